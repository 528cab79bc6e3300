"""QK-Clip: rescale the query/key weights of heads whose max attention logit exceeded tau.

After an optimizer step, a head whose largest logit m on that step's forwards exceeded tau gets

    gamma = tau / m                     (the logit factor; 1 for every other head)

and its weights are rescaled so that the same inputs give logits gamma times as large, i.e. a
maximum of exactly tau (Kimi K2's QK-Clip, docs/metrics.md):

- MHA (a key head per query head): W_q^h and W_k^h each times sqrt(gamma);
- GQA/MQA (a key head shared by several query heads): W_q^h times gamma, the key left alone,
  so that the other heads of the group keep their logits;
- biases: the logit is (W_q x + b_q) . (W_k x + b_k) (RoPE is linear), so a projection's bias is
  scaled with its weight and the logit scales exactly by the product of the two factors;
- softcapping (Gemma 2): the model softmaxes c tanh(z / c) of the score z = s q.k; the score is
  what the weights scale, so gamma is taken on scores: z_max -> c atanh(tau / c) (no head can
  exceed a tau >= c). Scores come from ``EntropySums.max_score``, before softcapping, so this
  stays exact where the softcapped logit rounds to c.

Not expressible as a weight rescale, hence refused by ``unsupported`` (the callback stops at
on_train_begin with its line): QK-norm (the norm divides the scale out again; its gains are shared
by every head in Qwen3/Gemma 3); MLA and any packing this module does not know; PEFT adapters on
Q/K (the merged weight's rescale would change the frozen base: the saved adapter would not
reproduce the clipped model) and frozen Q/K weights; weights sharded by FSDP or ZeRO-3.

Pure math (``clip_factors``, ``head_factors``) plus one function that writes weights in place.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from qkmonitor.weights.layout import output_dim, qk_rows
from qkmonitor.weights.live import LiveLayer, is_zero3

__all__ = ["apply_factors", "clip_factors", "head_factors", "unsupported"]


def clip_factors(max_score: Tensor, tau: float, softcap: float | None = None) -> Tensor:
    """gamma per head, (H,) float64: the factor on scores s q.k that brings the largest logit of
    a head above tau down to tau, 1 elsewhere (NaN or -inf scores: 1).

    max_score: (H,) the largest score per head (``EntropySums.max_score``, before softcapping);
    softcap: the model's logit softcap c (None: none), applied as c tanh(z / c).
    """
    max_score = max_score.to(torch.float64)
    if softcap is None:
        threshold = tau
    elif tau >= softcap:
        return torch.ones_like(max_score)  # softcapped logits stay below c
    else:
        threshold = softcap * math.atanh(tau / softcap)
    over = max_score > threshold  # False for NaN
    return torch.where(over, threshold / max_score, 1.0)


def head_factors(gamma: Tensor, n_kv_heads: int) -> tuple[Tensor, Tensor]:
    """(query factors (H,), key factors (Hkv,)) whose products are gamma: sqrt(gamma) on both
    for MHA; for shared key heads gamma on the queries and 1 on the keys."""
    if gamma.numel() == n_kv_heads:
        root = gamma.sqrt()
        return root, root
    return gamma, torch.ones(n_kv_heads, dtype=gamma.dtype, device=gamma.device)


def unsupported(layer: LiveLayer) -> str | None:
    """Why QK-Clip cannot rescale this layer's logits by its weights, or None."""
    plan = layer.plan
    if plan.q_norm or plan.k_norm:
        return (
            f"{layer.name} normalizes q and k (QK-norm), which undoes any rescaling of W_q/W_k; "
            "QK-Clip does not apply (QK-norm already bounds the logits)"
        )
    norms = [n for n, _ in layer.module.named_modules() if "norm" in n.rpartition(".")[2]]
    if norms:  # input or output norms (XLNet, Funnel, Granite Speech): not checked against
        return (
            f"{layer.name} holds norm modules ({', '.join(norms)}) besides its Q/K projections; "
            "QK-Clip rescales W_q/W_k only in layers with none, so it does not apply here"
        )
    if plan.head_scale:
        return (
            f"{layer.name} normalizes q and k (cosine attention), which undoes any rescaling "
            "of W_q/W_k; QK-Clip does not apply"
        )
    if not plan.packing.clippable:
        return f"{layer.name}: QK-Clip does not know the {plan.packing} layout (e.g. MLA)"
    # the Q/K weights only: a per-dimension query scale (TimesFM) multiplies the rescaled rows'
    # outputs and stays as it is
    for name in dict.fromkeys((plan.q, plan.k)):
        owner = layer.owner(name)
        if hasattr(owner, "base_layer"):
            return (
                f"{layer.name} has PEFT adapters on its Q/K projections: a clipped merged weight "
                "is not expressible in the adapters (the frozen base would change); QK-Clip "
                "needs fully trained Q/K weights"
            )
        weight = owner.weight
        if layer.fsdp_unit is not None or is_zero3(layer) or hasattr(weight, "full_tensor"):
            return f"{layer.name}: QK-Clip does not rescale FSDP/ZeRO-3 sharded weights"
        if not weight.requires_grad:
            return f"{name} is frozen; QK-Clip rescales trained Q/K weights only"
    return None


@torch.no_grad()
def apply_factors(layer: LiveLayer, gamma: Tensor) -> None:
    """Multiply the layer's Q/K weights (and biases) in place so that head h's logits scale by
    gamma[h] (``head_factors``). Heads with gamma 1 are multiplied by exactly 1: unchanged."""
    plan = layer.plan
    q_factor, k_factor = head_factors(gamma.to(torch.float64), plan.n_kv_heads)
    q_rows, k_rows = qk_rows(plan)
    scales: dict[str, Tensor] = {}
    for name, rows, factor in ((plan.q, q_rows, q_factor), (plan.k, k_rows, k_factor)):
        owner = layer.owner(name)
        dim = output_dim(plan.packing)
        vector = scales.get(name)
        if vector is None:
            vector = torch.ones(owner.weight.shape[dim], dtype=torch.float64)
        vector[rows.flatten()] = factor.cpu().repeat_interleave(plan.head_dim)
        scales[name] = vector
    for name, vector in scales.items():
        owner = layer.owner(name)
        dim = output_dim(plan.packing)
        shape = [1] * owner.weight.ndim
        shape[dim] = -1
        _scale(owner.weight, vector.reshape(shape))
        bias = getattr(owner, "bias", None)
        if isinstance(bias, Tensor):
            _scale(bias, vector)


def _scale(tensor: Tensor, factor: Tensor) -> None:
    """tensor *= factor, computed in at least float32 and rounded once to the tensor's dtype
    (a bf16 factor alone would be off by up to 0.4%); factor 1 leaves entries bit-identical."""
    wide = torch.promote_types(tensor.dtype, torch.float32)
    factor = factor.to(tensor.device, wide)
    tensor.copy_(tensor.to(wide) * factor)
