"""What an audit will cost, from its plan alone: bytes to fetch and multiply-adds to compute.

A front end that must answer within a limit (the QK Audit Space) estimates an audit before it
reads any weight byte: `audit_cost(source, layers)` from the plan (``weights.discovery.plan``)
and the safetensors headers, then `Throughput.seconds` with the rates measured on its own
hardware (`Throughput.measured`, e.g. from a small warm-up audit).

The multiply-add counts are those of ``qkmonitor.spectrum.head_spectra``: every matrix product
it makes, counted from the shapes alone (``FactoredHeads.multiply_adds``, equal to torch's flop
counter; multi-head latent attention through its Gram matrices), plus the small eigensolvers on
d_head x d_head matrices, which no flop counter sees (about `EIGEN_FACTOR` d_head³ per head).
The measured throughput absorbs the remaining constant.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from qkmonitor.spectrum import FactoredHeads, head_spectra
from qkmonitor.weights.layout import AttentionLayer, layer_tensors
from qkmonitor.weights.sources import WeightSource

__all__ = [
    "EIGEN_FACTOR",
    "AuditCost",
    "Throughput",
    "audit_cost",
    "layer_multiply_adds",
    "layer_products",
    "probe_rate",
]

#: multiply-adds of the eigen steps per d_head³: the non-symmetric eigenvalues (Hessenberg
#: reduction and QR iterations, about 10 n³ flops), and for the spectral norm a Cholesky
#: factor (n³ / 3) and one symmetric eigenvalue problem (4/3 n³); 12 when the spectral norm
#: took a second eigendecomposition (9 n³), scaled by the flops saved
EIGEN_FACTOR = 7.0


@dataclass(frozen=True)
class AuditCost:
    """The size of one audit."""

    bytes: int  # to fetch: the Q/K tensors (and norms, scales, MLA latents) from the headers
    multiply_adds: float  # to compute every head's statistics
    layers: int
    heads: int


@dataclass(frozen=True)
class Throughput:
    """Rates of one machine: bytes read per second, multiply-adds per second on heads of a
    real model's size, and a fixed time per head (splitting, small eigenproblems, results)."""

    bytes_per_second: float
    multiply_adds_per_second: float
    seconds_per_head: float = 0.0

    @classmethod
    def measured(
        cls, cost: AuditCost, compute_seconds: float, bytes_per_second: float
    ) -> Throughput:
        """This machine's rates: the multiply-add rate of `probe_rate` (heads of a 2k-wide
        model), and the per-head time that an audit of `cost` taking `compute_seconds` (reads
        excluded; a small model: mostly per-head time) adds to it; the read rate is measured
        or assumed separately."""
        if compute_seconds <= 0 or bytes_per_second <= 0 or cost.heads <= 0:
            raise ValueError("measured times, rates and head counts must be positive")
        rate = probe_rate()
        per_head = max(0.0, compute_seconds - cost.multiply_adds / rate) / cost.heads
        return cls(bytes_per_second, rate, per_head)

    def seconds(self, cost: AuditCost) -> float:
        """Estimated wall time of reading, then computing (reads and compute not overlapped:
        an upper bound where they are)."""
        compute = cost.multiply_adds / self.multiply_adds_per_second
        return cost.bytes / self.bytes_per_second + compute + cost.heads * self.seconds_per_head


def probe_rate(heads: int = 8, head_dim: int = 128, d_in: int = 2048) -> float:
    """Multiply-adds per second of ``head_spectra`` on random float64 heads of this shape
    (about 1e9 multiply-adds: under a second on one 2020s CPU core), after one run that warms
    it. The rate of small models' heads is several times lower (measured 3.8e8 against 1.5e9
    on a Llama-8B-shaped layer, one core), so it would overstate big audits."""
    generator = torch.Generator().manual_seed(0)
    wq = torch.randn(heads, head_dim, d_in, generator=generator, dtype=torch.float64)
    wk = torch.randn(heads // 2, head_dim, d_in, generator=generator, dtype=torch.float64)
    layer = _dense_products(heads, heads // 2, head_dim, d_in) + heads * EIGEN_FACTOR * head_dim**3
    head_spectra(wq[:1], wk[:1], 1.0)
    start = time.perf_counter()
    head_spectra(wq, wk, head_dim**-0.5)
    return layer / max(time.perf_counter() - start, 1e-9)


def _meta(*shape: int) -> torch.Tensor:
    return torch.empty(shape, device="meta")


def _dense_products(heads: int, kv_heads: int, head_dim: int, d_in: int) -> int:
    q, k = _meta(heads, head_dim, d_in), _meta(kv_heads, head_dim, d_in)
    return FactoredHeads(q, k, None, None).multiply_adds()


def layer_products(layer: AttentionLayer) -> int:
    """The matrix-product multiply-adds of one planned layer's statistics, from its shapes
    alone (``FactoredHeads.multiply_adds``; the small eigensolvers not included)."""
    if layer.mla is None:
        products = _dense_products(layer.n_heads, layer.n_kv_heads, layer.head_dim, layer.d_in)
        if layer.q_pre:  # per-head (d, mid) @ (mid, d_in) before the statistics
            mid = layer.q_pre_rank or layer.n_heads * layer.head_dim
            products += layer.n_heads * layer.head_dim * mid * layer.d_in
        if layer.k_pre:  # Aria's keys likewise
            mid = layer.n_heads * layer.head_dim
            products += layer.n_kv_heads * layer.head_dim * mid * layer.d_in
        return products
    dims, n = layer.mla.dims, layer.d_in
    rank = dims.q_lora_rank
    r_k = dims.kv_lora_rank + dims.qk_rope_head_dim  # the shared RoPE key rows join the latent
    heads = FactoredHeads(
        _meta(dims.num_heads, dims.head_dim, rank or n),
        _meta(dims.num_heads, dims.head_dim, r_k),
        _meta(rank, n) if rank else None,
        _meta(r_k, n),
    )
    return heads.multiply_adds()


def layer_multiply_adds(layer: AttentionLayer) -> float:
    """Multiply-adds of one layer's statistics: its matrix products and, per head, the
    eigensolvers' estimated `EIGEN_FACTOR` d_head³."""
    return layer_products(layer) + layer.n_heads * EIGEN_FACTOR * layer.head_dim**3


def audit_cost(source: WeightSource, layers: Sequence[AttentionLayer]) -> AuditCost:
    """Bytes and multiply-adds of auditing `layers` (a plan of `source`), from headers only:
    nothing but what `source` already knows is read."""
    layers = list(layers)
    rows = {name: r for layer in layers for name, r in layer.rows.items()}
    return AuditCost(
        bytes=source.byte_size(layer_tensors(layers), rows),
        multiply_adds=float(sum(layer_multiply_adds(layer) for layer in layers)),
        layers=len(layers),
        heads=sum(layer.n_heads for layer in layers),
    )
