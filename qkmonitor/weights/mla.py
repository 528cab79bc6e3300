"""Multi-head latent attention (MLA: DeepSeek-V2/V3, Kimi K2, MiniCPM3, ...) as factored heads.

What transformers' ``modeling_deepseek_v3`` computes for an input x (d_in), head h:

    q_h            = q_b_proj(q_a_layernorm(q_a_proj x))[h]      (q_proj x when q_lora_rank is None)
                   = [q_nope_h (d_nope); q_rope_h (d_rope)]
    [c_kv; k_rope] = kv_a_proj_with_mqa x                       (kv_lora_rank + d_rope rows)
    k_h            = [kv_b_proj(kv_a_layernorm(c_kv))[h][:d_nope]; k_rope]

k_rope is one key shared by every head; the remaining d_v rows of each kv_b_proj head are values.
At relative position 0 RoPE is the identity, so the logit is s * q_h . k_h (docs/metrics.md). Some
models rotate interleaved pairs (``rope_interleave``): at position 0 that only permutes the rope
dimensions of q and k alike, which leaves q . k unchanged, so W^h does not depend on it.
RMSNorm gains g multiply after the per-token normalization (``weight * x``), which is left out as
for QK-norm, so q_h = U_h L_q x and k_h = V_h L_k x with

    L_q = diag(g_q) q_a_proj                  (q_lora_rank x d_in; None, i.e. I, without it)
    U_h = q_b_proj rows of head h             (d_nope + d_rope, q_lora_rank)
    L_k = [diag(g_kv) c_kv rows; k_rope rows] (kv_lora_rank + d_rope, d_in)
    V_h = [[kv_b_proj k rows of head h, 0], [0, I_rope]]

and W^h = s (U_h L_q)^T (V_h L_k): ``qkmonitor.spectrum.FactoredHeads``, whose statistics need L
only through its Gram matrices, computed once per layer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from qkmonitor.errors import CorruptWeightsError, UnsupportedModelError
from qkmonitor.spectrum import FactoredHeads

__all__ = ["MLADims", "MLANames", "mla_heads"]


@dataclass(frozen=True)
class MLADims:
    """The sizes of one MLA layer (the config attributes of the same names)."""

    num_heads: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    kv_lora_rank: int
    q_lora_rank: int | None = None

    @classmethod
    def from_config(cls, config: Any) -> MLADims:
        """Read from a transformers config; refuses one without the MLA attributes."""

        def size(name: str, least: int = 1) -> int:
            value = getattr(config, name, None)
            if not isinstance(value, int) or value < least:
                raise UnsupportedModelError(
                    f"config has no usable '{name}' ({value!r}) for multi-head latent attention"
                )
            return value

        q_lora = getattr(config, "q_lora_rank", None)
        return cls(
            num_heads=size("num_attention_heads"),
            qk_nope_head_dim=size("qk_nope_head_dim"),
            qk_rope_head_dim=size("qk_rope_head_dim", least=0),
            v_head_dim=size("v_head_dim"),
            kv_lora_rank=size("kv_lora_rank"),
            q_lora_rank=None if q_lora is None else size("q_lora_rank"),
        )

    @property
    def head_dim(self) -> int:
        """Query/key size per head: d_nope + d_rope."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def key_rows(self) -> list[tuple[int, int]]:
        """kv_b_proj's key rows, [start, stop) per head: the first d_nope of each head's
        d_nope + d_v rows (the rest are values, which W^h does not use)."""
        per_head, nope = self.qk_nope_head_dim + self.v_head_dim, self.qk_nope_head_dim
        return [(h * per_head, h * per_head + nope) for h in range(self.num_heads)]


@dataclass(frozen=True)
class MLANames:
    """Checkpoint tensor names of one MLA layer's query/key path (weights and norm gains)."""

    kv_a_proj_with_mqa: str
    kv_a_layernorm: str
    kv_b_proj: str
    q_proj: str | None = None  # when q_lora_rank is None
    q_a_proj: str | None = None
    q_a_layernorm: str | None = None
    q_b_proj: str | None = None
    #: the gain of an RMS norm on the shared RoPE key (dots3_note's k_rope_only_layernorm)
    k_rope_norm: str | None = None
    #: one factor per head on the queries (Mistral Large 4's softmax_scaling.bias: its factor
    #: scale_h log(pos + 1) + bias_h is bias_h at position 0)
    q_head_scale: str | None = None

    @classmethod
    def of_module(
        cls, module: str, q_lora: bool, k_rope_norm: str | None = None, q_head_scale=None
    ) -> MLANames:
        """The names transformers gives the parameters under an attention module path
        (k_rope_norm, q_head_scale: child module and parameter, e.g. "softmax_scaling.bias")."""
        names = ["kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj"]
        names += ["q_a_proj", "q_a_layernorm", "q_b_proj"] if q_lora else ["q_proj"]
        fields = {name: f"{module}.{name}.weight" for name in names}
        if k_rope_norm:
            fields["k_rope_norm"] = f"{module}.{k_rope_norm}.weight"
        if q_head_scale:
            fields["q_head_scale"] = f"{module}.{q_head_scale}"
        return cls(**fields)

    @property
    def tensors(self) -> list[str]:
        """The names to read, in order."""
        return [name for name in vars(self).values() if name]


