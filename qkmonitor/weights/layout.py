"""The plan of an audit: where one attention layer's Q/K weights are and how to cut them.

``AttentionLayer`` is what discovery (``qkmonitor.weights.discovery.plan``) produces for every
attention module: checkpoint names, head counts, the softmax scale, QK-norm gains and the
``Packing`` of the rows. ``split_heads`` (and ``layer_weights``, which casts first) cuts the raw
tensors of one layer into per-head (d_head x d_in) Q and K slices for ``qkmonitor.spectrum``;
``qk_rows`` says which stored outputs make each head (QK-Clip rescales exactly those).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor

from qkmonitor.errors import CorruptWeightsError
from qkmonitor.weights.mla import MLADims, MLANames

__all__ = [
    "AttentionLayer",
    "MLALayout",
    "Packing",
    "layer_tensors",
    "layer_weights",
    "output_dim",
    "qk_rows",
    "split_heads",
]


class Packing(Enum):
    """How Q and K rows sit in the checkpoint (nn.Linear convention: rows are outputs)."""

    SEPARATE = "separate"  # q and k in their own Linear weights, (H d, d_in) and (Hkv d, d_in)
    CONV1D_QKV = "conv1d_qkv"  # GPT-2 Conv1D weight (d_in, 3 H d): columns [Q | K | V]
    PER_HEAD_QKV = "per_head_qkv"  # rows [q_0; k_0; v_0; q_1; k_1; v_1; ...] (GPT-NeoX, BLOOM)
    STACKED_QKV = "stacked_qkv"  # rows [Q (H d); K (Hkv d); V (Hkv d)] (Phi-3, Falcon-MQA)
    GROUPED_QKV = "grouped_qkv"  # per key head g: rows [q_g1 .. q_gr; k_g; v_g] (Falcon-40B+)
    GATED_Q = "gated_q"  # q rows per head [q_h (d); gate_h (d)], k separate (Qwen3-Next)
    MLA = "mla"  # multi-head latent attention: qkmonitor.weights.mla, AttentionLayer.mla
    # CodeGen: rows in 4 model-parallel chunks of 3 E/4 rows, each [q_c; v_c; k_c] (E/4 each);
    # queries are the q_c in chunk order, keys the k_c (CodeGenAttention.forward, mp_num = 4)
    MP4_QVK = "mp4_qvk"


@dataclass(frozen=True)
class AttentionLayer:
    """Everything needed to read and split one attention module's Q/K weights."""

    block: str  # the tower and role of its attention stack: "self", "text", "vision", "cross", ...
    layer: int
    q: str  # full tensor names in the checkpoint (equal for fused layouts)
    k: str
    packing: Packing
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_in: int
    scale: float
    causal: bool
    q_norm: str | None = None
    k_norm: str | None = None
    norm_offset: float = 0.0
    mla: MLALayout | None = None  # Packing.MLA: the latent path's tensors and sizes

    @property
    def tensors(self) -> list[str]:
        """The checkpoint tensors this layer needs, without duplicates."""
        names = [self.q, self.k, self.q_norm, self.k_norm]
        names += self.mla.names.tensors if self.mla is not None else []
        return list(dict.fromkeys(n for n in names if n))

    @property
    def rows(self) -> dict[str, list[tuple[int, int]]]:
        """Tensors of which only some rows are needed -> those rows (a source's row selection):
        MLA's kv_b_proj key rows, not its value rows."""
        return {} if self.mla is None else {self.mla.names.kv_b_proj: self.mla.dims.key_rows()}


@dataclass(frozen=True)
class MLALayout:
    """One MLA layer: checkpoint names and sizes of its latent q/k path (qkmonitor.weights.mla),
    and the constant factors some models apply after the latent norms (LongCat-Flash)."""

    names: MLANames
    dims: MLADims
    q_latent_scale: float = 1.0
    kv_latent_scale: float = 1.0


def _rows(weight: Tensor, packing: Packing) -> Tensor:
    """The fused weight as (rows, d_in), nn.Linear convention."""
    return weight.t() if packing is Packing.CONV1D_QKV else weight


