"""Flash attention on CPU for tests: transformers' real flash path over a dense stand-in kernel.

The flash-attn package needs CUDA. ``register_flash(monkeypatch)`` registers an implementation
named ``test_flash_attention`` with transformers' own ``flash_attention_forward`` and
``flash_attention_mask`` (what ``flash_attention_2`` and the Hub flash kernels use), and makes
transformers load the two kernel functions below for it. Everything transformers does for flash
(unpadding, packed ``position_ids``, ``cu_seq_lens``, sliding windows, softcapping) runs for real;
only the kernel is replaced, by a dense float64 computation of what flash-attn documents:
each sequence attends within itself, ``causal`` is aligned to the bottom-right corner, and
``window_size=(left, right)`` keeps keys in [i - left, i + right] around that diagonal.
"""

from __future__ import annotations

import pytest
import torch
import transformers.modeling_flash_attention_utils as flash_utils
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.flash_attention import flash_attention_forward
from transformers.masking_utils import flash_attention_mask

NAME = "test_flash_attention"


def _attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float | None,
    causal: bool,
    window: tuple[int, int],
    softcap: float,
) -> torch.Tensor:
    """One sequence: query (Tq, H, d), key and value (Tk, Hkv, d) -> (Tq, H, d); scale None:
    1 / sqrt(d), as flash-attn."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    group = query.shape[1] // key.shape[1]
    key, value = (x.double().repeat_interleave(group, dim=1) for x in (key, value))
    logits = torch.einsum("qhd,khd->hqk", query.double(), key) * scale
    if softcap > 0:
        logits = softcap * torch.tanh(logits / softcap)
    q_len, k_len = query.shape[0], key.shape[0]
    diagonal = torch.arange(q_len)[:, None] + (k_len - q_len)
    keys = torch.arange(k_len)[None, :]
    allowed = torch.ones(q_len, k_len, dtype=torch.bool)
    if causal:
        allowed &= keys <= diagonal
    if window[0] >= 0:
        allowed &= keys >= diagonal - window[0]
    if window[1] >= 0:
        allowed &= keys <= diagonal + window[1]
    probs = torch.softmax(logits.masked_fill(~allowed, -torch.inf), dim=-1).nan_to_num(0.0)
    return torch.einsum("hqk,khd->qhd", probs, value).to(query.dtype)


def flash_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    deterministic: bool = False,
) -> torch.Tensor:
    """(B, Tq, H, d) batch of equal-length sequences."""
    pattern = (softmax_scale, causal, window_size, softcap)
    return torch.stack([_attend(*x, *pattern) for x in zip(q, k, v, strict=True)])


def flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    deterministic: bool = False,
) -> torch.Tensor:
    """(total tokens, H, d): sequence s is tokens cu_seqlens[s]:cu_seqlens[s + 1]."""
    out = torch.zeros_like(q)
    for s in range(len(cu_seqlens_q) - 1):
        rows = slice(int(cu_seqlens_q[s]), int(cu_seqlens_q[s + 1]))
        cols = slice(int(cu_seqlens_k[s]), int(cu_seqlens_k[s + 1]))
        out[rows] = _attend(q[rows], k[cols], v[cols], softmax_scale, causal, window_size, softcap)
    return out


def register_flash(monkeypatch: pytest.MonkeyPatch) -> str:
    """Register the CPU flash implementation; returns its attn_implementation name."""
    AttentionInterface.register(NAME, flash_attention_forward)
    AttentionMaskInterface.register(NAME, flash_attention_mask)
    kernels = (flash_attn_func, flash_attn_varlen_func, None, flash_utils._pad_input)
    kernels += (flash_utils._unpad_input,)
    monkeypatch.setattr(flash_utils, "_lazy_imports", lambda *args, **kwargs: kernels)
    monkeypatch.setattr(flash_utils, "_loaded_implementation", None)
    return NAME
