"""A DeepSeek-V3-shaped MLA audit of an FP8 block-scaled checkpoint: time and bytes read.

    python benchmarks/mla_fp8.py [--folder /tmp/qkmonitor-mla-fp8] [--layers 61] [--threads 2]

DeepSeek-V3's attention shapes (d_in 7168, 128 heads, q_lora_rank 1536, kv_lora_rank 512,
no-RoPE 128 + RoPE 64 per head, YaRN factor 40) with its storage (F8_E4M3 weights, float32
``weight_scale_inv`` per 128 x 128 block). The folder is written once, sparsely: only the
tensors an audit reads (q_a_proj, q_a_layernorm, q_b_proj, kv_a_proj_with_mqa, kv_a_layernorm,
kv_b_proj and their scales; no MLP, experts or embeddings), random values. The audit is
``qkmonitor.audit``'s own (``audit_source``: plan on meta, FP8 dequantized, heads factored through
the latents) on a local source that counts the bytes it reads. Times include reading from the
(warm) page cache.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch

from qkmonitor.audit import audit_source
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


class CountingSource(LocalSource):
    """A local source that counts the bytes it reads from its safetensors files."""

    bytes_read = 0

    def _read_range(self, file: str, start: int, end: int) -> bytearray:
        self.bytes_read += end - start
        return super()._read_range(file, start, end)


def needed_bytes(layers: int) -> int:
    """Bytes of the Q/K path: every tensor of layer_shapes, but only the key rows of
    kv_b_proj's weight (qk_nope_head_dim of each head's qk_nope_head_dim + v_head_dim rows)."""
    sizes, c, total = {"F8_E4M3": 1, "F32": 4, "BF16": 2}, CONFIG, 0
    for layer in range(layers):
        for name, (shape, dtype) in layer_shapes(layer).items():
            length = math.prod(shape) * sizes[dtype]
            if name.endswith("kv_b_proj.weight"):
                nope = c["qk_nope_head_dim"]
                length = length * nope // (nope + c["v_head_dim"])
            total += length
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=Path("/tmp/qkmonitor-mla-fp8"))
    parser.add_argument("--layers", type=int, default=61)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    parser.add_argument("--progress", action="store_true", help="show the progress bar")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    start = time.perf_counter()
    size = write_checkpoint(args.folder, args.layers)
    print(f"checkpoint: {args.folder} ({size / 1e9:.2f} GB, written or reused in "
          f"{time.perf_counter() - start:.0f} s)")  # fmt: skip
    source = CountingSource(args.folder)  # opening reads the header, not counted
    start, cpu = time.perf_counter(), time.process_time()
    result = audit_source(source, dtype=dtype, progress=args.progress)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    finite = all(h.finite for h in result.heads)
    print(
        f"{args.layers} layers, {len(result.heads)} heads ({args.dtype}, {args.threads} "
        f"threads), storage {result.model.storage}: {wall:.1f} s wall "
        f"({wall / args.layers:.1f} s per layer), {cpu:.0f} s CPU; all finite: {finite}"
    )
    print(f"load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"tensor bytes read: {source.bytes_read / 1e9:.3f} GB of "
          f"{size / 1e9:.3f} GB written; the Q/K path needs {needed_bytes(args.layers) / 1e9:.3f}"
          " GB (kv_b_proj's key rows only)")  # fmt: skip


if __name__ == "__main__":
    main()
