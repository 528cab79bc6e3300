"""The Space's admission estimate against measured compute, side by side in this process.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/cost_model.py

For random float64 heads of several shapes (all-MiniLM-L6-v2's, a 1k-wide model's, a
Llama-3-8B layer's), the time of ``qkmonitor.spectrum.head_spectra`` against the estimate
``qkmonitor.cost`` makes from the probe rate (`probe_rate`, measured once here) and the layer's
multiply-adds. Ratios near 1 mean the estimate holds; a small model's heads run below the probe
rate (their per-head time is what `Throughput.measured` adds from the warm-up audit).
"""

from __future__ import annotations

import time

import torch

from qkmonitor.cost import EIGEN_FACTOR, probe_rate
from qkmonitor.spectrum import FactoredHeads, head_spectra

SHAPES = {  # name: (query heads, key heads, d_head, d_in)
    "all-MiniLM-L6-v2 layer": (12, 12, 32, 384),
    "1k-wide layer": (16, 16, 64, 1024),
    "Llama-3-8B layer": (32, 8, 128, 4096),
}


def _seconds(heads: int, kv: int, d_head: int, d_in: int, repeats: int = 2) -> float:
    generator = torch.Generator().manual_seed(0)
    wq = torch.randn(heads, d_head, d_in, generator=generator, dtype=torch.float64)
    wk = torch.randn(kv, d_head, d_in, generator=generator, dtype=torch.float64)
    head_spectra(wq, wk, d_head**-0.5)  # warm
    start = time.perf_counter()
    for _ in range(repeats):
        head_spectra(wq, wk, d_head**-0.5)
    return (time.perf_counter() - start) / repeats


def main() -> None:
    rate = probe_rate()
    print(f"probe rate: {rate:.3g} multiply-adds/s ({torch.get_num_threads()} threads)")
    print(f"{'shape':<24} {'measured s':>11} {'estimate s':>11} {'estimate/measured':>18}")
    for name, (heads, kv, d_head, d_in) in SHAPES.items():
        meta = [torch.empty(h, d_head, d_in, device="meta") for h in (heads, kv)]
        products = FactoredHeads(*meta, None, None).multiply_adds()
        madds = products + heads * EIGEN_FACTOR * d_head**3
        measured = _seconds(heads, kv, d_head, d_in)
        estimate = madds / rate
        print(f"{name:<24} {measured:>11.3f} {estimate:>11.3f} {estimate / measured:>18.2f}")


if __name__ == "__main__":
    main()
