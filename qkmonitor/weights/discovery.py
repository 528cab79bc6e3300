"""Attention layouts read off the installed transformers' own modules, not guessed from names.

For a config, ``skeleton(config)`` builds the model class the checkpoint names (or the Auto
class for its config) on the meta device: no memory, no weights, never remote code.
``attention_modules`` walks its modules and reads, per attention module, what its forward really
uses: the q/k projections, head_dim and the head counts those projections split into, the
softmax scale it passes to the attention function (``module.scaling``), causal or not, cross
attention, and QK-norm modules with their gain convention (probed on CPU with known weights, so
Gemma's ``1 + w`` is measured, not assumed). What cannot be read off a module (fused packings,
gated queries, scales the module does not expose, true exceptions) comes from
``architectures.MODULE_RULES``.

``plan(config, shapes)`` maps the modules' parameter names to a checkpoint's tensor names with
transformers' own checkpoint key conversion (``get_model_conversion_mapping`` and
``rename_source_key``, as ``from_pretrained`` does), so old and new Hub key layouts both resolve,
and names every attention stack of every tower as a block (``text``, ``vision``, ``audio``,
``encoder``, ``decoder``, ``cross``; ``self`` for a model with one stack). Anything with two
possible readings is refused with an UnsupportedModelError naming the ambiguity. Attention-like
modules with no fixed W^h (a hybrid's linear attention with a conv1d on q/k, a GatedDeltaNet, a
Mamba layer, an attention module with no q/k pair) are left out and listed with their reasons
(``PlanNotes.not_audited``); a model with nothing else to audit is refused.
A config naming remote code is read with transformers' own layout of its model_type (or of the
class its ``architectures`` names), with a warning; nothing is ever imported.
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import torch
from torch import nn

from qkmonitor.errors import CorruptWeightsError, QKMonitorError, UnsupportedModelError
from qkmonitor.weights import transformers_private as hf
from qkmonitor.weights.architectures import POOLING_HEADS, ModuleRule, module_rule
from qkmonitor.weights.layout import AttentionLayer, MLALayout, Packing
from qkmonitor.weights.mla import MLADims, MLANames
from qkmonitor.weights.unaudited import not_audited_line

__all__ = ["PlanNotes", "attention_modules", "clear_caches", "plan", "skeleton"]

#: (query, key) child names of separate projections, as transformers' modules call them
_PAIRS = (
    ("q_proj", "k_proj"),
    ("query", "key"),
    ("q", "k"),
    ("q_lin", "k_lin"),
    ("linear_q", "linear_k"),
    ("query_proj", "key_proj"),
    ("to_q", "to_k"),
)
_HEAD_DIM = ("head_dim", "attention_head_size", "key_value_proj_dim", "head_size", "d_k")
_HEADS = ("num_heads", "num_attention_heads", "n_heads", "n_head", "num_attn_heads")
_SCALE = ("scaling", "scale", "softmax_scale")
_CROSS_NAMES = (
    "encoder_attn",
    "cross_attn",
    "crossattention",
    "cross_attention",
    "EncDecAttention",
    "encoder_attn_text",  # Grounding DINO's decoder: queries over the text encoder's states
    "fusion_layer",  # Grounding DINO's image-text fusion: image queries over text keys
    "decoding_cross_attention",  # Perceiver's decoder: output queries over the latents
)
_TOWERS = (
    ("vision", ("vision", "visual", "image", "vit", "patch", "siglip", "clip_model")),
    ("audio", ("audio", "speech", "acoustic", "whisper", "sound")),
    ("text", ("language_model", "text_model", "text", "lm", "llm", "text_decoder")),
)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """transformers warns about untied weights, missing generation configs, ... on meta builds."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)


def _model_class(config):
    """The class the checkpoint was saved from (config.architectures), else the Auto class."""
    import transformers
    from transformers.models.auto import modeling_auto

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, str(name), None)
        if isinstance(cls, type) and getattr(cls, "config_class", None) is type(config):
            return cls
    for mapping in (
        "MODEL_MAPPING",
        "MODEL_FOR_CAUSAL_LM_MAPPING",
        "MODEL_FOR_PRETRAINING_MAPPING",
        "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING",
        "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING",
    ):
        with contextlib.suppress(KeyError, ValueError):  # ValueError: a mapped class it lacks
            found = getattr(modeling_auto, mapping)[type(config)]
            # several classes (Funnel: FunnelModel, FunnelBaseModel): the first, as the Auto
            # class picks where config.architectures names none of them
            return found[0] if isinstance(found, (list, tuple)) else found
    return None


_SKELETONS: dict[tuple[str, str], nn.Module] = {}
#: errors of the environment, not of a config, when building a skeleton
_ENVIRONMENT_ERRORS = (
    NotImplementedError,  # e.g. "Cannot copy out of meta tensor": a plugin touched the data
    torch.distributed.DistError,
    OSError,
    ImportError,
    MemoryError,
)


def skeleton(config) -> nn.Module:
    """The model of this config on the meta device (cached per config), in eager attention."""
    key = (type(config).__qualname__, config.to_json_string(use_diff=False))
    if key in _SKELETONS:
        return _SKELETONS[key]
    model_type = getattr(config, "model_type", "?")
    cls = _model_class(config)
    if cls is None:
        raise UnsupportedModelError(
            f"model_type '{model_type}' has no model class in the installed transformers; "
            "qkmonitor reads layouts off transformers' own modules and never runs remote code"
        )
    try:
        # outside transformers' DeepSpeed ZeRO-3 switch: under it (an HfDeepSpeedConfig alive, as
        # the Trainer and accelerate keep one) the build would go through zero.Init, which
        # partitions the meta-device skeleton and fails ("Cannot copy out of meta tensor")
        with _quiet(), torch.device("meta"), hf.zero3_construction_off():
            model = hf.from_config(cls, copy.deepcopy(config), attn_implementation="eager")
    except hf.TransformersInternalsError:
        raise
    except Exception as error:  # transformers validates configs with many exception types
        reason = " ".join(str(error).split())[:200]
        if isinstance(error, _ENVIRONMENT_ERRORS):
            # the environment (a meta-tensor copy, a distributed backend, a missing plugin),
            # never the config's fault
            raise QKMonitorError(
                f"building {cls.__name__} on the meta device failed in this environment "
                f"({type(error).__name__}: {reason})"
            ) from None
        raise UnsupportedModelError(
            f"transformers cannot build {cls.__name__} from this config.json ({reason})"
        ) from None
    if len(_SKELETONS) > 32:
        _SKELETONS.clear()
    _SKELETONS[key] = model
    return model


