"""A DeepSeek-V3-shaped MLA audit of an FP8 block-scaled checkpoint: time and bytes read.

    python benchmarks/mla_fp8.py [--folder /tmp/qkmonitor-mla-fp8] [--layers 61] [--threads 2]

DeepSeek-V3's attention shapes (d_in 7168, 128 heads, q_lora_rank 1536, kv_lora_rank 512,
no-RoPE 128 + RoPE 64 per head, YaRN factor 40) with its storage (F8_E4M3 weights, float32
``weight_scale_inv`` per 128 x 128 block). The folder is written once, sparsely: only the
tensors an audit reads (q_a_proj, q_a_layernorm, q_b_proj, kv_a_proj_with_mqa, kv_a_layernorm,
kv_b_proj and their scales; no MLP, experts or embeddings), random values. The audit goes through
``qkmonitor.audit`` when the planner knows MLA; otherwise (said in the output) through the same
building blocks it would use: QuantizedSource (reads and dequantizes), mla_heads (factored heads
through the latents), head_spectra. Times include reading from the (warm) page cache.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch

import qkmonitor
from qkmonitor.errors import UnsupportedModelError
from qkmonitor.spectrum import head_spectra
from qkmonitor.weights.mla import MLADims, MLANames, mla_heads
from qkmonitor.weights.quantized import QuantizedSource
from qkmonitor.weights.sources import LocalSource

BLOCK = 128
CONFIG = {
    "model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"], "hidden_size": 7168,
    "num_attention_heads": 128, "num_key_value_heads": 128, "q_lora_rank": 1536,
    "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "intermediate_size": 18432, "moe_intermediate_size": 2048, "n_routed_experts": 256,
    "n_shared_experts": 1, "num_experts_per_tok": 8, "first_k_dense_replace": 3,
    "vocab_size": 129280, "max_position_embeddings": 163840, "rms_norm_eps": 1e-6,
    "rope_scaling": {"type": "yarn", "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
                     "rope_theta": 10000},
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                            "weight_block_size": [BLOCK, BLOCK]},
}  # fmt: skip


def layer_shapes(layer: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, safetensors dtype) of one layer's Q/K path."""
    c, prefix = CONFIG, f"model.layers.{layer}.self_attn."
    head = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    linears = {
        "q_a_proj": (c["q_lora_rank"], c["hidden_size"]),
        "q_b_proj": (c["num_attention_heads"] * head, c["q_lora_rank"]),
        "kv_a_proj_with_mqa": (c["kv_lora_rank"] + c["qk_rope_head_dim"], c["hidden_size"]),
        "kv_b_proj": (
            c["num_attention_heads"] * (c["qk_nope_head_dim"] + c["v_head_dim"]),
            c["kv_lora_rank"],
        ),
    }
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for name, shape in linears.items():
        out[f"{prefix}{name}.weight"] = (shape, "F8_E4M3")
        blocks = tuple(math.ceil(n / BLOCK) for n in shape)
        out[f"{prefix}{name}.weight_scale_inv"] = (blocks, "F32")
    out[f"{prefix}q_a_layernorm.weight"] = ((c["q_lora_rank"],), "BF16")
    out[f"{prefix}kv_a_layernorm.weight"] = ((c["kv_lora_rank"],), "BF16")
    return out


def _values(shape: tuple[int, ...], dtype: str, generator: torch.Generator) -> torch.Tensor:
    if dtype == "F8_E4M3":  # random bytes with the top exponent bit clear: |w| <= 1.875, no NaN
        raw = torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8)
        return raw.bitwise_and_(0b1011_1111).view(torch.float8_e4m3fn)
    if dtype == "F32":  # block scales
        return torch.rand(shape, generator=generator).mul_(0.01).add_(0.01)
    return torch.rand(shape, generator=generator).add_(0.5).bfloat16()


