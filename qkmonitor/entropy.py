"""Attention entropy per head, computed in chunks with an online softmax.

For a query row i with logits z_ij over its allowed keys j and probabilities p_ij = softmax(z_i)
(docs/metrics.md, "Attention entropy"):

    H_i = -sum_j p_ij log p_ij = logsumexp_j z_ij - sum_j p_ij z_ij          (nats)

Both terms are accumulated over key chunks with a running maximum m_i, never forming the full
Tq x Tk matrix. Per row we keep, relative to the current m_i,

    s_i = sum_j exp(z_ij - m_i)        t_i = sum_j exp(z_ij - m_i) (z_ij - m_i)

and H_i = log s_i - t_i / s_i. Both terms are >= 0 (s_i >= 1, z_ij - m_i <= 0), so there is no
cancellation between two large numbers. When a chunk raises the maximum from m to m', the old
sums rescale as s <- a s and t <- a (t + (m - m') s) with a = exp(m - m').

Results are per-head sums and counts (float64, shape (H,)), so that callers add them over
micro-batches and all-reduce them over ranks before dividing; and the per-head maximum score
(docs/metrics.md, "attn_max_logit"), which callers combine with max instead.

The maximum score is the largest s q.k over the allowed (query, key) pairs of valid query rows,
before softcapping and without additive biases (ALiBi, T5's relative buckets) or attention sinks:
the part of the logit that the query/key weights make (what QK-Clip rescales). The logit the
model softmaxes is softcap(s q.k) (+ biases); ``softcapped`` maps the maximum score to the
maximum softcapped logit, exactly, since softcapping is monotone. It is the running maximum of
the online softmax when no softcap or bias applies, one more reduction of each block otherwise.

The maximum alone (``attention_max_score``, what QK-Clip measures on every step) needs no
softmax: one GEMM per tile and one max reduction, in square tiles whose float32 logits take at
most as much memory as a float32 copy of the queries (on CPU, also cache-sized); the keys are
cast once, the causal mask is applied to the tiles on the diagonal only, and tiles above it are
never computed (on CPU, neither are tiles a mask hides entirely, e.g. a 4D causal mask's).

All functions are pure: tensors in, tensors out, no autograd, any device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from qkmonitor.segments import SegmentMask

__all__ = [
    "EntropySums",
    "allowed_entries",
    "attention_entropy",
    "attention_max_score",
    "default_max_tile",
    "default_query_chunk",
    "softcapped",
]


@dataclass(frozen=True)
class EntropySums:
    """Per-head sums over valid query rows; every field is float64 with shape (H,).

    entropy: sum of H_i. normalized: sum of H_i / log(n_i) over rows with n_i >= 2 allowed keys.
    rows / normalized_rows: how many rows each sum covers.
    max_score: the largest s q.k over the allowed pairs of valid rows (before softcapping, without
        biases or sinks; module docstring); -inf where no pair was seen. Combined with max.
    """

    entropy: Tensor
    normalized: Tensor
    rows: Tensor
    normalized_rows: Tensor
    max_score: Tensor

    @classmethod
    def from_stacked(cls, stacked: Tensor, max_score: Tensor | None = None) -> EntropySums:
        """Inverse of `stacked`: (4, H) sums and the (H,) maximum score (None: no pair seen)."""
        sums = stacked.to(torch.float64)
        if max_score is None:
            max_score = torch.full_like(sums[0], -torch.inf)
        return cls(*sums.unbind(0), max_score.to(sums))

    def stacked(self) -> Tensor:
        """(4, H): entropy, normalized, rows, normalized_rows; one tensor to all-reduce."""
        return torch.stack([self.entropy, self.normalized, self.rows, self.normalized_rows])

    def __add__(self, other: EntropySums) -> EntropySums:
        """Sums add, maximum scores combine with max."""
        device = self.entropy.device
        return EntropySums.from_stacked(
            self.stacked() + other.stacked().to(device),
            torch.maximum(self.max_score, other.max_score.to(device)),
        )

    def means(self) -> tuple[Tensor, Tensor]:
        """(attn_entropy, attn_entropy_norm) per head, (H,) float64; NaN where no row counted."""
        return self.entropy / self.rows, self.normalized / self.normalized_rows


def softcapped(score: Tensor, softcap: float | None) -> Tensor:
    """The logit a model softmaxes for a score s q.k: softcap * tanh(score / softcap) (Gemma 2),
    or the score itself without softcapping. Monotone, so it maps a maximum to a maximum."""
    return score if softcap is None else softcap * torch.tanh(score / softcap)


def allowed_entries(mask: Tensor) -> Tensor:
    """Where a transformers attention mask allows attending: bool as is; for an additive float
    mask, entries above half the dtype's minimum (masked entries hold -inf or the minimum)."""
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


