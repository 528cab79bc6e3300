"""Where each architecture keeps its query/key weights, and how they are packed.

One table, ``ARCHITECTURES``, maps a config's ``model_type`` to its attention stacks. Everything
that depends on the architecture (tensor names, fused layouts, grouped-query mapping, the softmax
scale, QK-norm gains) lives here as data; ``resolve`` turns the table plus a checkpoint's tensor
names and shapes into a list of ``AttentionLayer`` plans, and ``split_heads`` cuts the raw
tensors of one layer into per-head (d_head x d_in) Q and K slices for ``qkmonitor.spectrum``.

Tensor names are matched with any prefix (``bert.``, ``model.``, ``base_model.model.``), so the
same entry serves a bare backbone, a task head model and a PEFT wrapper.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from torch import Tensor

from qkmonitor.errors import CorruptWeightsError, UnsupportedModelError
from qkmonitor.weights.mla import MLADims, MLANames

__all__ = [
    "ARCHITECTURES",
    "MODULE_RULES",
    "AttentionLayer",
    "AttentionStack",
    "MLALayout",
    "ModuleRule",
    "Packing",
    "layer_tensors",
    "output_dim",
    "qk_rows",
    "resolve",
    "split_heads",
    "supported_model_types",
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


Config = Any  # a transformers.PretrainedConfig
ScaleRule = Callable[[Config, int, int], float]  # (config, head_dim, layer index) -> scale


def inverse_sqrt_head_dim(config: Config, head_dim: int, layer: int) -> float:
    """The usual 1 / sqrt(d_head)."""
    return head_dim**-0.5


def unscaled(config: Config, head_dim: int, layer: int) -> float:
    """T5 folds the scale into its initialization and applies none."""
    return 1.0


def gpt2_scale(config: Config, head_dim: int, layer: int) -> float:
    """GPT-2: 1/sqrt(d) if scale_attn_weights; / (layer + 1) if scale_attn_by_inverse_layer_idx."""
    scale = head_dim**-0.5 if getattr(config, "scale_attn_weights", True) else 1.0
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        scale /= layer + 1
    return scale


def query_pre_attn_scale(config: Config, head_dim: int, layer: int) -> float:
    """Gemma 2/3: 1/sqrt(query_pre_attn_scalar), which need not equal d_head."""
    return float(config.query_pre_attn_scalar) ** -0.5


def falcon_packing(config: Config) -> Packing:
    """Falcon has three layouts, chosen by two config flags."""
    if getattr(config, "new_decoder_architecture", False):
        return Packing.GROUPED_QKV
    if getattr(config, "multi_query", True):
        return Packing.STACKED_QKV
    return Packing.PER_HEAD_QKV


@dataclass(frozen=True)
class AttentionStack:
    """One stack of attention modules (e.g. a decoder's self-attention) of an architecture.

    names: alternatives of (q template, k template), module paths with ``{i}`` for the layer
        index, without the ``.weight`` suffix. Fused layouts name the same tensor twice.
        Alternatives cover renamings between checkpoints and transformers' in-memory modules.
    norms: optional (q gain, k gain) templates of QK-norm weights, used when present.
    """

    name: str
    names: tuple[tuple[str, str], ...]
    packing: Packing | Callable[[Config], Packing] = Packing.SEPARATE
    scale: ScaleRule = inverse_sqrt_head_dim
    heads: str = "num_attention_heads"  # config attribute with the number of query heads
    causal: bool = True
    norms: tuple[str, str] | None = None
    norm_offset: float = 0.0  # Gemma's RMSNorm multiplies by (1 + weight)


def _separate(module: str, q: str = "q_proj", k: str = "k_proj") -> tuple[tuple[str, str], ...]:
    return ((f"{module}.{q}", f"{module}.{k}"),)


def _fused(module: str) -> tuple[tuple[str, str], ...]:
    return ((module, module),)


_BERT = AttentionStack(
    "self", _separate("encoder.layer.{i}.attention.self", "query", "key"), causal=False
)
_DECODER = AttentionStack("self", _separate("layers.{i}.self_attn"))
_QK_NORM_DECODER = AttentionStack(
    "self",
    _separate("layers.{i}.self_attn"),
    norms=("layers.{i}.self_attn.q_norm", "layers.{i}.self_attn.k_norm"),
)


def _encoder_decoder(
    encoder: str, decoder: str, cross: str, q: str, k: str, scale: ScaleRule, decoder_heads: str
) -> tuple[AttentionStack, ...]:
    return (
        AttentionStack("encoder", _separate(encoder, q, k), scale=scale, causal=False),
        AttentionStack("decoder", _separate(decoder, q, k), scale=scale, heads=decoder_heads),
        AttentionStack(
            "cross", _separate(cross, q, k), scale=scale, heads=decoder_heads, causal=False
        ),
    )


#: model_type -> attention stacks. Names are checkpoint names without any model prefix.
ARCHITECTURES: dict[str, tuple[AttentionStack, ...]] = {
    **dict.fromkeys(["bert", "roberta", "xlm-roberta", "electra", "camembert"], (_BERT,)),
    "distilbert": (
        AttentionStack(
            "self", _separate("transformer.layer.{i}.attention", "q_lin", "k_lin"), causal=False
        ),
    ),
    "vit": (
        AttentionStack(
            "self",
            (
                (
                    "encoder.layer.{i}.attention.attention.query",
                    "encoder.layer.{i}.attention.attention.key",
                ),
                ("layers.{i}.attention.q_proj", "layers.{i}.attention.k_proj"),
            ),
            causal=False,
        ),
    ),
    "gpt2": (AttentionStack("self", _fused("h.{i}.attn.c_attn"), Packing.CONV1D_QKV, gpt2_scale),),
    "gpt_neox": (
        AttentionStack(
            "self", _fused("layers.{i}.attention.query_key_value"), Packing.PER_HEAD_QKV
        ),
    ),
    "bloom": (
        AttentionStack(
            "self", _fused("h.{i}.self_attention.query_key_value"), Packing.PER_HEAD_QKV
        ),
    ),
    "falcon": (
        AttentionStack("self", _fused("h.{i}.self_attention.query_key_value"), falcon_packing),
    ),
    "gptj": (AttentionStack("self", _separate("h.{i}.attn")),),
    "opt": (AttentionStack("self", _separate("decoder.layers.{i}.self_attn")),),
    **dict.fromkeys(
        ["llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "gemma", "starcoder2"],
        (_DECODER,),
    ),
    **dict.fromkeys(["qwen3", "qwen3_moe", "olmo2"], (_QK_NORM_DECODER,)),
    "gemma2": (
        AttentionStack("self", _separate("layers.{i}.self_attn"), scale=query_pre_attn_scale),
    ),
    "gemma3_text": (
        AttentionStack(
            "self",
            _separate("layers.{i}.self_attn"),
            scale=query_pre_attn_scale,
            norms=("layers.{i}.self_attn.q_norm", "layers.{i}.self_attn.k_norm"),
            norm_offset=1.0,
        ),
    ),
    "phi3": (AttentionStack("self", _fused("layers.{i}.self_attn.qkv_proj"), Packing.STACKED_QKV),),
    "t5": _encoder_decoder(
        "encoder.block.{i}.layer.0.SelfAttention",
        "decoder.block.{i}.layer.0.SelfAttention",
        "decoder.block.{i}.layer.1.EncDecAttention",
        "q",
        "k",
        unscaled,
        "num_heads",
    ),
    "bart": _encoder_decoder(
        "encoder.layers.{i}.self_attn",
        "decoder.layers.{i}.self_attn",
        "decoder.layers.{i}.encoder_attn",
        "q_proj",
        "k_proj",
        inverse_sqrt_head_dim,
        "decoder_attention_heads",
    ),
    # Phi-2 optionally normalizes q and k per head (qk_layernorm); gains are used when present.
    "phi": (
        AttentionStack(
            "self",
            _separate("layers.{i}.self_attn"),
            norms=("layers.{i}.self_attn.q_layernorm", "layers.{i}.self_attn.k_layernorm"),
        ),
    ),
}


@dataclass(frozen=True)
class ModuleRule:
    """What qkmonitor.weights.discovery cannot read off one attention module class.

    why: the reason the row exists. q/k: projection child names of a fused or unusual layout
    (fused layouts name the same child twice). packing: how q/k rows sit in them (or a function
    of the module choosing one). scale: the softmax scale as a function of the module, where
    the module's forward computes one it does not store. output_norms: norm children that act on
    the attention output, not on q or k. refuse: why the module cannot be audited exactly.
    """

    why: str
    q: str | None = None
    k: str | None = None
    packing: Packing | Callable[[Any], Packing] = Packing.SEPARATE
    scale: Callable[[Any], float] | None = None
    output_norms: tuple[str, ...] = ()
    refuse: str | None = None


def _inverse_sqrt_head(module: Any) -> float:
    return float(getattr(module, "head_dim", None) or module.attention_head_size) ** -0.5


def _deberta_scale(module: Any) -> float:
    """DeBERTa-v2/v3: q.k / sqrt(d * (1 + [c2p] + [p2c])) with its default pos_att_type."""
    factor = 1 + sum(kind in module.pos_att_type for kind in ("c2p", "p2c"))
    return float(module.attention_head_size * factor) ** -0.5


#: attention module class -> rule, for model_types read by discovery (not in ARCHITECTURES).
#: Keys are "<modeling module>.<Class>" where two models share a class name, else "<Class>".
MODULE_RULES: dict[str, ModuleRule] = {
    "GPTNeoSelfAttention": ModuleRule(
        "GPT-Neo multiplies q.k with no softmax scale and has no scaling attribute",
        scale=lambda module: 1.0,
    ),
    **dict.fromkeys(
        ["Qwen3NextAttention", "Qwen3_5Attention", "Qwen3_5MoeAttention"],
        ModuleRule(
            "q_proj holds per head [queries; output gate] (torch.chunk of a (2 d_head) view)",
            packing=Packing.GATED_Q,
        ),
    ),
    # vision towers whose one `qkv` Linear is reshaped (T, 3, H, d): without these rows the
    # towers were skipped silently (found by the behavioural reference running them)
    **dict.fromkeys(
        [
            "qwen2_vl.VisionAttention",
            "Qwen2_5_VLVisionAttention",
            "Qwen3VLVisionAttention",
            "Qwen3VLMoeVisionAttention",
            "Qwen3_5VisionAttention",
            "Qwen3_5MoeVisionAttention",
            "Glm4vVisionAttention",
            "Blip2Attention",
            "InstructBlipAttention",
            "InstructBlipVideoAttention",
        ],
        ModuleRule(
            "a vision attention fusing q, k, v in qkv, reshaped (T, 3, H, d)",
            "qkv",
            "qkv",
            Packing.STACKED_QKV,
        ),
    ),
    "Exaone4_5_VisionAttention": ModuleRule(
        "EXAONE 4.5's vision attention splits one qkv Linear [Q (H d); K (Hkv d); V (Hkv d)]",
        "qkv",
        "qkv",
        Packing.STACKED_QKV,
    ),
    "MptAttention": ModuleRule(
        "MPT fuses q, k, v in Wqkv, chunked [Q; K; V]", "Wqkv", "Wqkv", Packing.STACKED_QKV
    ),
    "ModernBertAttention": ModuleRule(
        "ModernBERT fuses Wqkv viewed (3, H, d); its forward passes head_dim^-0.5 unstored",
        "Wqkv",
        "Wqkv",
        Packing.STACKED_QKV,
        scale=_inverse_sqrt_head,
    ),
    "GPTBigCodeAttention": ModuleRule(
        "StarCoder c_attn is a Linear: [Q; K; V] split for multi-query, per head (H, 3 d) else",
        "c_attn",
        "c_attn",
        lambda module: Packing.STACKED_QKV if module.multi_query else Packing.PER_HEAD_QKV,
    ),
    "PersimmonAttention": ModuleRule(
        "Persimmon fuses query_key_value viewed (H, 3, d)",
        "query_key_value",
        "query_key_value",
        Packing.PER_HEAD_QKV,
    ),
    "deberta_v2.DisentangledSelfAttention": ModuleRule(
        "DeBERTa-v2 divides by sqrt(d * scale_factor) computed in forward from pos_att_type",
        scale=_deberta_scale,
    ),
    "deberta.DisentangledSelfAttention": ModuleRule(
        "DeBERTa v1: in_proj viewed (H, 3 d); q is divided by sqrt(d (1 + len(pos_att_type)))",
        "in_proj",
        "in_proj",
        Packing.PER_HEAD_QKV,
        scale=lambda m: float(m.attention_head_size * (1 + len(m.pos_att_type))) ** -0.5,
    ),
    "MPNetSelfAttention": ModuleRule(
        "MPNet divides scores by sqrt(attention_head_size) and stores no scale",
        scale=_inverse_sqrt_head,
    ),
    "AlbertAttention": ModuleRule(
        "ALBERT's attention module also holds the output LayerNorm", output_norms=("LayerNorm",)
    ),
    "LEDEncoderSelfAttention": ModuleRule(
        "Longformer attention",
        refuse="local and global tokens use different q/k projections (query/key and "
        "query_global/key_global): two W^h per head",
    ),
    "MobileBertSelfAttention": ModuleRule(
        "MobileBERT",
        refuse="queries and keys are computed from two separate input tensors (query_tensor, "
        "key_tensor); which x each W^h side sees is not readable off the module",
    ),
    **dict.fromkeys(
        ["MLCDAttention", "OpenAIPrivacyFilterAttention"],
        ModuleRule(
            "MLCD, OpenAI privacy filter",
            refuse="its heads differ from what the model computes in qkmonitor's behavioural "
            "check; refused until that is understood",
        ),
    ),
    "CodeGenAttention": ModuleRule(
        "CodeGen",
        refuse="qkv_proj interleaves [q; v; k] in mp_num model-parallel chunks, not supported",
    ),
}


def module_rule(module: Any) -> ModuleRule | None:
    """The MODULE_RULES row of an attention module, if any."""
    cls = type(module)
    model = cls.__module__.rsplit(".", 1)[-1].removeprefix("modeling_")
    return MODULE_RULES.get(f"{model}.{cls.__name__}") or MODULE_RULES.get(cls.__name__)


def supported_model_types() -> list[str]:
    """The model_types with a known layout, sorted."""
    return sorted(ARCHITECTURES)


@dataclass(frozen=True)
class AttentionLayer:
    """Everything needed to read and split one attention module's Q/K weights."""

    stack: str
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


def _pattern(template: str) -> re.Pattern[str]:
    body = re.escape(template + ".weight").replace(re.escape("{i}"), r"(?P<i>\d+)")
    return re.compile(rf"^(?P<prefix>(?:.+\.)?){body}$")


def _find_layers(template: str, names: Sequence[str]) -> dict[str, dict[int, str]]:
    """prefix -> {layer index: tensor name} for names matching a template."""
    pattern, found = _pattern(template), {}
    for name in names:
        if match := pattern.match(name):
            found.setdefault(match["prefix"], {})[int(match["i"])] = name
    return found


def _best_prefix(found: dict[str, dict[int, str]]) -> str:
    """The prefix with most layers (then the shortest): a text model's layers, not a tower's."""
    return min(found, key=lambda prefix: (-len(found[prefix]), len(prefix)))


def _positive_int(config: Config, attribute: str) -> int:
    value = getattr(config, attribute, None)
    if not isinstance(value, int) or value <= 0:
        raise UnsupportedModelError(
            f"config.json has no usable '{attribute}' ({value!r}); qkmonitor needs the number "
            "of attention heads to split Q/K into heads"
        )
    return value


def _shape_heads(
    packing: Packing, q_shape: Sequence[int], k_shape: Sequence[int], n_heads: int, config: Config
) -> tuple[int, int, int]:
    """(n_kv_heads, head_dim, d_in) from tensor shapes, the packing and the query head count."""
    if len(q_shape) != 2 or len(k_shape) != 2:
        raise CorruptWeightsError(
            f"q weight {tuple(q_shape)} / k weight {tuple(k_shape)}: projection weights must be "
            "2-D (outputs x inputs); the checkpoint is corrupt or not a transformers model"
        )
    if packing is Packing.SEPARATE and q_shape[1] != k_shape[1]:
        raise CorruptWeightsError(
            f"q weight {tuple(q_shape)} and k weight {tuple(k_shape)} take inputs of different "
            "widths; the checkpoint does not match its config.json"
        )
    if packing is Packing.SEPARATE:
        (q_rows, d_in), (k_rows, _) = q_shape, k_shape
        head_dim = q_rows // n_heads
        n_kv, rest = divmod(k_rows, head_dim) if head_dim else (0, 1)
        if head_dim * n_heads != q_rows or rest or not n_kv or n_heads % n_kv:
            raise CorruptWeightsError(
                f"q weight {tuple(q_shape)} / k weight {tuple(k_shape)} do not split into "
                f"{n_heads} heads; check num_attention_heads in config.json"
            )
        return n_kv, head_dim, d_in
    if packing is Packing.CONV1D_QKV:
        d_in, rows = q_shape
    else:
        rows, d_in = q_shape
    head_dim = getattr(config, "head_dim", None)
    if not isinstance(head_dim, int) or packing is Packing.CONV1D_QKV:
        head_dim = (rows // 3 if packing is Packing.CONV1D_QKV else d_in) // n_heads
    extra, rest = divmod(rows - n_heads * head_dim, 2 * head_dim) if head_dim else (0, 1)
    if rest or extra <= 0 or n_heads % extra:
        raise CorruptWeightsError(
            f"fused qkv weight {tuple(q_shape)} does not split into {n_heads} query heads of "
            f"size {head_dim}; check the attention settings in config.json"
        )
    return extra, head_dim, d_in


def _stack_layers(
    stack: AttentionStack, config: Config, shapes: Mapping[str, Sequence[int]]
) -> list[AttentionLayer]:
    names = list(shapes)
    found = ((_find_layers(q, names), k) for q, k in stack.names)
    q_found, k_template = next(((q, k) for q, k in found if q), ({}, ""))
    if not q_found:
        return []
    prefix = _best_prefix(q_found)
    k_found = _find_layers(k_template, names).get(prefix, {})
    packing = stack.packing if isinstance(stack.packing, Packing) else stack.packing(config)
    n_heads = _positive_int(config, stack.heads)
    layers = []
    for index in sorted(q_found[prefix]):
        q_name, k_name = q_found[prefix][index], k_found.get(index)
        if k_name is None:
            raise CorruptWeightsError(f"{q_name} has no matching key weight in the checkpoint")
        n_kv, head_dim, d_in = _shape_heads(
            packing, shapes[q_name], shapes[k_name], n_heads, config
        )
        q_norm = k_norm = None
        if stack.norms:
            q_norm, k_norm = (
                prefix + template.format(i=index) + ".weight" for template in stack.norms
            )
            if q_norm not in shapes or k_norm not in shapes:
                q_norm = k_norm = None
        layers.append(
            AttentionLayer(
                stack=stack.name,
                layer=index,
                q=q_name,
                k=k_name,
                packing=packing,
                n_heads=n_heads,
                n_kv_heads=n_kv,
                head_dim=head_dim,
                d_in=d_in,
                scale=stack.scale(config, head_dim, index),
                causal=stack.causal,
                q_norm=q_norm,
                k_norm=k_norm,
                norm_offset=stack.norm_offset,
            )
        )
    return layers


def resolve(
    config: Config, shapes: Mapping[str, Sequence[int]]
) -> tuple[list[AttentionLayer], list[str]]:
    """Plan the audit of a checkpoint: its attention layers, and warnings for the user.

    config: the model's transformers config (``model_type`` selects the table entry).
    shapes: tensor name -> shape for every tensor of the checkpoint (headers only).
    Raises UnsupportedModelError when no attention weights can be located.
    """
    model_type = getattr(config, "model_type", None) or "unknown"
    stacks = ARCHITECTURES.get(model_type)
    if stacks is None:
        if getattr(config, "auto_map", None):
            raise UnsupportedModelError(
                f"config.json of '{model_type}' names remote code (auto_map), which qkmonitor "
                "never runs, and its layout is not in qkmonitor's table"
            )
        from qkmonitor.weights.discovery import plan

        return plan(config, shapes)
    warnings: list[str] = []
    if getattr(config, "auto_map", None):
        warnings.append(
            f"config.json names remote code (auto_map); audited with transformers' own "
            f"'{model_type}' layout, which that code may change"
        )
    layers = [layer for stack in stacks for layer in _stack_layers(stack, config, shapes)]
    if layers:
        return layers, warnings
    raise UnsupportedModelError(
        f"the Q/K weights of this '{model_type}' checkpoint were not found under the names "
        "transformers uses; is it a complete checkpoint?"
    )


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
    else:  # CONV1D_QKV and STACKED_QKV: [Q; K; V] blocks of rows
        rows = _rows(q_weight, packing)
        wq, wk = rows[: h * d], rows[h * d : (h + kv) * d]
    wq = _apply_gain(wq.reshape(h, d, -1), q_gain, layer.norm_offset)
    wk = _apply_gain(wk.reshape(kv, d, -1), k_gain, layer.norm_offset)
    return wq, wk


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
    return heads * d + dims, h * d + kv_heads * d + dims  # [Q; K; V] blocks (CONV1D, STACKED)
