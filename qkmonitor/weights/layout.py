"""The plan of an audit: where one attention layer's Q/K weights are and how to cut them.

``AttentionLayer`` is what discovery (``qkmonitor.weights.discovery.plan``) produces for every
attention module: checkpoint names, head counts, the softmax scale, QK-norm gains and the
``Packing`` of the rows. ``split_heads`` (and ``layer_weights``, which casts first) cuts the raw
tensors of one layer into per-head (d_head x d_in) Q and K slices for ``qkmonitor.spectrum``;
``qk_rows`` says which stored outputs make each head (QK-Clip rescales exactly those).
"""

from __future__ import annotations

import math
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


def _index(h: int, kv: int, d: int) -> tuple[Tensor, Tensor, Tensor]:
    return torch.arange(h)[:, None], torch.arange(kv)[:, None], torch.arange(d)[None, :]


def _separate_rows(h: int, kv: int, d: int) -> tuple[Tensor, Tensor]:
    heads, kv_heads, dims = _index(h, kv, d)
    return heads * d + dims, kv_heads * d + dims


def _stacked_rows(h: int, kv: int, d: int) -> tuple[Tensor, Tensor]:
    heads, kv_heads, dims = _index(h, kv, d)
    return heads * d + dims, h * d + kv_heads * d + dims


def _gate_stacked_rows(h: int, kv: int, d: int) -> tuple[Tensor, Tensor]:
    heads, kv_heads, dims = _index(h, kv, d)
    return h * d + heads * d + dims, 2 * h * d + kv_heads * d + dims


def _per_head_rows(h: int, kv: int, d: int) -> tuple[Tensor, Tensor]:
    heads, kv_heads, dims = _index(h, kv, d)
    return heads * 3 * d + dims, kv_heads * 3 * d + d + dims