def split_heads(
    layer: AttentionLayer,
    q_weight: Tensor,
    k_weight: Tensor,
    q_gain: Tensor | None = None,
    k_gain: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-head slices (H, d_head, d_in) of W_Q and (Hkv, d_head, d_in) of W_K of one layer.

    q_weight/k_weight: the checkpoint tensors named layer.q / layer.k (the same fused tensor for
    fused packings). q_gain/k_gain: QK-norm gains (size d_head, or one per output row), folded
    in as diag(offset + gain) @ W. Differentiable: the regularizer uses it on live weights.
    """
    h, kv, d = layer.n_heads, layer.n_kv_heads, layer.head_dim
    packing = layer.packing
    if packing is Packing.SEPARATE:
        wq, wk = q_weight, k_weight
    elif packing is Packing.GATED_Q:
        wq, wk = q_weight.reshape(h, 2, d, -1)[:, 0], k_weight
    elif packing is Packing.PER_HEAD_QKV:
        per_head = _rows(q_weight, packing).reshape(h, 3, d, -1)
        wq, wk = per_head[:, 0], per_head[:, 1]
    elif packing is Packing.GROUPED_QKV:
        grouped = _rows(q_weight, packing).reshape(kv, h // kv + 2, d, -1)
        wq, wk = grouped[:, :-2].flatten(0, 1), grouped[:, -2]
    elif packing is Packing.MP4_QVK:
        q_rows, k_rows = qk_rows(layer)
        wq, wk = q_weight[q_rows], k_weight[k_rows]
    else:  # CONV1D_QKV and STACKED_QKV: [Q; K; V] blocks of rows
        rows = _rows(q_weight, packing)
        wq, wk = rows[: h * d], rows[h * d : (h + kv) * d]
    wq = _apply_gain(wq.reshape(h, d, -1), q_gain, layer.norm_offset)
    wk = _apply_gain(wk.reshape(kv, d, -1), k_gain, layer.norm_offset)
    return wq, wk


def layer_weights(
    layer: AttentionLayer, tensors: dict[str, Tensor], dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor]:
    """Per-head (H, d, d_in) Q and (Hkv, d, d_in) K of one planned layer from its raw tensors.

    dtype: of the result (default: the tensors' own, at least float32). The tensors are cast
    before QK-norm gains are folded in: that product in bf16 rounds the weights to 3 digits.
    Differentiable.
    """

    def cast(tensor: Tensor) -> Tensor:
        return tensor.to(dtype or torch.promote_types(tensor.dtype, torch.float32))

    gains = [cast(tensors[n]) if n else None for n in (layer.q_norm, layer.k_norm)]
    return split_heads(layer, cast(tensors[layer.q]), cast(tensors[layer.k]), *gains)


def _apply_gain(w: Tensor, gain: Tensor | None, offset: float) -> Tensor:
    """diag(offset + gain) on the output rows of per-head weights (heads, d_head, d_in)."""
    if gain is None:
        return w
    heads, head_dim, _ = w.shape
    gain = gain.to(w.dtype) + offset
    if gain.numel() == head_dim:  # one gain per head dimension, shared by heads (Qwen3, Gemma 3)
        return w * gain.reshape(1, head_dim, 1)
    if gain.numel() == heads * head_dim:  # one gain per projection row (OLMo 2)
        return w * gain.reshape(heads, head_dim, 1)
    raise CorruptWeightsError(
        f"QK-norm gain of size {gain.numel()} fits neither d_head={head_dim} nor "
        f"{heads}x{head_dim} rows"
    )


def layer_tensors(layers: Sequence[AttentionLayer]) -> list[str]:
    """All tensors the planned layers need, in order, without duplicates."""
    return list(dict.fromkeys(name for layer in layers for name in layer.tensors))


def output_dim(packing: Packing) -> int:
    """The dimension of the stored Q/K weight that indexes projection outputs (rows of
    nn.Linear; GPT-2's Conv1D stores them as columns)."""
    return 1 if packing is Packing.CONV1D_QKV else 0


def qk_rows(layer: AttentionLayer) -> tuple[Tensor, Tensor]:
    """Which outputs of the stored tensors make each head: (H, d_head) indices into layer.q's
    output dimension for the query heads, (Hkv, d_head) into layer.k's for the key heads; the
    same tensor for fused packings, so that ``split_heads`` slices are ``w[rows]``. A bias of
    the projection has the same outputs."""
    h, kv, d = layer.n_heads, layer.n_kv_heads, layer.head_dim
    heads, dims = torch.arange(h)[:, None], torch.arange(d)[None, :]
    kv_heads = torch.arange(kv)[:, None]
    packing = layer.packing
    if packing is Packing.SEPARATE:
        return heads * d + dims, kv_heads * d + dims
    if packing is Packing.PER_HEAD_QKV:  # [q_h; k_h; v_h] per head
        return heads * 3 * d + dims, kv_heads * 3 * d + d + dims
    if packing is Packing.GROUPED_QKV:  # per key head g: [q_g1 .. q_gr; k_g; v_g]
        group = h // kv
        q_rows = (heads // group) * (group + 2) * d + (heads % group) * d + dims
        return q_rows, kv_heads * (group + 2) * d + group * d + dims
    if packing is Packing.MP4_QVK:  # chunk c of 3 E/4 rows: [q_c; v_c; k_c]
        local, row = h * d // 4, heads * d + dims
        chunk, offset = (row // local) * 3 * local, row % local
        return chunk + offset, chunk + 2 * local + offset
    return heads * d + dims, h * d + kv_heads * d + dims  # [Q; K; V] blocks (CONV1D, STACKED)
