"""Quantized checkpoints audit as their dequantized weights, reading only the Q/K pieces.

Every checkpoint here is made by a quantizer independent of qkmonitor: compressed-tensors' own
compressor (FP8 and int4 pack-quantized), and GPTQ / AWQ int4 packing and FP8 block scaling
written below from the formats' definitions. The reference audit is that of a float checkpoint
holding the dequantized weights (the test's own dequantization, or compressed-tensors'
decompressor); the quantized checkpoint's audit must equal it.
"""

from __future__ import annotations

import copy
import json
import math
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from support.checks import one_line_error
from support.quantizers import fp8_block, linear_modules
from transformers import LlamaConfig, LlamaForCausalLM

import qkmonitor
from qkmonitor.errors import CorruptWeightsError, UnsupportedModelError
from qkmonitor.result import STATISTICS, AuditResult
from qkmonitor.weights.quantized import QuantizedSource
from qkmonitor.weights.sources import LocalSource

QK = ("q_proj", "k_proj")
PACK_ORDER_AWQ = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ: nibble p of a word holds column ORDER[p]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    """(config dict, float32 tensors) of a Llama whose MLP dwarfs Q/K; d_in = 80 so that
    blocks of 16 x 32 leave partial edge blocks."""
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=80, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=32, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("float")
    LlamaForCausalLM(config).save_pretrained(folder)
    config_dict = json.loads((folder / "config.json").read_text())
    return config_dict, load_file(folder / "model.safetensors")


