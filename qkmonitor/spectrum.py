"""Exact QK-eigenspectrum statistics of attention heads, without forming W^h.

For query head h (docs/metrics.md), with A = W_Q^h and B = W_K^h the (d_head x d_in) slices of
the query and key projections and s the softmax scale,

    W = s * A^T B                               (d_in x d_in, rank <= d_head)

is the bilinear form of the content-content logit x_i^T W x_j. Every statistic below is computed
from three d_head x d_head matrices, never from the d_in x d_in W:

    M   = s * B A^T        eig(AB) = eig(BA) plus zeros: W = (s A^T) B and M = B (s A^T) share
                           their non-zero eigenvalues, so M gives the <= d_head non-zero
                           eigenvalues of W exactly, and tr(W) = tr(M), tr(W^2) = tr(M^2).
    G_Q = A A^T, G_K = B B^T
                           ||W||_F^2 = s^2 tr(B^T A A^T B) = s^2 tr(G_Q G_K) = s^2 <G_Q, G_K>.
                           The singular values of A^T B are the square roots of the eigenvalues
                           of G_Q^1/2 G_K G_Q^1/2 (same non-zero spectrum as G_K G_Q), so the
                           spectral norm needs only a d_head x d_head symmetric eigenproblem.

With n = d_in and S = (W + W^T) / 2:

    eig_mean        = tr(W) / n = tr(M) / n
    eig_var         = ||S||_F^2 / n - eig_mean^2,  ||S||_F^2 = (||W||_F^2 + tr(W^2)) / 2
    eig_var_complex = mean over all n eigenvalues of |lambda - eig_mean|^2
                    = sum |lambda_i(M)|^2 / n - eig_mean^2   (eig_mean is real; zeros add 0)
    eig_concentration = eig_mean / sqrt(||S||_F^2 / n) = eig_mean / sqrt(eig_var + eig_mean^2)
                    in [-1, 1] (tr(S) = tr(W), so eig_mean is also the mean eigenvalue of S and
                    Cauchy-Schwarz bounds it by their RMS); scale-free; NaN where S = 0

Cost per head: three (d_head x d_in) @ (d_in x d_head) products, O(d_in d_head^2), instead of
O(d_in^3) for an eigendecomposition of W. Grouped-query attention is handled without copying
keys: query head h uses key head h // (n_heads / n_kv_heads).

All functions are pure: tensors in, tensors out, any leading batch dimensions (layers, ...).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "HeadMoments",
    "HeadSpectra",
    "eig_concentration",
    "eig_var_gradient",
    "head_moments",
    "head_spectra",
    "trace_statistics",
]


@dataclass(frozen=True)
class HeadSpectra:
    """Statistics of a batch of heads; every field has shape (..., n_heads) unless noted."""

    eig_mean: Tensor
    eig_var: Tensor
    #: eig_mean / sqrt(eig_var + eig_mean^2), in [-1, 1]; NaN where the symmetric part is 0
    eig_concentration: Tensor
    eig_var_complex: Tensor
    spectral_norm: Tensor
    #: fraction of eigenvalue magnitude sum(|lambda|) carried by eigenvalues with Re > 0
    positive_fraction: Tensor
    #: (..., n_heads, d_head) complex: the non-zero eigenvalues of W^h (and zeros of M's kernel)
    eigvals: Tensor
    #: (..., n_heads) bool: False where a head's Q or K weights hold NaN or Inf
    finite: Tensor


def _group_queries(wq: Tensor, n_kv_heads: int) -> Tensor:
    """(..., H, d, n) -> (..., Hkv, H/Hkv, d, n): query heads grouped under their key head."""
    *batch, n_heads, d_head, d_in = wq.shape
    if n_heads % n_kv_heads:
        raise ValueError(f"{n_heads} query heads cannot share {n_kv_heads} key heads evenly")
    return wq.reshape(*batch, n_kv_heads, n_heads // n_kv_heads, d_head, d_in)


def _factors(wq: Tensor, wk: Tensor, scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """M = s B A^T, G_Q = A A^T, G_K = B B^T per query head, each (..., H, d, d).

    wq: (..., H, d, n); wk: (..., Hkv, d, n); scale: broadcastable to (..., H).
    Keys are never repeated: each key head multiplies its group of query heads at once.
    """
    *batch, n_heads, d_head, d_in = wq.shape
    n_kv = wk.shape[-3]
    group = n_heads // n_kv
    grouped = _group_queries(wq, n_kv).reshape(*batch, n_kv, group * d_head, d_in)
    kq = wk @ grouped.transpose(-1, -2)  # (..., Hkv, d, g d)
    kq = kq.reshape(*batch, n_kv, d_head, group, d_head).transpose(-3, -2)  # (..., Hkv, g, d, d)
    m = kq.reshape(*batch, n_heads, d_head, d_head) * scale[..., None, None]
    g_q = wq @ wq.transpose(-1, -2)  # (..., H, d, d)
    g_k = (wk @ wk.transpose(-1, -2)).repeat_interleave(group, dim=-3)  # (..., H, d, d)
    return m, g_q, g_k


def _as_scale(scale: Tensor | float, like: Tensor) -> Tensor:
    return torch.as_tensor(scale, dtype=like.dtype, device=like.device)


def trace_statistics(
    wq: Tensor, wk: Tensor, scale: Tensor | float, *, dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor]:
    """(eig_mean, eig_var) per query head from traces only: cheap and differentiable.

    wq: (..., H, d_head, d_in) query weights per head; wk: (..., Hkv, d_head, d_in) key weights
    per key head; scale: the softmax scale, a float or broadcastable to (..., H).
    dtype: computation dtype (default: the inputs' dtype, at least float32; autocast is
    disabled inside, so bf16 training never lowers the precision of this sum).
    Returns two (..., H) tensors. This is the regularizer's quantity (docs/metrics.md).
    """
    dtype = dtype or torch.promote_types(wq.dtype, torch.float32)
    with torch.autocast(wq.device.type, enabled=False):
        wq, wk = wq.to(dtype), wk.to(dtype)
        s = _as_scale(scale, wq)
        return _moments(*_factors(wq, wk, s), s, wq.shape[-1])


def _moments(m: Tensor, g_q: Tensor, g_k: Tensor, s: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """(eig_mean, eig_var) from the factors of _factors; n = d_in."""
    mean = m.diagonal(dim1=-2, dim2=-1).sum(-1) / n  # tr(W) / n
    frob_sq = (g_q * g_k).sum((-2, -1)) * s**2  # ||W||_F^2
    trace_sq = (m * m.transpose(-1, -2)).sum((-2, -1))  # tr(W^2)
    return mean, (frob_sq + trace_sq) / (2 * n) - mean**2


def eig_concentration(eig_mean: Tensor, eig_var: Tensor) -> Tensor:
    """eig_mean in units of the RMS eigenvalue of the symmetric part: mean / sqrt(var + mean^2).

    In [-1, 1]: +-1 when every eigenvalue of S equals the (non-zero) mean, 0 for a zero-mean
    spread, sqrt(r / n) for r equal non-zero eigenvalues and n - r zeros. For W of rank r
    (r <= d_head) |value| <= sqrt(r / n): with P the projector onto range(W), tr(W) = tr(PW) =
    <P, S> (P is symmetric, W - S antisymmetric) <= ||P||_F ||S||_F = sqrt(r) ||S||_F.
    Unchanged by W -> cW for c > 0 (the sign flips for c < 0). NaN where
    eig_var + eig_mean^2 = ||S||_F^2 / n is 0 (or NaN), as for a zero head.
    """
    second = eig_var.clamp_min(0) + eig_mean.square()
    ratio = eig_mean / second.sqrt()
    nan = torch.full_like(ratio, float("nan"))
    # rounding can put |mean| one ulp above the RMS; the bound itself is exact
    return torch.where(second > 0, ratio.clamp(-1.0, 1.0), nan)


def eig_var_gradient(
    wq: Tensor, wk: Tensor, scale: Tensor | float, weights: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Gradient of sum_h c_h eig_var_h with respect to wq and wk, in closed form.

    wq: (..., H, d, n); wk: (..., Hkv, d, n); scale as in ``trace_statistics``; weights: c,
    broadcastable to (..., H) (default: all ones). Computed in the inputs' dtype (at least
    float32), autocast off, no autograd. With A, B, M, G_Q, G_K of the module docstring and
    mean = tr(M) / n,

        eig_var = (s^2 <G_Q, G_K> + tr(M^2)) / (2n) - mean^2

    and, from d<G_Q, G_K> = 2 <G_K A, dA>, d tr(M^2) = 2 s <M B, dA>, d mean = (s / n) <B, dA>
    (and symmetrically in B, with M^T A in place of M B):

        d eig_var / dA = (s / n) (s G_K A + (M - 2 mean I) B)
        d eig_var / dB = (s / n) (s G_Q B + (M^T - 2 mean I) A)

    A key head's gradient sums over the query heads of its group. Same O(H d^2 n) products as
    the statistics themselves, and no autograd graph to record or replay.
    """
    dtype = torch.promote_types(wq.dtype, torch.float32)
    with torch.no_grad(), torch.autocast(wq.device.type, enabled=False):
        wq, wk = wq.to(dtype), wk.to(dtype)
        *batch, n_heads, d_head, d_in = wq.shape
        n_kv = wk.shape[-3]
        group = n_heads // n_kv
        s = _as_scale(scale, wq).expand(*batch, n_heads)
        c = torch.ones_like(s) if weights is None else _as_scale(weights, wq).expand_as(s)
        m, g_q, g_k = _factors(wq, wk, s)
        mean = m.diagonal(dim1=-2, dim2=-1).sum(-1) / d_in
        eye = torch.eye(d_head, dtype=dtype, device=wq.device)
        shifted = m - 2 * mean[..., None, None] * eye  # M - 2 mean I, (..., H, d, d)
        s4, coef = s[..., None, None], (c * s / d_in)[..., None, None]

        def by_group(x: Tensor) -> Tensor:  # (..., H, a, b) -> (..., Hkv, g, a, b)
            return x.reshape(*batch, n_kv, group, *x.shape[-2:])

        a = _group_queries(wq, n_kv)  # (..., Hkv, g, d, n)
        grad_a = by_group(coef) * (by_group(s4 * g_k) @ a + by_group(shifted) @ wk[..., None, :, :])
        # B: the group's sum of coef (s G_Q B + (M^T - 2 mean I) A), as two products
        gram = by_group(coef * s4 * g_q).sum(-3)  # (..., Hkv, d, d)
        mixed = by_group(coef * shifted.mT).transpose(-3, -2)  # (..., Hkv, d, g, d)
        mixed = mixed.reshape(*batch, n_kv, d_head, group * d_head)
        grad_b = gram @ wk + mixed @ a.reshape(*batch, n_kv, group * d_head, d_in)
        return grad_a.reshape(wq.shape), grad_b