def _shaped(tensor: Tensor, shape: Sequence[int], what: str) -> Tensor:
    if tuple(tensor.shape) != tuple(shape):
        raise CorruptWeightsError(
            f"MLA {what} has shape {tuple(tensor.shape)}, the config implies {tuple(shape)}; "
            "check the attention sizes in config.json"
        )
    return tensor


def mla_heads(
    tensors: Mapping[str, Tensor],
    names: MLANames,
    dims: MLADims,
    scale: float,
    *,
    q_latent_scale: float = 1.0,
    kv_latent_scale: float = 1.0,
    dtype: torch.dtype | None = None,
) -> FactoredHeads:
    """One MLA layer's heads W^h = s (U_h L_q)^T (V_h L_k) (module docstring), unformed.

    tensors: at least ``names.tensors``, with kv_b_proj whole or only its ``dims.key_rows()``
    (what an audit reads); scale: the softmax scale the module applies (its
    ``scaling``, YaRN's mscale^2 included). q_latent_scale / kv_latent_scale: constant factors
    some models apply after the latent norms (LongCat-Flash's mla_scale_q_lora, which multiplies
    all of q, and mla_scale_kv_lora, which multiplies the no-RoPE key only). dtype: of the
    result (default: the tensors', at least float32); tensors are cast before gains are folded.
    """

    def get(name: str | None, what: str) -> Tensor:
        if name is None:
            raise CorruptWeightsError(f"MLA layer has no {what} tensor name")
        tensor = tensors[name]
        return tensor.to(dtype or torch.promote_types(tensor.dtype, torch.float32))

    h, d, nope, rope = dims.num_heads, dims.head_dim, dims.qk_nope_head_dim, dims.qk_rope_head_dim
    kv_a = get(names.kv_a_proj_with_mqa, "kv_a_proj_with_mqa")
    d_in = kv_a.shape[-1]
    kv_a = _shaped(kv_a, (dims.kv_lora_rank + rope, d_in), "kv_a_proj_with_mqa")
    kv_gain = _shaped(get(names.kv_a_layernorm, "kv_a_layernorm"), (dims.kv_lora_rank,), "gain")
    kv_b = get(names.kv_b_proj, "kv_b_proj")
    if kv_b.shape[0] != h * nope:  # whole: drop each head's value rows
        kv_b = _shaped(kv_b, (h * (nope + dims.v_head_dim), dims.kv_lora_rank), "kv_b_proj")
        kv_b = kv_b.reshape(h, nope + dims.v_head_dim, -1)[:, :nope].reshape(h * nope, -1)
    kv_b = _shaped(kv_b, (h * nope, dims.kv_lora_rank), "kv_b_proj key rows")
    if dims.q_lora_rank is None:
        q_up = _shaped(get(names.q_proj, "q_proj"), (h * d, d_in), "q_proj") * q_latent_scale
        q_down = None
    else:
        rank = dims.q_lora_rank
        q_a = _shaped(get(names.q_a_proj, "q_a_proj"), (rank, d_in), "q_a_proj")
        q_gain = _shaped(get(names.q_a_layernorm, "q_a_layernorm"), (rank,), "q_a_layernorm")
        q_up = _shaped(get(names.q_b_proj, "q_b_proj"), (h * d, rank), "q_b_proj")
        q_down = (q_gain * q_latent_scale)[:, None] * q_a
    latent = (kv_gain * kv_latent_scale)[:, None] * kv_a[: dims.kv_lora_rank]
    k_down = torch.cat([latent, kv_a[dims.kv_lora_rank :]])
    k_nope = kv_b.reshape(h, nope, dims.kv_lora_rank)
    k_up = k_nope.new_zeros(h, d, dims.kv_lora_rank + rope)
    k_up[:, :nope, : dims.kv_lora_rank] = k_nope
    k_up[:, nope:, dims.kv_lora_rank :] = torch.eye(rope, dtype=k_up.dtype, device=k_up.device)
    if names.k_rope_norm is not None:
        gain = _shaped(get(names.k_rope_norm, "k_rope_norm"), (rope,), "k_rope_norm")
        k_up[:, nope:, dims.kv_lora_rank :] = torch.diag(gain)
    q_up = q_up.reshape(h, d, -1)
    if names.q_head_scale is not None:
        q_up = (
            q_up * _shaped(get(names.q_head_scale, "q_head_scale"), (h,), "q scale")[:, None, None]
        )
    return FactoredHeads(q_up, k_up, q_down, k_down, scale)