def _write(folder: Path, config: dict, tensors: dict, quantization: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    values = dict(config, **({"quantization_config": quantization} if quantization else {}))
    (folder / "config.json").write_text(json.dumps(values))
    save_file({n: t.contiguous() for n, t in tensors.items()}, folder / "model.safetensors")
    return folder


def _assert_same(got: AuditResult, want: AuditResult, tolerance: float = 0.0) -> None:
    assert [(h.layer, h.head) for h in got.heads] == [(h.layer, h.head) for h in want.heads]
    for ours, theirs in zip(got.heads, want.heads, strict=True):
        for statistic in STATISTICS:
            a, b = getattr(ours, statistic), getattr(theirs, statistic)
            assert abs(a - b) <= tolerance * max(abs(b), 1e-3), (ours.layer, ours.head, statistic)


def _to_int32(values: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit patterns (int64) as the int32 a checkpoint stores."""
    return torch.where(values >= 2**31, values - 2**32, values).to(torch.int32)


def _pack(values: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """Pack the last dim, 32 / bits values per int32, value k (or order[k]) at bits k * bits."""
    per_word = 32 // bits
    grouped = values.to(torch.int64).reshape(*values.shape[:-1], -1, per_word)
    if order is not None:
        grouped = grouped[..., list(order)]
    shifts = torch.arange(per_word) * bits
    return _to_int32((grouped << shifts).sum(-1))


def _asymmetric_int4(w: torch.Tensor, group: torch.Tensor, n_groups: int, zero_floor: int):
    """Per (group of inputs, output) min-max int4: w (in, out) -> q, zero, scale (float16)."""
    lo = torch.stack([w[group == g].amin(0) for g in range(n_groups)]).clamp(max=0)
    hi = torch.stack([w[group == g].amax(0) for g in range(n_groups)]).clamp(min=0)
    scale = ((hi - lo) / 15).clamp_min(1e-8).half()
    zero = torch.round(-lo / scale.float()).clamp(zero_floor, 15).to(torch.int64)
    q = torch.round(w / scale.float()[group] + zero[group]).clamp(0, 15).to(torch.int64)
    dequantized = scale.double()[group] * (q - zero[group])  # (in, out), exact
    return q, zero, scale, dequantized


# ---------------------------------------------------------------------------------------------
# The formats' definitions, written out


def _gptq(tensors: dict, group_size: int, v2: bool, act_order: bool) -> tuple[dict, dict]:
    quantized, dequantized = dict(tensors), dict(tensors)
    generator = torch.Generator().manual_seed(3)
    for module in linear_modules(tensors):
        w = tensors[f"{module}.weight"].t()  # (in, out)
        n_in = w.shape[0]
        g_idx = torch.arange(n_in) // group_size
        if act_order:  # desc_act: groups follow a permutation of the inputs
            g_idx = g_idx[torch.randperm(n_in, generator=generator)]
        n_groups = math.ceil(n_in / group_size)
        # the original format stores zero - 1, so it cannot hold a zero of 0
        q, zero, scale, deq = _asymmetric_int4(w, g_idx, n_groups, zero_floor=0 if v2 else 1)
        quantized.pop(f"{module}.weight")
        quantized[f"{module}.qweight"] = _pack(q.t(), 4).t()  # inputs packed along dim 0
        quantized[f"{module}.qzeros"] = _pack(zero - (0 if v2 else 1), 4)
        quantized[f"{module}.scales"] = scale
        if act_order:  # else absent: input i is in group i // group_size
            quantized[f"{module}.g_idx"] = g_idx.to(torch.int32)
        dequantized[f"{module}.weight"] = deq.t()
    return quantized, dequantized


def _awq(tensors: dict, group_size: int) -> tuple[dict, dict]:
    quantized, dequantized = dict(tensors), dict(tensors)
    for module in linear_modules(tensors):
        w = tensors[f"{module}.weight"].t()  # (in, out)
        group = torch.arange(w.shape[0]) // group_size
        q, zero, scale, deq = _asymmetric_int4(w, group, int(group[-1]) + 1, zero_floor=0)
        quantized.pop(f"{module}.weight")
        quantized[f"{module}.qweight"] = _pack(q, 4, PACK_ORDER_AWQ)  # (in, out / 8)
        quantized[f"{module}.qzeros"] = _pack(zero, 4, PACK_ORDER_AWQ)
        quantized[f"{module}.scales"] = scale
        dequantized[f"{module}.weight"] = deq.t()
    return quantized, dequantized


def _compressed_tensors(config: dict, tensors: dict, weights: dict, fmt: str):
    """(quantized tensors, quantization_config, dequantized tensors) by compressed-tensors."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils import calculate_qparams

    model = LlamaForCausalLM(LlamaConfig(**config))
    model.load_state_dict(tensors, strict=False)
    args = QuantizationArgs(**weights)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    apply_quantization_config(
        model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"])
    )
    for module in model.modules():
        if hasattr(module, "weight_scale"):  # min-max calibration of the weight
            w = module.weight.detach()
            if args.strategy == "group":
                w = w.reshape(w.shape[0], -1, args.group_size)
            if args.strategy == "block":  # per block, partial edge blocks included
                (bo, bi), (rows, cols) = args.block_structure, w.shape
                blocks = [[w[i : i + bo, j : j + bi] for j in range(0, cols, bi)]
                          for i in range(0, rows, bo)]  # fmt: skip
                lo = torch.tensor([[float(b.min()) for b in row] for row in blocks])
                hi = torch.tensor([[float(b.max()) for b in row] for row in blocks])
            else:
                dims = {"tensor": None, "channel": -1, "group": -1}[args.strategy]
                lo = w.amin(dims) if dims else w.min().reshape(1)
                hi = w.amax(dims) if dims else w.max().reshape(1)
            scale, zero = calculate_qparams(lo, hi, args)
            module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
            if hasattr(module, "weight_zero_point"):
                module.weight_zero_point.data.copy_(zero.reshape(module.weight_zero_point.shape))
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=fmt)
    compressor.compress_model(model)
    quantized = {n: t.detach().clone() for n, t in model.state_dict().items()}
    quantization = compressor.quantization_config.model_dump(exclude=["quant_method"])
    quantization["quant_method"] = "compressed-tensors"
    decompressed = copy.deepcopy(model)
    compressor.decompress_model(decompressed)
    dequantized = {n: t.detach().clone() for n, t in decompressed.state_dict().items()}
    return quantized, json.loads(json.dumps(quantization, default=str)), dequantized


# ---------------------------------------------------------------------------------------------
# Audits


FORMATS = {
    "fp8-block": ({"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [16, 32]},
                  "fp8-block-16x32"),
    "gptq": ({"quant_method": "gptq", "bits": 4, "group_size": 16, "desc_act": True},
             "gptq-int4-g16"),
    "gptq-v2": ({"quant_method": "gptq", "bits": 4, "group_size": 16,
                 "checkpoint_format": "gptq_v2"}, "gptq_v2-int4-g16"),
    "awq": ({"quant_method": "awq", "bits": 4, "group_size": 16, "version": "gemm",
             "zero_point": True}, "awq-int4-g16"),
}  # fmt: skip


def _quantize(kind: str, tensors: dict) -> tuple[dict, dict]:
    if kind == "fp8-block":
        return fp8_block(tensors, (16, 32))
    if kind == "awq":
        return _awq(tensors, 16)
    return _gptq(tensors, 16, v2=kind == "gptq-v2", act_order=kind == "gptq")


@pytest.mark.parametrize("kind", FORMATS, ids=FORMATS)
def test_format_audits_as_its_dequantized_weights(base, tmp_path, kind):
    config, tensors = base
    quantization, storage = FORMATS[kind]
    quantized, dequantized = _quantize(kind, tensors)
    folder = _write(tmp_path / "q", config, quantized, quantization)
    got = qkmonitor.audit(folder)
    want = qkmonitor.audit(_write(tmp_path / "f", config, dequantized))
    _assert_same(got, want)  # the same float64 weights: identical numbers
    assert got.model.storage == storage and want.model.storage == "f64"
    # and the quantization is coarse enough that reading it wrong would show
    original = qkmonitor.audit(_write(tmp_path / "o", config, tensors))
    differences = [abs(a.eig_var - b.eig_var) / b.eig_var for a, b in
                   zip(got.heads, original.heads, strict=True)]  # fmt: skip
    assert 1e-5 < max(differences) < 0.5


CT_SCHEMES = {
    "fp8-channel": ({"num_bits": 8, "type": "float", "strategy": "channel"}, "float-quantized",
                    "compressed-tensors-fp8-channel"),
    "fp8-tensor": ({"num_bits": 8, "type": "float", "strategy": "tensor"}, "float-quantized",
                   "compressed-tensors-fp8-tensor"),
    "fp8-block": ({"num_bits": 8, "type": "float", "strategy": "block",
                   "block_structure": [16, 32]}, "float-quantized",
                  "compressed-tensors-fp8-block-16x32"),
    "int4-group-asym": ({"num_bits": 4, "type": "int", "strategy": "group", "group_size": 16,
                         "symmetric": False}, "pack-quantized",
                        "compressed-tensors-int4-group16"),
    "int4-channel": ({"num_bits": 4, "type": "int", "strategy": "channel"}, "pack-quantized",
                     "compressed-tensors-int4-channel"),
    "int8-channel": ({"num_bits": 8, "type": "int", "strategy": "channel"}, "int-quantized",
                     "compressed-tensors-int8-channel"),
}  # fmt: skip


@pytest.mark.parametrize("scheme", CT_SCHEMES.values(), ids=CT_SCHEMES)
def test_compressed_tensors_audit_as_their_decompressed_weights(base, tmp_path, scheme):
    config, tensors = base
    weights, fmt, storage = scheme
    quantized, quantization, dequantized = _compressed_tensors(config, tensors, weights, fmt)
    assert quantization["format"] == fmt
    folder = _write(tmp_path / "q", config, quantized, quantization)
    if fmt == "pack-quantized":
        assert "model.layers.0.self_attn.q_proj.weight_packed" in load_file(
            folder / "model.safetensors"
        )
    got = qkmonitor.audit(folder)
    # compressed-tensors dequantizes in the scale's float32; qkmonitor exactly, in float64
    _assert_same(got, qkmonitor.audit(_write(tmp_path / "f", config, dequantized)), 1e-6)
    assert got.model.storage == storage


def _piece_bytes(folder: Path) -> int:
    """Bytes of the Q/K tensors and their scales, zero points and group indices."""
    total = 0
    with safe_open(folder / "model.safetensors", "pt") as handle:
        for name in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
            if any(f".{projection}." in name for projection in QK):
                tensor = handle.get_tensor(name)
                total += tensor.numel() * tensor.element_size()
    return total


@pytest.mark.parametrize("kind", ["fp8-block", "gptq"])
def test_hub_audit_reads_only_the_qk_pieces(base, hub, fresh_hub_cache, tmp_path, kind):
    config, tensors = base
    quantized, _ = _quantize(kind, tensors)
    folder = _write(tmp_path / "q", config, quantized, FORMATS[kind][0])
    repo = f"qk/quantized-{kind}"
    hub.add_repo(repo, folder)
    hub.reset_counters()
    remote = qkmonitor.audit(repo)
    _assert_same(remote, qkmonitor.audit(folder))
    assert remote.model.storage == FORMATS[kind][1]
    sent = hub.file_bytes_sent(repo, "model.safetensors")
    with (folder / "model.safetensors").open("rb") as handle:
        header = 8 + struct.unpack("<Q", handle.read(8))[0]
    assert sent <= 1.1 * _piece_bytes(folder) + header
    assert sent < (folder / "model.safetensors").stat().st_size / 5


@pytest.mark.parametrize("kind", ["fp8-block", "gptq"])
def test_row_selection_equals_the_rows_of_the_whole_weight(base, tmp_path, kind):
    """FP8 decodes the selected rows alone (block scales of any row, partial blocks), reading
    only those rows of the weight; GPTQ packs along the inputs, so it is read whole and sliced."""
    config, tensors = base
    quantized, _ = _quantize(kind, tensors)
    source = QuantizedSource(LocalSource(_write(tmp_path, config, quantized, FORMATS[kind][0])))
    name = "model.layers.1.self_attn.q_proj.weight"  # (80, 80): 16-row blocks
    rows = [(5, 21), (40, 41), (70, 80)]
    whole = source.read([name])[name]
    got = source.read([name], {name: rows})[name]
    assert torch.equal(got, torch.cat([whole[a:b] for a, b in rows]))
    pieces = source.byte_size([name]) - source.byte_size([name], {name: rows})
    weight_bytes = 80 * 80 if kind == "fp8-block" else 0  # F8: one byte per element
    assert pieces == weight_bytes * (80 - 27) // 80


def test_source_presents_plain_names_and_reads_only_pieces(base, tmp_path):
    config, tensors = base
    quantized, dequantized = _gptq(tensors, 16, v2=False, act_order=True)
    source = QuantizedSource(LocalSource(_write(tmp_path / "q", config, quantized,
                                                FORMATS["gptq"][0])))  # fmt: skip
    name = "model.layers.1.self_attn.k_proj.weight"
    assert source.shapes()[name] == (40, 80) and source.dtypes()[name] == "F64"
    assert "model.layers.1.self_attn.k_proj.qweight" not in source.shapes()
    assert source.byte_size([name]) == sum(
        quantized[f"model.layers.1.self_attn.k_proj.{s}"].nbytes
        for s in ("qweight", "qzeros", "scales", "g_idx")
    )
    torch.testing.assert_close(source.read([name])[name], dequantized[name], rtol=0, atol=0)
    # unquantized tensors pass through
    norm = "model.layers.0.input_layernorm.weight"
    assert torch.equal(source.read([norm])[norm], tensors[norm])


REFUSED = {
    "bitsandbytes": ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "bitsandbytes"),
    "awq-gemv": ({"quant_method": "awq", "bits": 4, "group_size": 16, "version": "gemv"}, "gemv"),
    "gptq-3bit": ({"quant_method": "gptq", "bits": 3, "group_size": 16}, "3 bits"),
    "gptq-marlin": ({"quant_method": "gptq", "bits": 4, "group_size": 16,
                     "checkpoint_format": "marlin"}, "marlin"),
    "nvfp4": ({"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized",
               "config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 4,
               "type": "float", "strategy": "tensor_group", "group_size": 16}}}},
              "nvfp4-pack-quantized"),
}  # fmt: skip


