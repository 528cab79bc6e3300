"""SegmentMask against flash attention's documented semantics, written out one sequence at a time.

flash_attn_varlen_func runs each sequence on its own: queries q_0..q_{Lq-1} and keys
k_0..k_{Lk-1} of the sequence, with causal aligned bottom-right (query r sees keys
c <= r + Lk - Lq) and window_size=(left, right) keeping keys in [r' - left, r' + right] around
r' = r + Lk - Lq. The reference builds the dense (Tq, Tk) mask from exactly that.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from qkmonitor.segments import SegmentMask


def dense_reference(
    sequences: list[tuple[list[int], list[int]]],
    shape: tuple[int, int],
    causal: bool,
    window: int | None,
) -> torch.Tensor:
    """(Tq, Tk) bool from sequences given as (query token indices, key token indices)."""
    allowed = torch.zeros(shape, dtype=torch.bool)
    left = right = -1 if window is None else window - 1
    for queries, keys in sequences:
        shift = len(keys) - len(queries)
        for r, i in enumerate(queries):
            for c, j in enumerate(keys):
                centre = r + shift
                ok = (not causal or c <= centre) and (left < 0 or c >= centre - left)
                ok = ok and (right < 0 or causal or c <= centre + right)
                allowed[i, j] = ok
    return allowed


def expand(mask: SegmentMask, q_len: int, k_len: int, chunk: int) -> torch.Tensor:
    """The whole (B, Tq, Tk) mask, assembled from blocks of `chunk` x `chunk`."""
    rows = []
    for q0 in range(0, q_len, chunk):
        blocks = [
            mask.block(q0, min(q0 + chunk, q_len), k0, min(k0 + chunk, k_len))
            for k0 in range(0, k_len, chunk)
        ]
        rows.append(torch.cat(blocks, dim=-1))
    return torch.cat(rows, dim=-2)[:, 0]


PADDING = torch.tensor(
    [
        [1, 1, 1, 1, 1, 1, 1, 0, 0],  # right-padded
        [0, 0, 0, 1, 1, 1, 1, 1, 1],  # left-padded
        [1, 1, 0, 1, 0, 1, 1, 1, 1],  # holes: flash unpads them too
    ]
)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [None, 1, 3])
@pytest.mark.parametrize("q_len", [9, 4, 1])
def test_padding_mask_as_flash_unpads_it(causal, window, q_len):
    mask = SegmentMask.from_padding(PADDING, q_len, is_causal=causal, window=window)
    got = expand(mask, q_len, PADDING.shape[1], chunk=2)
    for b, row in enumerate(PADDING.bool()):
        keys = row.nonzero().flatten().tolist()
        queries = [0] if q_len == 1 else [i for i, real in enumerate(row[-q_len:]) if real]
        want = dense_reference([(queries, keys)], (q_len, len(row)), causal, window)
        assert torch.equal(got[b], want), (b, got[b].int(), want.int())
    if q_len > 1:
        assert torch.equal(mask.query_mask, PADDING[:, -q_len:].bool())


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [None, 2])
def test_packed_boundaries(causal, window):
    query_bounds = torch.tensor([0, 3, 4, 8], dtype=torch.int32)
    key_bounds = torch.tensor([0, 3, 6, 10], dtype=torch.int32)  # sequence 1 has a prefix
    mask = SegmentMask.from_boundaries(
        query_bounds, key_bounds, 9, 11, is_causal=causal, window=window
    )
    q_pairs = itertools.pairwise(query_bounds.tolist())
    k_pairs = itertools.pairwise(key_bounds.tolist())
    sequences = [
        (list(range(q0, q1)), list(range(k0, k1)))
        for (q0, q1), (k0, k1) in zip(q_pairs, k_pairs, strict=True)
    ]
    want = dense_reference(sequences, (9, 11), causal, window)
    assert torch.equal(expand(mask, 9, 11, chunk=4)[0], want)
    assert mask.query_mask.tolist() == [[True] * 8 + [False]]  # token 8 is past the last bound
