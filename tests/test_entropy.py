"""attention_entropy against a naive float64 softmax over the full Tq x Tk matrix."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from qkmonitor.entropy import (
    EntropySums,
    attention_entropy,
    attention_max_score,
    default_max_tile,
    default_query_chunk,
    softcapped,
)
from qkmonitor.segments import SegmentMask

B, H, HKV, TQ, TK, D = 2, 4, 2, 9, 11, 8


def naive(
    query: torch.Tensor,
    key: torch.Tensor,
    scaling: float,
    allowed: torch.Tensor,
    query_mask: torch.Tensor | None = None,
    additive: torch.Tensor | float = 0.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """(4, H) sums from the full probability matrix; allowed: bool broadcastable to (B,H,Tq,Tk)."""
    query, key = query.double(), key.double()
    keys = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    logits = scaling * query @ keys.transpose(-1, -2)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    allowed = allowed.expand(logits.shape)
    logits = (logits + additive).masked_fill(~allowed, -math.inf)
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    entropy = -torch.xlogy(probs, probs).sum(-1)
    count = allowed.sum(-1).double()
    valid = count > 0
    if query_mask is not None:
        valid &= query_mask[:, None]
    long = valid & (count > 1)
    return torch.stack(
        [
            torch.where(valid, entropy, 0.0).sum((0, 2)),
            torch.where(long, entropy / count.log(), 0.0).sum((0, 2)),
            valid.sum((0, 2)).double(),
            long.sum((0, 2)).double(),
        ]
    )


@pytest.fixture
def qk() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(B, H, TQ, D, generator=generator, dtype=torch.float64) * 2
    key = torch.randn(B, HKV, TK, D, generator=generator, dtype=torch.float64) * 2
    return query, key


def random_mask(seed: int = 1) -> torch.Tensor:
    mask = torch.rand(B, 1, TQ, TK, generator=torch.Generator().manual_seed(seed)) > 0.4
    mask[1, 0, 3] = False  # a row without any allowed key
    mask[0, 0, 4] = False
    mask[0, 0, 4, 2] = True  # a row with a single allowed key
    return mask


@pytest.mark.parametrize("chunks", [(1, 1), (3, 2), (4, 5), (1024, 1024)])
def test_chunked_equals_naive_with_every_logit_term(qk, chunks):
    query, key = qk
    mask = random_mask()
    bias = torch.randn(1, H, TQ, TK, dtype=torch.float64)
    query_mask = torch.rand(B, TQ, generator=torch.Generator().manual_seed(2)) > 0.2
    got = attention_entropy(
        query,
        key,
        0.3,
        mask,
        query_mask=query_mask,
        bias=bias,
        softcap=2.0,
        key_chunk=chunks[0],
        query_chunk=chunks[1],
    )
    want = naive(query, key, 0.3, mask, query_mask, bias, softcap=2.0)
    torch.testing.assert_close(got.stacked(), want, rtol=0, atol=1e-12)
    assert got.rows.dtype == torch.float64 and got.rows.shape == (H,)


@pytest.mark.parametrize("chunks", [(2, 3), (1024, 1024)])
def test_causal_and_float_masks(qk, chunks):
    query, key = qk
    query = query[:, :, :TK]  # causal: keys end with the queries
    query_len = query.shape[2]
    causal = torch.ones(query_len, TK, dtype=torch.bool).tril()
    got = attention_entropy(query, key, 0.5, is_causal=True, key_chunk=chunks[0])
    want = naive(query, key, 0.5, causal)
    torch.testing.assert_close(got.stacked(), want, rtol=0, atol=1e-12)

    allowed = random_mask()[:, :, :1].expand(B, 1, query_len, TK) & causal  # padding & causal
    alibi = -torch.arange(TK, dtype=torch.float64).flip(0) * 0.25
    for masked in (-math.inf, torch.finfo(torch.float64).min):
        additive = torch.where(allowed, alibi, masked)  # ALiBi folded into the mask (Falcon)
        got = attention_entropy(
            query, key, 0.5, additive, key_chunk=chunks[0], query_chunk=chunks[1]
        )
        want = naive(query, key, 0.5, allowed, additive=torch.where(allowed, alibi, 0.0))
        torch.testing.assert_close(got.stacked(), want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("chunks", [(2, 3), (1024, 1024)])
def test_segment_masks_as_flash_describes_them(qk, chunks):
    query, key = qk  # 9 queries, 11 keys: causal aligns bottom-right
    padding = torch.ones(B, TK, dtype=torch.bool)
    padding[0, -3:] = False
    padding[1, :2] = False
    segments = SegmentMask.from_padding(padding, TQ, is_causal=True, window=4)
    dense = segments.block(0, TQ, 0, TK)
    got = attention_entropy(
        query, key, 0.4, segments=segments, key_chunk=chunks[0], query_chunk=chunks[1]
    )
    want = naive(query, key, 0.4, dense, query_mask=segments.query_mask)
    torch.testing.assert_close(got.stacked(), want, rtol=0, atol=1e-12)
    assert got.rows.tolist() == [float(segments.query_mask.sum())] * H

    extra = random_mask()  # combined with a dense mask, both apply
    got = attention_entropy(query, key, 0.4, extra, segments=segments, key_chunk=chunks[0])
    want = naive(query, key, 0.4, dense & extra)
    torch.testing.assert_close(got.stacked(), want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("chunks", [(2, 3), (1024, 1024)])
def test_attention_sink_is_one_more_outcome_of_the_softmax(qk, chunks):
    """gpt-oss style sinks: softmax over [logits, sink], the sink attending to no value."""
    query, key = qk
    mask = random_mask()
    sink = torch.tensor([0.5, -1.0, 3.0, 0.0], dtype=torch.float64)
    got = attention_entropy(
        query, key, 0.3, mask, sink=sink, key_chunk=chunks[0], query_chunk=chunks[1]
    )
    keys = key.repeat_interleave(H // HKV, dim=1)
    logits = (0.3 * query @ keys.transpose(-1, -2)).masked_fill(~mask, -math.inf)
    sinks = sink.reshape(1, H, 1, 1).expand(B, H, TQ, 1)
    probs = torch.softmax(torch.cat([logits, sinks], dim=-1), dim=-1)
    entropy = -torch.xlogy(probs, probs).sum(-1)  # (B, H, Tq), the sink's term included
    outcomes = mask.sum(-1).expand(B, H, TQ).double() + 1
    valid = outcomes > 1  # a row needs a real key; the one without any is left out
    want = torch.stack(
        [
            torch.where(valid, entropy, 0.0).sum((0, 2)),
            torch.where(valid, entropy / outcomes.log(), 0.0).sum((0, 2)),
            valid.sum((0, 2)).double(),
            valid.sum((0, 2)).double(),
        ]
    )
    torch.testing.assert_close(got.stacked(), want, rtol=0, atol=1e-12)


def test_rows_and_counts_follow_the_masks(qk):
    query, key = qk
    mask = random_mask()
    query_mask = torch.ones(B, TQ, dtype=torch.bool)
    query_mask[0, -2:] = False
    got = attention_entropy(query, key, 1.0, mask, query_mask=query_mask)
    has_key = mask.any(-1)[:, 0] & query_mask
    assert got.rows.tolist() == [float(has_key.sum())] * H
    long = (mask.sum(-1)[:, 0] > 1) & query_mask
    assert got.normalized_rows.tolist() == [float(long.sum())] * H
    entropy, normalized = got.means()
    assert (entropy >= 0).all() and (normalized >= 0).all() and (normalized <= 1).all()


def test_uniform_attention_has_log_n_entropy():
    query = torch.zeros(1, 2, 5, 4)
    key = torch.randn(1, 1, 5, 4)
    got = attention_entropy(query, key, 1.0, is_causal=True)
    expected = sum(math.log(n) for n in range(1, 6))
    torch.testing.assert_close(got.entropy, torch.full((2,), expected, dtype=torch.float64))
    torch.testing.assert_close(got.normalized, torch.full((2,), 4.0, dtype=torch.float64))
    assert got.rows.tolist() == [5.0, 5.0] and got.normalized_rows.tolist() == [4.0, 4.0]


def test_half_precision_inputs_are_upcast(qk):
    query, key = (x.to(torch.bfloat16) for x in qk)
    got = attention_entropy(query, key, 0.3, random_mask())
    want = attention_entropy(query.float(), key.float(), 0.3, random_mask())
    torch.testing.assert_close(got.stacked(), want.stacked(), rtol=0, atol=0)


def test_sums_add_and_round_trip(qk):
    query, key = qk
    first = attention_entropy(query[:1], key[:1], 0.3)
    second = attention_entropy(query[1:], key[1:], 0.3)
    both = attention_entropy(query, key, 0.3)
    torch.testing.assert_close((first + second).stacked(), both.stacked(), rtol=0, atol=1e-12)
    assert torch.equal(EntropySums.from_stacked(both.stacked()).stacked(), both.stacked())
    empty = EntropySums.from_stacked(torch.zeros(4, H))
    assert torch.isnan(empty.means()[0]).all()


class LargestAllocation(TorchDispatchMode):
    """Records the largest tensor any op creates, not counting views of the given inputs."""

    def __init__(self, *inputs: torch.Tensor) -> None:
        super().__init__()
        self.inputs = {tensor.untyped_storage().data_ptr() for tensor in inputs}
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if (
                isinstance(tensor, torch.Tensor)
                and tensor.untyped_storage().data_ptr() not in self.inputs
            ):
                self.largest = max(self.largest, tensor.numel())
        return out


def test_memory_is_blocks_not_the_attention_matrix():
    length, head_dim, key_chunk = 2048, 64, 512
    query = torch.randn(1, 1, length, head_dim)
    key = torch.randn(1, 1, length, head_dim)
    with LargestAllocation(query, key) as tracker:
        got = attention_entropy(query, key, head_dim**-0.5, is_causal=True, key_chunk=key_chunk)
    query_chunk = default_query_chunk(length, head_dim, key_chunk)
    assert tracker.largest <= max(query_chunk * key_chunk, key_chunk * head_dim)
    assert tracker.largest * 100 < length * length
    assert got.rows.item() == length


# ---- maximum score (attn_max_logit before softcapping) ------------------------------------------
def naive_max_score(
    query: torch.Tensor,
    key: torch.Tensor,
    scaling: float,
    allowed: torch.Tensor,
    query_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """(H,) the largest s q.k over allowed pairs of non-padding rows, from the full matrix."""
    keys = key.double().repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    logits = scaling * query.double() @ keys.transpose(-1, -2)
    allowed = allowed.expand(logits.shape)
    if query_mask is not None:
        allowed = allowed & query_mask[:, None, :, None]
    return logits.masked_fill(~allowed, -math.inf).amax((0, 2, 3))


@pytest.mark.parametrize("chunks", [(1, 1), (3, 2), (1024, 1024)])
@pytest.mark.parametrize("entropy", [True, False], ids=["with_entropy", "max_only"])
def test_max_score_is_the_largest_allowed_scaled_logit(qk, chunks, entropy):
    """Masks and padding queries respected; bias, softcap and sinks are not part of the score."""
    query, key = qk
    mask = random_mask()
    query_mask = torch.rand(B, TQ, generator=torch.Generator().manual_seed(2)) > 0.2
    bias = torch.randn(1, H, TQ, TK, dtype=torch.float64) * 10
    sink = torch.full((H,), 100.0, dtype=torch.float64)  # far above every score
    got = attention_entropy(
        query,
        key,
        0.3,
        mask,
        query_mask=query_mask,
        bias=bias,
        softcap=2.0,
        sink=sink,
        entropy=entropy,
        key_chunk=chunks[0],
        query_chunk=chunks[1],
    )
    want = naive_max_score(query, key, 0.3, mask, query_mask)
    torch.testing.assert_close(got.max_score, want, rtol=0, atol=1e-12)
    assert float(want.max()) > 2.0  # above the softcap: the score is taken before it
    if not entropy:
        assert got.rows.sum() == 0


@pytest.mark.parametrize("chunks", [(2, 3), (1024, 1024)])
def test_max_score_under_causal_segment_and_float_masks(qk, chunks):
    query, key = qk
    causal_query = query[:, :, :TK]
    causal = torch.ones(causal_query.shape[2], TK, dtype=torch.bool).tril()
    got = attention_entropy(causal_query, key, 0.5, is_causal=True, key_chunk=chunks[0])
    torch.testing.assert_close(got.max_score, naive_max_score(causal_query, key, 0.5, causal))

    allowed = random_mask()
    lowest = torch.tensor(torch.finfo(torch.float64).min, dtype=torch.float64)
    alibi = torch.where(allowed, 50.0, lowest)  # allowed entries' biases are not scores
    got = attention_entropy(query, key, 0.5, alibi, key_chunk=chunks[0], query_chunk=chunks[1])
    torch.testing.assert_close(got.max_score, naive_max_score(query, key, 0.5, allowed))

    padding = torch.ones(B, TK, dtype=torch.bool)
    padding[0, -3:] = False
    segments = SegmentMask.from_padding(padding, TQ, is_causal=True, window=4)
    got = attention_entropy(
        query, key, 0.4, segments=segments, key_chunk=chunks[0], query_chunk=chunks[1]
    )
    want = naive_max_score(query, key, 0.4, segments.block(0, TQ, 0, TK), segments.query_mask)
    torch.testing.assert_close(got.max_score, want, rtol=0, atol=1e-12)


def test_max_scores_combine_with_max_and_softcap_maps_them():
    query = torch.randn(2, 2, 5, 4, generator=torch.Generator().manual_seed(4)) * 3
    key = torch.randn(2, 1, 5, 4, generator=torch.Generator().manual_seed(5)) * 3
    first = attention_entropy(query[:1], key[:1], 0.5)
    second = attention_entropy(query[1:], key[1:], 0.5)
    both = attention_entropy(query, key, 0.5)
    assert torch.equal((first + second).max_score, both.max_score)
    none = torch.zeros(2, 5, dtype=torch.bool)
    empty = attention_entropy(query, key, 0.5, query_mask=none)
    assert torch.isneginf(empty.max_score).all()
    score = torch.tensor([-3.0, 0.5, 40.0], dtype=torch.float64)
    assert torch.equal(softcapped(score, None), score)
    torch.testing.assert_close(softcapped(score, 2.0), 2.0 * torch.tanh(score / 2.0))


def padded_causal_batch(dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """GQA q/k over 150 tokens (3 default tiles, the last partial), and the 4D bool mask sdpa
    gets for a causal batch with right and left padding, plus its real-query mask."""
    generator = torch.Generator().manual_seed(7)
    batch, length = 3, 150
    query = (torch.randn(batch, 4, length, 16, generator=generator) * 3).to(dtype)
    key = (torch.randn(batch, 2, length, 16, generator=generator) * 3).to(dtype)
    real = torch.ones(batch, length, dtype=torch.bool)
    real[0, 97:] = False  # right padding
    real[1, :40] = False  # left padding
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    mask = causal[None, None] & real[:, None, None, :]
    return query, key, mask, real


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_max_only_pass_equals_the_full_matrix_on_padded_and_causal_batches(dtype):
    """The max-only pass in its default tiles (and odd ones) against the full q k^T maximum in
    float64 of the same (bf16: the same rounded) inputs, and against the entropy pass's max."""
    query, key, mask, real = padded_causal_batch(dtype)
    scaling = 16**-0.5
    assert default_max_tile(query.shape[2], 16, 3 * 4) == 64  # 3 tiles per side
    cases = {
        "causal": ({"is_causal": True}, torch.ones(150, 150, dtype=torch.bool).tril(), None),
        "padded": ({"attention_mask": mask, "query_mask": real}, mask, real),
    }
    for name, (arguments, allowed, rows) in cases.items():
        want = naive_max_score(query, key, scaling, allowed, rows)
        fused = attention_entropy(query, key, scaling, **arguments).max_score
        for tiles in ({}, {"key_chunk": 23, "query_chunk": 17}, {"key_chunk": 200}):
            got = attention_max_score(query, key, scaling, **arguments, **tiles)
            assert got.dtype == torch.float64 and got.shape == (4,)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=name)
        torch.testing.assert_close(fused, want, rtol=1e-6, atol=1e-6, msg=name)
    # the padded rows' own scores are not counted: here they are the largest
    query[0, :, 97:] *= 50
    got = attention_max_score(query, key, scaling, mask, query_mask=real)
    torch.testing.assert_close(
        got, naive_max_score(query, key, scaling, mask, real), rtol=1e-6, atol=1e-6
    )
    assert (attention_max_score(query, key, scaling, mask) > got).all()