def _eigvals(m: Tensor) -> Tensor:
    """torch.linalg.eigvals of (..., d, d), the batch split over torch's CPU threads.

    LAPACK's geev on one small matrix runs on one core, and torch loops over the batch, so on
    CPU the nonsymmetric eigenproblems alone would leave the other cores idle (measured on
    Llama-8B heads, 2 cores: 0.16 s -> 0.10 s per layer of 32 heads).
    """
    threads = torch.get_num_threads()
    flat = m.reshape(-1, *m.shape[-2:])
    if m.device.type != "cpu" or threads < 2 or flat.shape[0] < 2:
        return torch.linalg.eigvals(m)
    with ThreadPoolExecutor(threads) as pool:
        parts = list(pool.map(torch.linalg.eigvals, flat.chunk(threads)))
    return torch.cat(parts).reshape(m.shape[:-1])


def _finite_factors(wq: Tensor, wk: Tensor, s: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """_factors, plus which heads have finite weights (the others computed on zeros)."""
    m, g_q, g_k = _factors(wq, wk, s)
    # A row holding NaN/Inf has a non-finite squared norm: the Gram diagonals tell which
    # heads are affected without another pass over the weights.
    finite = g_q.diagonal(dim1=-2, dim2=-1).isfinite().all(-1) & (
        g_k.diagonal(dim1=-2, dim2=-1).isfinite().all(-1)
    )
    if not bool(finite.all()):
        wq = torch.nan_to_num(wq, nan=0.0, posinf=0.0, neginf=0.0)
        wk = torch.nan_to_num(wk, nan=0.0, posinf=0.0, neginf=0.0)
        m, g_q, g_k = _factors(wq, wk, s)
    return m, g_q, g_k, finite


@dataclass(frozen=True)
class HeadMoments:
    """eig_mean, eig_var and eig_concentration of a batch of heads, shape (..., n_heads); NaN
    where not finite."""

    eig_mean: Tensor
    eig_var: Tensor
    eig_concentration: Tensor
    finite: Tensor


def head_moments(
    wq: Tensor, wk: Tensor, scale: Tensor | float, *, dtype: torch.dtype = torch.float64
) -> HeadMoments:
    """eig_mean, eig_var and eig_concentration exactly as ``head_spectra`` computes them, without
    its eigendecompositions (an order of magnitude cheaper for small heads). Same arguments."""
    with torch.no_grad():
        wq, wk = wq.to(dtype), wk.to(dtype)
        s = _as_scale(scale, wq)
        m, g_q, g_k, finite = _finite_factors(wq, wk, s)
        mean, var = _moments(m, g_q, g_k, s, wq.shape[-1])
        nan = torch.tensor(float("nan"), dtype=dtype, device=wq.device)
        mean, var = torch.where(finite, mean, nan), torch.where(finite, var.clamp_min(0), nan)
        return HeadMoments(mean, var, eig_concentration(mean, var), finite)


def head_spectra(
    wq: Tensor, wk: Tensor, scale: Tensor | float, *, dtype: torch.dtype = torch.float64
) -> HeadSpectra:
    """Every statistic of docs/metrics.md for a batch of heads, exactly, in ``dtype`` (float64).

    wq: (..., H, d_head, d_in); wk: (..., Hkv, d_head, d_in) with H divisible by Hkv;
    scale: float or broadcastable to (..., H). Any input dtype (bf16, fp16, fp32) is upcast.
    Heads whose weights are not finite get NaN statistics and ``finite=False``; the others are
    unaffected. No gradient is tracked.
    """
    with torch.no_grad():
        wq, wk = wq.to(dtype), wk.to(dtype)
        s = _as_scale(scale, wq)
        m, g_q, g_k, finite = _finite_factors(wq, wk, s)
        n = wq.shape[-1]
        mean, var = _moments(m, g_q, g_k, s, n)

        eigvals = _eigvals(m)  # (..., H, d)
        var_complex = eigvals.abs().square().sum(-1) / n - mean**2
        magnitude = eigvals.abs()
        positive = (magnitude * (eigvals.real > 0)).sum(-1)
        positive_fraction = positive / magnitude.sum(-1).clamp_min(torch.finfo(dtype).tiny)

        # sigma_max(A^T B)^2 = lambda_max(G_Q^1/2 G_K G_Q^1/2)
        e_q, u_q = torch.linalg.eigh(g_q)
        root = u_q * e_q.clamp_min(0).sqrt()[..., None, :]  # U diag(sqrt e): root root^T = G_Q
        c = root.transpose(-1, -2) @ g_k @ root
        sigma_sq = torch.linalg.eigvalsh(c)[..., -1].clamp_min(0)
        spectral_norm = s.abs() * sigma_sq.sqrt()

        nan = torch.tensor(float("nan"), dtype=dtype, device=wq.device)

        def masked(x: Tensor) -> Tensor:
            return torch.where(finite, x, nan)

        nan_pair = complex(math.nan, math.nan)  # both parts: full_like(z, nan) leaves imag 0
        eigvals = torch.where(finite[..., None], eigvals, torch.full_like(eigvals, nan_pair))
        return HeadSpectra(
            eig_mean=masked(mean),
            eig_var=masked(var.clamp_min(0)),
            eig_concentration=masked(eig_concentration(mean, var)),
            eig_var_complex=masked(var_complex.clamp_min(0)),
            spectral_norm=masked(spectral_norm.expand_as(mean)),
            positive_fraction=masked(positive_fraction),
            eigvals=eigvals,
            finite=finite,
        )