def write_checkpoint(folder: Path, layers: int) -> int:
    """The sparse checkpoint (one safetensors file, streamed tensor by tensor); its size."""
    folder.mkdir(parents=True, exist_ok=True)
    config = dict(CONFIG, num_hidden_layers=layers)
    target = folder / "model.safetensors"
    if (
        (folder / "config.json").is_file()
        and json.loads((folder / "config.json").read_text()) == config
        and target.is_file()
    ):
        return target.stat().st_size
    specs = {name: spec for layer in range(layers) for name, spec in layer_shapes(layer).items()}
    sizes = {"F8_E4M3": 1, "F32": 4, "BF16": 2}
    header, offset = {}, 0
    for name, (shape, dtype) in specs.items():
        length = math.prod(shape) * sizes[dtype]
        header[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + length],
        }
        offset += length
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    generator = torch.Generator().manual_seed(0)
    with target.open("wb") as out:
        out.write(len(raw).to_bytes(8, "little") + raw)
        for shape, dtype in specs.values():
            out.write(_values(shape, dtype, generator).contiguous().view(torch.uint8).numpy().data)
    (folder / "config.json").write_text(json.dumps(config))
    return target.stat().st_size


def audit_by_blocks(folder: Path, dtype: torch.dtype) -> tuple[list, float, float, int, str]:
    """(per-layer spectra, read seconds, statistics seconds, bytes read, storage)."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention

    source = QuantizedSource(LocalSource(folder))
    config = source.config
    with torch.device("meta"):
        scale = float(DeepseekV3Attention(config, 0).scaling)  # the module's, YaRN's mscale in
    dims = MLADims.from_config(config)
    read_time = stats_time = 0.0
    total, spectra = 0, []
    for layer in range(config.num_hidden_layers):
        names = MLANames.of_module(f"model.layers.{layer}.self_attn", q_lora=True)
        start = time.perf_counter()
        tensors = source.read(names.tensors)
        total += source.byte_size(names.tensors)
        read_time += time.perf_counter() - start
        start = time.perf_counter()
        spectra.append(head_spectra(mla_heads(tensors, names, dims, scale), dtype=dtype))
        stats_time += time.perf_counter() - start
    storage = source.storage_of(
        [n for n in source.shapes() if n.endswith("proj.weight") or "kv_a_proj" in n]
    )
    return spectra, read_time, stats_time, total, storage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=Path("/tmp/qkmonitor-mla-fp8"))
    parser.add_argument("--layers", type=int, default=61)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    start = time.perf_counter()
    size = write_checkpoint(args.folder, args.layers)
    print(f"checkpoint: {args.folder} ({size / 1e9:.2f} GB, written or reused in "
          f"{time.perf_counter() - start:.0f} s)")  # fmt: skip
    start = time.perf_counter()
    try:
        result = qkmonitor.audit(args.folder, dtype=dtype)
        wall = time.perf_counter() - start
        heads = len(result.heads)
        print(f"qkmonitor.audit: {heads} heads in {wall:.1f} s, storage {result.model.storage}")
        return
    except UnsupportedModelError as error:
        print(f"qkmonitor.audit refused ({error}); auditing through the building blocks")
    start, cpu = time.perf_counter(), time.process_time()
    spectra, read_time, stats_time, total, storage = audit_by_blocks(args.folder, dtype)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    heads = sum(int(s.eig_var.numel()) for s in spectra)
    finite = all(bool(s.finite.all()) for s in spectra)
    print(f"{args.layers} layers, {heads} heads ({args.dtype}, {args.threads} threads): "
          f"{wall:.1f} s = read + dequantize {read_time:.1f} s + statistics {stats_time:.1f} s "
          f"({wall / args.layers:.1f} s per layer); all finite: {finite}")  # fmt: skip
    print(f"CPU time {cpu:.0f} s; load average at the end {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores")  # fmt: skip
    print(f"bytes read: {total / 1e9:.3f} GB of {size / 1e9:.3f} GB written; storage {storage}")


if __name__ == "__main__":
    main()