@pytest.mark.parametrize("case", REFUSED.values(), ids=REFUSED)
def test_formats_it_cannot_read_are_refused_by_name(base, tmp_path, case):
    config, tensors = base
    quantization, name = case
    quantized, _ = _gptq(tensors, 16, v2=False, act_order=False)
    if quantization["quant_method"] == "compressed-tensors":  # stored as pack-quantized int4
        quantized, _, _ = _compressed_tensors(
            config, tensors, {"num_bits": 4, "type": "int", "strategy": "channel"},
            "pack-quantized",
        )  # fmt: skip
    folder = _write(tmp_path / "q", config, quantized, quantization)
    message = one_line_error(UnsupportedModelError, lambda: qkmonitor.audit(folder))
    assert name in message, message


def test_fp8_without_quantization_config_is_still_refused(base, tmp_path):
    config, tensors = base
    quantized, _ = fp8_block(tensors, (16, 32))
    folder = _write(tmp_path / "q", config, quantized)  # no quantization_config
    message = one_line_error(UnsupportedModelError, lambda: qkmonitor.audit(folder))
    assert "F8_E4M3" in message and "quantization_config" in message


def test_unreadable_weights_elsewhere_do_not_stop_the_audit(base, tmp_path):
    """A quantized tensor qkmonitor cannot read (here a 3-d expert stack) refuses only when an
    audit needs it; a Q/K weight whose scale does not fit is refused with its name."""
    config, tensors = base
    quantized, dequantized = fp8_block(tensors, (16, 32))
    quantized["model.layers.0.mlp.experts.weight"] = torch.zeros(2, 4, 4).to(torch.float8_e4m3fn)
    quantized["model.layers.0.mlp.experts.weight_scale_inv"] = torch.ones(2, 1, 1)
    folder = _write(tmp_path / "q", config, quantized, FORMATS["fp8-block"][0])
    _assert_same(
        qkmonitor.audit(folder), qkmonitor.audit(_write(tmp_path / "f", config, dequantized))
    )
    name = "model.layers.1.self_attn.k_proj.weight_scale_inv"
    quantized[name] = quantized[name][:1]
    folder = _write(tmp_path / "bad", config, quantized, FORMATS["fp8-block"][0])
    message = one_line_error(CorruptWeightsError, lambda: qkmonitor.audit(folder))
    assert "k_proj.weight" in message and "blocks" in message, message