def _window(tensor: Tensor, q0: int, q1: int, k0: int, k1: int) -> Tensor:
    """The (queries q0:q1, keys k0:k1) block of a tensor broadcastable to (..., Tq, Tk)."""
    rows = slice(None) if tensor.shape[-2] == 1 else slice(q0, q1)
    cols = slice(None) if tensor.shape[-1] == 1 else slice(k0, k1)
    return tensor[..., rows, cols]


def _allowed_block(
    mask: Tensor | None,
    segments: SegmentMask | None,
    is_causal: bool,
    q0: int,
    q1: int,
    k0: int,
    k1: int,
    device: torch.device,
) -> Tensor | None:
    """Which entries of the block may be attended; None means all of them."""
    allowed = None if segments is None else segments.block(q0, q1, k0, k1)
    if mask is not None:
        block = allowed_entries(_window(mask, q0, q1, k0, k1))
        allowed = block if allowed is None else allowed & block
    if is_causal and k1 - 1 > q0:  # blocks left of the diagonal are fully visible
        rows = torch.arange(q0, q1, device=device)[:, None]
        causal = torch.arange(k0, k1, device=device)[None, :] <= rows
        allowed = causal if allowed is None else allowed & causal
    return allowed


@dataclass
class _Rows:
    """Online softmax state for a block of query rows, each field (B, H, tq)."""

    peak: Tensor  # running maximum m_i (-inf while no allowed key was seen)
    total: Tensor  # s_i
    weighted: Tensor  # t_i
    allowed: Tensor  # n_i
    score: Tensor  # the largest s q.k over the row's allowed keys (-inf while none)

    @classmethod
    def empty(cls, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> _Rows:
        """State before any key: no maximum, zero sums and counts."""
        zeros = torch.zeros(shape, dtype=dtype, device=device)
        lowest = torch.full_like(zeros, -torch.inf)
        return cls(lowest, zeros, zeros, zeros, lowest)

    def update(self, logits: Tensor, allowed: Tensor | None, peak: Tensor | None = None) -> None:
        """Fold in one key chunk of logits (B, H, tq, tk), -inf where not allowed; ``peak``: its
        maximum per row when already known."""
        lowest = torch.finfo(logits.dtype).min
        peak = torch.maximum(self.peak, logits.amax(-1) if peak is None else peak)
        reference = torch.where(peak == -torch.inf, 0.0, peak)  # finite for fully masked rows
        shift = self.peak.clamp_min(lowest) - reference  # finite, <= 0
        scale = shift.exp()
        logits.sub_(reference[..., None])
        probs = logits.exp()
        if allowed is not None:
            logits.clamp_min_(lowest)  # -inf -> lowest, so that 0 * z stays 0
        chunk_weighted = torch.einsum("...k,...k->...", probs, logits)
        self.weighted = scale * (self.weighted + shift * self.total) + chunk_weighted
        self.total = scale * self.total + probs.sum(-1)
        self.peak = peak
        self.allowed = self.allowed + (logits.shape[-1] if allowed is None else allowed.sum(-1))

    def sums(self, query_mask: Tensor | None, sinks: int = 0) -> EntropySums:
        """Entropy, normalized entropy, both row counts and the maximum score over valid rows
        (rows with an allowed key besides the ``sinks`` outcomes folded in first)."""
        valid = self.allowed > sinks
        if query_mask is not None:
            valid = valid & query_mask[:, None].to(valid.device, torch.bool)
        normalizable = valid & (self.allowed > 1)
        entropy = self.total.log() - self.weighted / self.total
        normalized = entropy / self.allowed.log()
        stacked = torch.stack(
            [
                torch.where(valid, entropy, 0.0).sum((0, 2), dtype=torch.float64),
                torch.where(normalizable, normalized, 0.0).sum((0, 2), dtype=torch.float64),
                valid.sum((0, 2), dtype=torch.float64),
                normalizable.sum((0, 2), dtype=torch.float64),
            ]
        )
        return EntropySums.from_stacked(stacked, _row_max(self.score, query_mask))


def _row_max(score: Tensor, query_mask: Tensor | None) -> Tensor:
    """(H,) float64: the largest score (B, H, tq) over rows that are not padding queries (rows
    without any allowed key hold -inf)."""
    if query_mask is not None:
        score = torch.where(query_mask[:, None].to(score.device, torch.bool), score, -torch.inf)
    return score.amax((0, 2)).to(torch.float64)


def default_query_chunk(q_len: int, head_dim: int, key_chunk: int) -> int:
    """Query rows per block so that a float32 logits block holds Tq d / 8 elements per head.

    The two float32 blocks alive at once (logits, probabilities) then take Tq d bytes per head:
    half of a bf16 attention output (B, H, Tq, d), a quarter of a float32 one. Memory stays
    proportional to what SDPA itself allocates, whatever the sequence length. At least 16 rows,
    to bound the number of blocks.
    """
    return max(16, q_len * head_dim // (8 * key_chunk))


#: float32 elements of a CPU logits tile of the max-only pass (2 MiB): the max reduction then
#: reads what the product has just written from cache; measured fastest for 1-64 (batch, head)
#: pairs at T 512-4096 on this project's 2-core EPYC machine (docs/benchmarks.md)
CPU_TILE_ELEMENTS = 1 << 19


def default_max_tile(q_len: int, head_dim: int, batch_heads: int = 1, cpu: bool = True) -> int:
    """Query rows and keys per square tile of ``attention_max_score``.

    Never more than sqrt(Tq d) (at least 64), so that a float32 logits tile (B, H, tile, tile)
    holds at most as many elements as the queries: memory O(T). On CPU also at most what keeps
    the tile's B H tile^2 float32 logits within ``CPU_TILE_ELEMENTS`` (at least 64 per side).
    """
    tile = max(64, math.isqrt(q_len * head_dim))
    if cpu:
        tile = min(tile, max(64, math.isqrt(CPU_TILE_ELEMENTS // batch_heads)))
    return tile


@torch.no_grad()
def attention_max_score(
    query: Tensor,
    key: Tensor,
    scaling: float,
    attention_mask: Tensor | None = None,
    *,
    is_causal: bool = False,
    segments: SegmentMask | None = None,
    query_mask: Tensor | None = None,
    key_chunk: int | None = None,
    query_chunk: int | None = None,
) -> Tensor:
    """The largest score s q.k per query head over the allowed pairs of valid query rows,
    (H,) float64 (-inf where no pair is allowed): ``attention_entropy``'s ``max_score`` without
    the softmax. Exact: every allowed pair of every valid row is computed, none is sampled.

    Arguments as ``attention_entropy`` (biases, softcaps and sinks do not enter a score);
    key_chunk, query_chunk: tile sizes (default: ``default_max_tile``). Extra memory is
    O(B H query_chunk key_chunk) plus a float32 copy of the keys. Computes in float32 (float64
    inputs stay float64), under no_grad, on the inputs' device.
    """
    batch, heads, q_len, head_dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads do not group over {kv_heads} key heads")
    group = heads // kv_heads
    cpu = query.device.type == "cpu"
    tile = default_max_tile(q_len, head_dim, batch * heads, cpu)
    query_chunk, key_chunk = query_chunk or tile, key_chunk or tile
    dtype = torch.promote_types(query.dtype, torch.float32)
    keys = key.to(dtype).transpose(-1, -2)  # (B, Hkv, d, Tk), cast once for every tile
    best = torch.full((heads,), -torch.inf, dtype=torch.float64, device=query.device)
    for q0 in range(0, q_len, query_chunk):
        q1 = min(q0 + query_chunk, q_len)
        rows = q1 - q0
        queries = query[:, :, q0:q1].to(dtype) * scaling
        queries = queries.reshape(batch, kv_heads, group * rows, head_dim)
        row_mask = None if query_mask is None else query_mask[:, q0:q1]
        for k0 in range(0, min(k_len, q1) if is_causal else k_len, key_chunk):
            k1 = min(k0 + key_chunk, k_len)
            allowed = _allowed_block(
                attention_mask, segments, is_causal, q0, q1, k0, k1, query.device
            )
            if allowed is not None and cpu and not allowed.any():
                continue  # e.g. above the diagonal of a 4D causal mask (on a GPU: no sync)
            logits = torch.matmul(queries, keys[..., k0:k1]).view(batch, heads, rows, k1 - k0)
            if allowed is not None:
                logits.masked_fill_(allowed.logical_not(), -torch.inf)
            if row_mask is None:
                peak = logits.amax((0, 2, 3)).to(torch.float64)
            else:
                peak = _row_max(logits.amax(-1), row_mask)
            best = torch.maximum(best, peak)
    return best


@torch.no_grad()
def attention_entropy(
    query: Tensor,
    key: Tensor,
    scaling: float,
    attention_mask: Tensor | None = None,
    *,
    is_causal: bool = False,
    segments: SegmentMask | None = None,
    query_mask: Tensor | None = None,
    bias: Tensor | None = None,
    softcap: float | None = None,
    sink: Tensor | None = None,
    entropy: bool = True,
    key_chunk: int | None = None,
    query_chunk: int | None = None,
) -> EntropySums:
    """Sums of the attention entropy per query head over valid query rows, and the maximum score.

    query: (B, H, Tq, d); key: (B, Hkv, Tk, d), after RoPE, not repeated for grouped-query
        attention: query head h uses key head h // (H / Hkv).
    scaling: softmax scale s; logits are z = s q.k (then softcap, bias and mask, in that order).
    attention_mask: broadcastable to (B, H, Tq, Tk) as transformers passes it to attention
        functions: bool (True = attend) or additive float (0 or a bias where allowed, -inf or the
        dtype's minimum where masked); None = everything allowed (subject to is_causal).
    is_causal: also mask key j > query i (top-left aligned, like torch SDPA's is_causal).
    segments: the mask as flash attention takes it (sequences, causal, window), per token;
        combined with attention_mask and is_causal when those are given too.
    query_mask: (B, Tq) bool, False for padding queries. Needed because transformers' masks
        do not mask padded query rows (a right-padded query still attends to real keys).
        Rows without any allowed key are excluded whatever query_mask says.
    bias: extra additive logits broadcastable to (B, H, Tq, Tk): ALiBi, T5 position bias.
    softcap: Gemma 2's logit softcapping, z <- softcap * tanh(z / softcap).
    sink: (H,) attention-sink logits (``s_aux``, e.g. gpt-oss): one more outcome of every row's
        softmax that attends to no value. The entropy is that of the whole distribution the
        model computes (keys and sink), and n_i counts the sink. Not a key: no score.
    entropy: False computes the maximum score only, by ``attention_max_score`` (no softmax,
        larger tiles); sums and counts are 0.
    key_chunk, query_chunk: block sizes (default: 512 keys and `default_query_chunk` rows; with
        entropy=False, `default_max_tile` for both); extra memory is O(B H query_chunk
        key_chunk), never O(Tq Tk).

    Computes in float32 (float64 inputs stay float64), under no_grad, on the inputs' device.
    """
    if not entropy:
        zeros = torch.zeros(4, query.shape[1], device=query.device)
        score = attention_max_score(
            query,
            key,
            scaling,
            attention_mask,
            is_causal=is_causal,
            segments=segments,
            query_mask=query_mask,
            key_chunk=key_chunk,
            query_chunk=query_chunk,
        )
        return EntropySums.from_stacked(zeros, score)
    batch, heads, q_len, head_dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads do not group over {kv_heads} key heads")
    group = heads // kv_heads
    key_chunk = key_chunk or 512
    query_chunk = query_chunk or default_query_chunk(q_len, head_dim, key_chunk)
    dtype = torch.promote_types(query.dtype, torch.float32)
    additive = attention_mask is not None and attention_mask.dtype != torch.bool
    total = EntropySums.from_stacked(torch.zeros(4, heads, device=query.device))
    for q0 in range(0, q_len, query_chunk):
        q1 = min(q0 + query_chunk, q_len)
        rows = q1 - q0
        queries = query[:, :, q0:q1].to(dtype) * scaling
        queries = queries.reshape(batch, kv_heads, group * rows, head_dim)
        state = _Rows.empty((batch, heads, rows), dtype, query.device)
        if sink is not None:
            sinks = sink.to(dtype).reshape(1, heads, 1, 1).expand(batch, heads, rows, 1)
            state.update(sinks.clone(), None)
        for k0 in range(0, min(k_len, q1) if is_causal else k_len, key_chunk):
            k1 = min(k0 + key_chunk, k_len)
            keys = key[:, :, k0:k1].to(dtype).transpose(-1, -2)
            logits = torch.matmul(queries, keys).view(batch, heads, rows, k1 - k0)
            allowed = _allowed_block(
                attention_mask, segments, is_causal, q0, q1, k0, k1, logits.device
            )
            if allowed is not None:
                logits.masked_fill_(allowed.logical_not(), -torch.inf)
            peak = logits.amax(-1)  # the block's largest score per row
            state.score = torch.maximum(state.score, peak)
            if softcap is not None:
                logits.div_(softcap).tanh_().mul_(softcap)
                if allowed is not None:  # tanh(-inf) = -1: mask again
                    logits.masked_fill_(allowed.logical_not(), -torch.inf)
            if bias is not None:
                logits.add_(_window(bias, q0, q1, k0, k1))
            if additive:  # allowed entries carry biases (ALiBi); -inf stays -inf
                logits.add_(_window(attention_mask, q0, q1, k0, k1))
            changed = softcap is not None or bias is not None or additive
            state.update(logits, allowed, None if changed else peak)
        block_mask = None if query_mask is None else query_mask[:, q0:q1]
        total = total + state.sums(block_mask, sinks=int(sink is not None))
    return total
