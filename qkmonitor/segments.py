"""Attention masks described per token, the way flash attention's varlen kernels see a batch.

Flash attention never receives a (Tq, Tk) mask. It receives sequences: a 2D padding mask
(removed before the kernel runs), or the boundaries of sequences packed into one row
(``cu_seqlens``), plus ``causal`` and a sliding window. ``SegmentMask`` keeps exactly that
description (a segment id and a position per token), and expands it one (query, key) block
at a time, so that measuring attention under flash costs no more memory than its blocks.

Query i may attend key j when

    segment(i) == segment(j) >= 0                      same sequence, j is not padding
    and, if causal:  position(j) <= position(i)
    and, with a window w:  position(i) - position(j) < w   (and > -w when not causal)

Positions count within a segment. Flash aligns causal masks bottom-right (the last query sees
the last key), so a query's position is shifted by (keys - queries) of its segment; with as
many queries as keys, as in training, the shift is 0.

Pure tensor functions: no autograd, any device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["SegmentMask"]


def _ranks(valid: Tensor) -> Tensor:
    """(B, T) long: each valid token's index among the valid tokens of its row."""
    return valid.long().cumsum(-1) - 1


@dataclass(frozen=True)
class SegmentMask:
    """Which keys each query may attend, as segment ids and positions per token.

    query_segments: (B, Tq) long, -1 for padding queries (they attend nothing).
    key_segments: (B, Tk) long, -1 for padding keys (nothing attends them).
    query_positions, key_positions: (B, Tq) and (B, Tk) long, positions within the segment,
        queries' shifted to bottom-right alignment (see the module docstring).
    is_causal: keys after the query's position are masked.
    window: sliding window w (flash's ``window_size=(w - 1, w - 1)``), or None.
    """

    query_segments: Tensor
    key_segments: Tensor
    query_positions: Tensor
    key_positions: Tensor
    is_causal: bool = False
    window: int | None = None

    @classmethod
    def from_padding(
        cls,
        mask: Tensor,
        q_len: int,
        *,
        is_causal: bool = False,
        window: int | None = None,
    ) -> SegmentMask:
        """From a (B, Tk) padding mask (True or 1 = real token), as flash attention unpads it.

        Queries are the last q_len tokens of the mask (all of them when q_len == 1, a decoding
        step), as in transformers' ``_upad_input``, cross-attention included (there the
        encoder's mask also decides which decoder queries the kernel runs).
        """
        keys = mask.bool()
        if q_len > 1:
            queries = keys[:, -q_len:]
        else:
            queries = torch.ones(keys.shape[0], q_len, dtype=torch.bool, device=keys.device)
        shift = keys.sum(-1, keepdim=True) - queries.sum(-1, keepdim=True)
        return cls(
            query_segments=torch.where(queries, 0, -1),
            key_segments=torch.where(keys, 0, -1),
            query_positions=_ranks(queries) + shift,
            key_positions=_ranks(keys),
            is_causal=is_causal,
            window=window,
        )

    @classmethod
    def from_boundaries(
        cls,
        query_bounds: Tensor,
        key_bounds: Tensor,
        q_len: int,
        k_len: int,
        *,
        is_causal: bool = False,
        window: int | None = None,
    ) -> SegmentMask:
        """From flash's ``cu_seqlens``: sequence s holds tokens bounds[s]:bounds[s + 1] of one
        row of q_len queries and k_len keys (shape (1, T)); tokens past the last bound are
        padding."""
        query_segments, query_offsets = _segments(query_bounds, q_len)
        key_segments, key_offsets = _segments(key_bounds, k_len)
        lengths_q, lengths_k = query_bounds.diff().long(), key_bounds.diff().long()
        shift = torch.cat([lengths_k - lengths_q, lengths_q.new_zeros(1)])
        return cls(
            query_segments=query_segments[None],
            key_segments=key_segments[None],
            query_positions=(query_offsets + shift[query_segments])[None],
            key_positions=key_offsets[None],
            is_causal=is_causal,
            window=window,
        )

    @property
    def query_mask(self) -> Tensor:
        """(B, Tq) bool: queries that are not padding."""
        return self.query_segments >= 0

    def block(self, q0: int, q1: int, k0: int, k1: int) -> Tensor:
        """(B, 1, q1 - q0, k1 - k0) bool: which (query, key) pairs of the block may attend."""
        queries = self.query_segments[:, q0:q1, None]
        keys = self.key_segments[:, None, k0:k1]
        allowed = (queries == keys) & (keys >= 0)
        if self.is_causal or self.window is not None:
            gap = self.query_positions[:, q0:q1, None] - self.key_positions[:, None, k0:k1]
            if self.is_causal:
                allowed &= gap >= 0
            if self.window is not None:
                allowed &= gap < self.window
                if not self.is_causal:
                    allowed &= gap > -self.window
        return allowed[:, None]


def _segments(bounds: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """(segment id, offset within the segment) of each of `length` tokens; -1 past the end."""
    bounds = bounds.to(torch.long)
    tokens = torch.arange(length, device=bounds.device)
    segment = torch.searchsorted(bounds[1:], tokens, right=True)
    inside = tokens < bounds[-1]
    offset = tokens - bounds[segment.clamp_max(bounds.numel() - 2)]
    return torch.where(inside, segment, -1), offset