def _int_attr(module: nn.Module, names: Sequence[str]) -> int | None:
    for name in names:
        value = getattr(module, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _is_linear(module: nn.Module | None) -> bool:
    return isinstance(module, nn.Linear)


def _pointwise(module: nn.Module) -> bool:
    """A convolution of kernel 1, stride 1, no padding: a linear map of each position alone
    (grouped: a block-diagonal one)."""
    return (
        isinstance(module, nn.modules.conv._ConvNd)
        and set(module.kernel_size) == {1}
        and set(module.stride) == {1}
        and module.padding in ("valid", (0,) * len(module.kernel_size))
        and not module.transposed
    )


def _mixes_tokens(module: nn.Module) -> bool:
    """A convolution over positions (not transformers' Conv1D, which is GPT-2's linear layer)."""
    from transformers.pytorch_utils import Conv1D

    return "conv" in type(module).__name__.lower() and not isinstance(module, Conv1D)


def _projections(module: nn.Module, rule: ModuleRule | None) -> tuple[str, str] | None:
    if rule is not None and rule.q:
        return rule.q, rule.k
    children = dict(module.named_children())
    for q, k in _PAIRS:
        if _is_linear(children.get(q)) and _is_linear(children.get(k)):
            return q, k
    return None


def _stored_scale(module: nn.Module) -> float | None:
    """The softmax scale a module stores (scaling, scale or softmax_scale), if any."""
    return next(
        (float(v) for a in _SCALE if isinstance(v := getattr(module, a, None), (int, float))),
        None,
    )


_PROBED: dict[tuple, float | None] = {}


def clear_caches() -> None:
    """Forget the meta skeletons and QK-norm probes kept per config (``plan`` builds them
    once per config): for timing an uncached plan, or to free their memory."""
    _SKELETONS.clear()
    _PROBED.clear()


def _probe_norm(norm: nn.Module, where: str) -> float | None:
    """_probe_gain, once per norm class, size and settings (every layer has the same norms)."""
    weight = getattr(norm, "weight", None)
    settings = tuple(
        (k, v) for k, v in sorted(vars(norm).items()) if isinstance(v, (int, float, bool, str))
    )
    key = (type(norm), None if weight is None else tuple(weight.shape), settings)
    if key not in _PROBED:
        _PROBED[key] = _probe_gain(norm, where)
    return _PROBED[key]


#: norms that compute in float32 (LaraMini casts x and its weight) agree with float64 to ~1e-7;
#: the probes' alternatives (mean removed or not, offset 0 or 1) differ by far more
_RTOL = 1e-6


def _probe_gain(norm: nn.Module, where: str) -> float | None:
    """The gain convention of a QK-norm module: 0.0 (x * w), 1.0 (x * (1 + w)), None (no gain).

    The module is copied to CPU with known weights and run on a zero-mean token of RMS 1: its
    output divided by the input is the effective gain. A norm that also removes the mean
    (LayerNorm) or is not scale-invariant is refused: that is not a per-token gain.
    """
    weight = getattr(norm, "weight", None)
    shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else (8,)
    size = math.prod(shape)  # a per-head norm (Chameleon) has an (H, d) weight
    probe = copy.deepcopy(norm).to_empty(device="cpu").to(torch.float64)
    w = torch.linspace(0.25, 0.75, size, dtype=torch.float64).reshape(shape)
    with torch.no_grad():
        for name, parameter in probe.named_parameters():
            parameter.copy_(w if name == "weight" else torch.zeros_like(parameter))
        for attribute in ("eps", "variance_epsilon", "epsilon"):
            if isinstance(getattr(probe, attribute, None), float):
                setattr(probe, attribute, 0.0)
        x = torch.ones(shape, dtype=torch.float64)
        x[..., 1::2] = -1.0
        try:
            out = probe(x[None])[0]
            scaled = probe(3 * x[None])[0]
            shifted = probe((x + 0.5)[None])[0]
        except Exception:  # a norm that needs other inputs (shapes, heads): not a plain gain
            out = scaled = shifted = None
    # centering first: a LayerNorm whose forward fixes its own epsilon (Chameleon's 1e-5) is
    # not exactly scale-invariant, and is still a LayerNorm
    if out is not None and torch.allclose(out, shifted, rtol=_RTOL, atol=1e-12) and size > 1:
        raise UnsupportedModelError(
            f"{where} removes the mean (LayerNorm) before the dot product; its centering is "
            "not part of SPEC's W^h, so the heads are not audited"
        )
    if out is None or not torch.allclose(out, scaled, rtol=_RTOL, atol=1e-12):
        raise UnsupportedModelError(f"{where} is not a per-token RMS norm with a gain")
    gain, w = (out / x).flatten(), w.flatten()
    if size == 8 and weight is None:
        if torch.allclose(gain, torch.ones_like(gain)):
            return None
        raise UnsupportedModelError(f"{where} has a fixed gain qkmonitor cannot read")
    offset = gain - w
    if not torch.allclose(offset, offset[0].expand_as(offset), atol=_RTOL):
        raise UnsupportedModelError(f"{where}: its gain is not an offset of its weight")
    value = round(float(offset[0]), 5)
    if value not in (0.0, 1.0):
        raise UnsupportedModelError(f"{where}: unexpected gain convention (weight + {value})")
    return value


def _norms(
    module: nn.Module, path: str, head_dim: int, heads: tuple[int, int], skip: tuple[str, ...]
) -> tuple[str | None, str | None, float]:
    """(q norm path, k norm path, offset) of the QK-norm children of an attention module."""
    found: dict[str, tuple[str, nn.Module]] = {}
    for name, child in module.named_children():
        lowered = name.lower()
        if name in skip or isinstance(child, nn.Identity):  # InternVL without use_qk_norm
            continue
        if "norm" not in lowered and not re.search(r"(^|_)ln($|_)", lowered):
            continue
        side = "q" if lowered.startswith(("q_", "query")) else None
        side = "k" if lowered.startswith(("k_", "key")) else side
        sides = ("q", "k") if lowered.startswith("qk_") else (side,)  # one norm for both
        if None in sides or any(s in found for s in sides):
            raise UnsupportedModelError(
                f"{type(module).__name__} has a norm '{name}' qkmonitor cannot place on q or k"
            )
        found.update(dict.fromkeys(sides, (name, child)))
    if not found:
        return None, None, 0.0
    if set(found) != {"q", "k"}:
        raise UnsupportedModelError(f"{type(module).__name__} normalizes only one of q and k")
    offsets, names = [], []
    for side, n in (("q", heads[0]), ("k", heads[1])):
        name, child = found[side]
        weight = getattr(child, "weight", None)
        if weight is not None and weight.numel() not in (head_dim, n * head_dim):
            raise UnsupportedModelError(
                f"{type(module).__name__}.{name} has {weight.numel()} gains for heads of size "
                f"{head_dim}"
            )
        offsets.append(_probe_norm(child, f"{type(module).__name__}.{name}"))
        names.append(f"{path}.{name}" if weight is not None else None)
    if offsets[0] != offsets[1]:
        raise UnsupportedModelError(f"{type(module).__name__}: q and k norms differ in convention")
    return names[0], names[1], offsets[0] or 0.0


def _read(
    path: str, module: nn.Module, rule: ModuleRule | None
) -> AttentionLayer | _Skipped | None:
    """What one module does; _Skipped for an attention-like module whose q.k is not a fixed
    W^h (a linear attention's convolution on q/k); None when it is not an attention module."""
    kind = type(module).__name__
    refusal = rule and (rule.refuse(module) if callable(rule.refuse) else rule.refuse)
    if refusal:
        raise UnsupportedModelError(f"{kind}: {refusal}")
    unaudited = rule and (rule.unaudited(module) if callable(rule.unaudited) else rule.unaudited)
    if unaudited:
        return _Skipped(path, kind, unaudited)
    if hasattr(module, "kv_a_proj_with_mqa"):
        return _read_mla(path, module)
    if rule is not None and rule.inner:
        return _read_projected(path, module, rule)
    if rule is not None and rule.q_latent:
        return _read_latent_query(path, module, rule)
    if rule is not None and rule.packing is Packing.HEAD_PARAMETERS:
        return _read_head_parameters(path, module, rule)
    pair = _projections(module, rule)
    if pair is None:
        return None
    q_name, k_name = pair
    # a rule that names the projections vouches for the module's q/k path, where its
    # pointwise convolutions (VQGAN attention blocks, SqueezeBERT) are plain linear maps
    declared = rule is not None and rule.q is not None
    mixing = [
        n
        for n, c in module.named_children()
        if _mixes_tokens(c) and not (declared and _pointwise(c))
    ]
    if mixing:
        return _Skipped(
            path,
            kind,
            f"mixes neighbouring tokens into its queries or keys ({mixing[0]}): W^h of the "
            "projections alone is not what it computes",
        )
    q_mod, k_mod = module.get_submodule(q_name), module.get_submodule(k_name)
    scale = _stored_scale(module)
    if rule is not None and rule.scale is not None:
        scale = rule.scale(module)
    if scale is None or isinstance(getattr(module, "scaling", None), bool):
        raise UnsupportedModelError(f"{kind} does not expose the softmax scale it applies")
    head_dim = _int_attr(module, _HEAD_DIM)
    n_heads = _int_attr(module, _HEADS) or _int_attr(
        getattr(module, "config", None) or nn.Module(), ("num_attention_heads",)
    )
    if rule is not None and rule.heads is not None:
        n_heads = rule.heads(module)
    if rule is not None and rule.head_dim is not None:
        head_dim = rule.head_dim(module)
    if head_dim is None or n_heads is None:
        raise UnsupportedModelError(f"{kind} does not expose its head_dim and number of heads")
    packing = rule.packing if rule is not None else Packing.SEPARATE
    if not isinstance(packing, Packing):
        packing = packing(module)
    q_groups, k_groups = (m.groups if _pointwise(m) else 1 for m in (q_mod, k_mod))
    q_out = q_mod.weight.shape[packing.output_dim]
    d_in = q_mod.weight.shape[1 - packing.output_dim] * q_groups
    k_shape = k_mod.weight.shape
    k_out, k_in = (q_out, d_in) if packing.fused else (k_shape[0], k_shape[1] * k_groups)
    if not packing.fused and q_out != n_heads * head_dim * (1 + (packing is Packing.GATED_Q)):
        raise UnsupportedModelError(
            f"{kind}.{q_name} has {q_out} rows for {n_heads} heads of {head_dim}: gated or "
            "otherwise packed queries qkmonitor does not know"
        )
    n_kv = packing.n_kv_heads(q_out, k_out, n_heads, head_dim)
    if not n_kv or n_heads % n_kv:
        raise UnsupportedModelError(f"{kind}: {n_heads} query heads do not share {n_kv} key heads")
    groups = getattr(module, "num_key_value_groups", None)
    if isinstance(groups, int) and groups != n_heads // n_kv:
        raise UnsupportedModelError(f"{kind}: num_key_value_groups disagrees with k's shape")
    cross = bool(getattr(module, "is_cross_attention", False)) or any(
        part in _CROSS_NAMES for part in path.split(".")
    )
    if k_in != d_in:  # listed, the rest audited, as for nn.MultiheadAttention (Q-Former cross)
        return _Skipped(
            path,
            kind,
            f"takes queries ({d_in}) and keys ({k_in}) from inputs of different widths: W^h is "
            "not square, so it has no eigenspectrum",
        )
    causal = getattr(module, "is_causal", None)
    batch_norm = rule.batch_norm if rule is not None else None
    skip = rule.output_norms if rule is not None else ()
    values = tuple(n for n, _ in module.named_children() if n.lower().startswith(_VALUE_NORMS))
    q_norm, k_norm, offset = _norms(module, path, head_dim, (n_heads, n_kv), skip + values)
    return AttentionLayer(
        block="",
        layer=0,
        path=path,
        q=f"{path}.{q_name}.weight",
        k=f"{path}.{k_name}.weight",
        packing=packing,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        d_in=d_in,
        scale=scale,
        causal=bool(causal) and not cross,
        cross=cross,
        q_norm=q_norm and q_norm + ".weight",
        k_norm=k_norm and k_norm + ".weight",
        norm_offset=offset,
        left_out=tuple(f"{n}: a norm on the values, which never enter q.k" for n in values)
        + _left_out(rule, module),
        head_scale=rule and rule.head_scale and f"{path}.{rule.head_scale[0]}",
        head_scale_max=rule.head_scale[1] if rule and rule.head_scale else math.inf,
        q_groups=q_groups,
        k_groups=k_groups,
        head_block=q_out // n_heads
        if packing is Packing.PER_HEAD_BLOCK
        else k_out // n_heads
        if packing is Packing.SEPARATE_KV_BLOCK
        else 0,
        batch_norm=batch_norm and f"{path}.{batch_norm}",
        batch_norm_eps=_batch_norm_eps(module, batch_norm, rule and rule.k_batch_norm),
        k_batch_norm=rule and rule.k_batch_norm and f"{path}.{rule.k_batch_norm}",
        q_dim_scale=rule and rule.q_dim_scale and f"{path}.{rule.q_dim_scale}",
    )


def _left_out(rule: ModuleRule | None, module: nn.Module) -> tuple[str, ...]:
    """The rule's parts left out of W^h, for this module where they depend on it."""
    if rule is None:
        return ()
    return rule.left_out(module) if callable(rule.left_out) else rule.left_out


def _batch_norm_eps(module: nn.Module, q_norm: str | None, k_norm: str | None) -> float:
    """The eps of a layer's BatchNorm(s) on its q/k projections (0.0 without); q's and k's
    must agree, as AttentionLayer holds one."""
    eps = {float(module.get_submodule(n).eps) for n in (q_norm, k_norm) if n}
    if len(eps) > 1:
        raise UnsupportedModelError(f"{type(module).__name__}: q's and k's BatchNorm eps differ")
    return eps.pop() if eps else 0.0


def _read_torch_mha(
    path: str, module: nn.MultiheadAttention, parent: nn.Module, model: nn.Module
) -> AttentionLayer | _Skipped:
    """torch's nn.MultiheadAttention (q, k, v rows of its own in_proj_weight; the scale of
    F.multi_head_attention_forward, from MODULE_RULES). The attention of a pooling head
    (``architectures.POOLING_HEADS``: a learned probe's query over a tower's states) is a
    ``pool`` layer where the model uses the head's output, and is listed as not audited where
    the model discards it."""
    kind, owner = type(module).__name__, type(parent).__name__
    rule = module_rule(module)
    if rule is None or rule.scale is None:
        raise UnsupportedModelError(f"{kind} at {path} has no MODULE_RULES row")
    if module.kdim != module.embed_dim:
        return _Skipped(
            path,
            kind,
            f"takes queries ({module.embed_dim}) and keys ({module.kdim}) from inputs of "
            "different widths: W^h is not square, so it has no eigenspectrum",
        )
    pooling = POOLING_HEADS.get(owner)
    top = type(model).__name__
    if pooling is not None and top not in pooling.used_by:
        return _Skipped(
            path,
            kind,
            f"is the attention of a pooling head ({owner}) whose output {top} discards: it "
            f"{pooling.discarded} (only {', '.join(pooling.used_by)} use it)",
        )
    if pooling is None and "pool" in owner.lower():
        return _Skipped(
            path,
            kind,
            f"is the attention of a pooling head ({owner}) qkmonitor does not know: whether "
            f"{top} uses its output is not known",
        )
    fused = module.in_proj_weight is not None
    left_out = ()
    if module.bias_k is not None:
        left_out += (
            "bias_k: a learned key appended to every sequence (add_bias_kv), not a token's "
            "key; W^h is that of the tokens' keys",
        )
    if module.add_zero_attn:
        left_out += ("add_zero_attn: a zero key appended to every sequence (logit 0)",)
    return AttentionLayer(
        block="",
        layer=0,
        path=path,
        q=f"{path}.{'in_proj_weight' if fused else 'q_proj_weight'}",
        k=f"{path}.{'in_proj_weight' if fused else 'k_proj_weight'}",
        packing=Packing.IN_PROJ_QKV if fused else Packing.IN_PROJ_SEPARATE,
        n_heads=module.num_heads,
        n_kv_heads=module.num_heads,
        head_dim=module.head_dim,
        d_in=module.embed_dim,
        scale=rule.scale(module),
        causal=False,
        cross=pooling is not None or any(part in _CROSS_NAMES for part in path.split(".")),
        left_out=left_out,
        pool=pooling is not None,
    )


def _read_projected(path: str, module: nn.Module, rule: ModuleRule) -> AttentionLayer | _Skipped:
    """A module whose q and k projections feed an nn.MultiheadAttention child that projects
    them again with its own in_proj (Aria's cross attention, ``ModuleRule.inner``): heads
    W_Q^h = W_in_q^h W_q, W_K^h = W_in_k^h W_k over the inputs of q and k, with the inner
    module's heads and scale. Listed as not audited where q's and k's inputs differ in width
    (no square W^h)."""
    kind = type(module).__name__
    inner = module.get_submodule(rule.inner)
    q_mod, k_mod = module.get_submodule(rule.q), module.get_submodule(rule.k)
    linear = _is_linear(q_mod) and _is_linear(k_mod)
    if not isinstance(inner, nn.MultiheadAttention) or not linear:
        raise UnsupportedModelError(
            f"{kind}: {rule.q}/{rule.k} and {rule.inner} are not Linear layers feeding an "
            "nn.MultiheadAttention, as its MODULE_RULES row reads them"
        )
    if q_mod.in_features != k_mod.in_features:
        return _Skipped(
            path,
            kind,
            f"takes queries ({q_mod.in_features}) and keys ({k_mod.in_features}) from inputs of "
            "different widths: W^h is not square, so it has no eigenspectrum",
        )
    heads = _read_torch_mha(f"{path}.{rule.inner}", inner, module, module)
    if isinstance(heads, _Skipped) or heads.packing is not Packing.IN_PROJ_QKV:
        raise UnsupportedModelError(f"{kind}.{rule.inner} is not a packed nn.MultiheadAttention")
    if (q_mod.out_features, k_mod.out_features) != (inner.embed_dim, inner.kdim):
        raise UnsupportedModelError(f"{kind}: {rule.q}/{rule.k} do not feed {rule.inner}'s widths")
    sides = zip(rule.output_norms, ("query", "key"), (rule.q, rule.k), strict=True)
    left_out = tuple(
        f"{name}: a LayerNorm of the {side} inputs before {proj}, as a layer's input norm: "
        "W^h acts on its outputs"
        for name, side, proj in sides
    )
    return replace(
        heads,
        path=path,
        d_in=q_mod.in_features,
        q_pre=f"{path}.{rule.q}.weight",
        k_pre=f"{path}.{rule.k}.weight",
        cross=True,
        pool=True,
        left_out=heads.left_out + left_out,
    )


#: DeepSeek-V4's attention children besides its q/k path, and what they do to q.k
_LATENT_Q_PARTS = {
    "o_a_proj": None,  # output projections
    "o_b_proj": None,
    "compressor": "compressor: extra keys, each a softmax-gated pool of a window of tokens' "
    "kv_proj (own weights, kv_norm, RoPE at the window's position; in CSA layers chosen per "
    "query by an indexer), appended after the tokens' keys; not a token's key, so W^h is that "
    "of the tokens' keys",
}


def _read_latent_query(path: str, module: nn.Module, rule: ModuleRule) -> AttentionLayer:
    """A module whose queries pass a down projection and its RMS norm before q
    (``ModuleRule.q_latent``; DeepSeek-V4): q_h = n_h(W_q^h g * W_down x / rms), with n_h a
    per-head RMS norm without gain, and k = v = diag(g_k) W_k x / rms, one key head shared by
    all. W^h = s (W_q^h diag(g) W_down)^T diag(g_k) W_k: the norms' per-token factors are left
    out as for QK-norm, their gains folded in."""
    kind = type(module).__name__
    down_name, latent_name, q_norm_name, k_norm_name = rule.q_latent
    children = dict(module.named_children())
    ours = {rule.q, rule.k, down_name, latent_name, q_norm_name, k_norm_name}
    extra = sorted(set(children) - ours - set(_LATENT_Q_PARTS))
    if extra or not ours <= set(children):
        raise UnsupportedModelError(
            f"{kind} has other parts ({', '.join(extra) or 'missing ones'}) than the latent "
            "query and shared key qkmonitor reads"
        )
    down, q_mod, k_mod = (children[n] for n in (down_name, rule.q, rule.k))
    if not all(_is_linear(m) and m.bias is None for m in (down, q_mod, k_mod)):
        raise UnsupportedModelError(
            f"{kind}: {down_name}/{rule.q}/{rule.k} are not Linear layers without bias"
        )
    for name, gain in ((latent_name, 0.0), (q_norm_name, None), (k_norm_name, 0.0)):
        if _probe_norm(children[name], f"{kind}.{name}") != gain:
            raise UnsupportedModelError(
                f"{kind}.{name} is not an RMS norm {'with a gain' if gain == 0.0 else 'without'}"
            )
    n_heads, head_dim = module.num_heads, module.head_dim
    scale = getattr(module, "scaling", None)
    if not isinstance(scale, float):
        raise UnsupportedModelError(f"{kind} does not expose the softmax scale it applies")
    d_in, rank = down.in_features, down.out_features
    if (
        q_mod.in_features != rank
        or q_mod.out_features != n_heads * head_dim
        or (k_mod.in_features, k_mod.out_features) != (d_in, head_dim)
        or getattr(module, "num_key_value_groups", n_heads) != n_heads
    ):
        raise UnsupportedModelError(
            f"{kind}: {down_name} {tuple(down.weight.shape)}, {rule.q} "
            f"{tuple(q_mod.weight.shape)} and {rule.k} {tuple(k_mod.weight.shape)} are not "
            f"{n_heads} query heads of {head_dim} over one shared key head"
        )
    left_out = tuple(_LATENT_Q_PARTS[n] for n in sorted(children) if _LATENT_Q_PARTS.get(n))
    return AttentionLayer(
        block="",
        layer=0,
        path=path,
        q=f"{path}.{rule.q}.weight",
        k=f"{path}.{rule.k}.weight",
        packing=Packing.SEPARATE,
        n_heads=n_heads,
        n_kv_heads=1,
        head_dim=head_dim,
        d_in=d_in,
        scale=scale,
        causal=bool(getattr(module, "is_causal", True)),
        k_norm=f"{path}.{k_norm_name}.weight",
        left_out=left_out + _left_out(rule, module),
        q_pre=f"{path}.{down_name}.weight",
        q_pre_norm=f"{path}.{latent_name}.weight",
        q_pre_rank=rank,
    )


def _read_head_parameters(path: str, module: nn.Module, rule: ModuleRule) -> AttentionLayer:
    """A module whose q and k are its own (d_in, heads, head_dim) parameters, applied with
    einsum("ibh,hnd->ibnd") (XLNet, ``Packing.HEAD_PARAMETERS``): W_Q^h = q[:, h, :]^T, and
    W_K^h alike; heads and head_dim are the parameters' own sizes, which the einsum uses."""
    kind = type(module).__name__
    q, k = getattr(module, rule.q, None), getattr(module, rule.k, None)
    if not (isinstance(q, nn.Parameter) and isinstance(k, nn.Parameter) and q.ndim == k.ndim == 3):
        raise UnsupportedModelError(
            f"{kind}: {rule.q}/{rule.k} are not (d_in, heads, head_dim) parameters, as its "
            "MODULE_RULES row reads them"
        )
    (d_in, n_heads, head_dim), (k_in, n_kv, k_dim) = q.shape, k.shape
    if k_in != d_in or k_dim != head_dim or n_heads % n_kv:
        raise UnsupportedModelError(
            f"{kind}: {rule.q} {tuple(q.shape)} and {rule.k} {tuple(k.shape)} do not pair into "
            "heads"
        )
    scale = _stored_scale(module)
    if rule.scale is not None:
        scale = rule.scale(module)
    if scale is None:
        raise UnsupportedModelError(f"{kind} does not expose the softmax scale it applies")
    q_norm, k_norm, offset = _norms(module, path, head_dim, (n_heads, n_kv), rule.output_norms)
    return AttentionLayer(
        block="",
        layer=0,
        path=path,
        q=f"{path}.{rule.q}",
        k=f"{path}.{rule.k}",
        packing=Packing.HEAD_PARAMETERS,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        d_in=d_in,
        scale=scale,
        causal=bool(getattr(module, "is_causal", False)),
        q_norm=q_norm and q_norm + ".weight",
        k_norm=k_norm and k_norm + ".weight",
        norm_offset=offset,
    )


#: children that normalize the values (Gemma 3n/4 ``v_norm``): no part of W^h
_VALUE_NORMS = ("v_norm", "v_layernorm", "value_norm")
_MLA_CHILDREN = {"kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o_proj"}
#: constant factors on the q latent and the no-RoPE key latent: LongCat-Flash, dots3_note
_MLA_SCALES = (("mla_scale_q_lora", "q_lora_scale"), ("mla_scale_kv_lora", "kv_lora_scale"))
#: children of a latent attention that never change q.k, with what they do
_MLA_LEFT_OUT = {
    "indexer": "indexer: a sparse-attention indexer, which only chooses the keys each query "
    "sees; W^h is that of the softmax attention over the chosen keys",
    "gate_proj": "gate_proj: a gate on the attention output",
    "g_proj": "g_proj: a per-head gate on the attention output",
}


def _read_mla(path: str, module: nn.Module) -> AttentionLayer:
    """A multi-head latent attention module (DeepSeek-V2/V3 layout, qkmonitor.weights.mla)."""
    kind = type(module).__name__
    children = {name for name, _ in module.named_children()}
    q_lora = "q_a_proj" in children
    expected = _MLA_CHILDREN | ({"q_a_proj", "q_a_layernorm", "q_b_proj"} if q_lora else {"q_proj"})
    if "q_gate_proj" in children:
        raise UnsupportedModelError(
            f"{kind}.q_gate_proj makes the queries from the normalized and the raw q latent "
            "together, which changes q.k by each token's RMS; no fixed W^h"
        )
    left_out = tuple(_MLA_LEFT_OUT[n] for n in sorted(children) if n in _MLA_LEFT_OUT)
    known = set(_MLA_LEFT_OUT) | {"k_rope_only_layernorm", "softmax_scaling"}
    extra = children - expected - known - {n for n in children if "dropout" in n}
    if extra or not expected - {"o_proj"} <= children:
        raise UnsupportedModelError(
            f"{kind} is a latent attention with other parts ({', '.join(sorted(extra)) or '?'}) "
            "than DeepSeek's q/kv latents; not supported"
        )
    dims = MLADims.from_config(
        _Namespace(
            num_attention_heads=getattr(module, "num_heads", None),
            qk_nope_head_dim=getattr(module, "qk_nope_head_dim", None),
            qk_rope_head_dim=getattr(module, "qk_rope_head_dim", None),
            v_head_dim=getattr(module, "v_head_dim", None),
            kv_lora_rank=getattr(module, "kv_lora_rank", None),
            q_lora_rank=getattr(module, "q_lora_rank", None) if q_lora else None,
        )
    )
    scale = getattr(module, "scaling", None)
    if not isinstance(scale, float):
        raise UnsupportedModelError(f"{kind} does not expose the softmax scale it applies")
    for norm in ("q_a_layernorm", "kv_a_layernorm") if q_lora else ("kv_a_layernorm",):
        if _probe_norm(module.get_submodule(norm), f"{kind}.{norm}") != 0.0:
            raise UnsupportedModelError(f"{kind}.{norm} is not a plain RMS norm with a gain")
    latent = [
        float(next((getattr(module, n) for n in names if hasattr(module, n)), 1.0))
        for names in _MLA_SCALES
    ]
    k_rope_norm = None
    if "k_rope_only_layernorm" in children:
        norm = module.get_submodule("k_rope_only_layernorm")
        if _probe_norm(norm, f"{kind}.k_rope_only_layernorm") != 0.0:
            raise UnsupportedModelError(f"{kind}.k_rope_only_layernorm is not a plain RMS gain")
        k_rope_norm = "k_rope_only_layernorm"
    q_head_scale = None
    if "softmax_scaling" in children:
        scaling = module.get_submodule("softmax_scaling")
        if {n for n, _ in scaling.named_parameters()} != {"scale", "bias"}:
            raise UnsupportedModelError(f"{kind}.softmax_scaling is not a per-head log scaling")
        q_head_scale = "softmax_scaling.bias"
        left_out += (
            "softmax_scaling: multiplies each head's queries by scale_h log(pos + 1) + bias_h; "
            "W^h is at position 0, where that is bias_h (folded in)",
        )
    names = MLANames.of_module(path, q_lora, k_rope_norm, q_head_scale)
    d_in = module.kv_a_proj_with_mqa.weight.shape[1]
    return AttentionLayer(
        block="",
        layer=0,
        path=path,
        q=names.q_b_proj or names.q_proj,
        k=names.kv_b_proj,
        packing=Packing.MLA,
        n_heads=dims.num_heads,
        n_kv_heads=dims.num_heads,
        head_dim=dims.head_dim,
        d_in=d_in,
        scale=scale,
        causal=bool(getattr(module, "is_causal", True)),
        cross=False,
        mla=MLALayout(names, dims, latent[0], latent[1]),
        left_out=left_out,
    )


def _read_shared(
    path: str, module: nn.Module, found: list[AttentionLayer], modules: dict[str, nn.Module]
) -> AttentionLayer:
    """A layer that attends with the keys of an earlier layer (Gemma 3n/4 ``is_kv_shared_layer``:
    the keys the last earlier layer of its ``layer_type`` with ``store_full_length_kv`` stored).
    W^h pairs this layer's W_Q (and q_norm) with the source layer's W_K (and k_norm); a k_proj
    of its own, if a checkpoint stores one, is never read."""
    kind = type(module).__name__
    template = _template(path)[0]
    sources = [
        a
        for a in found
        if _template(a.path)[0] == template
        and getattr(modules[a.path], "store_full_length_kv", None) is True
        and getattr(modules[a.path], "layer_type", None) == getattr(module, "layer_type", None)
    ]
    if len(sources) != 1:
        raise UnsupportedModelError(
            f"{kind} at {path} reuses the keys of an earlier layer, and {len(sources)} layers "
            "of its kind store keys; which one it reads cannot be read off the modules"
        )
    (source,) = sources
    q_mod = getattr(module, "q_proj", None)
    head_dim = _int_attr(module, _HEAD_DIM)
    n_heads = _int_attr(module, _HEADS) or _int_attr(
        getattr(module, "config", None) or nn.Module(), ("num_attention_heads",)
    )
    scale = getattr(module, "scaling", None)
    if (
        not _is_linear(q_mod)
        or not isinstance(scale, (int, float))
        or head_dim != source.head_dim
        or n_heads is None
        or tuple(q_mod.weight.shape) != (n_heads * head_dim, source.d_in)
        or n_heads % source.n_kv_heads
    ):
        raise UnsupportedModelError(
            f"{kind} at {path} reuses the keys of {source.path}, and its queries do not fit "
            "them as qkmonitor reads them"
        )
    q_norm = None
    norm = getattr(module, "q_norm", None)
    if norm is not None:
        offset = _probe_norm(norm, f"{kind}.q_norm")
        if offset != source.norm_offset or source.k_norm is None:
            raise UnsupportedModelError(f"{kind}: q and k norms differ in convention")
        q_norm = f"{path}.q_norm.weight" if getattr(norm, "weight", None) is not None else None
    elif source.q_norm is not None:
        raise UnsupportedModelError(f"{kind} normalizes only one of q and k")
    return replace(
        source,
        path=path,
        q=f"{path}.q_proj.weight",
        n_heads=n_heads,
        scale=float(scale),
        causal=bool(getattr(module, "is_causal", source.causal)),
        q_norm=q_norm,
        left_out=(
            f"keys: those of {source.path} (shared across layers), whose k_proj and k_norm it "
            "uses; a k_proj of its own never enters",
        ),
    )


class _Namespace:
    def __init__(self, **values) -> None:
        self.__dict__.update(values)


class _Skipped(NamedTuple):
    """An attention-like module that is not audited, and why (one line)."""

    path: str
    kind: str
    reason: str

    def record(self) -> dict[str, str]:
        """As ModelInfo.not_audited holds it."""
        return {"module": self.path, "class": self.kind, "reason": self.reason}


class PlanNotes(list):
    """The warnings of a plan (a list of str), and ``not_audited``: every attention-like module
    the plan leaves out, as {"module", "class", "reason"} dicts (ModelInfo.not_audited)."""

    def __init__(self, warnings: Sequence[str] = (), not_audited: Sequence[dict] = ()) -> None:
        super().__init__(warnings)
        self.not_audited: list[dict[str, str]] = list(not_audited)


def attention_modules(model: nn.Module) -> list[AttentionLayer]:
    """Every softmax attention module of a model (a meta skeleton or a live model), in order.

    A module whose weights are shared by several layers (ALBERT) appears once. The
    attention-like modules left out are ``_survey``'s second list (``plan`` reports them).
    """
    return _survey(model)[0]


def _survey(model: nn.Module) -> tuple[list[AttentionLayer], list[_Skipped]]:
    """attention_modules, and every attention-like module that is not audited with its reason:
    those whose q.k is not a fixed W^h, and those named like attention with no q/k pair."""
    found: list[AttentionLayer] = []
    skipped: list[_Skipped] = []
    modules: dict[str, nn.Module] = {}
    rotaries: list[tuple[str, nn.Module]] = []
    inside = None  # named_modules is depth-first: a found module's descendants follow it
    for path, module in model.named_modules():
        if re.search("rotary|rope", type(module).__name__.lower()):
            rotaries.append((path, module))
        if inside is not None and path.startswith(inside):
            continue
        if getattr(module, "is_kv_shared_layer", None) is True:
            attention = _read_shared(path, module, found, modules)
        elif isinstance(module, nn.MultiheadAttention):
            parent = model.get_submodule(path.rpartition(".")[0])
            attention = _read_torch_mha(path, module, parent, model)
        else:
            attention = _read(path, module, module_rule(module))
        if isinstance(attention, _Skipped):
            skipped.append(attention)
            inside = path + "."
        elif attention is not None:
            found.append(attention)
            modules[path] = module
            inside = path + "."
    covered = [a.path for a in found] + [s.path for s in skipped]
    skipped += _attention_like(model, covered)
    if found:  # a model of state-space layers alone has no attention layers (refused as such)
        skipped += _state_space(model, covered + [s.path for s in skipped])
    order = {path: index for index, (path, _) in enumerate(model.named_modules())}
    skipped.sort(key=lambda s: order[s.path])
    return [_with_rope_factor(a, rotaries) for a in found], skipped


def _with_rope_factor(
    attention: AttentionLayer, rotaries: list[tuple[str, nn.Module]]
) -> AttentionLayer:
    """YaRN, LongRoPE, ... multiply cos and sin by an attention factor f (the rotary module's
    ``attention_scaling``): at relative position 0, q.k is f^2 times the content logit. The
    rotary module that applies is the nearest one above the attention module."""
    above = [
        (path, m)
        for path, m in rotaries
        if attention.path.startswith(path.rpartition(".")[0] + ".") or "." not in path
    ]
    if not above:
        return attention
    _, rotary = max(above, key=lambda entry: len(entry[0]))
    factors = {
        float(v)
        for k, v in vars(rotary).items()
        if k.endswith("attention_scaling") and isinstance(v, (int, float))
    }
    if factors <= {1.0}:
        return attention
    kind = type(rotary).__name__
    if len(factors) > 1:
        raise UnsupportedModelError(
            f"{kind} has several RoPE attention factors ({sorted(factors)}); which one a layer "
            "uses cannot be read off the modules"
        )
    inv_freq = getattr(rotary, "inv_freq", None)
    full = isinstance(inv_freq, torch.Tensor) and 2 * inv_freq.numel() == attention.head_dim
    if attention.packing is Packing.MLA or not full:
        raise UnsupportedModelError(
            f"{kind} scales only the rotary dimensions by its attention factor; W^h would need a "
            "per-dimension scale qkmonitor does not apply"
        )
    (factor,) = factors
    return replace(attention, scale=attention.scale * factor**2)


def _template(path: str) -> tuple[str, tuple[int, ...]]:
    parts = path.split(".")
    numbers = tuple(int(p) for p in parts if p.isdigit())
    return ".".join("{}" if p.isdigit() else p for p in parts), numbers


def _tower(template: str) -> str | None:
    parts = [p.lower() for p in template.split(".")]
    for tower, words in _TOWERS:
        if any(word in part for part in parts for word in words):
            return tower
    return None


def _role(template: str, cross: bool) -> str:
    if cross:
        return "cross"
    parts = template.split(".")
    for role in ("encoder", "decoder"):
        if any(role in part.lower() for part in parts):
            return role
    return ""


def _block_names(attentions: list[AttentionLayer]) -> dict[str, str]:
    """Stack template -> block name, e.g. 'vision', 'text', 'encoder', 'cross' or 'self'; an
    attention pool ``<tower>_pool`` (``pool`` where no tower is named), which leaves the other
    stacks' names as they are without it."""
    pools = {_template(a.path)[0] for a in attentions if a.pool}
    names = _stack_names([a for a in attentions if not a.pool])
    for template in sorted(pools):
        tower = _tower(template)
        name = f"{tower}_pool" if tower else "pool"
        if name in names.values():
            words = [p for p in template.split(".") if p != "{}"]
            name = f"{name}_{'_'.join(words)}"
        names[template] = name
    if len(set(names.values())) != len(names):
        raise UnsupportedModelError("two attention stacks get the same block name")
    return names


def _stack_names(attentions: list[AttentionLayer]) -> dict[str, str]:
    """_block_names of the stacks that are not pools."""
    stacks: dict[str, AttentionLayer] = {}
    for attention in attentions:
        stacks.setdefault(_template(attention.path)[0], attention)
    if not stacks:
        return {}
    if len(stacks) == 1:
        return dict.fromkeys(stacks, "self")
    towers = {t: _tower(t) for t in stacks}
    several_towers = len(set(towers.values())) > 1
    roles = {t: _role(t, a.cross) for t, a in stacks.items()}
    names = {}
    for template in stacks:
        tower, role = towers[template], roles[template]
        same_tower = [t for t in stacks if towers[t] == tower]
        # a stack outside every named tower is named by its role (DiffusionGemma's "decoder")
        use_role = len({roles[t] for t in same_tower}) > 1 or not several_towers or not tower
        parts = [tower if several_towers else None, role if use_role else None]
        names[template] = "_".join(p for p in parts if p) or (tower or "self")
    by_name: dict[str, list[str]] = {}
    for template, name in names.items():
        by_name.setdefault(name, []).append(template)
    for name, templates in by_name.items():
        if len(templates) > 1:  # e.g. a tower's layers and its attention pool
            for template in templates[1:]:
                words = [p for p in template.split(".") if p != "{}"]
                first = [p for p in templates[0].split(".") if p != "{}"]
                extra = next((w for w in words if w not in first), words[-1])
                if f"{name}_{extra}" in names.values():  # LXMERT: x_layers.{lang,visn}_self_att
                    extra = "_".join(w for w in words if w not in first) or extra
                names[template] = f"{name}_{extra}"
    if len(set(names.values())) != len(names):
        raise UnsupportedModelError("two attention stacks get the same block name")
    return names


def _layer_indices(attentions: list[AttentionLayer]) -> dict[str, int]:
    """Module path -> layer index: the stack's one list index (or the one that varies within
    it), else the order."""
    stacks: dict[str, list[tuple[str, tuple[int, ...]]]] = {}
    for attention in attentions:
        template, numbers = _template(attention.path)
        stacks.setdefault(template, []).append((attention.path, numbers))
    out = {}
    for members in stacks.values():
        columns = list(zip(*(numbers for _, numbers in members), strict=True))
        varying = [c for c in columns if len(set(c)) > 1]
        if len(columns) == 1:  # one list index: the layer's place (hybrids keep theirs)
            varying = columns
        for index, (path, _) in enumerate(members):
            out[path] = varying[0][index] if len(varying) == 1 else index
    return out


@dataclass(frozen=True)
class _Rows:
    """Rows [start, stop) of a fused checkpoint tensor of ``total`` rows that transformers cuts
    out into one skeleton parameter when loading. block: PermuteForRope then reorders the rows
    within each block of that many rows (interleaved to half-split rotary pairs)."""

    start: int
    stop: int
    total: int
    block: int | None = None


def _split_rows(converter, renamed: str, meta: Mapping, config) -> dict[str, _Rows] | str:
    """Target parameter -> its rows, for a converter that only cuts one fused tensor along its
    rows (Chunk or Split on dim 0, then at most a PermuteForRope), or only reorders one tensor's
    rows with a PermuteForRope (all its rows, in blocks); else the reason it is not."""
    from transformers.core_model_loading import Chunk, PermuteForRope, Split

    ops = list(converter.operations)
    named = ", ".join(type(op).__name__ for op in ops)
    if (
        len(ops) == 1
        and isinstance(ops[0], PermuteForRope)
        and len(converter.source_patterns) == len(converter.target_patterns) == 1
    ):
        return _permuted_rows(ops[0], converter.source_patterns[0], renamed, meta, config)
    cut, rest = ops[0], ops[1:]
    if (
        not isinstance(cut, (Chunk, Split))
        or cut.dim != 0
        or getattr(cut, "num_shards_attribute", None) is not None
        or len(rest) > 1
        or any(not isinstance(op, PermuteForRope) or op.inverse for op in rest)
        or len(converter.source_patterns) != 1
    ):
        return f"with {named}, not a plain split of its rows"
    first = converter.target_patterns[0]
    if renamed.count(first) != 1:
        return "into targets whose names qkmonitor cannot rebuild"
    targets = [renamed.replace(first, target, 1) for target in converter.target_patterns]
    if any(target not in meta for target in targets):
        return "into targets the model does not have"
    sizes = [meta[target].shape[0] for target in targets]
    if isinstance(cut, Chunk) and len(set(sizes)) != 1:
        return "into equal chunks that do not match the model's parameters"
    out, start = {}, 0
    for target, size in zip(targets, sizes, strict=True):
        block = None
        if rest and any(n in target for n in rest[0].permute_layer_names or [target]):
            sub = getattr(config, rest[0].subconfig_key or "", None) or config
            block = size // getattr(sub, "num_attention_heads", 1)
        out[target] = _Rows(start, start + size, sum(sizes), block)
        start += size
    return out


def _permuted_rows(op, source: str, renamed: str, meta: Mapping, config) -> dict[str, _Rows] | str:
    """The rows of a tensor that a lone PermuteForRope reorders when loading (Mistral Large 4's
    vision wq/wk, saved for interleaved RoPE): all of them, in blocks of rows / heads (the heads
    of its sub-config); the permutation only applies where the source names one of
    ``permute_layer_names``, as transformers' ``PermuteForRope.convert`` decides."""
    if renamed not in meta:
        return "into a target the model does not have"
    if op.permute_layer_names is not None and not any(n in source for n in op.permute_layer_names):
        return {renamed: _Rows(0, meta[renamed].shape[0], meta[renamed].shape[0])}
    if op.inverse:
        return "with an inverse PermuteForRope, not a plain reorder of its rows"
    rows = meta[renamed].shape[0]
    sub = getattr(config, op.subconfig_key or "", None) or config
    heads = getattr(sub, "num_attention_heads", 1)
    if not isinstance(heads, int) or heads <= 0 or rows % heads or (rows // heads) % 2:
        return f"with PermuteForRope in {heads} blocks, which do not divide its {rows} rows"
    return {renamed: _Rows(0, rows, rows, rows // heads)}


def _checkpoint_names(
    model: nn.Module, names: Sequence[str], wanted: set[str]
) -> tuple[dict[str, str], dict[str, _Rows]]:
    """Skeleton parameter name -> checkpoint tensor name, with transformers' key conversion;
    and, for parameters transformers cuts out of a fused checkpoint tensor, their rows in it."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    state = model.state_dict()
    # transformers adds or strips base_model_prefix only where meta_state_dict.get(key) is not
    # None: the values must be something (the model's meta tensors), not None
    meta = dict(state)
    prefix = getattr(model, "base_model_prefix", "") or None
    found: dict[str, str] = {}
    parts: dict[str, _Rows] = {}
    only_weights = all(w.endswith("weight") for w in wanted)  # else a per-head scale too
    for name in names:
        if only_weights and not name.endswith("weight"):  # also in_proj_weight (torch's MHA)
            continue
        # a base model's names (GPT-2's "h.0..." in GPT2LMHeadModel) take the model's
        # base_model_prefix, as from_pretrained loads them; wrappers (PEFT's base_model.model.)
        # lose leading parts
        for candidate in (name, f"{prefix}.{name}") if prefix else (name,):
            while True:
                renamed, converted = rename_source_key(
                    candidate, renamings, converters, prefix, meta
                )
                if renamed not in meta and candidate in meta:
                    renamed, converted = candidate, None
                if _loads_into(renamed, converted, converters, wanted) or "." not in candidate:
                    break
                candidate = candidate.split(".", 1)[1]
            if _loads_into(renamed, converted, converters, wanted):
                break
        if not _loads_into(renamed, converted, converters, wanted):
            continue
        targets = {renamed: None}
        if converted is not None:
            converter = next(c for c in converters if converted in c.source_patterns)
            split = _split_rows(converter, renamed, state, model.config)
            if isinstance(split, str):
                raise UnsupportedModelError(
                    f"the checkpoint stores {name}, which transformers converts when loading "
                    f"{split}; qkmonitor does not read it"
                )
            targets = {t: rows for t, rows in split.items() if t in wanted}
        for target, rows in targets.items():
            if target in found:
                raise UnsupportedModelError(
                    f"{found[target]} and {name} both load into {target}: two readings of the "
                    "checkpoint"
                )
            found[target] = name
            if rows is not None:
                parts[target] = rows
    return found, parts


def _read_tied(
    model: nn.Module, wanted: set[str], names: dict[str, str], parts: dict[str, _Rows]
) -> None:
    """Parameters the checkpoint does not store because the model ties them to others
    (DiffusionGemma's encoder text layers are its decoder layers): read from their source's
    tensor, as from_pretrained ties them (``get_expanded_tied_weights_keys``)."""
    missing = wanted - set(names)
    expanded = getattr(model, "get_expanded_tied_weights_keys", None)
    if not missing or expanded is None:
        return
    ties = expanded(all_submodels=True)
    for name in missing:
        source = ties.get(name)
        if source in names:
            names[name] = names[source]
            if source in parts:
                parts[name] = parts[source]


def _loads_into(renamed: str, converted, converters, wanted: set[str]) -> bool:
    """Whether a checkpoint tensor loads into a wanted parameter: its renamed key, or, for a
    tensor a converter cuts into several (HRM's gqkv_proj into gate, q, k, v), any target."""
    if renamed in wanted:
        return True
    if converted is None:
        return False
    converter = next(c for c in converters if converted in c.source_patterns)
    first = converter.target_patterns[0]
    return any(renamed.replace(first, t, 1) in wanted for t in converter.target_patterns)


def _attention_like(model: nn.Module, covered: Sequence[str] = ()) -> list[_Skipped]:
    """Every module named like attention (Attention, Attn, SelfAtt, DeltaNet) with parameters,
    that is neither one of the covered module paths nor inside or around one, and holds no other
    such module: attention-like modules with no q/k projection pair qkmonitor knows."""
    out = []
    for path, module in model.named_modules():
        kind = type(module).__name__
        if not _ATTENTION_NAME.search(kind.lower()) or any(
            path == f or path.startswith(f + ".") or f.startswith(path + ".") for f in covered
        ):
            continue
        inner = (m for n, m in module.named_modules() if n)
        if any(_ATTENTION_NAME.search(type(m).__name__.lower()) for m in inner):
            continue
        children = [n for n, c in module.named_children() if any(True for _ in c.parameters())]
        children += [n for n, _ in module.named_parameters(recurse=False)]
        if children:
            reason = (
                f"has no q/k projection pair qkmonitor knows among its parts "
                f"({', '.join(children)})"
            )
            out.append(_Skipped(path, kind, reason))
    return out


def _state_space(model: nn.Module, covered: Sequence[str]) -> list[_Skipped]:
    """Every state-space layer (Mamba, Mamba-2: a module holding the ``A_log`` of a selective
    scan) outside the covered module paths: token mixers of a hybrid with no softmax over q.k."""
    out = []
    for path, module in model.named_modules():
        if "A_log" not in dict(module.named_parameters(recurse=False)) or any(
            path == f or path.startswith(f + ".") or f.startswith(path + ".") for f in covered
        ):
            continue
        reason = "is a state-space layer (a selective scan, A_log): no softmax over q.k"
        out.append(_Skipped(path, type(module).__name__, reason))
    return out


_ATTENTION_NAME = re.compile(r"attention|attn|selfatt|deltanet")


def _fused_reading(
    a: AttentionLayer, names: Mapping[str, str], parts: Mapping[str, _Rows]
) -> AttentionLayer:
    """An attention whose q and k transformers cuts out of one fused checkpoint tensor, read as
    that tensor's rows [Q; K; V] (Packing.STACKED_QKV) or [gate; Q; K; V] with a gate of H d
    rows (Packing.GATE_QKV, HRM's gqkv_proj); refused when the cut is another one."""
    q, k = parts.get(a.q), parts.get(a.k)
    if q is None and k is None:
        return a
    if names[a.q] != names[a.k] and all(r is None or r.stop - r.start == r.total for r in (q, k)):
        return _permuted_reading(a, names, q, k)
    fused = names[a.q]
    q_rows, k_rows = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
    packings = {0: Packing.STACKED_QKV, q_rows: Packing.GATE_QKV}  # rows before Q -> packing
    packing = None
    if (
        q is not None
        and k is not None
        and names[a.k] == fused
        and a.packing is Packing.SEPARATE
        and q.start in packings
        and (q.stop, k.start, k.stop) == (q.start + q_rows, q.stop, q.stop + k_rows)
        and q.total == q.start + q_rows + 2 * k_rows
    ):
        packing = packings[q.start]
    if packing is None:
        raise UnsupportedModelError(
            f"the checkpoint stores the q and k of {a.path} in {fused}, which transformers "
            "splits when loading in another way than rows [Q; K; V] (or [gate; Q; K; V]) of "
            "one tensor; qkmonitor does not read it"
        )
    if q.block != k.block or (q.block and (a.head_dim % q.block or a.q_norm)):
        raise UnsupportedModelError(
            f"transformers reorders the rows of {fused} when loading (PermuteForRope) in a way "
            "that does not keep each head's q.k; qkmonitor does not read it"
        )
    # PermuteForRope with equal blocks inside each head reorders q's and k's rows alike, which
    # leaves every head's q.k (and W^h) unchanged.
    return replace(a, q=a.q, k=a.q, packing=packing)


def _permuted_reading(
    a: AttentionLayer, names: Mapping[str, str], q: _Rows | None, k: _Rows | None
) -> AttentionLayer:
    """An attention whose own q and k tensors transformers reorders when loading (a lone
    PermuteForRope): read as stored where the same permutation within each head reorders both
    q's and k's rows, which leaves every head's q.k (and W^h) unchanged; refused otherwise."""
    blocks = {r.block if r is not None else None for r in (q, k)}
    (block,) = blocks if len(blocks) == 1 else (0,)
    if block is None:  # neither is reordered
        return a
    if (
        not block
        or a.head_dim % block
        or a.packing is not Packing.SEPARATE
        or a.n_heads != a.n_kv_heads
        or a.q_norm
        or a.k_norm
        or a.q_dim_scale
    ):
        raise UnsupportedModelError(
            f"transformers reorders the rows of {names[a.q]} and {names[a.k]} when loading "
            "(PermuteForRope) in a way that does not keep each head's q.k; qkmonitor does not "
            "read it"
        )
    # PermuteForRope with equal blocks inside each head reorders q's and k's rows alike:
    # W_Q^h^T P^T P W_K^h = W_Q^h^T W_K^h, the stored weights' W^h
    return a


def _renamed(layout: MLALayout, names: Mapping[str, str]) -> MLALayout:
    fields = {k: v and names[v] for k, v in vars(layout.names).items()}
    return MLALayout(MLANames(**fields), layout.dims, layout.q_latent_scale, layout.kv_latent_scale)


def _plan_checkpoint(
    config, shapes: Mapping[str, Sequence[int]]
) -> tuple[list[AttentionLayer], PlanNotes]:
    """The attention layers of a checkpoint, from its config and its tensor names and shapes."""
    model = skeleton(config)
    attentions, skipped = _survey(model)
    model_type = getattr(config, "model_type", "?")
    if not attentions:
        if skipped:  # nothing to audit: the first one refuses the model, in one line
            first = skipped[0]
            raise UnsupportedModelError(
                f"model_type '{model_type}': its {first.kind} looks like attention, but it "
                f"{first.reason}; nothing to audit"
            )
        raise UnsupportedModelError(
            f"model_type '{model_type}' has no attention layers qkmonitor can read: it audits "
            "softmax attention heads"
        )
    parameters = dict(model.state_dict(keep_vars=True))
    wanted = {n for a in attentions for n in a.tensors}
    names, parts = _checkpoint_names(model, list(shapes), wanted)
    _read_tied(model, wanted, names, parts)
    missing = sorted(wanted - set(names))
    if missing:
        raise CorruptWeightsError(
            f"the checkpoint has no tensor for {missing[0]} that its config implies"
        )
    attentions = [_fused_reading(a, names, parts) for a in attentions]
    for name in wanted:
        want, got = tuple(parameters[name].shape), tuple(shapes[names[name]])
        if name in parts:
            want = (parts[name].total, *want[1:])
        if want != got:
            raise CorruptWeightsError(
                f"{names[name]} has shape {got}, config.json implies {want}; check config.json",
                tensor=names[name],
            )
    blocks = _block_names(attentions)
    layers = _layer_indices(attentions)
    out = [
        replace(
            a,
            block=blocks[_template(a.path)[0]],
            layer=layers[a.path],
            q=names[a.q],
            k=names[a.k],
            q_norm=a.q_norm and names[a.q_norm],
            k_norm=a.k_norm and names[a.k_norm],
            head_scale=a.head_scale and names[a.head_scale],
            q_dim_scale=a.q_dim_scale and names[a.q_dim_scale],
            q_pre=a.q_pre and names[a.q_pre],
            k_pre=a.k_pre and names[a.k_pre],
            q_pre_norm=a.q_pre_norm and names[a.q_pre_norm],
            mla=a.mla and _renamed(a.mla, names),
        )
        for a in attentions
    ]
    first_seen: dict[str, int] = {}
    for layer in out:
        first_seen.setdefault(layer.block, len(first_seen))
    out.sort(key=lambda layer: (first_seen[layer.block], layer.layer))  # blocks kept together
    left_out: dict[str, int] = {}
    for layer in out:
        for item in layer.left_out:
            left_out[item] = left_out.get(item, 0) + 1
    notes = [
        f"left out of W^h (does not change q.k), in {count} layer{'s' * (count > 1)}: {item}"
        for item, count in left_out.items()
    ]
    not_audited = [s.record() for s in skipped]
    if not_audited:
        notes.append(not_audited_line(not_audited))
    return out, PlanNotes(notes, not_audited)


def _named_layout(config: Any) -> Any | None:
    """For a config of a model_type transformers does not know: the same values as the config
    of the one transformers model class its ``architectures`` names (Kimi K2's
    DeepseekV3ForCausalLM), or None when it names none or several."""
    import transformers

    named = {getattr(transformers, str(n), None) for n in getattr(config, "architectures", ())}
    config_classes = {getattr(c, "config_class", None) for c in named if isinstance(c, type)}
    config_classes.discard(None)
    if len(config_classes) != 1:
        return None
    values = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "auto_map")}
    return config_classes.pop().from_dict(values)


def plan(
    config: Any, shapes: Mapping[str, Sequence[int]]
) -> tuple[list[AttentionLayer], PlanNotes]:
    """Plan the audit of a checkpoint: its attention layers, and warnings for the user.

    config: the model's transformers config; shapes: tensor name -> shape for every tensor of
    the checkpoint (headers only). A config naming remote code (``auto_map``) is read with
    transformers' own layout of its model_type, or, for a model_type transformers does not know,
    of the one transformers class its ``architectures`` names; every Q/K tensor must then be in
    the checkpoint with the shape that layout implies, and the result carries a warning. Remote
    code is never run. Raises UnsupportedModelError (one line) when the heads cannot be read
    exactly.
    """
    from transformers import CONFIG_MAPPING

    model_type = getattr(config, "model_type", None) or "unknown"
    if not getattr(config, "auto_map", None):
        return _plan_checkpoint(config, shapes)
    if model_type in CONFIG_MAPPING:
        layout = f"transformers' own '{model_type}' layout"
    else:
        named = _named_layout(config)
        if named is None:
            raise UnsupportedModelError(
                f"config.json of '{model_type}' names remote code (auto_map), which qkmonitor "
                f"never runs, and neither its model_type nor its architectures name a layout "
                "of the installed transformers"
            )
        layout = f"the layout of {', '.join(config.architectures)} (its architectures)"
        config = named
    layers, notes = _plan_checkpoint(config, shapes)
    warning = (
        f"config.json names remote code (auto_map); audited with {layout}, which that code may "
        "change"
    )
    return layers, PlanNotes([warning, *notes], notes.not_audited)
