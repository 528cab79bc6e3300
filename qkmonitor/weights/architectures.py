"""The one architecture table: what discovery cannot read off an attention module.

Layouts are read off transformers' own attention modules (``qkmonitor.weights.discovery``); the
one table here, ``MODULE_RULES``, holds as data only what cannot be read off a module (fused
packings, scales a forward computes without storing them, norms on the attention output,
refusals), each row with the reason it exists. The plan types it fills in (``Packing``,
``AttentionLayer``) live in ``qkmonitor.weights.layout``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from qkmonitor.errors import UnsupportedModelError
from qkmonitor.weights.layout import Packing

__all__ = ["MODULE_RULES", "POOLING_HEADS", "ModuleRule", "PoolingHead", "module_rule"]


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
    module giving that reason, None where it can be). inner: an nn.MultiheadAttention child
    that q and k pass through after the q/k projections (Aria): W_Q = W_in_q W_q, W_K = W_in_k
    W_k, with the inner module's heads and scale. unaudited: why an attention-like module that
    is not softmax attention over q.k is left out (listed in ``not_audited``, the rest of the
    model audited), or a function of the module giving that reason (None where it is audited).
    head_scale: (parameter, maximum) of a per-head log temperature the forward multiplies each
    head's logits by, exp(min(parameter, maximum)). q_dim_scale: a parameter v of d_head values
    whose softplus multiplies each query dimension (its constant factor goes in scale).
    batch_norm: a BatchNorm1d child on the q/k projection's outputs, folded in with its
    running statistics (inference); k_batch_norm: k's own, where q and k are two projections.
    left_out: parts that add to or act on the logits without changing the content logit
    x_i^T W^h x_j (relative position terms, softcaps), named in the result with what they do
    (or a function of the module giving them). q_latent: (down projection, its RMS norm, q's
    norm, k's norm) children where the queries pass a down projection and an RMS norm before q
    (DeepSeek-V4): W_Q^h = W_q^h diag(g) W_down, the norms' per-token factors left out as for
    QK-norm.
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
    inner: str | None = None
    unaudited: str | Callable[[Any], str | None] | None = None
    head_scale: tuple[str, float] | None = None
    batch_norm: str | None = None
    k_batch_norm: str | None = None
    q_dim_scale: str | None = None
    left_out: tuple[str, ...] | Callable[[Any], tuple[str, ...]] = ()
    q_latent: tuple[str, str, str, str] | None = None


@dataclass(frozen=True)
class PoolingHead:
    """An attention pooling head (a module holding a learned probe that an nn.MultiheadAttention
    child attends from): which model classes use its output.

    why: what it is and where its output goes. used_by: the model classes whose forward uses
    the pooled output; in any other model (a multimodal model that takes the tower's hidden
    states) the head is computed or built but its output never reaches the model's outputs, so
    it is listed in not_audited with ``discarded``, not audited as if it mattered.
    """

    why: str
    used_by: tuple[str, ...]
    discarded: str


def _inverse_sqrt_head(module: Any) -> float:
    return float(getattr(module, "head_dim", None) or module.attention_head_size) ** -0.5


def _deberta_scale(module: Any) -> float:
    """DeBERTa-v2/v3: q.k / sqrt(d * (1 + [c2p] + [p2c])) with its default pos_att_type."""
    factor = 1 + sum(kind in module.pos_att_type for kind in ("c2p", "p2c"))
    return float(module.attention_head_size * factor) ** -0.5


def _spatial_reduction(ratio: str, conv: str) -> Callable[[Any], str | None]:
    """The not_audited reason of a PVT-style spatial-reduction attention module whose keys come
    from a reduced sequence (its ``ratio`` attribute > 1, or PVT v2's linear_attention), None
    where keys are the projection of the same tokens as the queries (ratio 1)."""

    def reason(module: Any) -> str | None:
        if getattr(module, "linear_attention", False):
            return (
                f"takes its keys from an average pool of the tokens to 7 x 7 (pool), a 1 x 1 "
                f"convolution ({conv}), a LayerNorm and a GELU: keys of pooled neighbouring "
                "tokens, not a linear map of the queries' tokens; W^h of the projections alone "
                "is not what it computes"
            )
        r = getattr(module, ratio)
        if r <= 1:
            return None
        return (
            f"takes its keys from a strided {r} x {r} convolution over neighbouring tokens "
            f"({conv}) and a LayerNorm (spatial-reduction attention): a token-mixing "
            "convolution and a LayerNorm on the keys' input, so W^h of the projections alone "
            "is not what it computes"
        )

    return reason


def _efficient_attention(ratio: str, conv: str) -> ModuleRule:
    """PVT-style efficient attention (GLPN, PVT, PVT v2): the scale its forward computes, and
    the modules whose keys come from a reduced sequence listed as not audited."""
    return ModuleRule(
        "PVT-style efficient attention divides q.k by sqrt(attention_head_size) in forward and "
        "stores no scale; where its sequence-reduction ratio is 1, keys are key(x) of the "
        "queries' own tokens",
        scale=_inverse_sqrt_head,
        unaudited=_spatial_reduction(ratio, conv),
    )


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
def _beam_scale(module: Any) -> float:
    """Beam: head_dim^-0.5, times (1 + 1 / 2048) ** 0.1 in a layer without RoPE."""
    config = module.config
    kind, params = config.layer_types[module.layer_idx], config.rope_parameters
    nope = isinstance(params, dict) and kind in params and params[kind] is None
    return float(module.scaling) * (math.exp(0.1 * math.log1p(1 / 2048)) if nope else 1.0)


def _clamped_linears(module: Any) -> tuple[str, ...]:
    """Gemma 4's use_clipped_linears: q_proj/k_proj (Gemma4ClippableLinear) clamp their inputs
    and outputs elementwise to stored bounds (buffers, +-inf as initialised). Inside the bounds
    they are the linear maps W^h is made of; the clamps act per token like an input norm and
    QK-norm, which SPEC leaves out of W^h, so they are named, not folded."""
    if not getattr(module.q_proj, "use_clipped_linears", False):
        return ()
    return (
        "use_clipped_linears: q_proj/k_proj clamp their inputs and outputs elementwise to "
        "stored bounds (input_min/max, output_min/max); W^h is exact for tokens within them",
    )


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
        "MobileBERT's forward(query_tensor, key_tensor, ...) projects query(q), key(k); its one "
        "caller, MobileBertLayer, passes one tensor as both in every bottleneck mode "
        "(Bottleneck.forward: the shared bottleneck's output, or the hidden states): "
        "self-attention over that tensor (width true_hidden_size)"
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
    "MultiheadAttention": ModuleRule(
        "torch's nn.MultiheadAttention: in_proj_weight rows [Q; K; V] of embed_dim each (or "
        "q_proj_weight/k_proj_weight where vdim differs); F.multi_head_attention_forward scales "
        "q by 1/sqrt(embed_dim / num_heads); in_proj_bias, bias_k/bias_v and add_zero_attn are "
        "not part of W^h",
        scale=lambda module: float(module.head_dim) ** -0.5,
    ),
    "AriaCrossAttention": ModuleRule(
        "Aria's projector: query = q_proj(layer_norm(learned queries)), key = k_proj("
        "layer_norm_kv(vision states)), then multihead_attn (an nn.MultiheadAttention) projects "
        "them again with its in_proj: W_Q = W_in_q W_q_proj, W_K = W_in_k W_k_proj on the "
        "inputs of q_proj/k_proj (its LayerNorms act before them, as a layer's input norm)",
        "q_proj",
        "k_proj",
        output_norms=("layer_norm", "layer_norm_kv"),
        inner="multihead_attn",
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
        "CTRL's forward(v, k, q) projects Wq(q), Wk(k); its one caller, EncoderLayer, passes "
        "the same normed x as v, k and q: self-attention with q/k projections Wq/Wk",
        "Wq",
        "Wk",
    ),
    "xlm.MultiHeadAttention": ModuleRule(
        "XLM divides q by sqrt(head_dim) in its forward (q / math.sqrt(self.head_dim))",
        scale=_inverse_sqrt_head,
    ),
    "flaubert.MultiHeadAttention": ModuleRule(
        "FlauBERT (XLM's attention) divides q by sqrt(head_dim) in its forward",
        scale=_inverse_sqrt_head,
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
        left_out=_clamped_linears,
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
        "DeepSeek-V4: q = q_b_norm(q_b_proj(q_a_norm(q_a_proj x))) per head (q_b_norm an RMS "
        "norm without gain), one key head k = v = kv_norm(kv_proj x) shared by every query "
        "head; W^h = s (W_qb^h diag(g_qa) W_qa)^T diag(g_kv) W_kv, the norms' per-token "
        "factors left out as for QK-norm",
        q="q_b_proj",
        k="kv_proj",
        q_latent=("q_a_proj", "q_a_norm", "q_b_norm", "kv_norm"),
        left_out=(
            "sinks: one learned logit per head on an extra slot that holds no value (gpt-oss), "
            "not a token's key",
        ),
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
    # issue 17: fixed per-dimension query scaling, a diagonal on W_Q like a QK-norm gain
    # (diag(softplus(v)) W_Q^h); each constant read off the installed forward
    **dict.fromkeys(
        ["TimesFmAttention", "TimesFm2_5Attention"],
        ModuleRule(
            "TimesFM multiplies query dimension i by softplus(scaling_i) * 1.442695041 / "
            "sqrt(head_dim) (after 2.5's q_norm: diagonals commute) and passes scaling=1.0 to "
            "the attention function",
            scale=lambda module: 1.442695041 / math.sqrt(module.head_dim),
            q_dim_scale="scaling",
        ),
    ),
    "VideoPrismMultiheadAttentionPoolingHead": ModuleRule(
        "VideoPrism's attention pooling: its queries are q_proj of a learned query, times "
        "1.442695041 / sqrt(head_dim) and softplus(per_dim_scale) per dimension; it passes "
        "scaling=1.0 to the attention function",
        scale=lambda module: 1.442695041 / math.sqrt(module.head_dim),
        q_dim_scale="per_dim_scale",
    ),
    "Gemma3nAudioAttention": ModuleRule(
        "Gemma 3n audio multiplies queries by q_scale * softplus(per_dim_scale), q_scale = "
        "head_dim^-0.5 / softplus(0) (a buffer, unset on the meta device); it attends in chunks "
        "with a local context, which is a mask",
        scale=lambda module: module.head_dim**-0.5 / math.log(2.0),
        q_dim_scale="per_dim_scale",
        left_out=(
            "relative_position_embedding: a relative position term (the query against pos_proj "
            "of sinusoids of the key's offset) added to q.k; it does not depend on the key",
            "the logit softcap c tanh(z / c) (conf_attention_logit_cap): a nonlinearity on the "
            "logits after q.k",
        ),
    ),
    "Gemma4AudioAttention": ModuleRule(
        "Gemma 4 audio wraps q/k in Gemma4ClippableLinear (.linear) and multiplies queries by "
        "q_scale * softplus(per_dim_scale) and keys by k_scale (both constants it stores); it "
        "attends in chunks with a local context, which is a mask",
        "q_proj.linear",
        "k_proj.linear",
        scale=lambda module: module.q_scale * module.k_scale,
        q_dim_scale="per_dim_scale",
        left_out=lambda module: (
            "relative_k_proj: a relative position term (the query against relative_k_proj of "
            "the key's offset embedding) added to q.k; it does not depend on the key",
            "the logit softcap c tanh(z / c) (attention_logit_cap): a nonlinearity on the "
            "logits after q.k",
            *_clamped_linears(module),
        ),
    ),
    # issue 17: Phi-4-multimodal's text decoder (its forward slices qkv_proj's outputs
    # [:H d], [H d : H d + Hkv d], the rest values)
    "Phi4MultimodalAttention": ModuleRule(
        "Phi-4-multimodal fuses qkv_proj as Phi-3 does: [Q (H d); K (Hkv d); V (Hkv d)]",
        "qkv_proj",
        "qkv_proj",
        Packing.STACKED_QKV,
    ),
    # issue 17.5: scales read off each class's forward, where the module stores none
    **dict.fromkeys(
        [
            "DonutSwinSelfAttention",
            "MaskFormerSwinSelfAttention",
            "GroundingDinoMultiheadAttention",
            "MMGroundingDinoMultiheadAttention",
        ],
        ModuleRule(
            "divides q.k by sqrt(attention_head_size) in forward and stores no scale (Swin's "
            "relative position bias and the window mask are added to the logits: position terms, "
            "not part of W^h)",
            scale=_inverse_sqrt_head,
        ),
    ),
    "LukeSelfAttention": ModuleRule(
        "LUKE divides q.k by sqrt(attention_head_size) in forward and stores no scale",
        scale=_inverse_sqrt_head,
        refuse=lambda module: (
            "with use_entity_aware_attention, word and entity tokens use different query "
            "projections per pair of token kinds (query, w2e_query, e2w_query, e2e_query): "
            "four W^h per head, like local/global projection pairs"
            if module.use_entity_aware_attention
            else None
        ),
    ),
    "FastSpeech2ConformerAttention": ModuleRule(
        "Conformer relative-position attention: ((q + pos_bias_u).k + (q + pos_bias_v).p) / "
        "sqrt(dim_key); pos_bias_u.k is a key bias and the second term a position term, so the "
        "content logit is q.k / sqrt(dim_key); no scale stored",
        scale=lambda module: float(module.dim_key) ** -0.5,
    ),
    **dict.fromkeys(
        ["Swinv2SelfAttention", "Swin2SRSelfAttention"],
        ModuleRule(
            "Swin v2 cosine attention: normalize(q) . normalize(k) * exp(min(logit_scale_h, "
            "log 100)). x / |x| is the RMS normalization (left out, as for QK-norm) times "
            "1/sqrt(d) on each side: scale 1/d, and the learned per-head temperature folded into "
            "W_Q^h; the continuous position bias (cpb_mlp) is a position term",
            scale=lambda module: 1.0 / module.attention_head_size,
            head_scale=("logit_scale", math.log(1.0 / 0.01)),
        ),
    ),
    **dict.fromkeys(
        ["GroundingDinoBiMultiHeadAttention", "MMGroundingDinoBiMultiHeadAttention"],
        ModuleRule(
            "Grounding DINO's image-text fusion: image queries vision_proj(v) * scale over text "
            "keys text_proj(t); the text-to-image direction softmaxes the transposed logits, "
            "whose W^h is the transpose (the same eigenvalues and statistics). Subtracting the "
            "logits' max does not change a softmax; the clamp at +-50000 acts only beyond that",
            "vision_proj",
            "text_proj",
            scale=lambda module: float(module.scale),
        ),
    ),
    **dict.fromkeys(
        [
            "GroundingDinoMultiscaleDeformableAttention",
            "MMGroundingDinoMultiscaleDeformableAttention",
        ],
        ModuleRule(
            "Deformable attention (Grounding DINO's image encoder and decoder cross attention)",
            unaudited="is deformable attention: its weights are a softmax of a linear map of the "
            "query alone (attention_weights) over sampled points, not of q.k between tokens; it "
            "has no W^h",
        ),
    ),
    # issue 17: softmax scales read off the forward of the last modules refused for it
    "ClapAudioSelfAttention": ModuleRule(
        "CLAP's audio tower (HTS-AT, Swin windows) divides q.k by sqrt(attention_head_size) in "
        "forward and stores no scale; the relative position bias and the shifted-window mask "
        "are added to the logits: position terms, not part of W^h",
        scale=_inverse_sqrt_head,
    ),
    "GLPNEfficientSelfAttention": _efficient_attention("sr_ratio", "sr"),
    "PvtEfficientSelfAttention": _efficient_attention(
        "sequences_reduction_ratio", "sequence_reduction"
    ),
    "PvtV2SelfAttention": _efficient_attention("spatial_reduction_ratio", "spatial_reduction"),
    "SegformerAttention": ModuleRule(
        "SegFormer's efficient attention (PVT's); its scaling is stored, but the sequence "
        "reduction holding the convolution is a child module of its own",
        unaudited=_spatial_reduction(
            "sequence_reduction_ratio", "sequence_reduction.sequence_reduction"
        ),
    ),
    "PerceiverSelfAttention": ModuleRule(
        "Perceiver divides q.k by sqrt(qk_channels / num_heads) in forward (heads of "
        "qk_channels_per_head, unstored as head_dim); layernorm1 normalizes the queries' input "
        "and layernorm2 a cross attention's keys' input before query and key, as a layer's "
        "input norm: W^h acts on their outputs",
        scale=lambda module: float(module.qk_channels_per_head) ** -0.5,
        head_dim=lambda module: module.qk_channels_per_head,
        output_norms=("layernorm1", "layernorm2"),
    ),
    "LocalSelfAttention": ModuleRule(
        "Reformer's local attention divides its keys by sqrt(attention_head_size) in forward "
        "(query and key are separate projections of the same tokens); chunking only limits "
        "which keys a query sees",
        scale=_inverse_sqrt_head,
    ),
    "LSHSelfAttention": ModuleRule(
        "Reformer's LSH attention",
        unaudited="makes its queries and keys with one shared projection (query_key), "
        "normalizes only the keys to unit length per token (one side of a QK-norm) and masks "
        "each token's own key: no fixed W^h over q.k",
    ),
    "qwen2_5_omni.DiTAttention": ModuleRule(
        "Qwen2.5-Omni's token2wav DiT passes no scaling to the attention function (SDPA's "
        "default 1/sqrt(head_dim); the model falls back to SDPA from eager and flash), with "
        "heads of inner_dim / heads; RoPE on the first head only is the identity at position 0",
        scale=lambda module: float(module.inner_dim // module.heads) ** -0.5,
        head_dim=lambda module: module.inner_dim // module.heads,
    ),
    "SuperGlueSelfAttention": ModuleRule(
        "SuperGlue divides q.k by sqrt(attention_head_size) in forward and stores no scale; its "
        "'cross' GNN layers run the same module with the other image's descriptors (the same "
        "width and space) as keys",
        scale=_inverse_sqrt_head,
    ),
    # --- packed or unusual q/k parts (issue 17) ---
    "HieraMaskUnitAttention": ModuleRule(
        "Hiera: qkv is one Linear reshaped (batch, tokens, windows, 3, H, d), d = "
        "hidden_size_output / H; (q * scale) . k. Mask-unit windows only choose the keys",
        "qkv",
        "qkv",
        Packing.STACKED_QKV,
        unaudited=lambda module: _pooled_queries(module.query_stride > 1, module.query_stride),
    ),
    "Sam2MultiScaleAttention": ModuleRule(
        "SAM 2's Hiera: qkv is one Linear reshaped (batch, tokens, 3, H, d), d = dim_out / H, "
        "unstored; scaled by module.scale",
        "qkv",
        "qkv",
        Packing.STACKED_QKV,
        head_dim=lambda module: module.qkv.weight.shape[0] // (3 * module.num_attention_heads),
        unaudited=lambda module: _pooled_queries(bool(module.query_stride), module.query_stride),
    ),
    **dict.fromkeys(
        ["Florence2VisionWindowAttention", "MgpstrAttention"],
        ModuleRule(
            "DaViT window attention / MGP-STR: qkv is one Linear reshaped (batch, tokens, 3, H, "
            "d), d = hidden / H, unstored; scaled by module.scale",
            "qkv",
            "qkv",
            Packing.STACKED_QKV,
            head_dim=lambda module: module.qkv.weight.shape[0] // (3 * _heads(module)),
        ),
    ),
    "Florence2VisionChannelAttention": ModuleRule(
        "DaViT channel attention: q, k, v of one qkv Linear, transposed so that channels attend "
        "to channels",
        unaudited="attends between channels (q.k summed over the tokens), not between tokens: "
        "it has no per-token W^h",
    ),
    "LlavaOnevision15VisionAttention": ModuleRule(
        "LLaVA-OneVision-1.5's vision qkv is one Linear reshaped (tokens, 3, H, d)",
        "qkv",
        "qkv",
        Packing.STACKED_QKV,
    ),
    "ErgoAttention": ModuleRule(
        "Ergo fuses qkv_proj split [Q (H d); K (Hkv d); V (Hkv d)]; on global layers q and k "
        "are each multiplied by the buffer qk_scale = sqrt(global_attention_scale) after the "
        "QK-norm, so the logits by global_attention_scale",
        "qkv_proj",
        "qkv_proj",
        Packing.STACKED_QKV,
        scale=lambda module: (
            module.scaling
            * (module.config.global_attention_scale if module.qk_scale is not None else 1.0)
        ),
    ),
    **dict.fromkeys(
        [
            "ChameleonVQVAEEncoderAttnBlock",
            "JanusVQVAEAttnBlock",
            "Apertus1p5VisionTokenizerAttnBlock",
            "WavTokenizerVocosAttention",
        ],
        ModuleRule(
            "VQGAN attention block: GroupNorm on the input (the tokens q, k and v all read), then "
            "1x1 convolutions q, k (linear maps of each position), one head of all channels, "
            "scaled by channels^-0.5",
            "q",
            "k",
            heads=lambda module: 1,
            head_dim=lambda module: module.q.weight.shape[0],
            scale=lambda module: module.q.weight.shape[0] ** -0.5,
            output_norms=("norm",),
        ),
    ),
    "LevitAttention": ModuleRule(
        "LeViT: queries_keys_values is a Linear then a BatchNorm1d (MLPLayerWithBN), its "
        "output viewed (H, 2 key_dim + attention_ratio key_dim) and split [q_h; k_h; v_h] per "
        "head; q.k * scale. The BatchNorm is folded in with its running statistics, as the "
        "model computes in inference (training normalizes by the batch's)",
        "queries_keys_values.linear",
        "queries_keys_values.linear",
        Packing.PER_HEAD_BLOCK,
        head_dim=lambda module: module.key_dim,
        batch_norm="queries_keys_values.batch_norm",
        left_out=(
            "attention_biases: a learned bias per head and relative offset of the two "
            "positions, added to the logits (a position term)",
        ),
    ),
    "LevitAttentionSubsample": ModuleRule(
        "LeViT's subsampling attention: queries from queries (Linear + BatchNorm1d) on every "
        "stride-th token, keys from keys_values (Linear + BatchNorm1d) viewed per head [k_h; "
        "v_h]; q.k * key_dim^-0.5. A square W^h over the input tokens (queries a subset of "
        "them); both BatchNorms folded in with their running statistics (inference)",
        "queries.linear",
        "keys_values.linear",
        Packing.SEPARATE_KV_BLOCK,
        head_dim=lambda module: module.key_dim,
        batch_norm="queries.batch_norm",
        k_batch_norm="keys_values.batch_norm",
        left_out=(
            "attention_biases: a learned bias per head and relative offset of the two "
            "positions, added to the logits (a position term)",
            "queries_subsample: the queries are every stride-th token's, the keys every "
            "token's; W^h is the same bilinear form over tokens",
        ),
    ),
    "EvollaSequenceCompressorAttention": ModuleRule(
        "Evolla's sequence compressor (a Perceiver resampler): queries to_q of the latents, "
        "keys the first half of to_kv's rows [K; V] over the protein states and the latents "
        "together; q * dim_head^-0.5. Its LayerNorms act on the inputs (as a layer's input "
        "norm): W^h acts on their outputs",
        "to_q",
        "to_kv",
        Packing.SEPARATE_KV,
        heads=lambda module: module.heads,
        head_dim=lambda module: module.to_q.out_features // module.heads,
        scale=lambda module: module.scale,
        output_norms=("norm_media", "norm_latents"),
        left_out=(
            "norm_media, norm_latents: LayerNorms of the protein states and the latents before "
            "to_q / to_kv, as a layer's input norm: W^h acts on their outputs",
        ),
    ),
    "SqueezeBertSelfAttention": ModuleRule(
        "SqueezeBERT: query and key are grouped Conv1d of kernel 1 (block-diagonal linear maps, "
        "groups q_groups / k_groups); scores divided by sqrt(attention_head_size), unstored",
        "query",
        "key",
        scale=_inverse_sqrt_head,
    ),
    # issue 17: relative-position attention (Transformer-XL style): the content logit's W^h,
    # with the position, segment and bias terms the forward adds left out, as SPEC says
    "XLNetRelativeAttention": ModuleRule(
        "XLNet: q and k are (d_model, n_head, d_head) parameters applied with einsum; the logits "
        "are ((q + r_w_bias).k + (q + r_r_bias).k_r + segment term) * scale, where r_w_bias.k "
        "is a key bias, and the relative-position (r, r_r_bias) and segment (seg_embed, "
        "r_s_bias) terms are position terms; the query stream (g) uses the same q and k; "
        "layer_norm acts on the output",
        "q",
        "k",
        Packing.HEAD_PARAMETERS,
        output_norms=("layer_norm",),
    ),
    "FunnelRelMultiheadAttention": ModuleRule(
        "Funnel: q_head(query) * scale . k_head(key), scale = d_head^-0.5 (module.scale), plus "
        "r_w_bias.k (a key bias), relative-position (r_kernel, r_r_bias) and token-type "
        "(seg_embed, r_s_bias) position terms; the first layer of each pooling block takes its "
        "queries from the block's input pooled with stride 2 (same width, the same W^h on "
        "those tokens); heads and d_head from its config; layer_norm acts on the output",
        "q_head",
        "k_head",
        heads=lambda module: module.config.n_head,
        head_dim=lambda module: module.config.d_head,
        output_norms=("layer_norm",),
    ),
    **dict.fromkeys(
        ["GraniteSpeechConformerAttention", "GraniteSpeechPlusConformerAttention"],
        ModuleRule(
            "Granite Speech conformer: to_q, and to_kv chunked [K; V]; sdpa with scale "
            "dim_head^-0.5 (module.scale) over blocks of context_size frames, Shaw's relative "
            "position term (q.rel_pos_emb) added as its mask; pre_norm is the LayerNorm of the "
            "module's input, before to_q and to_kv, as a layer's input norm: W^h acts on its "
            "outputs",
            "to_q",
            "to_kv",
            Packing.SEPARATE_KV,
            head_dim=lambda module: module.dim_head,
            output_norms=("pre_norm",),
        ),
    ),
    "KyutaiSpeechToTextAttention": ModuleRule(
        "Kyutai STT (Moshi's decoder) wraps q/k in KyutaiSpeechToTextLinear (.linear); flexible "
        "ones would hold one weight per codebook",
        "q_proj.linear",
        "k_proj.linear",
        refuse=lambda module: (
            "its flexible q/k projections use one weight per codebook position, so W^h "
            "differs by position"
            if module.q_proj.use_flexible_linear
            else None
        ),
    ),
    "MiniCPM5MoeAttention": ModuleRule(
        "MiniCPM 5 MoE: q_gate_proj viewed (H, 2 d_head) and chunked per head [q_h; gate_h] "
        "(the gate multiplies the attention output: not part of W^h); k_proj separate",
        "q_gate_proj",
        "k_proj",
        Packing.GATED_Q,
    ),
    **dict.fromkeys(
        ["SLANetAttentionGRUCell", "SLANeXtAttentionGRUCell"],
        ModuleRule(
            "SLANet / SLANeXt structure decoder",
            unaudited="is additive attention: its weights are a softmax of score(tanh("
            "input_to_hidden(x_j) + hidden_to_hidden(h))) over the tokens, not of q.k between "
            "tokens; it has no W^h",
        ),
    ),
    "AutoformerAttention": ModuleRule(
        "Autoformer's AutoCorrelation",
        unaudited="is auto-correlation: its weights are a softmax over the top-k time delays of "
        "the q-k cross-correlation (FFT), averaged over heads and channels, not of q.k between "
        "tokens; it has no W^h",
    ),
    "InformerProbSparseAttention": ModuleRule(
        "Informer's ProbSparse self-attention multiplies q_proj's output by its scaling and "
        "softmaxes q.k of the queries it keeps",
        left_out=(
            "ProbSparse (attention_type='prob'): only the top-u queries by a sparsity measure "
            "over randomly sampled keys attend, with softmax(x_i^T W^h x_j); the others output "
            "the mean of the values",
        ),
    ),
    "BeamAttention": ModuleRule(
        "Beam's full-attention layers (no RoPE parameters) run without RoPE and multiply the "
        "queries by the Scalable-Softmax factor (1 + (pos + 1) / 2048) ** 0.1, which it stores "
        "nowhere; W^h is that at position 0, as for every position-dependent factor",
        scale=_beam_scale,
    ),
}


#: pooling head class -> which models use its output (issue 17.4). In the installed
#: transformers every multimodal model with a SigLIP tower (Gemma 3, ShieldGemma 2, PaliGemma,
#: Cohere2-vision, LFM2-VL, DeepSeek-VL, modernvbert, T5Gemma 2) builds its image features from
#: the tower's last_hidden_state and overwrites pooler_output; SiglipForImageClassification
#: averages last_hidden_state; Phi-4-multimodal takes hidden_states[layer_idx].
POOLING_HEADS: dict[str, PoolingHead] = {
    **dict.fromkeys(
        ["SiglipMultiheadAttentionPoolingHead", "Siglip2MultiheadAttentionPoolingHead"],
        PoolingHead(
            "SigLIP / SigLIP 2: the learned probe queries the post-LayerNorm last hidden states; "
            "the head's output is the vision tower's pooler_output, which SiglipModel takes as "
            "its image embeddings",
            used_by=("SiglipModel", "Siglip2Model", "SiglipVisionModel", "Siglip2VisionModel"),
            discarded="builds its image features from the tower's hidden states, not its "
            "pooler_output",
        ),
    ),
    "Phi4MultimodalVisionMultiheadAttentionPoolingHead": PoolingHead(
        "Phi-4-multimodal's image tower: its pooler_output is the head's output",
        used_by=("Phi4MultimodalVisionModel",),
        discarded="takes the image tower's hidden_states[layer_idx], not its pooler_output",
    ),
}


def _pooled_queries(pooled: bool, stride: Any) -> str | None:
    """Why a layer that max-pools its projected queries (Hiera, SAM 2) is not audited."""
    if not pooled:
        return None
    return (
        f"max-pools its projected queries over windows of stride {stride}: a maximum of "
        "projections is not a bilinear form of the tokens, so the layer has no W^h"
    )


def _heads(module: Any) -> int:
    return getattr(module, "num_attention_heads", None) or module.num_heads


def module_rule(module: Any) -> ModuleRule | None:
    """The MODULE_RULES row of an attention module, if any."""
    cls = type(module)
    model = cls.__module__.rsplit(".", 1)[-1].removeprefix("modeling_")
    return MODULE_RULES.get(f"{model}.{cls.__name__}") or MODULE_RULES.get(cls.__name__)