def test_max_only_pass_memory_is_one_query_sized_tile():
    """A float32 logits tile holds at most as many elements as the queries (O(T), not O(T^2)),
    and above the diagonal nothing is computed, whether causality is a flag or a 4D mask."""
    length, head_dim = 2048, 64
    query = torch.randn(1, 2, length, head_dim)
    key = torch.randn(1, 2, length, head_dim)
    with LargestAllocation(query, key) as tracker:
        attention_max_score(query, key, head_dim**-0.5, is_causal=True)
    tile = default_max_tile(length, head_dim, 2)
    assert tile * tile <= length * head_dim
    assert default_max_tile(length, head_dim, 2, cpu=False) ** 2 <= length * head_dim
    assert tracker.largest <= 2 * tile * tile
    assert tracker.largest * 16 < 2 * length * length

    products = 0

    class CountProducts(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            nonlocal products
            out = func(*args, **(kwargs or {}))
            if func in (torch.ops.aten.bmm.default, torch.ops.aten.mm.default):
                products += out.numel()
            return out

    causal = torch.ones(length, length, dtype=torch.bool).tril()[None, None]
    lower = 2 * length * (length + 1) // 2  # the causal triangle, both heads
    for arguments in ({"is_causal": True}, {"attention_mask": causal}):  # flag; 4D mask (eager)
        products = 0
        with CountProducts():
            attention_max_score(query, key, head_dim**-0.5, **arguments)
        assert lower <= products <= lower + 2 * length * tile  # + half of each diagonal tile


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_max_only_pass_on_cuda_equals_the_full_matrix(dtype):
    """The same padded/causal GQA batch on the GPU, in the GPU's tiles (sqrt(Tq d) per side)."""
    query, key, mask, real = padded_causal_batch(dtype)
    scaling = 16**-0.5
    want = naive_max_score(query, key, scaling, mask, real)
    got = attention_max_score(
        query.cuda(), key.cuda(), scaling, mask.cuda(), query_mask=real.cuda()
    )
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), want, rtol=1e-6, atol=1e-6)
    causal = torch.ones(150, 150, dtype=torch.bool).tril()
    got = attention_max_score(query.cuda(), key.cuda(), scaling, is_causal=True)
    torch.testing.assert_close(
        got.cpu(), naive_max_score(query, key, scaling, causal), rtol=1e-6, atol=1e-6
    )