def _grouped_rows(h: int, kv: int, d: int) -> tuple[Tensor, Tensor]:
    heads, kv_heads, dims = _index(h, kv, d)
    group = h // kv
    q_rows = (heads // group) * (group + 2) * d + (heads % group) * d + dims
    return q_rows, kv_heads * (group + 2) * d + group * d + dims


def _gated_rows(h: int, kv: int, d: int) -> tuple[Tensor, Tensor]:
    heads, kv_heads, dims = _index(h, kv, d)
    return heads * 2 * d + dims, kv_heads * d + dims


def _mp4_rows(h: int, kv: int, d: int) -> tuple[Tensor, Tensor]:
    heads, _, dims = _index(h, kv, d)
    local, row = h * d // 4, heads * d + dims
    chunk, offset = (row // local) * 3 * local, row % local
    return chunk + offset, chunk + 2 * local + offset


class Packing(Enum):
    """How Q and K rows sit in the checkpoint (nn.Linear convention: rows are outputs).

    Each packing is one object that knows its rows: ``rows(h, kv, d)`` (which stored outputs
    make each head), ``n_kv_heads`` (the key heads its stored sizes imply), ``output_dim`` (the
    dimension of the stored weight that indexes outputs), ``fused`` (q and k in one tensor) and
    ``clippable`` (QK-Clip may rescale its rows in place).
    """

    #: q and k in their own Linear weights, (H d, d_in) and (Hkv d, d_in)
    SEPARATE = ("separate", _separate_rows, False, False, True)
    #: GPT-2 Conv1D weight (d_in, 3 H d): columns [Q | K | V]
    CONV1D_QKV = ("conv1d_qkv", _stacked_rows, True, True, True)
    #: rows [q_0; k_0; v_0; q_1; k_1; v_1; ...] (GPT-NeoX, BLOOM)
    PER_HEAD_QKV = ("per_head_qkv", _per_head_rows, True, False, True)
    #: rows [Q (H d); K (Hkv d); V (Hkv d)] (Phi-3, Falcon-MQA, nn.MultiheadAttention)
    STACKED_QKV = ("stacked_qkv", _stacked_rows, True, False, True)
    #: rows [gate (H d); Q (H d); K (Hkv d); V (Hkv d)] (HRM's gqkv_proj, cut by transformers)
    GATE_QKV = ("gate_qkv", _gate_stacked_rows, True, False, True)
    #: per key head g: rows [q_g1 .. q_gr; k_g; v_g] (Falcon-40B+)
    GROUPED_QKV = ("grouped_qkv", _grouped_rows, True, False, True)
    #: q rows per head [q_h (d); gate_h (d)], k separate (Qwen3-Next)
    GATED_Q = ("gated_q", _gated_rows, False, False, False)
    #: multi-head latent attention: qkmonitor.weights.mla, AttentionLayer.mla (no plain rows)
    MLA = ("mla", None, False, False, False)
    #: CodeGen: rows in 4 model-parallel chunks of 3 E/4 rows, each [q_c; v_c; k_c] (E/4 each);
    #: queries are the q_c in chunk order, keys the k_c (CodeGenAttention.forward, mp_num = 4)
    MP4_QVK = ("mp4_qvk", _mp4_rows, True, False, False)
    #: torch's nn.MultiheadAttention: its own parameter in_proj_weight, rows [Q (E); K (E);
    #: V (E)], not a Linear child's weight (QK-Clip, which rescales a child's .weight, skips it)
    IN_PROJ_QKV = ("in_proj_qkv", _stacked_rows, True, False, False)
    #: nn.MultiheadAttention with a value width of its own (vdim): q_proj_weight and
    #: k_proj_weight, its own parameters, rows as SEPARATE
    IN_PROJ_SEPARATE = ("in_proj_separate", _separate_rows, False, False, False)
    #: per head one block of rows [q_h (d); k_h (d); v_h (the rest)], the value wider than d
    #: (LeViT: attention_ratio d): blocks of AttentionLayer.head_block rows, H = Hkv; a
    #: BatchNorm follows (AttentionLayer.batch_norm), so QK-Clip does not rescale the rows
    PER_HEAD_BLOCK = ("per_head_block", None, True, False, False)
    #: q separate (H d rows); k's tensor per head one block [k_h (d); v_h (the rest)] of
    #: AttentionLayer.head_block rows, H = Hkv (LeViT's subsampling attention); each behind
    #: its own BatchNorm (AttentionLayer.batch_norm, k_batch_norm), so QK-Clip does not rescale
    SEPARATE_KV_BLOCK = ("separate_kv_block", None, False, False, False)
    #: q separate; k's tensor holds rows [K (Hkv d); V (Hkv d)] (Granite Speech's to_kv, chunked
    #: in two): the key rows are its first Hkv d
    SEPARATE_KV = ("separate_kv", _separate_rows, False, False, False)
    #: q and k as the attention module's own parameters of shape (d_in, H, d), used through
    #: einsum("ibh,hnd->ibnd") (XLNet): head h's W_Q^h is q[:, h, :]^T; split as (d_in, H d)
    #: columns
    HEAD_PARAMETERS = ("head_parameters", _separate_rows, False, True, False)

    def __init__(self, label: str, rows, fused: bool, transposed: bool, clippable: bool) -> None:
        self.label = label
        self._rows = rows
        self.fused = fused
        self.output_dim = 1 if transposed else 0
        self.clippable = clippable

    def __repr__(self) -> str:
        return f"<Packing.{self.name}>"

    def rows(self, n_heads: int, n_kv_heads: int, head_dim: int) -> tuple[Tensor, Tensor]:
        """(H, d) indices of the query heads' outputs in the q tensor, (Hkv, d) of the key
        heads' in the k tensor (the same tensor when fused)."""
        if self._rows is None:
            raise ValueError(f"{self} has no per-head rows (qkmonitor.weights.mla)")
        return self._rows(n_heads, n_kv_heads, head_dim)

    def n_kv_heads(self, q_outputs: int, k_outputs: int, n_heads: int, head_dim: int) -> int:
        """The key heads the stored output sizes imply, or 0 when they fit no whole number."""
        if self is Packing.PER_HEAD_BLOCK:  # blocks of q, k and a value at least d wide
            block, rest = divmod(q_outputs, n_heads)
            return n_heads if not rest and block > 2 * head_dim else 0
        if self is Packing.SEPARATE_KV_BLOCK:  # q (H d); blocks of k and a value
            block, rest = divmod(k_outputs, n_heads)
            fits = not rest and block > head_dim and q_outputs == n_heads * head_dim
            return n_heads if fits else 0
        if self.fused:
            leading = 2 if self is Packing.GATE_QKV else 1  # Q (and a gate) before K and V
            n_kv, rest = divmod(q_outputs - leading * n_heads * head_dim, 2 * head_dim)
        else:
            per_head = 2 * head_dim if self is Packing.GATED_Q else head_dim
            if q_outputs != n_heads * per_head:
                return 0
            n_kv, rest = divmod(k_outputs, head_dim * (2 if self is Packing.SEPARATE_KV else 1))
        return 0 if rest or n_kv <= 0 else n_kv

    def split(self, q_weight: Tensor, k_weight: Tensor, h: int, kv: int, d: int):
        """(H, d, d_in) and (Hkv, d, d_in) per-head slices of the stored q/k weights (views
        where the rows are contiguous)."""
        q_rows, k_rows = self.rows(h, kv, d)
        if self is Packing.HEAD_PARAMETERS:  # (d_in, H, d) -> (d_in, H d): outputs as columns
            q_weight, k_weight = q_weight.flatten(1), k_weight.flatten(1)
        return _take(q_weight.movedim(self.output_dim, 0), q_rows), _take(
            k_weight.movedim(self.output_dim, 0), k_rows
        )


def _take(weight: Tensor, rows: Tensor) -> Tensor:
    """weight[rows] (heads, d, d_in): a view when the rows are one contiguous range."""
    first, count = int(rows[0, 0]), rows.numel()
    if torch.equal(rows.flatten(), torch.arange(first, first + count)):
        return weight[first : first + count].reshape(*rows.shape, -1)
    return weight[rows]


@dataclass(frozen=True)
class AttentionLayer:
    """Everything needed to read and split one attention module's Q/K weights.

    ``discovery.attention_modules`` yields one per module with the model's own parameter names
    (block "" and layer 0 until planned); ``discovery.plan`` maps them to checkpoint names and
    names the block and layer.
    """

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
    path: str = ""  # the module's path in the model
    cross: bool = False  # keys from another sequence (encoder states, another tower)
    #: parts of the module that do not change the content logit, left out of W^h with what
    #: they do, e.g. ("v_norm: a norm on the values",); named in the result
    left_out: tuple[str, ...] = ()
    #: an attention pooling head: learned queries (a probe) over a tower's states; its block is
    #: named ``<tower>_pool``
    pool: bool = False
    #: projections applied to the inputs before q's and k's own (Aria: q_proj and k_proj, then
    #: the nn.MultiheadAttention's in_proj): W_Q^h = W_Q^h(q) W_q_pre, (d_mid, d_in) each
    q_pre: str | None = None
    k_pre: str | None = None
    #: a per-head log temperature (Swin v2's cosine attention ``logit_scale``, H values): head
    #: h's logits are multiplied by exp(min(t_h, head_scale_max)), folded into W_Q^h
    head_scale: str | None = None
    head_scale_max: float = math.inf
    #: Packing.PER_HEAD_BLOCK: the rows of one head's block [q_h; k_h; v_h]
    head_block: int = 0
    #: a BatchNorm1d on the q/k projection's outputs (LeViT's MLPLayerWithBN), folded in as in
    #: inference: row r scaled by weight_r / sqrt(running_var_r + batch_norm_eps) (its shift
    #: is a bias); its path, whose weight and running_var the layer reads
    batch_norm: str | None = None
    batch_norm_eps: float = 0.0
    #: Packing.SEPARATE_KV_BLOCK: the BatchNorm on k's projection (batch_norm is q's), folded in
    #: alike with batch_norm_eps
    k_batch_norm: str | None = None
    #: q's and k's projections are grouped pointwise convolutions (SqueezeBERT): the stored
    #: weight (out, in / groups, 1) is the diagonal blocks of W, expanded by ``split_heads``
    q_groups: int = 1
    k_groups: int = 1
    #: a learned per-dimension query scale v (d_head values shared by the heads: TimesFM's
    #: ``scaling``, Gemma 3n/4 audio's ``per_dim_scale``): query dimension i is multiplied by
    #: softplus(v_i), folded into W_Q^h as diag(softplus(v)); any constant factor is in ``scale``
    q_dim_scale: str | None = None
    #: the gain of an RMS norm between q_pre and q (DeepSeek-V4's q_a_norm on its query latent):
    #: W_Q^h = W_Q^h(q) diag(g) W_q_pre, the norm's per-token factor left out as for QK-norm
    q_pre_norm: str | None = None
    #: the rows of q_pre (its latent's size) where q_pre is not n_heads * head_dim wide (Aria's)
    q_pre_rank: int = 0

    @property
    def tensors(self) -> list[str]:
        """The checkpoint tensors this layer needs, without duplicates."""
        names = [self.q, self.k, self.q_norm, self.k_norm, self.q_pre, self.k_pre]
        names += [self.head_scale, self.q_dim_scale, self.q_pre_norm]
        for norm in (self.batch_norm, self.k_batch_norm):
            names += [f"{norm}.weight", f"{norm}.running_var"] if norm else []
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
    q_weight = _block_diagonal(q_weight, layer.q_groups)
    k_weight = _block_diagonal(k_weight, layer.k_groups)
    if layer.packing in (Packing.PER_HEAD_BLOCK, Packing.SEPARATE_KV_BLOCK):
        q_rows, k_rows = qk_rows(layer)
        wq, wk = _take(q_weight, q_rows), _take(k_weight, k_rows)
    else:
        wq, wk = layer.packing.split(q_weight, k_weight, h, kv, d)
    wq = _apply_gain(wq, q_gain, layer.norm_offset)
    wk = _apply_gain(wk, k_gain, layer.norm_offset)
    return wq, wk


def layer_weights(
    layer: AttentionLayer,
    tensors: dict[str, Tensor],
    dtype: torch.dtype | None = None,
    *,
    stored_if_split: bool = False,
) -> tuple[Tensor, Tensor]:
    """Per-head (H, d, d_in) Q and (Hkv, d, d_in) K of one planned layer from its raw tensors.

    dtype: of the result (default: the tensors' own, at least float32). The tensors are cast
    before QK-norm gains are folded in: that product in bf16 rounds the weights to 3 digits.
    stored_if_split: where the heads are only split (the layer reads no tensor but q and k: no
    gain, pre-projection or head or per-dimension scale), return them in their stored dtype
    instead, for a caller that converts them exactly itself (``spectrum.head_spectra``, key head
    by key head).
    Differentiable.
    """

    def cast(tensor: Tensor) -> Tensor:
        return tensor.to(dtype or torch.promote_types(tensor.dtype, torch.float32))

    # every step below but the split reads a tensor of its own (a gain, a pre-projection, a
    # head scale): a layer that reads only q and k is only split, whatever fields come later
    only_split = not set(layer.tensors) - {layer.q, layer.k}
    if stored_if_split and only_split:
        return split_heads(layer, tensors[layer.q], tensors[layer.k])
    gains = [cast(tensors[n]) if n else None for n in (layer.q_norm, layer.k_norm)]
    q_weight, k_weight = cast(tensors[layer.q]), cast(tensors[layer.k])

    def folded(weight: Tensor, norm: str) -> Tensor:  # rows scaled by the BatchNorm's factor
        gain = cast(tensors[f"{norm}.weight"])
        return (
            weight
            * (gain / (cast(tensors[f"{norm}.running_var"]) + layer.batch_norm_eps).sqrt())[:, None]
        )

    if layer.batch_norm:  # a fused tensor (Packing.PER_HEAD_BLOCK) is scaled once
        q_weight = folded(q_weight, layer.batch_norm)
        k_weight = folded(k_weight, layer.k_batch_norm) if layer.k_batch_norm else q_weight
    wq, wk = split_heads(layer, q_weight, k_weight, *gains)
    if layer.q_pre:  # (H, d, d_mid) @ (d_mid, d_in): the product of the two projections
        q_pre = cast(tensors[layer.q_pre])
        if layer.q_pre_norm:
            gain = cast(tensors[layer.q_pre_norm]).reshape(-1)
            if gain.numel() != q_pre.shape[0]:
                raise CorruptWeightsError(
                    f"{layer.q_pre_norm} has {gain.numel()} gains for {q_pre.shape[0]} rows of "
                    f"{layer.q_pre}",
                    tensor=layer.q_pre_norm,
                )
            q_pre = gain[:, None] * q_pre
        wq = wq @ q_pre
    if layer.k_pre:
        wk = wk @ cast(tensors[layer.k_pre])
    if layer.head_scale:
        log_scale = cast(tensors[layer.head_scale]).reshape(-1)
        if log_scale.numel() != layer.n_heads:
            raise CorruptWeightsError(
                f"{layer.head_scale} has {log_scale.numel()} values for {layer.n_heads} heads",
                tensor=layer.head_scale,
            )
        wq = wq * log_scale.clamp(max=layer.head_scale_max).exp()[:, None, None]
    if layer.q_dim_scale:
        per_dim = cast(tensors[layer.q_dim_scale]).reshape(-1)
        if per_dim.numel() != layer.head_dim:
            raise CorruptWeightsError(
                f"{layer.q_dim_scale} has {per_dim.numel()} values for heads of size "
                f"{layer.head_dim}",
                tensor=layer.q_dim_scale,
            )
        wq = wq * torch.nn.functional.softplus(per_dim)[None, :, None]
    return wq, wk


def _block_diagonal(weight: Tensor, groups: int) -> Tensor:
    """W (out, in) of a pointwise convolution in ``groups`` groups from its stored weight (out,
    in / groups, 1...): group g maps input block g to output block g, zero elsewhere."""
    if groups == 1:
        return weight
    return torch.block_diag(*weight.flatten(1).chunk(groups, dim=0))


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
    nn.Linear; GPT-2's Conv1D stores them as columns): ``packing.output_dim``."""
    return packing.output_dim


def qk_rows(layer: AttentionLayer) -> tuple[Tensor, Tensor]:
    """Which outputs of the stored tensors make each head: (H, d_head) indices into layer.q's
    output dimension for the query heads, (Hkv, d_head) into layer.k's for the key heads; the
    same tensor for fused packings, so that ``split_heads`` slices are ``w[rows]``. A bias of
    the projection has the same outputs. ``layer.packing.rows`` of the layer's sizes."""
    h, d = layer.n_heads, layer.head_dim
    if layer.packing is Packing.PER_HEAD_BLOCK:
        heads, dims = torch.arange(h)[:, None], torch.arange(d)[None, :]
        return heads * layer.head_block + dims, heads * layer.head_block + d + dims
    if layer.packing is Packing.SEPARATE_KV_BLOCK:
        heads, dims = torch.arange(h)[:, None], torch.arange(d)[None, :]
        return heads * d + dims, heads * layer.head_block + dims
    return layer.packing.rows(h, layer.n_kv_heads, d)
