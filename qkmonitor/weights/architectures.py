"""Where each architecture keeps its query/key weights, and how they are packed.

Layouts are read off transformers' own attention modules (``qkmonitor.weights.discovery``); the
one table here, ``MODULE_RULES``, holds as data only what cannot be read off a module (fused
packings, scales a forward computes without storing them, norms on the attention output,
refusals), each row with the reason it exists. ``resolve`` turns a config plus a checkpoint's
tensor names and shapes into ``AttentionLayer`` plans, and ``split_heads`` cuts the raw tensors
of one layer into per-head (d_head x d_in) Q and K slices for ``qkmonitor.spectrum``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from torch import Tensor

from qkmonitor.errors import CorruptWeightsError, UnsupportedModelError
from qkmonitor.weights.mla import MLADims, MLANames

__all__ = [
    "MODULE_RULES",
    "AttentionLayer",
    "MLALayout",
    "ModuleRule",
    "Packing",
    "layer_tensors",
    "output_dim",
    "qk_rows",
    "resolve",
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
class ModuleRule:
    """What qkmonitor.weights.discovery cannot read off one attention module class.

    why: the reason the row exists. q/k: projection child names of a fused or unusual layout
    (fused layouts name the same child twice). packing: how q/k rows sit in them (or a function
    of the module choosing one). scale: the softmax scale as a function of the module, where
    the module's forward computes one it does not store. heads/head_dim: the number of query
    heads and their size as functions of the module, where it does not store them.
    output_norms: norm children that act on the attention output (or other inputs), not on the
    tokens' q or k. refuse: why the module cannot be audited exactly (or a function of the
    module giving that reason, None where it can be).
    """

    why: str
    q: str | None = None
    k: str | None = None
    packing: Packing | Callable[[Any], Packing] = Packing.SEPARATE
    scale: Callable[[Any], float] | None = None
    heads: Callable[[Any], int] | None = None
    head_dim: Callable[[Any], int] | None = None
    output_norms: tuple[str, ...] = ()
    refuse: str | Callable[[Any], str | None] | None = None


def _inverse_sqrt_head(module: Any) -> float:
    return float(getattr(module, "head_dim", None) or module.attention_head_size) ** -0.5


def _deberta_scale(module: Any) -> float:
    """DeBERTa-v2/v3: q.k / sqrt(d * (1 + [c2p] + [p2c])) with its default pos_att_type."""
    factor = 1 + sum(kind in module.pos_att_type for kind in ("c2p", "p2c"))
    return float(module.attention_head_size * factor) ** -0.5


def _falcon_packing(module: Any) -> Packing:
    """Falcon has three layouts, chosen by two config flags."""
    if module.new_decoder_architecture:
        return Packing.GROUPED_QKV
    return Packing.STACKED_QKV if module.multi_query else Packing.PER_HEAD_QKV


def _gpt2_packing(module: Any) -> Packing:
    if module.is_cross_attention:  # q from q_attn, [K; V] from c_attn: not one fused layout
        raise UnsupportedModelError(
            "GPT-2 cross attention (add_cross_attention) takes q and k from two Conv1D "
            "projections; not supported"
        )
    return Packing.CONV1D_QKV


def _gpt2_style_scale(module: Any) -> float:
    """GPT-2: 1/sqrt(d) if scale_attn_weights; / (layer + 1) if scale_attn_by_inverse_layer_idx."""
    scale = module.head_dim**-0.5 if module.scale_attn_weights else 1.0
    return scale / (module.layer_idx + 1) if module.scale_attn_by_inverse_layer_idx else scale


#: attention module class -> rule. Keys are "<modeling module>.<Class>" where two models share a
#: class name, else "<Class>".
MODULE_RULES: dict[str, ModuleRule] = {
    "GPT2Attention": ModuleRule(
        "GPT-2 fuses q, k, v in one Conv1D c_attn (columns [Q | K | V]), not an nn.Linear pair",
        "c_attn",
        "c_attn",
        _gpt2_packing,
    ),
    "GPTNeoXAttention": ModuleRule(
        "GPT-NeoX fuses query_key_value viewed (H, 3 d): [q_h; k_h; v_h] per head",
        "query_key_value",
        "query_key_value",
        Packing.PER_HEAD_QKV,
    ),
    "BloomAttention": ModuleRule(
        "BLOOM fuses query_key_value viewed (H, 3, d) and scales by inv_norm_factor in baddbmm",
        "query_key_value",
        "query_key_value",
        Packing.PER_HEAD_QKV,
        scale=lambda module: float(module.inv_norm_factor),
    ),
    "FalconAttention": ModuleRule(
        "Falcon fuses query_key_value in one of three layouts (new_decoder_architecture: per key "
        "group; multi_query: [Q; K; V]; else per head) and scales by inv_norm_factor",
        "query_key_value",
        "query_key_value",
        _falcon_packing,
        scale=lambda module: float(module.inv_norm_factor),
    ),
    "Phi3Attention": ModuleRule(
        "Phi-3 fuses qkv_proj as [Q (H d); K (Hkv d); V (Hkv d)]",
        "qkv_proj",
        "qkv_proj",
        Packing.STACKED_QKV,
    ),
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
    "MptAttention": ModuleRule(
        "MPT fuses q, k, v in Wqkv, chunked [Q; K; V]", "Wqkv", "Wqkv", Packing.STACKED_QKV
    ),
    # build helper (issue 10): DBRX, found by the sweep once its default config builds
    "DbrxAttention": ModuleRule(
        "DBRX fuses Wqkv split [Q (H d); K (Hkv d); V (Hkv d)]; clip_qkv clamps activations",
        "Wqkv",
        "Wqkv",
        Packing.STACKED_QKV,
    ),
    **dict.fromkeys(
        [
            "BlipAttention",
            "Blip2Attention",
            "InstructBlipAttention",
            "InstructBlipVideoAttention",
            "PPOCRV5MobileRecAttention",
            "PPOCRV5ServerRecAttention",
            "PPOCRV6SmallRecAttention",
        ],
        ModuleRule(
            "BLIP vision towers fuse qkv viewed (3, H, d); the scale is module.scale",
            "qkv",
            "qkv",
            Packing.STACKED_QKV,
            scale=lambda module: float(module.scale),
        ),
    ),
    **dict.fromkeys(
        ["EsmSelfAttention", "EvollaSaProtSelfAttention"],
        ModuleRule(
            "ESM multiplies the query by head_size^-0.5 itself and passes scaling=1.0",
            scale=lambda module: float(module.attention_head_size) ** -0.5,
        ),
    ),
    "BarkSelfAttention": ModuleRule(
        "Bark splits att_proj into [Q; K; V] and divides q.k by sqrt(head_dim) in _attn",
        "att_proj",
        "att_proj",
        Packing.STACKED_QKV,
        scale=_inverse_sqrt_head,
    ),
    "BltCrossAttention": ModuleRule(
        "BLT normalizes the inputs, not q and k: q_proj(q_norm(x)), k_proj(k_norm(y))",
        refuse="q_norm and k_norm normalize its inputs before q_proj and k_proj (gains per input "
        "dimension), which qkmonitor does not fold into W^h",
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
    # issue 10: BERT-style modules that divide q.k by sqrt(attention_head_size) in forward
    # (BigBird's block-sparse path multiplies by the same rsqrt_d; relative/bbox position terms
    # are not part of W^h)
    **dict.fromkeys(
        [
            "BigBirdSelfAttention",
            "BigBirdBlockSparseAttention",
            "BigBirdPegasusSelfAttention",
            "BigBirdPegasusBlockSparseAttention",
            "BlipTextSelfAttention",
            "BrosSelfAttention",
            "CanineSelfAttention",
            "Data2VecVisionSelfAttention",
            "FlavaSelfAttention",
            "GitSelfAttention",
            "LxmertAttention",
            "MegatronBertSelfAttention",
            "MobileViTSelfAttention",
            "RemBertSelfAttention",
            "RoFormerSelfAttention",
            "TapasSelfAttention",
            "ViltSelfAttention",
            "VisualBertSelfAttention",
        ],
        ModuleRule(
            "divides q.k by sqrt(attention_head_size) in forward and stores no scale",
            scale=_inverse_sqrt_head,
        ),
    ),
    # issue 10: scales and refusals read off each class's forward
    **dict.fromkeys(
        ["ProphetNetAttention", "ProphetNetNgramSelfAttention"],
        ModuleRule(
            "ProphetNet divides queries by sqrt(head_dim) in forward (the n-gram streams share "
            "the projections)",
            scale=_inverse_sqrt_head,
        ),
    ),
    "sew_d.DisentangledSelfAttention": ModuleRule(
        "SEW-D copies DeBERTa-v2's attention: q.k / sqrt(d * scale_factor) from pos_att_type",
        scale=_deberta_scale,
    ),
    "MraSelfAttention": ModuleRule(
        "MRA zero-pads heads to 32 dimensions before its logits q.k / sqrt(padded head_dim)",
        scale=lambda module: float(max(module.attention_head_size, 32)) ** -0.5,
    ),
    **dict.fromkeys(
        ["LongT5LocalAttention", "LongT5TransientGlobalAttention"],
        ModuleRule(
            "LongT5's local and transient-global attention apply no scale, like T5; the global "
            "side keys are the same k projection of block aggregates normalized by "
            "global_input_layer_norm, which acts on those inputs, not on the tokens' q or k",
            scale=lambda module: 1.0,
            output_norms=("global_input_layer_norm",),
        ),
    ),
    "LongformerSelfAttention": ModuleRule(
        "Longformer attention",
        refuse="local and global tokens use different q/k projections (query/key and "
        "query_global/key_global): two W^h per head",
    ),
    "LiltSelfAttention": ModuleRule(
        "LiLT",
        refuse="every logit adds a second q.k of the layout stream (layout_query/layout_key of "
        "layout_inputs): the text W^h alone is not what it computes",
    ),
    **dict.fromkeys(
        ["TimesFmAttention", "TimesFm2_5Attention", "Gemma3nAudioAttention"],
        ModuleRule(
            "TimesFM, Gemma 3n audio",
            refuse="each query dimension is multiplied by softplus of a learned vector (per-"
            "dimension query scaling), which qkmonitor does not fold into W^h",
        ),
    ),
    "AriaCrossAttention": ModuleRule(
        "Aria projector",
        refuse="q_proj/k_proj outputs pass through nn.MultiheadAttention's own in_proj: queries "
        "and keys are products of two projections, which qkmonitor does not compose",
    ),
    "xLSTMLayer": ModuleRule(
        "xLSTM",
        refuse="its mLSTM layer gates a linear recurrence over q.k, with no softmax attention; "
        "qkmonitor audits softmax attention heads",
    ),
    "YosoSelfAttention": ModuleRule(
        "YOSO",
        refuse="it weights values by LSH collision probabilities (1 - arccos(cos(q, k))/pi)^tau "
        "of normalized q and k, not by a softmax of q.k",
    ),
    # issue 10: head counts and sizes that modules compute but do not store
    **dict.fromkeys(
        ["LwDetrAttention", "RfDetrAttention"],
        ModuleRule(
            "LW-DETR/RF-DETR split q into config.decoder_self_attention_heads heads",
            heads=lambda module: module.config.decoder_self_attention_heads,
        ),
    ),
    **dict.fromkeys(
        ["SamAttention", "SamHQAttention"],
        ModuleRule(
            "SAM's mask decoder splits its downsampled internal_dim into num_attention_heads",
            head_dim=lambda module: module.internal_dim // module.num_attention_heads,
        ),
    ),
    "GroupViTAssignAttention": ModuleRule(
        "GroupViT grouping block",
        refuse="its softmax runs over the queries (group tokens compete for each image token, "
        "made one-hot at inference): an assignment of tokens to groups, not attention heads",
    ),
    "OpenAIPrivacyFilterAttention": ModuleRule(
        "OpenAI privacy filter multiplies q and k each by scaling (head_dim^-0.25) and passes "
        "1.0 to the attention function: the logit's scale is scaling^2",
        scale=lambda module: module.scaling**2,
    ),
    # issue 10: norms on the attention output (they do not touch W^h), extra query factors
    "BitNetAttention": ModuleRule(
        "BitNet normalizes the attention output (attn_sub_norm) before o_proj",
        output_norms=("attn_sub_norm",),
    ),
    "DiffLlamaAttention": ModuleRule(
        "Differential attention: each head is a softmax head; groupnorm acts on their combined "
        "output",
        output_norms=("groupnorm",),
    ),
    "KosmosTextAttention": ModuleRule(
        "Kosmos-2 normalizes the attention output (inner_attn_ln) before out_proj",
        output_norms=("inner_attn_ln",),
    ),
    **dict.fromkeys(
        ["MuseSparkTextAttention", "MuseGlimmerTextAttention"],
        ModuleRule(
            "Muse: q is multiplied by config.qk_scale_factor after its gain-free qk_norm; o_norm "
            "acts on the output",
            scale=lambda module: module.scaling * module.qk_scale_factor,
            output_norms=("o_norm",),
        ),
    ),
    "CodeGenAttention": ModuleRule(
        "CodeGen: qkv_proj viewed (mp_num = 4, 3 E/4), split [q; v; k]; rotary_dim is the "
        "identity at position 0",
        "qkv_proj",
        "qkv_proj",
        Packing.MP4_QVK,
        refuse=lambda module: (
            f"qkv_proj in mp_num = {module.mp_num} chunks, not 4" if module.mp_num != 4 else None
        ),
    ),
    # Fused, renamed or attention-like modules that discovery cannot read off their children
    # (issue 10, "exact or clearly refused"); each row checked against the module's forward.
    **dict.fromkeys(
        [
            "qwen2_vl.VisionAttention",
            "Qwen2_5_VLVisionAttention",
            "Qwen3VLVisionAttention",
            "Qwen3VLMoeVisionAttention",
            "Qwen3_5VisionAttention",
            "Qwen3_5MoeVisionAttention",
            "Qwen3OmniMoeVisionAttention",
            "Qwen4ExpVisionAttention",
            "GlmImageVisionAttention",
            "Glm4vVisionAttention",
            "Glm4vMoeVisionAttention",
            "GlmOcrVisionAttention",
            "Glm5NextVisionAttention",
            "Ernie4_5_VLMoeVisionAttention",
            "Dots3NoteVisionAttention",
            "CohereCompassVisionAttention",
            "Exaone4_5_VisionAttention",
        ],
        ModuleRule(
            "vision qkv is one Linear, reshaped (seq, 3, H, d) or split [q_dim, kv_dim, kv_dim]",
            "qkv",
            "qkv",
            Packing.STACKED_QKV,
        ),
    ),
    **dict.fromkeys(
        [
            "SamVisionAttention",
            "SamVisionSdpaAttention",
            "SamHQVisionAttention",
            "SamHQVisionSdpaAttention",
            "VitDetAttention",
            "SegGptAttention",
            "TimesformerSelfAttention",
            "GotOcr2VisionAttention",  # SAM's vision attention, copied
            "DeepseekOcr2SamVisionAttention",
            "DeepseekOcr2SamVisionSdpaAttention",
            "UnlimitedOcrSamVisionAttention",
            "UnlimitedOcrSamVisionSdpaAttention",
            "PPFormulaNetVisionAttention",
            "SLANeXtVisionAttention",
        ],
        ModuleRule(
            "qkv is one Linear reshaped (batch, tokens, 3, H, d); d_head = hidden / H, unstored",
            "qkv",
            "qkv",
            Packing.STACKED_QKV,
            head_dim=lambda module: module.qkv.weight.shape[0] // (3 * _heads(module)),
        ),
    ),
    "openai.Attention": ModuleRule(
        "GPT-1: Conv1D c_attn split [Q | K | V]; divides by sqrt(d) only if its bool 'scale'",
        "c_attn",
        "c_attn",
        Packing.CONV1D_QKV,
        scale=lambda module: (module.split_size // module.n_head) ** -0.5 if module.scale else 1.0,
        head_dim=lambda module: module.split_size // module.n_head,
    ),
    **dict.fromkeys(
        ["ImageGPTAttention", "DecisionTransformerGPT2Attention"],
        ModuleRule(
            "GPT-2 style Conv1D c_attn split [Q | K | V], scaled as GPT-2 (ImageGPT stores no "
            "scaling)",
            "c_attn",
            "c_attn",
            _gpt2_packing,
            scale=_gpt2_style_scale,
        ),
    ),
    "ctrl.MultiHeadAttention": ModuleRule(
        "CTRL",
        refuse="it takes v, k and q as three separate inputs (Wq(q), Wk(k)); "
        "which x each W^h side sees is not readable off the module",
    ),
    "CpmAntAttention": ModuleRule(
        "CPM-Ant: project_q/project_k, heads of dim_head, scores divided by sqrt(dim_head)",
        "project_q",
        "project_k",
        scale=lambda module: module.dim_head**-0.5,
        head_dim=lambda module: module.dim_head,
    ),
    "GPTNeoXJapaneseAttention": ModuleRule(
        "query_key_value viewed (H, 3 d) as GPT-NeoX; scores divided by its norm_factor",
        "query_key_value",
        "query_key_value",
        Packing.PER_HEAD_QKV,
        scale=lambda module: 1.0 / module.norm_factor,
    ),
    "IBertSelfAttention": ModuleRule(
        "I-BERT: QuantLinear query/key, plain linear maps unless quant_mode",
        "query",
        "key",
        scale=_inverse_sqrt_head,
        refuse=lambda module: (
            "quant_mode quantizes q/k weights and activations to integers at "
            "run time; W^h of the stored weights is not what it computes"
            if module.quant_mode
            else None
        ),
    ),
    "JetMoeAttention": ModuleRule(
        "JetMoE",
        refuse="a mixture of attention heads: each token's queries come from the experts its "
        "router picks (experts.input_linear), so W_Q of a head depends on the token",
    ),
    "SwiftFormerEfficientAdditiveAttention": ModuleRule(
        "SwiftFormer",
        refuse="additive attention softmaxes each token's query against one learned vector "
        "(w_g), not q.k between tokens: it has no W^h",
    ),
    "MoshiAttention": ModuleRule(
        "Moshi wraps q/k in MoshiLinear (.linear); the depth decoder's are flexible",
        "q_proj.linear",
        "k_proj.linear",
        refuse=lambda module: (
            "its MoshiFlexibleLinear q/k projections use one weight per "
            "codebook position, so W^h differs by position"
            if module.q_proj.use_flexible_linear
            else None
        ),
    ),
    "Gemma4VisionAttention": ModuleRule(
        "Gemma 4 vision wraps q/k in Gemma4ClippableLinear (.linear); v_norm acts on values",
        "q_proj.linear",
        "k_proj.linear",
        output_norms=("v_norm",),
        refuse=lambda module: (
            "use_clipped_linears clamps the q/k projections' inputs and "
            "outputs to stored bounds: not a linear map, so no single W^h"
            if module.q_proj.use_clipped_linears
            else None
        ),
    ),
    "Gemma4AudioAttention": ModuleRule(
        "Gemma 4 audio",
        refuse="queries are scaled per dimension by softplus(per_dim_scale) and attend in "
        "chunks with relative keys (relative_k_proj); not a layout qkmonitor reads",
    ),
    **dict.fromkeys(
        [
            "Inkling2SlidingAttention",
            "Inkling2FullAttention",
            "Inkling2LoopSlidingAttention",
            "Inkling2LoopFullAttention",
        ],
        ModuleRule(
            "Inkling 2",
            refuse="its keys pass a short convolution over neighbouring tokens (k_proj.sconv) "
            "and its queries an L2 clip (q_proj.norm): W^h of the projections alone is not "
            "what it computes",
        ),
    ),
    "DeepseekV4Attention": ModuleRule(
        "DeepSeek-V4",
        refuse="keys are one kv_proj shared with the values (K = V) plus compressed entries "
        "from its compressor, and q passes two norms between q_a_proj and q_b_proj; not a "
        "layout qkmonitor reads",
    ),
    "RwkvSelfAttention": ModuleRule(
        "RWKV",
        refuse="RWKV time mixing is a linear recurrence over keys and values (WKV) gated by "
        "its receptance, with no softmax over q.k: it has no attention heads to audit",
    ),
    "PatchTSMixerGatedAttention": ModuleRule(
        "PatchTSMixer",
        refuse="its gated attention is a softmax over the features of each token (attn_layer), "
        "not q.k between tokens: it has no attention heads to audit",
    ),
    "MobileViTV2LinearSelfAttention": ModuleRule(
        "MobileViTV2",
        refuse="separable linear attention softmaxes one score per token over the tokens, not "
        "q.k between tokens: it has no W^h",
    ),
}


def _heads(module: Any) -> int:
    return getattr(module, "num_attention_heads", None) or module.num_heads


def module_rule(module: Any) -> ModuleRule | None:
    """The MODULE_RULES row of an attention module, if any."""
    cls = type(module)
    model = cls.__module__.rsplit(".", 1)[-1].removeprefix("modeling_")
    return MODULE_RULES.get(f"{model}.{cls.__name__}") or MODULE_RULES.get(cls.__name__)


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


def resolve(
    config: Any, shapes: Mapping[str, Sequence[int]]
) -> tuple[list[AttentionLayer], list[str]]:
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

    from qkmonitor.weights.discovery import plan  # discovery reads this module's table

    model_type = getattr(config, "model_type", None) or "unknown"
    if not getattr(config, "auto_map", None):
        return plan(config, shapes)
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
    layers, warnings = plan(config, shapes)
    warning = (
        f"config.json names remote code (auto_map); audited with {layout}, which that code may "
        "change"
    )
    return layers, [warning, *warnings]


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
