"""The audit engine on CPU, side by side in one run: audit times against the time to read the
same bytes, torch's threads against one thread, and TransformerLens's eigenvalue step.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/audit_engine.py \
        [--llama-layers 32] [--deepseek-layers 2] [--repeats 2] [--skip-transformer-lens]
        [--device cuda]   (also times the audits on that device: scripts/gpu_check.sh)

1. Llama-3-8B-shaped bf16 checkpoint (d_in 4096, 32 heads, 8 key heads, d_head 128; Q/K only):
   ``qkmonitor.audit(folder, device="cpu")`` in float64, with torch's threads and with one
   thread, runs alternated (after one warm-up audit), against reading every byte of the
   checkpoint (load_file + clone).
   With fewer than 32 layers the times are also extrapolated to 32 (printed as such).
2. DeepSeek-V3-shaped FP8 checkpoint (benchmarks/mla_fp8.py's sparse one): a few layers
   audited and read, extrapolated to its 61 layers (printed as such: a full run is ~9 min).
3. GPT-2-medium-shaped heads (24 layers x 16 heads, d 1024, d_head 64), the same random float64
   weights: ``qkmonitor.spectrum.head_spectra`` (six statistics and the eigenvalues) against
   TransformerLens's ``FactoredMatrix(W_Q, W_K^T).eigenvalues`` (eigenvalues only). Needs
   TransformerLens 3.9.0 without its declared dependencies (they pull wandb):
   ``pip install --no-deps transformer_lens==3.9.0 beartype better-abc einops fancy-einsum
   jaxtyping wadler-lindig typeguard`` (the ``bench`` extra names transformer_lens).

The machine's load average is printed: on a shared machine, compare only the ratios.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from audit_speed import write_llama_checkpoint
from mla_fp8 import write_checkpoint
from safetensors.torch import load_file

from qkmonitor import audit
from qkmonitor.spectrum import head_spectra

DEEPSEEK_LAYERS, LLAMA_LAYERS = 61, 32


def best(run: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def read_all(folder: Path) -> None:
    """Every byte of the folder's safetensors files (load_file maps lazily; clone reads)."""
    for shard in sorted(folder.glob("*.safetensors")):
        [t.clone() for t in load_file(shard).values()]


def audit_with(folder: Path, threads: int, device: str = "cpu") -> Callable[[], object]:
    def run() -> object:
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return audit(folder, device=device)
        finally:
            torch.set_num_threads(previous)

    return run


def audits_against_reads(
    name: str, folder: Path, layers: int, full: int, repeats: int, device: str
) -> None:
    threads = torch.get_num_threads()
    audit(folder, device=device)  # warm-up: imports, the plan's skeleton on meta, page cache
    runs: dict[str, list[float]] = {
        "read": [],
        f"audit, {threads} threads": [],
        "audit, 1 thread": [],
    }
    for _ in range(repeats):  # alternated, so that load changes hit each alike
        runs["read"].append(best(lambda: read_all(folder), 1))
        runs[f"audit, {threads} threads"].append(best(audit_with(folder, threads), 1))
        runs["audit, 1 thread"].append(best(audit_with(folder, 1), 1))
        if device != "cpu":
            runs[f"audit on {device}"] = [
                *runs.get(f"audit on {device}", []),
                best(audit_with(folder, threads, device), 1),
            ]
    read = min(runs["read"])
    scale = full / layers
    print(f"[{name}, {layers} of {full} layers, float64]")
    for label, times in runs.items():
        extrapolated = f"; x{scale:.1f} -> {min(times) * scale:.1f} s for {full} layers"
        print(
            f"    {label:<18} {min(times):7.2f} s ({min(times) / read:5.1f}x the read)"
            + (extrapolated if layers != full else "")
        )


def transformer_lens_ratio(repeats: int) -> None:
    try:
        from transformer_lens import FactoredMatrix
    except ImportError:
        print("[GPT-2-medium shapes] transformer_lens not installed (see this file's docstring)")
        return
    layers, heads, d_model, d_head = 24, 16, 1024, 64
    generator = torch.Generator().manual_seed(0)
    w_q = torch.randn(layers, heads, d_model, d_head, generator=generator, dtype=torch.float64)
    w_k = torch.randn(layers, heads, d_model, d_head, generator=generator, dtype=torch.float64)
    w_q, w_k = w_q * 0.02, w_k * 0.02
    scale = d_head**-0.5
    theirs = best(lambda: FactoredMatrix(w_q * scale, w_k.transpose(-1, -2)).eigenvalues, repeats)
    wq, wk = w_q.transpose(-1, -2), w_k.transpose(-1, -2)  # (layers, heads, d_head, d_model)
    ours = best(lambda: head_spectra(wq, wk, scale), repeats)
    mine = head_spectra(wq, wk, scale).eigvals
    lens = FactoredMatrix(w_q * scale, w_k.transpose(-1, -2)).eigenvalues

    def spectrum(z: torch.Tensor) -> torch.Tensor:
        return torch.sort(z.abs(), dim=-1).values

    radius = spectrum(mine)[..., -1:]
    differ = float(((spectrum(mine) - spectrum(lens)).abs() / radius).max())
    print(
        f"[GPT-2-medium shapes, {layers * heads} heads, float64] qkmonitor head_spectra "
        f"(6 statistics + eigenvalues) {ours:.3f} s, TransformerLens FactoredMatrix.eigenvalues "
        f"{theirs:.3f} s: {ours / theirs:.2f}x its time; eigenvalue magnitudes agree to "
        f"{differ:.1e} of the spectral radius"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--llama-layers", type=int, default=LLAMA_LAYERS)
    parser.add_argument("--deepseek-layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-transformer-lens", action="store_true")
    parser.add_argument(
        "--device", default="cpu", help="also time audits there (cuda: scripts/gpu_check.sh)"
    )
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS', 'unset')}, load average {os.getloadavg()[0]:.1f} "
        f"on {os.cpu_count()} cores"
    )
    with tempfile.TemporaryDirectory() as tmp:
        llama = Path(tmp, "llama")
        llama.mkdir()
        write_llama_checkpoint(llama, args.llama_layers)
        audits_against_reads("Llama-3-8B-shaped bf16", llama, args.llama_layers, LLAMA_LAYERS,
                             args.repeats, args.device)  # fmt: skip
        deepseek = Path(tmp, "deepseek")
        write_checkpoint(deepseek, args.deepseek_layers)
        audits_against_reads("DeepSeek-V3-shaped FP8", deepseek, args.deepseek_layers,
                             DEEPSEEK_LAYERS, args.repeats, args.device)  # fmt: skip
    if not args.skip_transformer_lens:
        transformer_lens_ratio(args.repeats)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
