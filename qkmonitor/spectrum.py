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
                           of R^T G_K R for any R with R R^T = G_Q (same non-zero spectrum as
                           G_K G_Q; R: the Cholesky factor of G_Q), so the spectral norm needs
                           only a d_head x d_head symmetric eigenproblem.

With n = d_in and S = (W + W^T) / 2:

    eig_mean        = tr(W) / n = tr(M) / n
    eig_var         = ||S||_F^2 / n - eig_mean^2,  ||S||_F^2 = (||W||_F^2 + tr(W^2)) / 2
    eig_var_complex = mean over all n eigenvalues of |lambda - eig_mean|^2
                    = sum |lambda_i(M)|^2 / n - eig_mean^2   (eig_mean is real; zeros add 0)
    eig_concentration = eig_mean / sqrt(||S||_F^2 / n) = eig_mean / sqrt(eig_var + eig_mean^2)
                    in [-1, 1] (tr(S) = tr(W), so eig_mean is also the mean eigenvalue of S and
                    Cauchy-Schwarz bounds it by their RMS); scale-free; NaN where S = 0

Cost per head: about 2.75 (d_head x d_in) @ (d_in x d_head) products, O(d_in d_head^2) (M,
G_Q skipping its mirrored triangle, and G_K shared by a key head's group), instead of
O(d_in^3) for an eigendecomposition of W. Grouped-query attention is handled without copying
keys: query head h uses key head h // (n_heads / n_kv_heads); each key head's rows and its
group's are converted to the compute dtype together, into one reused workspace
(``_dense_factors``).

Factored heads (``FactoredHeads``; MLA, or any low-rank shared down-projection): A = U_h L_q and
B = V_h L_k with L_q (r_q x n), L_k (r_k x n) shared by all heads of a layer. The three small
matrices only ever need L through its Gram matrices, computed once per layer:

    G_Q = U_h (L_q L_q^T) U_h^T,   G_K = V_h (L_k L_k^T) V_h^T,   M = s V_h (L_k L_q^T) U_h^T

so a layer costs O(n (r_q + r_k)^2) once plus O(H d r (r + d)) for its heads, and neither W
(n x n) nor the per-head A, B (d x n) are formed when that is cheaper (``FactoredHeads.cheaper``).
``head_spectra`` takes G_Q = (U_h R)(U_h R)^T with L_q L_q^T = R R^T, R triangular: about
H d r_q^2 / 2 multiply-adds, half of U_h (L_q L_q^T) U_h^T (``_latent_factors``).

All functions are pure: tensors in, tensors out, any leading batch dimensions (layers, ...).
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields, make_dataclass

import torch
from torch import Tensor

from qkmonitor.statistics import HEAD_STATISTICS, Statistic

__all__ = [
    "FactoredHeads",
    "HeadMoments",
    "HeadSpectra",
    "eig_concentration",
    "eig_var_gradient",
    "head_moments",
    "head_spectra",
    "trace_statistics",
]


def _statistics_class(name: str, doc: str, statistics: tuple[Statistic, ...], tail) -> type:
    """A frozen dataclass with one Tensor field per statistic, then the ``tail`` fields."""
    columns = [(s.name, Tensor) for s in statistics]
    cls = make_dataclass(name, [*columns, *tail], frozen=True, namespace={"__doc__": doc})
    cls.__module__ = __name__
    return cls


HeadSpectra = _statistics_class(
    "HeadSpectra",
    "Statistics of a batch of heads (HEAD_STATISTICS), each of shape (..., n_heads), then\n"
    "eigvals: (..., n_heads, d_head) complex, the non-zero eigenvalues of W^h (and zeros of M's\n"
    "kernel), and finite: (..., n_heads) bool, False where a head's Q or K weights hold NaN/Inf.",
    HEAD_STATISTICS,
    [("eigvals", Tensor), ("finite", Tensor)],
)
HeadMoments = _statistics_class(
    "HeadMoments",
    "The statistics of HEAD_STATISTICS that need no eigendecomposition, each (..., n_heads);\n"
    "NaN where not finite (finite: (..., n_heads) bool).",
    tuple(s for s in HEAD_STATISTICS if not s.eigen),
    [("finite", Tensor)],
)


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
    return _bilinear_factors(wq, wk, scale, None, None, None)


#: the triangular products (``_gram``, ``_times_lower``) go in blocks of at least _BLOCK rows
#: (smaller ones run the GEMM kernels below speed) and at most _PIECES blocks (each block
#: passes over the whole other operand once: on a latent of 1536, 6 blocks of 256 took 2.9 s
#: where 24 of 64 took 3.9 s and one full product 3.7 s, one thread)
_BLOCK, _PIECES = 64, 6


def _blocks(k: int) -> list[tuple[int, int]]:
    """[start, stop) of the row blocks of a k-row triangular product (d_head 128: two halves,
    192: three thirds; a latent of 1536: six blocks of 256)."""
    size = max(_BLOCK, -(-k // _PIECES))
    if k <= 2 * _BLOCK:
        size = -(-k // 2)
    return [(lo, min(k, lo + size)) for lo in range(0, k, size)]


def gram_multiply_adds(k: int, n: int) -> int:
    """Multiply-adds of ``_gram`` on a (k, n) matrix: each row block against the rows from
    its own start on (k^2 n / 2 plus the diagonal blocks' other halves)."""
    return sum((hi - lo) * (k - lo) * n for lo, hi in _blocks(k))


def lower_multiply_adds(m: int, r: int) -> int:
    """Multiply-adds of ``_times_lower`` for an (m, r) matrix times a lower triangular
    (r, r) one: each column block needs only the rows from its own start on."""
    return sum(m * (r - lo) * (hi - lo) for lo, hi in _blocks(r))


def _gram(x: Tensor) -> Tensor:
    """x x^T for x (..., k, n), symmetric: each row block against the rows from its
    own start on (the upper triangle in blocks, mirrored), about half a full product's
    multiply-adds (``gram_multiply_adds``; torch has no syrk)."""
    k = x.shape[-2]
    gram = torch.empty(*x.shape[:-1], k, dtype=x.dtype, device=x.device)
    for lo, hi in _blocks(k):
        part = x[..., lo:hi, :] @ x[..., lo:, :].transpose(-1, -2)  # (..., rows, k - lo)
        gram[..., lo:hi, lo:] = part
        gram[..., hi:, lo:hi] = part[..., hi - lo :].transpose(-1, -2)
    return gram


def _times_lower(x: Tensor, lower: Tensor) -> Tensor:
    """x @ lower for a lower triangular (..., r, r) ``lower`` (x: (..., m, r)): each block of
    columns from the rows of its own start on (``lower_multiply_adds``; torch has no trmm)."""
    r, m = lower.shape[-1], x.shape[-2]
    out = torch.empty(*x.shape[:-2], r, m, dtype=x.dtype, device=x.device)  # transposed
    for lo, hi in _blocks(r):  # blocks of rows of the transpose: contiguous, written in place
        torch.matmul(lower[..., lo:, lo:hi].transpose(-1, -2), x[..., lo:].transpose(-1, -2),
                     out=out[..., lo:hi, :])  # fmt: skip
    return out.transpose(-1, -2)


def _dense_factors(
    a: Tensor, b: Tensor, scale: Tensor, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """M, G_Q, G_K of dense heads (``_factors``) in dtype, from a and b in any float dtype.

    Key head by key head, its d rows and its group's g d query rows are converted into one
    workspace X = [B; A_1; ...; A_g] ((g + 1) d x n), then B X^T gives G_K and every B A_i^T
    in one product, and each A_i A_i^T is a ``_gram``. The workspace (21 MB for a Llama-8B
    key head) is reused by every key head: converting a whole Llama-8B layer to float64 into
    fresh memory took about 10x the copy itself, in page faults. Every key head's products
    have the same shapes, so its
    bits do not depend on which heads are computed with it (torch's small bmm kernels give
    batch-dependent last bits)."""
    *batch, n_heads, d, n = a.shape
    n_kv = b.shape[-3]
    if n_heads % n_kv:
        raise ValueError(f"{n_heads} query heads cannot share {n_kv} key heads evenly")
    group = n_heads // n_kv
    queries = a.unflatten(-3, (n_kv, group)).reshape(-1, group, d, n)
    keys = b.reshape(-1, d, n)
    total = keys.shape[0]
    x = torch.empty(group + 1, d, n, dtype=dtype, device=a.device)
    m = torch.empty(total, d, group, d, dtype=dtype, device=a.device)
    g_q = torch.empty(total, group, d, d, dtype=dtype, device=a.device)
    g_k = torch.empty(total, d, d, dtype=dtype, device=a.device)
    for j in range(total):
        x[0].copy_(keys[j])
        x[1:].copy_(queries[j])
        row = x[0] @ x.reshape((group + 1) * d, n).transpose(-1, -2)  # (d, (g + 1) d)
        g_k[j] = row[:, :d]
        m[j] = row[:, d:].reshape(d, group, d)
        g_q[j] = _gram(x[1:])
    m = m.transpose(-3, -2).reshape(*batch, n_heads, d, d) * scale[..., None, None]
    g_k = g_k.reshape(*batch, n_kv, d, d).repeat_interleave(group, dim=-3)
    return m, g_q.reshape(*batch, n_heads, d, d), g_k


def _times(x: Tensor, metric: Tensor | None) -> Tensor:
    """x @ metric, where a metric of None is the identity."""
    return x if metric is None else x @ metric[..., None, :, :]


def _bilinear_factors(
    a: Tensor,
    b: Tensor,
    scale: Tensor,
    g_qq: Tensor | None,
    g_kk: Tensor | None,
    g_kq: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """M, G_Q, G_K of heads A_h = a_h L_q, B_g = b_g L_k given the Grams of L_q and L_k.

    a: (..., H, d, r_q); b: (..., Hkv, d, r_k); g_qq = L_q L_q^T (..., r_q, r_q), g_kk = L_k L_k^T
    (..., r_k, r_k), g_kq = L_k L_q^T (..., r_k, r_q); None stands for the identity (dense heads:
    L = I). Then A A^T = a g_qq a^T, B B^T = b g_kk b^T and B A^T = b g_kq a^T, each (d, d).
    """
    *batch, n_heads, d_head, _ = a.shape
    n_kv = b.shape[-3]
    if n_heads % n_kv:
        raise ValueError(f"{n_heads} query heads cannot share {n_kv} key heads evenly")
    group = n_heads // n_kv
    grouped = a.reshape(*batch, n_kv, group * d_head, a.shape[-1])
    kq = _times(b, g_kq) @ grouped.transpose(-1, -2)  # (..., Hkv, d, g d)
    kq = kq.reshape(*batch, n_kv, d_head, group, d_head).transpose(-3, -2)  # (..., Hkv, g, d, d)
    m = kq.reshape(*batch, n_heads, d_head, d_head) * scale[..., None, None]
    g_q = _times(a, g_qq) @ a.transpose(-1, -2)  # (..., H, d, d)
    g_k = (_times(b, g_kk) @ b.transpose(-1, -2)).repeat_interleave(group, dim=-3)
    return m, g_q, g_k


@dataclass(frozen=True)
class FactoredHeads:
    """The heads W^h = s_h (U_h L_q)^T (V_g L_k) of a layer whose Q and K pass through shared
    down-projections (latents), g = h // (H / Hkv), like TransformerLens' FactoredMatrix.

    q_up: U, (..., H, d_head, r_q); k_up: V, (..., Hkv, d_head, r_k);
    q_down: L_q, (..., r_q, d_in), or None for the identity (then r_q = d_in: no latent);
    k_down: L_k, (..., r_k, d_in), or None likewise; scale: float or broadcastable to (..., H).
    MLA puts any gains between the projections into the down-projections (diag(g) L) and the
    key's shared RoPE rows into L_k with an identity block in every V_g
    (qkmonitor.weights.mla). The spectrum functions take it in place of (wq, wk, scale).
    """

    q_up: Tensor
    k_up: Tensor
    q_down: Tensor | None
    k_down: Tensor | None
    scale: Tensor | float = 1.0

    def __post_init__(self) -> None:
        n = self.d_in
        for up, down, side in ((self.q_up, self.q_down, "q"), (self.k_up, self.k_down, "k")):
            rank = n if down is None else down.shape[-2]
            if up.shape[-1] != rank or (down is not None and down.shape[-1] != n):
                raise ValueError(
                    f"{side} factors do not chain: up {tuple(up.shape)}, down "
                    f"{None if down is None else tuple(down.shape)}, d_in {n}"
                )
        if self.q_up.shape[-2] != self.k_up.shape[-2]:
            raise ValueError(f"q and k head sizes differ: {self.q_up.shape} vs {self.k_up.shape}")

    @property
    def d_in(self) -> int:
        """n: the input dimension of the bilinear form (eigenvalue count of W^h)."""
        down = self.q_down if self.q_down is not None else self.k_down
        return down.shape[-1] if down is not None else self.q_up.shape[-1]

    def dense(self) -> tuple[Tensor, Tensor]:
        """Per-head (..., H, d, d_in) Q and (..., Hkv, d, d_in) K: U_h L_q and V_g L_k."""
        return _times(self.q_up, self.q_down), _times(self.k_up, self.k_down)

    def _costs(self) -> tuple[int, int]:
        """Multiply-adds of M, G_Q, G_K as ``head_spectra`` makes them: by the latents'
        triangular factors (``_latent_factors``) and by forming the dense heads
        (``_dense_factors``)."""
        *_, heads, d, r_q = self.q_up.shape
        kv, r_k, n = self.k_up.shape[-3], self.k_up.shape[-1], self.d_in
        q, k = self.q_down is not None, self.k_down is not None
        factored = q * gram_multiply_adds(r_q, n) + k * gram_multiply_adds(r_k, n)
        factored += (q and k) * r_k * r_q * n  # L_k L_q^T
        factored += q * lower_multiply_adds(heads * d, r_q) + k * lower_multiply_adds(kv * d, r_k)
        factored += heads * gram_multiply_adds(d, r_q) + kv * gram_multiply_adds(d, r_k)
        factored += min(_m_costs(heads, kv, d, r_q, r_k))
        # forming the heads, B [B; A_1..A_g]^T per key head, each A A^T as a _gram
        dense = heads * d * q * r_q * n + kv * d * k * r_k * n
        dense += (heads + kv) * d * d * n + heads * gram_multiply_adds(d, n)
        return factored, dense

    def cheaper(self) -> bool:
        """Whether the latent route costs fewer multiply-adds than forming the dense heads
        (never without a latent)."""
        factored, dense = self._costs()
        latent = self.q_down is not None or self.k_down is not None
        return latent and factored < dense

    def multiply_adds(self) -> int:
        """The matrix-product multiply-adds of ``head_spectra`` on these heads (per leading
        batch element): M, G_Q and G_K by the cheaper route (through a latent: its Gram,
        then each head times the Gram's triangular factor, G_Q = (U_h R)(U_h R)^T, about
        heads d r_q^2 / 2 for the q latent), plus the spectral norm's d x d products. Shapes
        only (meta tensors will do). Not included: LAPACK's factorizations and small
        eigensolvers, about (10 + 1/3 + 4/3) d^3 flops per head (eigvals, cholesky,
        eigvalsh; eigh, 9 d^3, only for a head of rank < d) and r^3 / 3 per latent."""
        heads, d = self.q_up.shape[-3], self.q_up.shape[-2]
        factored, dense = self._costs()
        return (factored if self.cheaper() else dense) + 2 * heads * d**3

    def to(self, dtype: torch.dtype) -> FactoredHeads:
        """The same heads with every tensor cast to dtype."""

        def cast(x: Tensor | float | None) -> Tensor | float | None:
            return x.to(dtype) if isinstance(x, Tensor) else x

        parts = (self.q_up, self.k_up, self.q_down, self.k_down, self.scale)
        return FactoredHeads(*(cast(x) for x in parts))

    def factors(self, scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """M, G_Q, G_K per query head (module docstring), by the cheaper route, differentiable
        (``trace_statistics``; ``head_spectra`` takes ``_latent_factors``)."""
        if not self.cheaper():
            return _factors(*self.dense(), scale)
        l_q, l_k = self.q_down, self.k_down

        def gram(x: Tensor | None, y: Tensor | None) -> Tensor | None:  # x y^T, None = I
            if x is None:
                return None if y is None else y.transpose(-1, -2)
            return x if y is None else x @ y.transpose(-1, -2)

        return _bilinear_factors(
            self.q_up, self.k_up, scale, gram(l_q, l_q), gram(l_k, l_k), gram(l_k, l_q)
        )


def _m_costs(heads: int, kv: int, d: int, r_q: int, r_k: int) -> tuple[int, int]:
    """Multiply-adds of M = s V_g (L_k L_q^T) U_h^T: (L_k L_q^T) U^T first, then V_g; or
    V_g (L_k L_q^T) first, then U_h^T."""
    return r_k * r_q * heads * d + heads * d * d * r_k, kv * d * r_k * r_q + heads * d * d * r_q


def _latent_factors(heads: FactoredHeads, scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """M, G_Q, G_K of heads through a latent (no autograd): with the latent's Gram
    L_q L_q^T = R R^T, R lower triangular (``_gram_root``), G_Q = (U_h R)(U_h R)^T, each
    product half of a full one (``_times_lower``, ``_gram``); likewise G_K;
    M = s V_g (L_k L_q^T) U_h^T in the cheaper order (``_m_costs``)."""
    a, b, l_q, l_k = heads.q_up, heads.k_up, heads.q_down, heads.k_down
    *batch, n_heads, d, r_q = a.shape
    n_kv, r_k = b.shape[-3], b.shape[-1]
    if n_heads % n_kv:
        raise ValueError(f"{n_heads} query heads cannot share {n_kv} key heads evenly")
    group = n_heads // n_kv

    def through(up: Tensor, down: Tensor | None) -> Tensor:  # U R, R R^T = L L^T
        if down is None:
            return up
        rows = up.reshape(*up.shape[:-3], -1, up.shape[-1])
        return _times_lower(rows, _gram_root(_gram(down), lower=True)).reshape(up.shape)

    if l_q is None:
        g_kq = l_k
    else:
        g_kq = l_q.transpose(-1, -2) if l_k is None else l_k @ l_q.transpose(-1, -2)
    rows = a.reshape(*batch, n_heads * d, r_q)
    first, second = _m_costs(n_heads, n_kv, d, r_q, r_k)
    if first <= second:  # (L_k L_q^T) U^T for every head at once, then each V_g
        t = (g_kq @ rows.transpose(-1, -2)).unflatten(-1, (n_kv, group * d))
        kq = b @ t.movedim(-2, -3)  # (..., Hkv, d, g d)
    else:
        kq = (b @ g_kq[..., None, :, :]) @ rows.reshape(*batch, n_kv, group * d, r_q).mT
    kq = kq.reshape(*batch, n_kv, d, group, d).transpose(-3, -2)
    m = kq.reshape(*batch, n_heads, d, d) * scale[..., None, None]
    g_q = _gram(through(a, l_q))
    g_k = _gram(through(b, l_k)).repeat_interleave(group, dim=-3)
    return m, g_q, g_k


Heads = Tensor | FactoredHeads


def _operands(
    wq: Heads,
    wk: Tensor | None,
    scale: Tensor | float | None,
    dtype: torch.dtype,
    *,
    keep_dense: bool = False,
) -> tuple[FactoredHeads, Tensor]:
    """Dense (wq, wk, scale) or factored heads as FactoredHeads in dtype, plus the scale in
    dtype. keep_dense: dense heads stay in their own dtype (``_dense_factors`` converts them
    chunk by chunk)."""
    if isinstance(wq, FactoredHeads):
        if wk is not None or scale is not None:
            raise TypeError("factored heads carry their own keys and scale; pass them alone")
        heads = wq.to(dtype)
    elif wk is None or scale is None:
        raise TypeError("dense heads need wq, wk and scale")
    elif keep_dense:
        heads = FactoredHeads(wq, wk, None, None, scale)
    else:
        heads = FactoredHeads(wq.to(dtype), wk.to(dtype), None, None, scale)
    s = heads.scale
    return heads, torch.as_tensor(s, dtype=dtype, device=heads.q_up.device)


def _as_scale(scale: Tensor | float, like: Tensor) -> Tensor:
    return torch.as_tensor(scale, dtype=like.dtype, device=like.device)


def trace_statistics(
    wq: Heads,
    wk: Tensor | None = None,
    scale: Tensor | float | None = None,
    *,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """(eig_mean, eig_var) per query head from traces only: cheap and differentiable.

    wq: (..., H, d_head, d_in) query weights per head; wk: (..., Hkv, d_head, d_in) key weights
    per key head; scale: the softmax scale, a float or broadcastable to (..., H). Or wq alone:
    a FactoredHeads (which carries its keys and scale).
    dtype: computation dtype (default: the inputs' dtype, at least float32; autocast is
    disabled inside, so bf16 training never lowers the precision of this sum).
    Returns two (..., H) tensors. This is the regularizer's quantity (docs/metrics.md).
    """
    first = wq.q_up if isinstance(wq, FactoredHeads) else wq
    dtype = dtype or torch.promote_types(first.dtype, torch.float32)
    with torch.autocast(first.device.type, enabled=False):
        heads, s = _operands(wq, wk, scale, dtype)
        return _moments(*heads.factors(s), s, heads.d_in)


def _moments(m: Tensor, g_q: Tensor, g_k: Tensor, s: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """(eig_mean, eig_var) from the factors of _factors; n = d_in."""
    mean = _per_head_sum(m.diagonal(dim1=-2, dim2=-1), 1) / n  # tr(W) / n
    frob_sq = _per_head_sum(g_q * g_k, 2) * s**2  # ||W||_F^2
    trace_sq = _per_head_sum(m * m.transpose(-1, -2), 2)  # tr(W^2)
    return mean, (frob_sq + trace_sq) / (2 * n) - mean**2


def _per_head_sum(x: Tensor, dims: int) -> Tensor:
    """The sum over x's last ``dims`` dimensions, each head's entries summed as one contiguous
    row. A sum over a strided or two-dimensional block is vectorized across heads, so its
    rounding would depend on how many heads are computed together (the CPU's thread parts)."""
    return x.contiguous().flatten(-dims).sum(-1)


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


class _SingleThreadWorkers:
    """Python threads that each run torch with one OpenMP thread, kept for the process.

    torch's thread count is per thread: ``torch.set_num_threads`` sets the calling thread's
    OpenMP count, and also the count that every thread not yet started on torch takes at its
    first parallel operation. Setting it to 1 around each computation (as before) let threads
    that started meanwhile (the Space's request threads) keep one thread for good, and so
    compute other bits. Here each worker sets its own count once, when the pool starts; the
    starting count is restored right after. ``size`` is the caller's torch thread count
    (``torch.get_num_threads()``), and 1 on a worker: no nested split.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._started = 0
        self._local = threading.local()

    def on_worker(self) -> bool:
        return getattr(self._local, "worker", False)

    def size(self) -> int:
        return 1 if self.on_worker() else torch.get_num_threads()

    def _start_worker(self) -> None:
        self._local.worker = True
        torch.set_num_threads(1)

    def _pool_of(self, workers: int) -> ThreadPoolExecutor:
        with self._lock:
            if self._started < workers:
                starting = torch.get_num_threads()
                pool = ThreadPoolExecutor(
                    workers, "qkmonitor-spectra", initializer=self._start_worker
                )
                all_started = threading.Barrier(workers + 1)  # one task per worker thread
                for _ in range(workers):
                    pool.submit(all_started.wait)
                all_started.wait()
                torch.set_num_threads(starting)  # what threads that start later will take
                if self._pool is not None:
                    self._pool.shutdown(wait=False)
                self._pool, self._started = pool, workers
            return self._pool

    def map(self, function, items: list) -> list:
        """function over items on the workers (one OpenMP thread each), in order; on this
        thread where it runs torch with one thread already (a worker's own calls included)."""
        if self.size() == 1:
            return [function(item) for item in items]
        return list(self._pool_of(len(items)).map(function, items))


_WORKERS = _SingleThreadWorkers()
#: CPU computations of head_spectra run one at a time (concurrent audits in one process, as the
#: Space runs them): their thread parts would otherwise share the workers and the cores
_CPU_COMPUTE = threading.RLock()


def _per_thread(solver, m: Tensor):
    """A batched LAPACK solver on (..., d, d), the batch split over torch's CPU threads.

    One level of parallelism: torch loops over the batch, and MKL's solver for one small
    matrix barely gains from its OpenMP threads but suffers from them on a busy machine (on 2
    loaded cores eigh of 128 192 x 192 matrices took 33 s with two OpenMP threads and 1.0 s
    split over two Python threads). So the batch is split over as many Python threads as torch
    has, and each solves its share with one OpenMP thread (torch's thread count is 1 for the
    duration; before, each Python thread also ran torch's full OpenMP team: threads^2 threads
    on the cores). The products around it keep torch's threads. Each matrix is solved as one
    single-threaded call would solve it, whatever the thread count.
    """
    threads = _WORKERS.size()
    flat = m.reshape(-1, *m.shape[-2:])
    if m.device.type != "cpu":
        return solver(m)
    if threads < 2 or flat.shape[0] < 2:
        return _WORKERS.map(solver, [m])[0]
    parts = _WORKERS.map(solver, list(flat.chunk(threads)))

    def join(pieces: list[Tensor]) -> Tensor:
        return torch.cat(pieces).reshape(*m.shape[:-2], *pieces[0].shape[1:])

    if isinstance(parts[0], Tensor):
        return join(parts)
    return tuple(join(list(pieces)) for pieces in zip(*parts, strict=True))


def _spectrum_factors(
    heads: FactoredHeads, s: Tensor, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """M, G_Q, G_K in dtype as the statistics take them: dense heads (stored in any dtype)
    by ``_dense_factors``, factored ones by ``FactoredHeads.factors``."""
    if heads.q_down is None and heads.k_down is None:
        return _dense_factors(heads.q_up, heads.k_up, s, dtype)
    if not heads.cheaper():
        return _dense_factors(*heads.dense(), s, dtype)
    return _latent_factors(heads, s)


def _finite_factors(
    heads: FactoredHeads, s: Tensor, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """M, G_Q, G_K (``_spectrum_factors``), plus which heads have finite weights (the others
    computed on zeros)."""
    m, g_q, g_k = _spectrum_factors(heads, s, dtype)
    # A row holding NaN/Inf has a non-finite squared norm: the Gram diagonals tell which
    # heads are affected without another pass over the weights.
    finite = g_q.diagonal(dim1=-2, dim2=-1).isfinite().all(-1) & (
        g_k.diagonal(dim1=-2, dim2=-1).isfinite().all(-1)
    )
    if not bool(finite.all()):

        def clean(x: Tensor | None) -> Tensor | None:
            return None if x is None else torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)

        parts = (heads.q_up, heads.k_up, heads.q_down, heads.k_down)
        cleaned = FactoredHeads(*(clean(x) for x in parts), heads.scale)
        m, g_q, g_k = _spectrum_factors(cleaned, s, dtype)
    return m, g_q, g_k, finite


def head_moments(
    wq: Heads,
    wk: Tensor | None = None,
    scale: Tensor | float | None = None,
    *,
    dtype: torch.dtype = torch.float64,
) -> HeadMoments:
    """eig_mean, eig_var and eig_concentration exactly as ``head_spectra`` computes them, without
    its eigendecompositions (an order of magnitude cheaper for small heads). Same arguments."""
    with torch.no_grad():
        heads, s = _operands(wq, wk, scale, dtype, keep_dense=True)
        m, g_q, g_k, finite = _finite_factors(heads, s, dtype)
        mean, var = _moments(m, g_q, g_k, s, heads.d_in)
        values = {
            "eig_mean": mean,
            "eig_var": var,
            "eig_concentration": eig_concentration(mean, var),
        }
        return HeadMoments(**_finished(values, finite), finite=finite)


def _gram_root(gram: Tensor, *, lower: bool = False) -> Tensor:
    """R with R R^T = gram for symmetric positive semidefinite (..., d, d): the Cholesky factor
    (d^3 / 3 flops) where gram is numerically positive definite, else U diag(sqrt(max(e, 0)))
    from its eigendecomposition (9 d^3; rank < d: d_head > d_in, zero heads, a rank-deficient
    latent), made lower triangular by a QR of its transpose if ``lower``. NaN where gram is
    not finite."""
    root, info = _per_thread(torch.linalg.cholesky_ex, gram)
    finite = gram.isfinite().all(-1).all(-1)
    failed = (info != 0) & finite
    if bool(failed.any()):
        e, u = _per_thread(torch.linalg.eigh, gram[failed])
        other = u * e.clamp_min(0).sqrt()[..., None, :]
        if lower:  # other^T = Q T (T upper triangular): other other^T = T^T T
            other = _per_thread(lambda x: torch.linalg.qr(x, mode="r").R, other.mT).mT
        root[failed] = other
    return torch.where(finite[..., None, None], root, torch.full_like(root, math.nan))


def _finished(values: dict[str, Tensor], finite: Tensor) -> dict[str, Tensor]:
    """Each statistic's values as reported: unsigned ones clamped at 0 (rounding can take a
    variance one ulp below it), NaN for heads whose weights are not finite."""
    declared = {statistic.name: statistic for statistic in HEAD_STATISTICS}
    nan = torch.tensor(float("nan"))
    out = {}
    for name, value in values.items():
        value = value if declared[name].signed else value.clamp_min(0)
        out[name] = torch.where(finite, value, nan.to(value))
    return out


def head_spectra(
    wq: Heads,
    wk: Tensor | None = None,
    scale: Tensor | float | None = None,
    *,
    dtype: torch.dtype = torch.float64,
) -> HeadSpectra:
    """Every statistic of docs/metrics.md for a batch of heads, exactly, in ``dtype`` (float64).

    wq: (..., H, d_head, d_in); wk: (..., Hkv, d_head, d_in) with H divisible by Hkv;
    scale: float or broadcastable to (..., H). Or wq alone: a FactoredHeads (its own keys and
    scale). Any input dtype (bf16, fp16, fp32) is upcast.
    Heads whose weights are not finite get NaN statistics and ``finite=False``; the others are
    unaffected. No gradient is tracked.
    """
    with torch.no_grad():
        heads, s = _operands(wq, wk, scale, dtype, keep_dense=True)
        if heads.q_up.device.type != "cpu":
            return _head_spectra(heads, s, dtype)
        with _CPU_COMPUTE:  # one at a time: the workers and the cores are shared
            parts = _dense_parts(heads, s)
            if parts is None:
                return _head_spectra(heads, s, dtype)
            done = _WORKERS.map(lambda part: _head_spectra(*part, dtype), parts)
        if len(done) == 1:
            return done[0]
        joined = {
            f.name: torch.cat(
                [getattr(x, f.name) for x in done], dim=-2 if f.name == "eigvals" else -1
            )
            for f in fields(HeadSpectra)
        }
        return HeadSpectra(**joined)


def _dense_parts(heads: FactoredHeads, s: Tensor) -> list[tuple[FactoredHeads, Tensor]] | None:
    """Dense heads split by key heads into one part per torch thread, each a contiguous copy
    computed by a worker with one OpenMP thread (the CPU's one level of parallelism). Every
    head's bits are then those of a single-threaded run, whatever the thread count and
    whichever thread calls: a product over a strided slice, or with more OpenMP threads,
    rounds differently. None for factored heads (computed whole with torch's threads: parts
    would recompute the shared Grams) and for heads the computation refuses (uneven groups)."""
    n_kv = heads.k_up.shape[-3]
    if heads.q_down is not None or heads.k_down is not None or heads.q_up.shape[-3] % n_kv:
        return None
    group = heads.q_up.shape[-3] // n_kv
    parts = []
    for keys in torch.arange(n_kv).chunk(_WORKERS.size()):
        lo, hi = int(keys[0]), int(keys[-1]) + 1
        scale = s[..., lo * group : hi * group].contiguous() if s.dim() and s.shape[-1] > 1 else s
        q_up = heads.q_up[..., lo * group : hi * group, :, :].contiguous()
        k_up = heads.k_up[..., lo:hi, :, :].contiguous()
        parts.append((FactoredHeads(q_up, k_up, None, None, scale), scale))
    return parts


def _head_spectra(heads: FactoredHeads, s: Tensor, dtype: torch.dtype) -> HeadSpectra:
    """head_spectra of heads already in dtype, s their scale tensor."""
    m, g_q, g_k, finite = _finite_factors(heads, s, dtype)
    n = heads.d_in
    mean, var = _moments(m, g_q, g_k, s, n)

    eigvals = _per_thread(torch.linalg.eigvals, m)  # (..., H, d)
    var_complex = eigvals.abs().square().sum(-1) / n - mean**2
    magnitude = eigvals.abs()
    positive = (magnitude * (eigvals.real > 0)).sum(-1)
    positive_fraction = positive / magnitude.sum(-1).clamp_min(torch.finfo(dtype).tiny)

    # sigma_max(A^T B)^2 = lambda_max(R^T G_K R) for any R with R R^T = G_Q
    root = _gram_root(g_q)
    c = root.transpose(-1, -2) @ g_k @ root
    sigma_sq = _per_thread(torch.linalg.eigvalsh, c)[..., -1].clamp_min(0)
    spectral_norm = s.abs() * sigma_sq.sqrt()

    nan_pair = complex(math.nan, math.nan)  # both parts: full_like(z, nan) leaves imag 0
    eigvals = torch.where(finite[..., None], eigvals, torch.full_like(eigvals, nan_pair))
    values = {
        "eig_mean": mean,
        "eig_var": var,
        "eig_concentration": eig_concentration(mean, var),
        "eig_var_complex": var_complex,
        "spectral_norm": spectral_norm,
        "positive_fraction": positive_fraction,
    }
    return HeadSpectra(**_finished(values, finite), eigvals=eigvals, finite=finite)
