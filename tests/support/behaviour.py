"""A behavioural reference for any architecture: W^h from what the model itself computes.

Nothing here imports qkmonitor or reads an architecture table. For a model built by transformers
(float64), every attention module that hands queries and keys to transformers' attention
interface is found by running the model once through a recording attention function. Each
module is then called again on probe tokens: its hidden states (and, for cross attention, the
states its keys come from) are replaced by rows of [0, e_1, ..., e_n] (n = d_in), with every
position at position 0 (position_ids zero, rotary outputs of position 0), so RoPE is the
identity. The query and key the module passes to the attention function give

    W^h[i, j] = s * (q_h(e_i) - q_h(0)) . (k_g(e_j) - k_g(0)),   g = h // (H / Hkv)

with s the scaling it passes (None: SDPA's default 1/sqrt(d)), biases cancelled by the
differences. QK-norm (and MLA's latent norms) normalize each token by its RMS, which is
data-dependent and excluded by SPEC.md; every norm inside the module gets epsilon = E huge, so
that x / sqrt(mean(x^2) + E) = x / sqrt(E) to ~1e-20 relative: the norm becomes linear with its
own gain convention (w or 1 + w). The power of sqrt(E) on each path is measured by running
twice (E and 1e4 E) and divided out. A norm that removes the mean (LayerNorm) stays centering,
which is the model's behaviour; qkmonitor refuses such modules.

Modules named *Attention* that compute their logits themselves are probed through their first
softmax's input (or the logits of an SDPA they call): W^h from z(e_a, e_b) - z(e_a, 0) - z(0, e_b)
+ z(0, 0) at one pair of slots, in the layout of their captured call (windows, 2-D images, a
fixed token count), keys from their key states in cross attention; F.normalize (cosine
attention) is read as QK-norm, x / sqrt(d), its per-token RMS left out (``_bilinear_once``).

``shrink(model_type)`` makes a tiny config from transformers' default one, for the sweep and the
tests.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import itertools
import math
import re
import warnings
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

F64 = torch.float64
PROBE = "qk_probe"
_EPS = 1e20
_EPS_ATTRIBUTES = ("eps", "variance_epsilon", "epsilon")


@dataclass
class ProbedModule:
    """One attention module's per-query-head W^h, as the model computes it."""

    path: str
    matrices: list[Tensor]  # per query head, (d_in, d_in), float64
    kv_of_head: list[int] | None  # the key head each query head uses (None: from logits)
    direct: bool = False  # called on its own: no forward pass of its model reached it


# --- tiny configs ------------------------------------------------------------------------------

_SIZES = {
    "hidden_size": 64, "d_model": 64, "n_embd": 64, "embed_dim": 64, "dim": 64,
    "num_hidden_layers": 2, "num_layers": 2, "n_layer": 2, "n_layers": 2, "encoder_layers": 2,
    "decoder_layers": 2, "num_decoder_layers": 2, "depth": 2,
    "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "num_heads": 4,
    "encoder_attention_heads": 4, "decoder_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "d_kv": 16, "kv_channels": 16, "d_head": 16,
    "intermediate_size": 128, "ffn_dim": 128, "encoder_ffn_dim": 128, "decoder_ffn_dim": 128,
    "d_ff": 128, "n_inner": 128, "moe_intermediate_size": 32, "ffn_hidden_size": 128,
    "shared_expert_intermediate_size": 32, "num_experts": 2, "num_local_experts": 2,
    "n_routed_experts": 2, "num_experts_per_tok": 1, "max_position_embeddings": 128,
    "rotary_dim": 8, "q_lora_rank": 24, "kv_lora_rank": 16, "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 16, "v_head_dim": 16, "moe_num_experts": 2,
    "emb_dim": 64, "projection_dim": 32, "hidden_dim": 64, "embedding_size": 64,
    "mamba_d_state": 16, "state_size": 16, "global_head_dim": 32,
    "hidden_size_per_layer_input": 16, "vocab_size_per_layer_input": 512,
    "num_filters": 8, "base_channels": 32, "num_embeddings": 64, "decoder_hidden_size": 64,
    "encoder_hash_byte_group_vocab": 64, "patch_embeds_hidden_size": 16,
    "alignment_intermediate_size": 128, "moe_k": 1, "vision_output_dim": 64,
    "projector_input_dim": 64, "projector_output_dim": 64, "intermediate_size_mlp": 128,
    "expert_ffn_hidden_size": 32, "zero_expert_num": 2, "out_hidden_size": 64,
    "pred_hidden_size": 64, "pred_num_attention_heads": 4, "pred_num_hidden_layers": 2,
    "downsample_hidden_size": 32, "d_latents": 64, "num_latents": 16, "upsample_groups": 64,
    "linear_head_dim": 16, "swa_head_dim": 16, "d_inner": 128, "num_bpe_labels": 512,
    "num_wordpiece_labels": 512, "image_token_embed_dim": 64, "latent_channels": 32,
    "index_head_dim": 16, "index_n_heads": 4,
}  # fmt: skip
_VOCAB = re.compile(r"vocab")  # vocabulary sizes (src_vocab_size, input_vocab_size, ...)
_TOKEN = re.compile(r"_token_id$|_token_index$")  # ids that must lie in a shrunken vocabulary
#: scaling coefficients of EfficientNet-style configs (widths and repeats per block)
_COEFFICIENTS = {"width_coefficient": 0.25, "depth_coefficient": 0.25}
_LAYER_KEYS = (
    "num_hidden_layers", "num_layers", "n_layer", "n_layers", "encoder_layers", "decoder_layers",
)  # fmt: skip
#: sizes of the layers that the shrunken sizes of _SIZES feed: a key of another (sub-)config
#: that held the same default value is shrunk alike (vision out_hidden_size = text hidden_size)
_HIDDEN_KEYS = ("hidden_size", "d_model", "n_embd", "embed_dim", "dim", "emb_dim")
_LINKED = re.compile(r"hidden|_dim$|^dim|_size$|channels|width|d_model")
_NOT_LINKED = re.compile(
    r"image|patch|vocab|kernel|window|position|chunk|batch|num_|pool|stride|sampling|crop|grid"
    r"|bins|mel|length|token|layer|rank|head|state|expert|sample|rate|frame|segment"
)
#: per-stage lists of vision backbones (Swin, ConvNeXt, ResNet, PVT, ...)
_STAGE_SIZES = (
    "hidden_sizes", "embed_dims", "dims", "hidden_dims", "embed_dim", "embedding_dims",
    "embed_dim_per_stage",
)  # fmt: skip
_STAGE_HEADS = ("num_heads", "num_attention_heads", "heads", "num_attention_heads_per_stage")
_STAGE_DEPTHS = ("depths", "depth", "num_layers", "layers", "blocks_per_stage")


_MROPE_TEXT = ["qwen2_vl_text", "qwen2_5_vl_text", "glm4v_text", "glm_ocr_text", "glm_image_text"]

#: per model_type values the generic shrinking cannot infer (attention every 8th layer, ...),
#: or that transformers' own default config lacks (its default does not build)
_OVERRIDES = {
    "jamba": {"attn_layer_offset": 1, "attn_layer_period": 2, "expert_layer_offset": 1},
    # (reference helper) the default leaves top-k None; M-RoPE sections must sum to head_dim / 2
    "deepseek_v2": {"num_experts_per_tok": 1},
    **{
        name: {"rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3]}}
        for name in _MROPE_TEXT
    },
    "dbrx": {"attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 1e6}},
    "chameleon": {"vocabulary_map": {"<image>": 5}},
    "emu3": {"vocabulary_map": {"<image>": 5, "<|extra_200|>": 6}},
    "zamba": {"tie_word_embeddings": False},
    "bamba": {"attn_layer_indices": [1]},  # the default has no attention layer
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"]},
    "recurrent_gemma": {"block_types": ["recurrent", "attention"]},
    "dac": {"encoder_hidden_size": 8},  # channels double at each of 4 downsamplings
    "esm": {"vocab_size": 33, "pad_token_id": 1, "mask_token_id": 32},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
    "qwen3_omni_moe_talker_text": {"shared_expert_intermediate_size": 32},
    "dots1": {"n_routed_experts": 2, "num_experts_per_tok": 1, "n_shared_experts": 1},
    "diffusion_gemma_text": {"num_experts": 2, "top_k_experts": 1, "moe_intermediate_size": 32},
    # the default lacks key heads (8 from the class); its decoder views queries with
    # num_key_value_heads heads too, so only MHA runs: as many key heads as query heads
    "moonshine_streaming": {"num_key_value_heads": 4},
    "t5gemma2_text": {"dropout_rate": 0.0},
    "t5gemma2_decoder": {"dropout_rate": 0.0},
    "deepseek_ocr2_text": {"mlp_layer_types": ["dense", "sparse"]},
    "bit": {"hidden_sizes": [128, 256, 512, 1024]},  # bottlenecks of width / 4, 32 groups
    "reformer": {"axial_pos_embds_dim": [16, 48]},  # must sum to hidden_size
    "dots3_note_text": {"head_dim": 24},  # its sliding layers: qk_nope + qk_rope
    "deepseek_v32": {"n_group": 1, "topk_group": 1},  # expert groups of the 2 shrunk experts
    "dory": {"n_input_layers": 1, "n_recurrent_layers": 1, "n_output_layers": 1},
    "molmo2_adapter": {"vision_feature_layer": [-1, -2]},
    "fun_asr_nano": {"adaptor_config": {"intermediate_size": 16}},  # text hidden / 4
    "gemma4_assistant": {"hidden_size_per_layer_input": 0},
    "gemma4_unified_assistant": {"hidden_size_per_layer_input": 0},
    "cohere_compass_text": {
        "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e4}}
    },
    "time_series_transformer": {"prediction_length": 4},
    "autoformer": {"prediction_length": 4, "label_length": 2},  # label within the context
    "informer": {"prediction_length": 4},
    # sizes its config derives from hidden_size (2 hidden, / heads, expand hidden / heads)
    "zamba2": {"attention_hidden_size": 128, "attention_head_dim": 32, "mamba_headdim": 16},
    # Phi-4-multimodal's audio conformer: its layers are num_blocks, its convolutions' widths
    # (default 1024, its hidden size) are *_channel, which the generic shrinking misses
    # its rotary code reads mrope_section unconditionally (4 axes in HunYuan's checkpoints)
    "hunyuan_vl_text": {"rope_parameters": {"mrope_section": [2, 2, 2, 2]}},
    # its rotary width is at least 32 (max(projection_dim / 2 heads, 32)): heads of width 32
    "clvp_encoder": {"num_attention_heads": 2},
    "step3p5": {"sliding_window": 64},  # its mask builder needs one; the default has none
    # its context is the hidden states of len(target_layer_ids) layers of the main model
    "muse_glimmer_assistant": {"target_layer_ids": [1]},
    # its spatial embeddings (4 coordinates, 2 shapes) fill the hidden size: 4 x 10 + 2 x 12
    "layoutlmv3": {"coordinate_size": 10, "shape_size": 12},
    # its pixel-shuffle MLP takes hidden / pixel_shuffle_ratio^2 = intermediate_size inputs
    "llama4_vision_model": {"intermediate_size": 256},
    # the last num_blocks of its layers take the queries: at most the layers kept
    "eomt": {"num_blocks": 1},
    "eomt_dinov3": {"num_blocks": 1},
    # SAM's random Fourier position features (2 num_pos_feats wide) are added to the mask
    # decoder's image embeddings (its hidden size): half the shrunken hidden size
    "sam_vision_model": {"num_pos_feats": 32},
    "sam_hq_vision_model": {"num_pos_feats": 32},
    # its transformer module projects conv_dim maps to hidden_dim by convolutions it keeps in a
    # plain list (unregistered: float32 in the float64 model), made only where the two differ,
    # which they do not by default
    "oneformer": {"conv_dim": 64, "mask_dim": 64},
    # two-stage detectors: their queries are the top num_queries image tokens (900 by default),
    # at most the tokens of a small image
    "grounding-dino": {"num_queries": 64},
    "mm-grounding-dino": {"num_queries": 64},
    # its heads are attention_heads, its global layers num_global_layers (generic shrinking
    # misses both); 448 / 14 = 32 x 32 patches per tile (1025 tokens, 4 tiles): 4 x 4 patches;
    # its output: the last and the intermediate layers' states, each hidden_size wide
    "mllama_vision_model": {
        "attention_heads": 4,
        "num_global_layers": 1,
        "image_size": 56,
        "intermediate_layers_indices": [1],
        "vision_output_dim": 128,
    },
    # its layer counts are num_spatial/temporal/auxiliary_layers; 16 frames of 16 x 16 patches
    # (4096 tokens): 4 frames of 4 x 4 patches
    "videoprism_vision_model": {
        "num_spatial_layers": 2,
        "num_temporal_layers": 2,
        "num_auxiliary_layers": 1,
        "num_frames": 4,
        "image_size": 72,
    },
    # blocks of context_size frames attended alone (default 200, padded from any shorter
    # input, which makes each probe pass cost 200^2 logits per block): blocks of 16 frames,
    # so that 72 tokens span several blocks and a padded last one
    "granite_speech_encoder": {"context_size": 16},
    "granite_speech_plus_encoder": {"context_size": 16},
    "phi4_multimodal_audio": {
        "num_blocks": 2,
        "ext_pw_out_channel": 64,
        "depthwise_separable_out_channel": 64,
    },
}


def _kept_layers(values: dict, layers: int) -> list[int]:
    """Which of the default layers to keep: the first two, plus the first of every other kind
    of layer (layer_types of hybrid models), so a shrunken hybrid keeps its attention."""
    keep = [0, 1]
    for value in values.values():
        if isinstance(value, list) and len(value) == layers:
            kinds = [repr(v) for v in value]
            keep += [kinds.index(kind) for kind in dict.fromkeys(kinds)]
    return sorted(set(keep))[:4]


def _is_config(value) -> bool:
    return isinstance(value, dict) and ("model_type" in value or "hidden_size" in value)


def _per_layer(value, layers: int, keep: list[int]):
    """A dict keyed by layer index ('05': {...}), re-keyed to the kept layers; else None."""
    if not isinstance(value, dict) or not value:
        return None
    if not all(
        str(k).isdigit() and int(k) < layers and isinstance(v, dict) for k, v in value.items()
    ):
        return None
    width = len(str(next(iter(value))))
    out = {}
    for k, v in value.items():
        if int(k) in keep:
            new = keep.index(int(k))
            key = str(new).zfill(width) if isinstance(k, str) else new
            out[key] = _shrink_dict(v) if isinstance(v, dict) else v
    return out


def _divisor(heads: int, size: int) -> int:
    return next(d for d in (4, 2, 1) if d <= max(heads, 1) and size % d == 0)


def _stages(values: dict, out: dict, linked: dict) -> None:
    """Per-stage lists of a vision backbone: widths scaled down by one power of two (keeping
    their ratios), one block per stage, heads that divide the widths. linked gets the widths,
    as ("stage", width), for lists of them elsewhere (SAM 2's backbone_channel_list)."""
    sizes = next((k for k in _STAGE_SIZES if _int_list(values.get(k))), None)
    depths = next((k for k in _STAGE_DEPTHS if _int_list(values.get(k))), None)
    if sizes is None and depths is None:
        return
    widths = values.get(sizes) if sizes else None
    if widths:
        factor = 1
        while max(widths) // factor > 256:
            factor *= 2
        out[sizes] = [max(8, w // factor) for w in widths]
        linked.update({("stage", w): new for w, new in zip(widths, out[sizes], strict=True)})
        for key in _HIDDEN_KEYS:  # Hiera: the patch embedding's width is the first stage's
            if key != sizes and values.get(key) == widths[0]:
                out[key] = linked[widths[0]] = out[sizes][0]
        widths = out[sizes]
    if depths:
        out[depths] = [min(d, 1) for d in values[depths]]
        if isinstance(values.get("embed_dim"), int) and any(
            _int_list(values.get(k)) for k in _STAGE_HEADS
        ):
            out["embed_dim"] = 16  # Swin: widths embed_dim * 2^stage
    for key in _STAGE_HEADS:
        heads = values.get(key)
        if _int_list(heads):
            base = out.get("embed_dim") if isinstance(out.get("embed_dim"), int) else None
            stage = widths or [base * 2**i for i in range(len(heads))] if (widths or base) else None
            if stage and len(stage) == len(heads):
                out[key] = [_divisor(h, w) for h, w in zip(heads, stage, strict=True)]
            else:
                out[key] = [min(h, 2) for h in heads]


def _int_list(value) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    )


def _mamba(values: dict, out: dict) -> None:
    """Mamba-2 mixers: heads x head_dim must equal expand x hidden, groups divide heads."""
    for heads, dim, expand, groups in (
        ("mamba_n_heads", "mamba_d_head", "mamba_expand", "mamba_n_groups"),
        ("num_heads", "head_dim", "expand", "n_groups"),
    ):
        if isinstance(values.get(expand), int) and heads in values and dim in values:
            if heads == "num_heads" and "state_size" not in values:
                continue
            hidden = out.get("hidden_size") or 64
            out[dim] = 16
            out[heads] = values[expand] * hidden // 16
            if isinstance(values.get(groups), int):
                out[groups] = _divisor(values[groups], out[heads])
            if isinstance(values.get("mamba_d_ssm"), int):  # Falcon-H1: heads x head_dim
                out["mamba_d_ssm"] = out[heads] * out[dim]
            if "mamba_chunk_size" in values:
                out["mamba_chunk_size"] = 16
            if "chunk_size" in values and heads == "num_heads":
                out["chunk_size"] = 16


def _derived(model_type: str, values: dict) -> list[str]:
    """Sizes the config class computes when left None (Zamba's attention_hidden_size = 2
    hidden): left None, they are derived again from the shrunken sizes."""
    import dataclasses

    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        return []
    cls = CONFIG_MAPPING[model_type]
    if not dataclasses.is_dataclass(cls):
        return []
    return [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is None
        and isinstance(values.get(f.name), int)
        and not isinstance(values[f.name], bool)
        and f.name not in _SIZES
        and re.search(r"size|dim|rank", f.name)
        and not re.search(r"patch|image|kernel|window|stride|pool|frame|sample", f.name)
        and not _VOCAB.search(f.name)
        and not _TOKEN.search(f.name)
    ]


def _half_rope(values: dict) -> int | None:
    """Half the rotary width of a config: qk_rope_head_dim, head_dim, or hidden / heads, times
    the partial_rotary_factor (top-level or in rope_parameters)."""
    width = values.get("qk_rope_head_dim") or values.get("head_dim")
    heads, hidden = values.get("num_attention_heads"), values.get("hidden_size")
    if not isinstance(width, int) and isinstance(heads, int) and isinstance(hidden, int):
        width = hidden // heads
    if not isinstance(width, int):
        return None
    rope = values.get("rope_parameters")
    factor = values.get("partial_rotary_factor") or (
        rope.get("partial_rotary_factor") if isinstance(rope, dict) else None
    )
    if isinstance(factor, float) and "qk_rope_head_dim" not in values:
        width = int(width * factor)
    return width // 2


def _mla_partial(values: dict, out: dict) -> None:
    """Mistral 4's rope_parameters partial_rotary_factor, the rope part of an MLA query head
    (qk_rope / (qk_nope + qk_rope)): recomputed from the shrunken parts."""
    rope, nope, params = (
        values.get(k) for k in ("qk_rope_head_dim", "qk_nope_head_dim", "rope_parameters")
    )
    if not (isinstance(rope, int) and isinstance(nope, int) and isinstance(params, dict)):
        return
    if params.get("partial_rotary_factor") == rope / (nope + rope):
        new = out["qk_rope_head_dim"] / (out["qk_nope_head_dim"] + out["qk_rope_head_dim"])
        out["rope_parameters"] = {**out["rope_parameters"], "partial_rotary_factor": new}


def _code_sections(model_type: str) -> list[int] | None:
    """The M-RoPE sections the model's code falls back to when its config names none
    (GLM-4.5V: rope_parameters.get("mrope_section", [8, 12, 12])), where it splits the
    rotary width by them (which must then sum to half of it)."""
    import importlib

    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        return None
    name = CONFIG_MAPPING[model_type].__module__.replace(".configuration_", ".modeling_")
    try:
        source = inspect.getsource(importlib.import_module(name))
    except (ImportError, OSError, TypeError):
        return None
    if "split(self.mrope_section" not in source:  # interleaved M-RoPE takes any width
        return None
    found = re.search(r"get\(\s*\"mrope_section\"\s*,\s*\[([\d,\s]+)\]\s*\)", source)
    return [int(v) for v in found.group(1).split(",") if v.strip()] if found else None


def _rope_sections(values: dict, out: dict, model_type: str = "") -> None:
    """Multimodal RoPE sections (time, height, width) that fill half the rotary width,
    rescaled to the shrunken width; where the config names none, those the model's code falls
    back to (made explicit, rescaled)."""
    old, new = _half_rope(values), _half_rope(out)
    for key in ("rope_parameters", "rope_scaling"):
        rope = out.get(key)
        sections = rope.get("mrope_section") if isinstance(rope, dict) else None
        full = old  # what named sections fill: half the default's rotary width
        if isinstance(rope, dict) and "mrope_section" not in rope and key == "rope_parameters":
            sections = _code_sections(model_type)
            full = sum(sections) if sections else None  # the code's, for its checkpoints' width
        if not (_int_list(sections) and full and new and sum(sections) == full and new < full):
            continue
        scaled = [s * new // full for s in sections]
        for i in range(new - sum(scaled)):
            scaled[i % len(scaled)] += 1
        out[key] = {**rope, "mrope_section": scaled}


def _shared_kv(values: dict, out: dict) -> None:
    """KV-sharing layers (Gemma 3n): as many trailing layers as can share, while the layers
    before them still hold one layer of each kind."""
    kinds = out.get("layer_types")
    if not isinstance(values.get("num_kv_shared_layers"), int) or not isinstance(kinds, list):
        return
    first = max(kinds.index(kind) for kind in kinds)
    out["num_kv_shared_layers"] = min(values["num_kv_shared_layers"], len(kinds) - first - 1)


def _key_heads(values: dict, out: dict) -> None:
    """Other counts of key heads (Sapiens2's num_key_value_heads_per_layer, one per kept layer,
    and num_key_value_attention_heads), shrunk as num_key_value_heads: a count equal to the
    query heads (full attention) to the shrunken query heads, any other (grouped) to at most 2."""
    heads, new = values.get("num_attention_heads"), out.get("num_attention_heads")
    if not isinstance(heads, int) or not isinstance(new, int):
        return

    def shrunk(count: int) -> int:
        return new if count == heads else min(count, 2)

    for key in values:
        # of the query heads num_attention_heads counts (cross_/swa_ prefixes have their own)
        if key == "num_key_value_heads" or not re.match(r"num_key_value_\w*heads", key):
            continue
        value = out.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            out[key] = shrunk(value)
        elif _int_list(value):
            out[key] = [shrunk(v) for v in value]


def _shrink_dict(values: dict, model_type: str = "", linked: dict | None = None) -> dict:
    """values shrunk; linked collects (default -> shrunken) hidden sizes for _link."""
    linked = {} if linked is None else linked
    out = dict(values)
    layers = next((values[k] for k in _LAYER_KEYS if isinstance(values.get(k), int)), None)
    keep = _kept_layers(values, layers) if layers and layers > 2 else None
    for key, value in values.items():
        if _is_config(value):
            out[key] = _shrink_dict(value, value.get("model_type", ""), linked)
        elif key in _LAYER_KEYS and keep and value == layers:
            out[key] = len(keep)
        elif key in _SIZES and isinstance(value, int) and not isinstance(value, bool):
            out[key] = min(value, _SIZES[key])
            if key in _HIDDEN_KEYS and value > out[key]:
                linked.setdefault(value, out[key])
            if key == "num_key_value_heads":  # keep MHA as MHA (MLA needs it), GQA as GQA
                mha = value == values.get("num_attention_heads")
                out[key] = min(values.get("num_attention_heads") or 4, 4) if mha else min(value, 2)
        elif isinstance(value, list) and keep and len(value) == layers:
            out[key] = [value[i] for i in keep]
        elif keep and (per_layer := _per_layer(value, layers, keep)) is not None:
            out[key] = per_layer
    for key, value in values.items():  # one layer the model treats apart (MiniCPM's merger
        # after insert_layer_id): a layer not kept becomes the last kept one, so it still runs
        named = key.endswith("_layer_id") and keep and isinstance(value, int)
        if named and value not in keep and 0 <= value < layers:
            out[key] = len(keep) - 1
        for sub, shrunk in values.items():  # the same field of a sub-config (MiniCPM-V's own
            # insert_layer_id, which it hands its vision config): its shrunken value
            if key.endswith("_layer_id") and _is_config(shrunk) and shrunk.get(key) == value:
                out[key] = out[sub].get(key, value)
    for key in values:  # per-layer sizes (Gemma 3n's intermediate_size)
        if key in _SIZES and _int_list(out.get(key)) and key not in _LAYER_KEYS:
            out[key] = [min(v, _SIZES[key]) for v in out[key]]
    _stages(values, out, linked)
    _mamba(values, out)
    _shared_kv(values, out)
    _key_heads(values, out)
    for key, value in _COEFFICIENTS.items():
        if isinstance(values.get(key), float):
            out[key] = min(values[key], value)
    for key, value in values.items():
        if _VOCAB.search(key) and isinstance(value, int) and value > 512 and key not in _SIZES:
            out[key] = 512
    for key in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
        if isinstance(out.get(key), int) and out[key] >= 500:
            out[key] = 1
    spare = iter(range(511, 400, -1))  # other special tokens: distinct ids above the inputs'
    for key in values:
        if _TOKEN.search(key) and isinstance(out.get(key), int) and out[key] >= 512:
            out[key] = next(spare)
    if "qk_rope_head_dim" in values and "head_dim" in values:  # MLA: head_dim is the rope part
        out["head_dim"] = out["qk_rope_head_dim"]
    _mla_partial(values, out)
    heads = out.get("num_attention_heads")
    if "num_key_value_heads" in out and out["num_key_value_heads"] is None:
        out["num_key_value_heads"] = heads  # None: one key head per query head (Nemotron)
    if "head_dim" in out and out["head_dim"] is None and isinstance(heads, int):
        out["head_dim"] = (out.get("hidden_size") or 64) // heads  # None: hidden / heads
    _rope_sections(values, out, model_type)
    # backbones: recomputed, except over per-stage lists, whose stages all stay (the pixel
    # decoders of Mask2Former and OneFormer take the feature maps of several stages)
    if not any(_int_list(values.get(k)) for k in _STAGE_DEPTHS):
        for key in ("out_features", "out_indices", "stage_names"):
            out.pop(key, None)
    for key in _derived(model_type, values):
        out[key] = None
    for key in _computed(model_type, values, out):
        out.pop(key, None)
    _experts(values, out)
    for key, value in _OVERRIDES.get(model_type, {}).items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = {**out[key], **value} if both else value
    return out


def _computed(model_type: str, values: dict, out: dict) -> list[str]:
    """Attributes, not fields, that the config's own __post_init__ computes from fields the
    shrinking changed (BROS's dim_bbox_projection = hidden / heads, Zamba2's hybrid_layer_ids,
    MLA's qk_head_dim) but that still hold the default's value: left out of the shrunken
    values, they are computed again from them."""
    import dataclasses

    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        return []
    cls = CONFIG_MAPPING[model_type]
    method = getattr(cls, "__post_init__", None)
    if not dataclasses.is_dataclass(cls) or getattr(method, "__module__", "") != cls.__module__:
        return []
    try:
        source = inspect.getsource(method)
    except (OSError, TypeError):
        return []
    fields = {f.name for f in dataclasses.fields(cls)}
    changed = {k for k in values if k in out and out[k] != values[k]}
    keys = []
    # assignments in the method's body itself (8 spaces), not under an if
    for key, expression in re.findall(r"^ {8}self\.(\w+)\s*=\s*(.+)$", source, re.MULTILINE):
        read = set(re.findall(r"self\.(\w+)", expression))
        if key in values and key not in fields and out.get(key) == values[key] and read & changed:
            keys.append(key)
            changed.add(key)  # and what is computed from it in turn
    return keys


_TOP_K = re.compile(r"^(num_experts_per_tok|num_experts_per_token|moe_topk|top_k_experts|moe_k)$")
_EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
_EXPERT_GROUPS = ("n_group", "num_expert_group")


def _experts(values: dict, out: dict) -> None:
    """Routers over the shrunken experts: top-k at most their count (1 where the default
    leaves it None, which the router cannot take), and one group of experts (groups must divide
    the experts; top-k groups at most the groups)."""
    counts = [out[k] for k in _EXPERT_COUNTS if isinstance(out.get(k), int) and out[k] > 0]
    if not counts:
        return
    for key in values:
        if _TOP_K.match(key) and out.get(key) is None:
            out[key] = 1
        elif _TOP_K.match(key) and isinstance(out[key], int) and not isinstance(out[key], bool):
            out[key] = max(1, min(out[key], min(counts)))
    for key in _EXPERT_GROUPS:
        if isinstance(out.get(key), int) and out[key] > 1:
            out[key] = 1
            if isinstance(out.get("topk_group"), int):
                out["topk_group"] = 1


def _link(values: dict, linked: dict) -> dict:
    """Sizes elsewhere in the tree that equal a shrunken hidden size's default, shrunk alike."""
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out[key] = _link(value, linked)
        elif (
            _int_list(value)
            and all(("stage", v) in linked for v in value)
            and key not in _SIZES
            and re.search("channel", key)
        ):
            out[key] = [linked["stage", v] for v in value]
        elif (
            isinstance(value, int)
            and not isinstance(value, bool)
            and value in linked
            and key not in _SIZES
            and _LINKED.search(key)
            and not _NOT_LINKED.search(key)
        ):
            out[key] = linked[value]
        else:
            out[key] = value
    return out


def shrunken_dict(model_type: str) -> dict:
    """The shrunken values of model_type's default config."""
    from transformers import CONFIG_MAPPING

    linked: dict = {}
    values = _shrink_dict(CONFIG_MAPPING[model_type]().to_dict(), model_type, linked)
    return _link(values, linked)


def shrink(model_type: str):
    """A tiny config of model_type (hidden <= 64, 2 layers, 4 heads), or None if transformers
    rejects the shrunken values."""
    from transformers import CONFIG_MAPPING

    with _quiet():
        try:
            return CONFIG_MAPPING[model_type].from_dict(shrunken_dict(model_type))
        except Exception:
            return None


def model_class(config):
    """The model class transformers maps a config to: AutoModel's, else the first other auto
    mapping's (TrOCR: ForCausalLM), else, for a sub-config (a text or vision tower), the model
    class of the config's own modeling module. A mapped class that takes another config
    (composite MusicGen's AutoModel is its decoder) is passed over."""
    import importlib

    import transformers.models.auto.modeling_auto as auto
    from transformers import PreTrainedModel

    mappings = [auto.MODEL_MAPPING, auto.MODEL_FOR_CAUSAL_LM_MAPPING] + [
        getattr(auto, name)
        for name in sorted(dir(auto))
        if name.startswith("MODEL_FOR_") and name.endswith("_MAPPING")
    ]
    first = None  # AutoModel's class, where its config_class is another (Sarvam: DeepSeek's)
    for mapping in mappings:
        try:
            mapped = mapping.get(type(config), None)
        except ValueError:  # a mapped class the installed transformers lacks
            continue
        mapped = mapped[0] if isinstance(mapped, (list, tuple)) else mapped
        if mapped is not None and isinstance(config, getattr(mapped, "config_class", None) or ()):
            return mapped
        first = first or mapped
    name = type(config).__module__.replace(".configuration_", ".modeling_")
    try:
        module = vars(importlib.import_module(name))
    except ImportError:
        module = {}
    own = [
        obj
        for obj in module.values()
        if isinstance(obj, type)
        and issubclass(obj, PreTrainedModel)
        and getattr(obj, "config_class", None) is type(config)
        and not obj.__name__.endswith("PreTrainedModel")  # the abstract base
    ]
    if not own and first is not None:
        return first
    if not own:
        raise ValueError(f"transformers maps no model class to {type(config).__name__}")
    return min(own, key=lambda c: ("For" in c.__name__, "With" in c.__name__, len(c.__name__)))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)


def build(config, seed: int = 0, std: float = 0.2) -> nn.Module:
    """The base model of a config in float64, every trainable float parameter redrawn (norm
    gains ~ 1); frozen ones (RoFormer's sinusoidal table, from which it rotates q and k) keep
    the values the model computes for them."""
    with _quiet():
        model = model_class(config)._from_config(
            copy.deepcopy(config), attn_implementation="eager", experts_implementation="eager"
        )
    # complex buffers (Llama 4 vision's rotary freqs_ci) would lose their imaginary part
    complex_buffers = [
        (model.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2], buffer)
        for name, buffer in model.named_buffers()
        if buffer.is_complex()
    ]
    model = model.to(F64).eval()
    for owner, name, buffer in complex_buffers:
        setattr(owner, name, buffer.to(torch.complex128))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.is_floating_point() and parameter.requires_grad:
                noise = torch.randn(parameter.shape, generator=generator, dtype=F64) * std
                gain = parameter.ndim == 1 and "norm" in name.lower() and name.endswith("weight")
                parameter.copy_(noise + (1.0 if gain else 0.0))
        for sub in model.modules():  # running statistics too (LeViT folds them into q and k)
            if isinstance(sub, nn.modules.batchnorm._BatchNorm) and sub.running_var is not None:
                sub.running_mean.copy_(torch.randn(sub.running_mean.shape, generator=generator))
                sub.running_var.copy_(0.5 + torch.rand(sub.running_var.shape, generator=generator))
    return model


# --- recording attention function ----------------------------------------------------------------


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[nn.Module, Tensor, Tensor, float | None]] = []
        self.active = True

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        import sys

        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        if self.active:
            self.calls.append((module, query.detach(), key.detach(), kwargs.get("scaling")))
        # the model's own (softcapping, sinks, ...): the one the module's forward names as its
        # default, where a file has two (Phi-4-multimodal's towers: simple_eager_...)
        own = sys.modules[type(module).__module__]
        forward = inspect.unwrap(type(module).forward)  # under its decorators (Llama 4 vision)
        named = getattr(getattr(forward, "__code__", None), "co_names", ())
        default = next((n for n in named if n.endswith("eager_attention_forward")), "")
        eager = getattr(own, default, None) or getattr(own, "eager_attention_forward", None)
        # a module that passes no scaling to an eager function requiring one (Qwen2.5-Omni's
        # DiT looks up ALL_ATTENTION_FUNCTIONS, which never holds eager) runs SDPA's default
        if eager is not None and "scaling" not in kwargs:
            wants = inspect.signature(eager).parameters.get("scaling")
            eager = None if wants is not None and wants.default is wants.empty else eager
        if eager is not None:
            return eager(module, query, key, value, attention_mask, **kwargs)
        kwargs.pop("s_aux", None)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


@contextlib.contextmanager
def recording(model: nn.Module) -> Iterator[_Recorder]:
    """Route the model's attention through a recorder (the model's eager attention, else SDPA,
    underneath)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    recorder = _Recorder()
    AttentionInterface.register(PROBE, recorder)
    # the masks of the model's own eager attention, which the recorder calls: sdpa's may be
    # None (a causal mask left to is_causal), which an eager function may not take (ModernBERT
    # decoder's)
    AttentionMaskInterface.register(PROBE, eager_mask)
    configs = [
        m.config
        for m in model.modules()
        if hasattr(m, "config") and hasattr(m.config, "_attn_implementation")
    ]
    saved = [c._attn_implementation for c in configs]
    for config in configs:
        config._attn_implementation = PROBE
    try:
        yield recorder
    finally:
        for config, value in zip(configs, saved, strict=True):
            config._attn_implementation = value


# --- inputs -----------------------------------------------------------------------------------


def _int(config, *names: str, default=None):
    """The first of config's attributes that is an int (the first of a list or pair)."""
    for name in names:
        value = getattr(config, name, None)
        value = value[0] if isinstance(value, (list, tuple)) and value else value
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return default


def _inputs(model: nn.Module, tokens: int) -> list[dict]:
    """Candidate dummy inputs for a model's (or a tower's) forward, from its signature and
    config, to be tried in order; [] if none applies. Inputs only reach the attention modules:
    what they hold does not enter the check, which probes each module on its own."""
    config = model.config
    params = inspect.signature(model.forward).parameters
    generator = torch.Generator().manual_seed(1)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator, dtype=F64)

    vocab = getattr(config, "vocab_size", None)
    hidden = _int(config, "hidden_size", "d_model", "embed_dim", "n_embd", "dim")
    channels = _int(config, "num_channels", "in_channels", "in_chans", default=3)
    patch = _int(config, "patch_size", default=16)
    # a composite model without an image size of its own takes its vision config's (SAM's
    # image encoder: 1024, which its prompt encoder's grid assumes)
    size = _int(config, "image_size") or _int(getattr(config, "vision_config", None), "image_size")
    out: dict = {}
    candidates: list[dict] = []
    if "input_ids" in params and vocab is None and "inputs_embeds" in params:
        vocab = 50  # character models (CANINE: ids are code points)
    if "input_ids" in params and vocab is None and params["input_ids"].default is inspect._empty:
        # a text input the model requires (Grounding DINO's prompt), in its text tower's vocabulary
        vocab = _int(getattr(config, "text_config", None), "vocab_size", default=50)
    positions = _int(config, "max_position_embeddings")
    if "input_ids" in params and isinstance(positions, int) and 8 < positions < tokens + 2:
        tokens = positions - 2  # learned positions (SigLIP's text tower: 64)
    if "input_ids" in params and isinstance(vocab, int):
        out["input_ids"] = torch.randint(
            3, max(4, min(vocab, 50)), (1, tokens), generator=generator
        )
        if "position_ids" in params:
            out["position_ids"] = torch.zeros(1, tokens, dtype=torch.long)
        if "attention_mask" in params:
            out["attention_mask"] = torch.ones(1, tokens, dtype=torch.long)
        if "decoder_input_ids" in params and getattr(config, "is_encoder_decoder", False):
            out["decoder_input_ids"] = out["input_ids"][:, : tokens - 1]
        if "bbox" in params:  # layout models: one box (x0, y0, x1, y1) per token
            out["bbox"] = torch.tensor([[[10, 20, 110, 220]] * tokens])
        if "query_embeds" in params and isinstance(hidden, int):  # a Q-Former's learned queries
            out["query_embeds"] = randn(1, tokens, hidden)
        candidates = [out]
        if "protein_input_ids" in params:  # Evolla: a protein for its encoder and compressor
            protein = getattr(config, "protein_encoder_config", None)
            letters = _int(protein, "vocab_size", default=vocab) if protein else vocab
            out["protein_input_ids"] = torch.randint(
                3, max(4, min(letters, 20)), (1, tokens), generator=generator
            )
            out["protein_attention_mask"] = torch.ones(1, tokens, dtype=torch.long)
        if "lang_ids" in params:  # X-MOD: a language adapter per sequence
            out["lang_ids"] = torch.zeros(1, dtype=torch.long)
        if "visual_feats" in params:  # LXMERT: region features and boxes
            boxes = _int(config, "visual_feat_dim", default=hidden)
            out["visual_feats"] = randn(1, tokens, boxes)
            out["visual_pos"] = randn(1, tokens, _int(config, "visual_pos_dim", default=4))
        vision = getattr(config, "vision_config", None) or config
        side = _int(vision, "image_size", default=8 * patch)
        if "pixel_values" in params and getattr(config, "image_token_id", None) is None:  # ViLT
            image = randn(1, channels, side, side)
            candidates.append({**out, "pixel_values": image})
            if "image_attention_mask" in params:  # IDEFICS: images per sequence, each token's
                mask = torch.ones(1, tokens, 1, dtype=torch.long)
                candidates.append({**out, "pixel_values": image[:, None]})
                candidates[-1]["image_attention_mask"] = mask
        if "encoder_hidden_states" in params and isinstance(hidden, int):  # a decoder alone
            width = _int(config, "encoder_hidden_size", "cross_attention_hidden_size")
            states = randn(1, tokens, width or hidden)  # first: with them (GPT-2 rejects them)
            candidates.insert(0, {**out, "encoder_hidden_states": states})
    elif "query_embeds" in params and isinstance(hidden, int):  # a Q-Former alone
        width = _int(config, "encoder_hidden_size", default=hidden)
        out = {"query_embeds": randn(1, tokens, hidden)}
        if "encoder_hidden_states" in params:
            out["encoder_hidden_states"] = randn(1, tokens, width)
        candidates = [out]
    elif "grid_thw" in params and ("hidden_states" in params or "pixel_values" in params):
        candidates = _grid_patches(config, params, tokens, randn)  # flattened patches (Qwen2-VL)
    elif "pixel_values" in params and "pixel_position_ids" in params:  # Gemma 4: patches, (x, y)
        side = 2 * _int(config, "pooling_kernel_size", default=1)  # whole pooling windows
        grid = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="xy"))
        out["pixel_values"] = randn(1, side * side, channels * patch * patch)
        out["pixel_position_ids"] = grid.reshape(2, -1).T[None]
        candidates = [out]
    elif "pixel_values" in params and "spatial_shapes" in params:  # NaFlex patches (SigLIP2)
        h, w = 8, max(1, tokens // 8)
        out["pixel_values"] = randn(1, h * w, channels * patch * patch)
        out["spatial_shapes"] = torch.tensor([[h, w]])
        if "pixel_attention_mask" in params:
            out["pixel_attention_mask"] = torch.ones(1, h * w, dtype=torch.long)
        candidates = [out]
    elif "pixel_values" in params or "pixel_values_videos" in params:
        sizes = [8 * patch, size] if isinstance(size, int) and size > 8 * patch else [size]
        shape = getattr(config, "image_size", None)  # (height, width) where it is a pair
        pair = list(shape) if isinstance(shape, (list, tuple)) and len(shape) == 2 else None
        sides = [(s, s) for s in sizes if isinstance(s, int)] if size else [(8 * patch,) * 2]
        for height, width in [tuple(pair)] if pair and pair[0] != pair[1] else sides:
            image = randn(1, channels, height, width)
            base = {"pixel_values": image}
            if "pixel_values" not in params:  # a video model: (batch, frames, c, h, w)
                tubelet = _int(config, "tubelet_size")  # first two tubelets, then the clip
                clip = _int(config, "num_frames", "frames_per_clip", default=2)
                for frames in dict.fromkeys([2 * tubelet if tubelet else clip, clip]):
                    video = image[:, None].expand(1, frames, *image.shape[1:]).contiguous()
                    candidates.append({"pixel_values_videos": video})
                continue
            if "image_sizes" in params:
                base["image_sizes"] = torch.tensor([[height, width]])
            if "task_inputs" in params:  # OneFormer: its task prompt's token ids (fixed length)
                length = _int(config, "task_seq_len", default=tokens)
                base["task_inputs"] = torch.randint(3, 50, (1, length), generator=generator)
            if "target_sizes" in params:  # patches per side (MiniCPM's vision tower)
                base["target_sizes"] = torch.tensor([[height // patch, width // patch]])
            for name in ("prompt_pixel_values", "prompt_masks"):  # SegGPT: a prompt image
                if name in params:  # stacked above the image: each half the configured height
                    base["pixel_values"] = base[name] = image[:, :, : height // 2]
            if "aspect_ratio_ids" in params:  # tiled images (Mllama): one tile
                tiles = _int(config, "max_num_tiles", default=1)
                base["pixel_values"] = image[:, None, None].expand(1, 1, tiles, *image.shape[1:])
                base["aspect_ratio_ids"] = torch.tensor([[1]])
                mask = torch.zeros(1, 1, tiles, dtype=torch.long)
                mask[..., 0] = 1
                base["aspect_ratio_mask"] = mask
            frames = _int(config, "num_frames", default=None)
            candidates.append(base)
            if frames:  # video models: (batch, frames, channels, height, width)
                video = image[:, None].expand(1, frames, *image.shape[1:]).contiguous()
                candidates.append({**base, "pixel_values": video})
                # or the frames as the batch (X-CLIP's vision tower: (batch * frames, c, h, w))
                candidates.append({**base, "pixel_values": video[0]})
            # an image pair (keypoint matching: (batch, 2, c, h, w)); flattened patches
            candidates.append({"pixel_values": image[:, None].expand(1, 2, *image.shape[1:])})
            rows = image.unfold(2, patch, patch).unfold(3, patch, patch)  # (1, c, h', w', p, p)
            flat = rows.permute(0, 2, 3, 1, 4, 5).reshape(1, -1, channels * patch * patch)
            candidates.append({"pixel_values": flat})
    elif "input_values" in params:
        length = 4000
        kernels = getattr(config, "conv_kernel", None)
        strides = getattr(config, "conv_stride", None)
        if isinstance(kernels, (list, tuple)) and isinstance(strides, (list, tuple)):
            length = tokens  # samples giving `tokens` frames through the feature convolutions
            for kernel, stride in zip(reversed(kernels), reversed(strides), strict=True):
                length = (length - 1) * stride + kernel
        wave = randn(1, length)
        candidates = [{"input_values": wave}, {"input_values": wave[:, None]}]
        candidates.append({"input_values": wave[..., None]})
        mels = _int(config, "num_mel_bins")
        frames = _int(config, "max_length")
        if mels and frames:  # a spectrogram of max_length frames (AST)
            candidates.append({"input_values": randn(1, frames, mels)})
        if "decoder_input_ids" in params and isinstance(vocab, int):  # then with a decoder's
            ids = torch.randint(3, max(4, min(vocab, 50)), (1, 5), generator=generator)
            candidates += [{**c, "decoder_input_ids": ids} for c in candidates]
    elif "input_features" in params:
        mels = _int(
            config,
            "num_mel_bins",
            "feature_size",
            "n_mels",
            "input_feat_size",
            "input_feat_per_channel",
            "feature_projection_input_dim",
        )
        if isinstance(mels, int):
            full = 2 * _int(config, "max_source_positions", default=16)
            window = _int(config, "n_window")  # chunked encoders: whole windows of 2 n_window
            # a clip first where the positions span minutes (W2V-BERT's 5000: slow, not needed)
            for length in [2 * tokens, full] if full > 1024 else [full]:
                length = -(-length // (2 * window)) * 2 * window if window else length
                # stacked frames (low frame rate features: k frames of mels side by side)
                stacked = [randn(1, length, mels * k) for k in range(2, 9)]
                for features in (randn(1, mels, length), randn(1, length, mels), *stacked):
                    base = {"input_features": features}
                    if "input_features_mask" in params:
                        base["input_features_mask"] = torch.ones(1, length, dtype=torch.long)
                    if "decoder_input_ids" in params and isinstance(vocab, int):
                        base["decoder_input_ids"] = torch.randint(
                            3, min(vocab, 50), (1, 5), generator=generator
                        )
                    candidates.append(base)
    elif "flattened_patches" in params and isinstance(hidden, int):  # Pix2Struct: row, column,
        width = _int(config, "patch_embed_hidden_size", default=channels * patch * patch)
        patches = randn(1, tokens, 2 + width)  # then the patch's pixels
        patches[..., :2] = 1.0
        candidates = [{"flattened_patches": patches}]
    elif "latents" in params:  # an audio codec's decoder: (batch, latent_dim, frames)
        widths = [_int(config, n) for n in ("latent_dim", "codebook_dim", "hidden_size")]
        candidates = [{"latents": randn(1, d, tokens)} for d in dict.fromkeys(widths) if d]
    elif "past_values" in params:  # time series: (batch, context, channels)
        candidates = _series(config, params, tokens, randn)
    candidates += _fallbacks(config, params, tokens, hidden, randn)
    letters = _text_vocabulary(config) if "decoder_input_ids" in params else None
    if "decoder_input_ids" in params and vocab is None and isinstance(letters, int):
        # last, ids of a composite encoder-decoder whose config holds no vocabulary (its text
        # config's: Diffusion Gemma, whose decoder runs only on its encoder's cache)
        ids = torch.randint(3, max(4, min(letters, 50)), (1, tokens), generator=generator)
        candidates.append({"input_ids": ids, "decoder_input_ids": ids})
    for candidate in candidates:
        if "use_cache" in params:
            candidate["use_cache"] = False
    return candidates


def _text_vocabulary(config) -> int | None:
    """The vocabulary size of a config's one text config (None where it has several: MusicGen's
    text encoder and decoder, of which transformers will not pick one)."""
    try:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
    except ValueError:
        return None
    return getattr(text, "vocab_size", None)


def _grid_patches(config, params, tokens: int, randn) -> list[dict]:
    """Flattened patches with their grid (t, h, w) (Qwen2-VL style towers): the patches as
    (patches, c * t * p * p), as (patches, c, p, p), or as (patches, c, t, p, p)."""
    merge = _int(config, "spatial_merge_size", "merge_kernel_size", default=1)
    channels = _int(config, "num_channels", "in_channels", "in_chans", default=3)
    patch = _int(config, "patch_size", default=16)
    h, w = 2 * merge, max(1, tokens // (2 * merge * merge)) * merge
    name = "hidden_states" if "hidden_states" in params else "pixel_values"
    shapes = []  # frames per patch: the config's, else 1 or 2 (a tower's config may omit it)
    for frames in dict.fromkeys([_int(config, "temporal_patch_size", default=1), 1, 2]):
        flat = randn(h * w, channels * frames * patch * patch)
        shapes += [flat, flat.reshape(h * w, channels * frames, patch, patch)]
        shapes.append(flat.reshape(h * w, channels, frames, patch, patch))
        shapes.append(shapes[-2][None])  # batched (PaddleOCR-VL: (1, patches, c, p, p))
    base = {"grid_thw": torch.tensor([[1, h, w]])}
    if "merge_sizes" in params:  # VideoLLaMA 3: the merge size of each image
        base["merge_sizes"] = torch.tensor([merge])
    return [{name: x, **base} for x in shapes]


def _series(config, params, tokens: int, randn) -> list[dict]:
    """Time-series inputs: past values over the context and the largest lag, their time
    features and observed mask, and future ones (the decoder's inputs) where the model has them."""
    context = _int(config, "context_length", default=tokens)
    series = _int(config, "num_input_channels", "input_size", default=1)
    lags = getattr(config, "lags_sequence", None)
    past = context + (max(lags) if isinstance(lags, (list, tuple)) and lags else 0)
    shape = (1, past, series) if series > 1 else (1, past)
    out = {"past_values": randn(1, context, series)}
    candidates = [out]
    if "past_time_features" in params:
        features = _int(config, "num_time_features", default=0)
        future = _int(config, "prediction_length", default=1)
        full = {"past_values": randn(*shape), "past_observed_mask": torch.ones(shape, dtype=F64)}
        full["past_time_features"] = randn(1, past, features)
        if "future_values" in params:
            full["future_values"] = randn(1, future, *shape[2:])
            full["future_time_features"] = randn(1, future, features)
        candidates.append(full)
    return candidates


def _fallbacks(config, params, tokens: int, hidden, randn) -> list[dict]:
    """Last candidates for a model (or tower) whose inputs are hidden states: embeddings
    instead of ids (a talker whose input_ids must be None), or a tower's hidden states."""
    first = next(iter(params), "")
    # a tower that projects its input features first (Granite Speech's CTC encoder: input_dim)
    features = _int(config, "input_dim") if first == "hidden_states" else None
    if not isinstance(hidden, int) and not isinstance(features, int):
        return []
    states = randn(1, tokens, hidden) if isinstance(hidden, int) else None
    out = []
    if "inputs_embeds" in params and states is not None:
        out.append({"inputs_embeds": states})
    # a tower's input (noise_embeds; Perceiver's inputs, of d_model channels, without preprocessor)
    if first in ("hidden_states", "inputs") or first.endswith("_embeds"):
        out += [{first: states}] if states is not None else []
        if isinstance(features, int) and features != hidden:
            out.append({first: randn(1, tokens, features)})
    names = [n for n in ("encoder_hidden_states", "context_hidden_states") if n in params]
    # first with the states keys come from (cross attention runs only with them)
    return [{**c, n: states} for c in out for n in names] + out


# --- modules the forward passes never reach ---------------------------------------------------

_Q_NAME = re.compile(r"(^|_)(q|query|qkv|to_q|wq|wqkv|c_attn|att_proj|in_proj|q_proj|qkv_proj)$")
_K_NAME = re.compile(r"(^|_)(k|key|to_k|wk|k_proj|kv|kv_proj|to_kv)$")
_ROTARY_INPUTS = ("freqs_cis", "rotary_pos_emb")
_QK_CROSS = ("key_value_states", "encoder_hidden_states", "cross_attention_states", "context")


def _pointwise(sub: nn.Module) -> bool:
    """A Conv1d/Conv2d of kernel 1 (stride 1, one group): a Linear of each position's channels,
    on channel-first maps (batch, channels, *positions)."""
    return (
        isinstance(sub, (nn.Conv1d, nn.Conv2d))
        and all(k == 1 for k in sub.kernel_size)
        and all(s == 1 for s in sub.stride)
        and sub.groups == 1
    )


def _query_projection(module: nn.Module) -> nn.Module | None:
    return next(
        (sub for name, sub in module.named_modules() if _Q_NAME.search(name.rsplit(".", 1)[-1])),
        None,
    )


def _channels_first(module: nn.Module, hidden: Tensor) -> bool:
    """Whether the module's query projection is a 1x1 convolution over hidden's axis 1: its
    tokens are then the positions of a channel-first map (VQGAN's (B, C, H, W) blocks)."""
    sub = _query_projection(module)
    return (
        sub is not None
        and _pointwise(sub)
        and hidden.ndim == len(sub.kernel_size) + 2
        and hidden.shape[1] == sub.in_channels
    )


def _as_map(x: Tensor, dims: int) -> Tensor:
    """(1, tokens, channels) as a channel-first map of `dims` position axes (two: the
    tokens as rows of 8 where they divide so)."""
    x = x.transpose(1, 2)
    if dims == 1:
        return x
    rows = 8 if x.shape[-1] % 8 == 0 else 1
    return x.reshape(*x.shape[:2], rows, -1)


def _in_width(module: nn.Module, pattern: re.Pattern) -> int | None:
    """The input width of the module's first projection whose name matches pattern (a Linear,
    transformers' Conv1D (in, out), or a 1x1 convolution)."""
    for name, sub in module.named_modules():
        last = name.rsplit(".", 1)[-1]
        if not pattern.search(last):
            continue
        sub = sub.linear if isinstance(getattr(sub, "linear", None), nn.Linear) else sub
        if isinstance(sub, nn.Linear):  # a Linear, or a wrapper's (Gemma 4's clippable ones)
            return sub.in_features
        if _pointwise(sub):  # a 1x1 convolution: a Linear of each position's channels
            return sub.in_channels
        weight = getattr(sub, "weight", None)
        if type(sub).__name__ == "Conv1D" and isinstance(weight, Tensor):
            return weight.shape[0]
    return None


def _head_width(module: nn.Module) -> list[int]:
    """Candidate per-head widths for a module's (cos, sin): its head_dim attribute (or its
    config's), and the rotary widths its config names."""
    config = getattr(module, "config", None)
    widths = [getattr(module, n, None) for n in ("head_dim", "attention_head_size", "d_head")]
    widths += [_int(config, "head_dim", "rotary_dim", "qk_rope_head_dim")] if config else []
    heads = _int(module, "num_heads", "num_attention_heads", "n_heads")
    width = _in_width(module, _Q_NAME)
    if heads and width:
        widths.append(width // heads)
    return [w for w in dict.fromkeys(widths) if isinstance(w, int) and w > 0]


def _rotations(model: nn.Module, module: nn.Module, tokens: int) -> list:
    """Candidate position_embeddings for a module called on its own, all at position 0: the
    outputs of the rotary modules of its model (position_ids zero), then (cos, sin) = (1, 0)
    of each candidate head width, with and without the batch axis. At position 0 RoPE is the
    identity; a rotary module's output there keeps its attention factor (YaRN's)."""
    out: list = []
    for sub in model.modules():
        if not re.search(_ROTARY, type(sub).__name__.lower()):
            continue
        for width in dict.fromkeys([*_head_width(module), 64]):
            x = torch.zeros(1, tokens, width, dtype=F64)
            try:
                with torch.no_grad(), _quiet():
                    value = sub(x, torch.zeros(1, tokens, dtype=torch.long))
            except Exception:
                continue
            if isinstance(value, tuple) and len(value) == 2:
                out.append(value)
                break
    for width in _head_width(module):
        ones, zeros = torch.ones(tokens, width, dtype=F64), torch.zeros(tokens, width, dtype=F64)
        out += [(ones[None], zeros[None]), (ones, zeros)]
    return out


def _relative_positions(model: nn.Module, tokens: int, width: int) -> list[Tensor]:
    """Last candidates for a module's required position_embeddings that are one tensor: the
    outputs of its model's relative position encodings on hidden states of the module's width
    (Gemma 4 audio's sinusoids of the key offsets, which its relative_k_proj projects into a
    term of the query and the offset: cancelled by the probes' differences)."""
    out = []
    for sub in model.modules():
        if not re.search("relpositional|relativeposition", type(sub).__name__.lower()):
            continue
        try:
            with torch.no_grad(), _quiet():
                value = sub(torch.zeros(1, tokens, width, dtype=F64))
        except Exception:
            continue
        if isinstance(value, Tensor):
            out.append(value)
    return out


def _direct_calls(model: nn.Module, module: nn.Module, tokens: int) -> list[tuple[tuple, dict]]:
    """Candidate calls of an attention module that no forward pass of its model reached (a
    tower the dummy inputs cannot drive): hidden states of the width its query projection
    takes (as many tokens as its window holds, where it has one), the states its keys come
    from (the hidden states themselves, or of its key projection's width), and position 0 for
    whatever rotary input it requires. Only what the module computes from its own inputs is
    then measured: nothing its model would pass it besides (see docs/benchmarks.md)."""
    width = _in_width(module, _Q_NAME)
    if width is None:
        return []
    key_width = _in_width(module, _K_NAME) or width
    params = inspect.signature(module.forward).parameters
    names = [n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if not names:
        return []
    window = getattr(module, "window_size", None)
    side = window if isinstance(window, int) and window > 1 else None
    window = math.prod(window) if isinstance(window, (tuple, list)) else window
    counts = [n for n in dict.fromkeys([window, tokens]) if isinstance(n, int) and n > 1]
    # then one square window of states (batch, side, side, d), for a module that splits a 2-D
    # map into windows itself (Florence-2's DaViT): one window keeps the tokens' order
    layouts = [(n,) for n in counts] + ([(side, side)] if side else [])
    rotary = [n for n in names if "position_embeddings" in n or n in _ROTARY_INPUTS]
    # the states keys come from: named so, or a second required input (CANINE's to_tensor)
    required = [n for n in names[1:] if params[n].default is params[n].empty]
    keyed = [
        n
        for n in names[1:]
        if n in _QK_CROSS
        or (n in required and n not in rotary and n != "cu_seqlens" and "mask" not in n)
    ]
    keyed = keyed if keyed and keyed[0] in required else keyed[:1]  # (query, key, value): all
    generator = torch.Generator().manual_seed(2)
    conv = _query_projection(module)
    # a 1x1 convolution's states: channel-first maps of its positions (VQGAN's attention blocks)
    dims = len(conv.kernel_size) if conv is not None and _pointwise(conv) else 0
    out = []
    for layout in layouts:
        count = math.prod(layout)
        x = torch.randn(1, *layout, width, generator=generator, dtype=F64)
        y = torch.randn(1, *layout, key_width, generator=generator, dtype=F64)
        if dims and len(layout) == 1:
            x, y = _as_map(x, dims), _as_map(y, dims)
        keys = [x, y] if key_width == width else [y]
        if keyed and keyed[0] not in required and key_width == width:
            keys.insert(0, None)  # self-attention first, where keys' states are optional
        rotations = [*_rotations(model, module, count), None] if rotary else [None]
        rotations += _relative_positions(model, count, width) if rotary else []
        # a required mask: None, else booleans of each meaning (Gemma 3n audio's True: padded);
        # the wrong one masks every logit, which the probe rejects as non-finite
        masks = [None, False, True] if any("mask" in n for n in required) else [None]
        for key, rotation, padding in itertools.product(
            keys if keyed else [None], rotations, masks
        ):
            values: dict = {names[0]: x}
            for name in names[1:]:
                if name in keyed:
                    values[name] = key
                elif name in rotary:
                    values[name] = rotation
                elif name in ("value", "values"):  # SAM's forward(query, key, value)
                    values[name] = x if key is None else key
                elif name in ("position_ids", "cache_position"):
                    ids = torch.zeros(count, dtype=torch.long)
                    values[name] = ids[None] if name == "position_ids" else ids
                elif "repeat" in name and params[name].default == 0:
                    # EdgeTAM's rope_k_repeat: its keys as that many groups (0, by default,
                    # is a division by zero); one group
                    values[name] = 1
                elif name == "cu_seqlens":  # packed sequences (varlen): one of all the tokens
                    values[name] = torch.tensor([0, count], dtype=torch.int32)
                elif name in required and "mask" in name and padding is not None:
                    values[name] = torch.full((1, count), padding)  # True or False: padded
                elif name in required:
                    values[name] = None
            # inputs up to the last required one positionally: an input that is the hidden
            # states itself is then replaced by the probes (``_probe_once``, ``_bilinear_once``)
            last = max([names.index(n) for n in required], default=0)
            args = tuple(values.pop(n) for n in names[: last + 1])
            if names[0] == "hidden_states" and last == 0:
                args, values = (), {"hidden_states": args[0], **values}
            elif any(names[0] == q for q, _ in _QK_APART):  # by name: the key input is found so
                args, values = (), {**dict(zip(names, args, strict=False)), **values}
            out.append((args, values))
            if "cu_seqlens" in names:  # packed sequences: (tokens, d), no batch axis
                args = tuple(a[0] if a is x else a for a in args)
                values = {k: v[0] if v is x else v for k, v in values.items()}
                out.append((args, values))
    return out


def _runnable_parts(model: nn.Module) -> list[nn.Module]:
    """The towers of a composite model: the models inside it, outermost first."""
    from transformers import PreTrainedModel

    return [m for m in model.modules() if m is not model and isinstance(m, PreTrainedModel)]


#: modules whose outputs rotate q and k (RoFormer rotates by its sinusoidal position embedding);
#: others matched (additive sinusoidal embeddings) only change hidden states that probes replace;
#: LightGlue rotates by angles projected from its keypoints (its PositionalEncoder)
_ROTARY = "rotary|rope|sinusoidal|positionalencoder"


def _position_zero(module, args, output):
    """A rotary module's (cos, sin) made a rotation by zero for every token, keeping their
    magnitude (an attention factor, YaRN's): every probe then sees the same RoPE, the identity.
    Other outputs (angles): the first position's, broadcast."""

    def first(t):
        if isinstance(t, Tensor) and t.is_complex():  # e^(i theta) per token (Llama 4 vision)
            return t.abs().to(t.dtype)  # the rotation by zero, its magnitude kept
        if not isinstance(t, Tensor) or t.ndim < 2:
            return t
        return t[:1].expand_as(t) if t.ndim == 2 else t[:, :1].expand_as(t)

    if isinstance(output, tuple) and output and isinstance(output[0], tuple):
        return (_position_zero(module, args, output[0]), *output[1:])  # ((cos, sin), ...)
    if isinstance(output, tuple) and len(output) == 2 and output[0].shape == output[1].shape:
        cos, sin = (first(t) for t in output)
        return (cos.square() + sin.square()).sqrt(), torch.zeros_like(sin)
    return tuple(first(t) for t in output) if isinstance(output, tuple) else first(output)


def _token_zero(module, args, kwargs):
    """An attention module that rotates q and k itself by its tokens' indices (V-JEPA 2's 3D
    RoPE; position_mask: the index of each token, None: 0, 1, ...) given index 0 for every
    token: the rotation is then the identity."""
    hidden = args[0] if args else kwargs.get("hidden_states")
    mask = kwargs.get("position_mask")
    if isinstance(mask, Tensor):  # the predictor's: indices of context and target tokens
        kwargs["position_mask"] = torch.zeros_like(mask)
    elif isinstance(hidden, Tensor):
        kwargs["position_mask"] = torch.zeros(hidden.shape[:2], dtype=torch.long)
    return args, kwargs


def _plain_state(model: nn.Module) -> list[tuple[nn.Module, dict]]:
    """Each module's plain attributes (numbers, strings, tuples), to restore after a failed
    forward: Swin clamps its window_size to a too small input before it fails on it."""
    plain = (int, float, str, tuple, type(None))
    return [
        (m, {k: v for k, v in vars(m).items() if isinstance(v, plain)}) for m in model.modules()
    ]


def _run(model: nn.Module, tokens: int, mark=None) -> list:
    """Attention calls of one forward pass of the model (or of each tower), in call order.

    Rotary modules are made to return position 0's values (their inputs may not take
    position_ids); a model whose rotary output that breaks is run again without it. What a
    failed candidate input recorded is dropped: its calls, and, through mark (called before
    each candidate, it returns an undo), what the caller's hooks saw.
    """
    attempts = [(True, True), (False, True), (True, False), (False, False)]
    # a model that shortens its sequence (CANINE downsamples by 4) may need more tokens
    attempts = [(z, r, n) for n in dict.fromkeys([tokens, max(tokens, 16)]) for z, r in attempts]
    # last, with casts to float32 keeping float64: a float64 model that casts inside (MRA's
    # q, k, v, Autoformer's AutoCorrelation, FSMT's mask fill) fails or overflows otherwise
    attempts = [(z, r, n, f) for f in (False, True) for z, r, n in attempts]
    for zero_positions, record, tokens, float64 in attempts:  # a model may reject the interface
        hooks = [
            m.register_forward_hook(_position_zero)
            for m in model.modules()
            if zero_positions and re.search(_ROTARY, type(m).__name__.lower())
        ]
        hooks += [  # first, so that a caller's capture sees the zero positions too
            m.register_forward_pre_hook(_token_zero, with_kwargs=True, prepend=True)
            for m in model.modules()
            if zero_positions
            and hasattr(m, "get_position_ids")
            and "position_mask" in inspect.signature(m.forward).parameters
        ]
        ran = False
        try:
            context = recording(model) if record else contextlib.nullcontext(_Recorder())
            keep = _Float64() if float64 else contextlib.nullcontext()
            with context as recorder, torch.no_grad(), keep:
                for part in [model, *_runnable_parts(model)]:
                    called = {id(call[0]) for call in recorder.calls}
                    if part is not model and any(id(m) in called for m in part.modules()):
                        continue  # a tower the whole model's pass already ran
                    candidates = _inputs(part, tokens)
                    for number, inputs in enumerate(candidates):
                        saved, count = _plain_state(part), len(recorder.calls)
                        undo = mark() if mark is not None else None
                        try:
                            with _quiet():
                                output = part(**inputs)
                            if "attention_mask" in inputs and not _finite(output):
                                # an all-ones mask the model makes NaN (ProphetNet: float32
                                # (1 - mask) times float64's min): next, the same without it
                                unmasked = {
                                    k: v for k, v in inputs.items() if k != "attention_mask"
                                }
                                candidates.insert(number + 1, unmasked)
                                raise RuntimeError("non-finite outputs")
                            ran = True
                            break
                        except Exception:
                            for module, state in saved:
                                module.__dict__.update(state)
                            del recorder.calls[count:]
                            if undo is not None:
                                undo()
                            continue
        finally:
            for hook in hooks:
                hook.remove()
        if ran:
            return recorder.calls
    raise RuntimeError("the model does not run on dummy inputs")


def _finite(output) -> bool:
    """Whether every floating tensor of a model's output (nested tuples, dicts) is finite."""
    if isinstance(output, Tensor):
        return not output.is_floating_point() or bool(torch.isfinite(output).all())
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (list, tuple)):
        return all(_finite(value) for value in output)
    return True


class _Float64(torch.overrides.TorchFunctionMode):
    """Inside a probe, casts to float32 (RMSNorm's upcast) keep float64: the probe's q and k
    are then exact to float64, not rounded to float32's 6e-8."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is Tensor.float and args[0].dtype == F64:
            return args[0]
        to_float32 = (len(args) > 1 and args[1] is torch.float32) or (
            kwargs.get("dtype") is torch.float32
        )
        if (
            func is Tensor.to
            and isinstance(args[0], Tensor)
            and args[0].dtype == F64
            and to_float32
        ):
            return args[0]
        return func(*args, **kwargs)


# --- probing one module -----------------------------------------------------------------------

_KEY_INPUTS = ("key_value_states", "encoder_hidden_states", "cross_attention_states")
#: a module whose forward takes its queries' and keys' inputs apart (SAM's attention(query, key,
#: value), which its layer calls with positions added to both): the query's, then the key's
_QK_APART = (
    ("query", "key"),
    ("queries", "keys"),
    ("vision_features", "text_features"),  # Grounding DINO's fusion: vision queries
    ("global_hidden_states", "token_hidden_states"),  # PEGASUS-X: global queries first
)


def _states(args: tuple, kwargs: dict) -> tuple[Tensor, str | None]:
    """A captured call's query states (its first input, or hidden_states, or the query of a
    module that takes q and k apart) and the name of the input its keys come from (None: the
    query states themselves; a key input that is the query tensor is self-attention)."""
    names = [*_KEY_INPUTS]
    if args:
        hidden = args[0]
    elif isinstance(kwargs.get("hidden_states"), Tensor):
        hidden = kwargs["hidden_states"]
    else:
        apart = [(q, k) for q, k in _QK_APART if isinstance(kwargs.get(q), Tensor)]
        if not apart:
            raise RuntimeError("the call has no hidden states")
        hidden, names = kwargs[apart[0][0]], [*names, apart[0][1]]
    keys = [k for k in names if isinstance(kwargs.get(k), Tensor) and kwargs[k] is not hidden]
    return hidden, next(iter(keys), None)


def _with_probes(args: tuple, kwargs: dict, hidden: Tensor, x: Tensor) -> tuple[list, dict]:
    """The call with every input that is the hidden states itself (CTRL's forward(v, k, q),
    SAM's self-attention key) replaced by the probe states x."""
    new_args = [x if a is hidden else a for a in args]
    return new_args, {k: x if v is hidden else v for k, v in kwargs.items()}


def _capture_inputs(model: nn.Module, modules: list[nn.Module], tokens: int) -> dict:
    """id(module) -> (args, kwargs) of its first call in a forward pass."""
    seen: dict[int, tuple] = {}

    def hook(module, args, kwargs):
        seen.setdefault(id(module), (args, dict(kwargs)))

    def mark():  # calls of a candidate input that then fails are not kept (Swin's small image)
        before = set(seen)
        return lambda: [seen.pop(key) for key in set(seen) - before]

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in modules]
    try:
        _run(model, tokens, mark)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _fill(template: Tensor, probes: Tensor, start: int) -> tuple[Tensor, list[int]]:
    """template's shape filled slot by slot with probe rows start, start+1, ... (cycled), and the
    probe of each slot. The first token of each sequence, where there are several, gets probe 0
    and index -1 (not recorded): it may be a class token with a position of its own (MLCD
    rotates it by learned angles) that position 0 elsewhere does not undo."""
    tokens = template.shape[-2] if template.ndim >= 2 else 1
    slots = template.numel() // template.shape[-1]
    index, probe = [], start
    for slot in range(slots):
        if tokens > 1 and slot % tokens == 0:
            index.append(-1)
        else:
            index.append(probe % probes.shape[0])
            probe += 1
    rows = probes[[max(i, 0) for i in index]]
    return rows.reshape(template.shape).to(template.dtype), index


def _set_eps(module: nn.Module, value: float | None, saved: dict) -> None:
    for sub in module.modules():
        if isinstance(sub, nn.modules.batchnorm._BatchNorm) and not sub.training:
            continue  # in inference a fixed affine map of each token (its running statistics)
        for attribute in _EPS_ATTRIBUTES:
            current = getattr(sub, attribute, None)
            if isinstance(current, float):
                key = (id(sub), attribute)
                saved.setdefault(key, current)
                setattr(sub, attribute, saved[key] if value is None else value)


def _no_added_positions(kwargs: dict, width: int) -> dict:
    """Position embeddings a module adds to its q/k inputs (DETR's ``position_embeddings``,
    ``object_queries``), made zero: a position term, left out of W^h like RoPE at position 0.
    Probes in different slots would otherwise carry different positions into q and k."""
    return {
        name: torch.zeros_like(value)
        for name, value in kwargs.items()
        if ("position" in name or name == "object_queries")
        and isinstance(value, Tensor)
        and value.is_floating_point()
        and value.shape[-1] == width
    }


@contextlib.contextmanager
def _input_norms_skipped(module: nn.Module, inputs: list) -> Iterator[None]:
    """A norm inside the module applied to one of its very inputs (the probes: Granite Speech's
    pre_norm before to_q and to_kv) returns that input: it is the layer's input norm, and W^h
    acts on what the q/k projections take (SPEC), as for a norm outside the module. inputs:
    the tensors of the current call, updated by the caller."""

    def hook(sub, args, output):
        if args and any(args[0] is x for x in inputs):
            return args[0]
        return output

    norms = [
        sub
        for sub in module.modules()
        if sub is not module
        and any(isinstance(getattr(sub, a, None), float) for a in _EPS_ATTRIBUTES)
    ]
    handles = [sub.register_forward_hook(hook) for sub in norms]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _probe_once(
    model, module, args, kwargs, recorder, d_in: int, d_key_in: int, source=None, learned=None
):
    """(q per probe (H, n+1, d), k per probe (Hkv, n+1, d), scaling) for one module.

    source: (module, args, kwargs) of the module whose keys this one attends with (shared keys,
    see ``_key_sources``): it is run first on the same probes, into a fresh shared dict.
    learned: the name of the module's learned query (``_learned_query``), given the probes."""
    probes_q = torch.cat([torch.zeros(1, d_in, dtype=F64), torch.eye(d_in, dtype=F64)])
    probes_k = torch.cat([torch.zeros(1, d_key_in, dtype=F64), torch.eye(d_key_in, dtype=F64)])
    q_rows: dict[int, Tensor] = {}
    k_rows: dict[int, Tensor] = {}
    scaling = None
    hidden, key_name = _states(args, kwargs)
    start = key_start = passes = 0  # each side's next probe
    while len(q_rows) < d_in + 1 or len(k_rows) < d_key_in + 1:
        passes += 1
        if passes > 2 * (d_in + d_key_in + 2):
            raise RuntimeError("probes did not reach every slot")
        x, q_index = _fill(hidden, probes_q, start)
        new_args, new_kwargs = _with_probes(args, kwargs, hidden, x)
        k_index = q_index
        if key_name is not None:
            y, k_index = _fill(kwargs[key_name], probes_k, key_start)
            new_kwargs[key_name] = y
        for cache in ("past_key_values", "past_key_value", "cache"):
            if cache in new_kwargs:
                new_kwargs[cache] = None
        new_kwargs.update(_no_added_positions(new_kwargs, hidden.shape[-1]))
        recorder.calls.clear()
        inputs = [x, *([new_kwargs[key_name]] if key_name is not None else [])]
        with torch.no_grad(), _quiet(), _Float64(), _input_norms_skipped(module, inputs):
            if source is not None:
                new_kwargs, k_index = _run_source(source, x, new_kwargs, q_index)
            saved = module._parameters[learned] if learned else None
            try:
                if learned:  # the probes as the queries' input, slot by slot as the keys'
                    module._parameters[learned] = x
                module(*new_args, **new_kwargs)
            finally:
                if learned:
                    module._parameters[learned] = saved
        calls = [c for c in recorder.calls if c[0] is module]
        first = calls[0] if calls else None
        if (
            len(calls) > 1
            and all(  # the same q and k with other values (DiffLlama): one call
                torch.equal(c[1], first[1]) and torch.equal(c[2], first[2]) and c[3] == first[3]
                for c in calls[1:]
            )
        ):
            calls = calls[:1]
        if not calls or len({c[3] for c in calls}) != 1:
            raise RuntimeError(f"{len(calls)} attention calls from one module call")
        scaling = calls[0][3]
        if any(c[1].ndim != 4 or c[2].ndim != 4 for c in calls):
            raise RuntimeError("query/key are not (B, H, T, d)")
        # several calls: the module splits the tokens into consecutive chunks (Qwen2.5-VL's
        # windows), each attended alone; their tokens, in call order, are the module's
        query = torch.cat([c[1] for c in calls], dim=2)
        key = torch.cat([c[2] for c in calls], dim=2)
        # keys appended after the tokens' own (DeepSeek V4's compressed keys) in self-attention:
        # the tokens' are the first, which each probe must then give alike in every slot; keys
        # of a context before them (context_hidden_states) are ``_own_tokens``'s
        appended = (
            key_name is None
            and not isinstance(new_kwargs.get("context_hidden_states"), Tensor)
            and len(calls) == 1
            and key.shape[2] > query.shape[2]
            and query.shape[0] * query.shape[2] == len(q_index)
        )
        if appended:
            key = key[:, :, : query.shape[2]]
        qs = query.permute(0, 2, 1, 3).reshape(-1, query.shape[1], query.shape[3])
        ks = key.permute(0, 2, 1, 3).reshape(-1, key.shape[1], key.shape[3])
        ks = _one_copy(ks, len(k_index), key.shape[0])
        qs, ks, k_index = _own_tokens(qs, ks, q_index, k_index, new_kwargs, key_name)
        for slot, probe in enumerate(q_index):
            if probe >= 0:
                q_rows.setdefault(probe, qs[slot])
        for slot, probe in enumerate(k_index):
            if probe >= 0:
                row = k_rows.setdefault(probe, ks[slot])
                size = float(row.abs().max())
                if appended and not torch.allclose(row, ks[slot], rtol=1e-9, atol=1e-9 * size):
                    raise RuntimeError("the first keys are not the tokens' own")
        start += sum(probe >= 0 for probe in q_index)
        key_start += sum(probe >= 0 for probe in k_index)
    q = torch.stack([q_rows[p] for p in range(d_in + 1)], dim=1)  # (H, n+1, d)
    k = torch.stack([k_rows[p] for p in range(d_key_in + 1)], dim=1)
    return q.to(F64), k.to(F64), scaling


def _one_copy(ks: Tensor, tokens: int, batch: int) -> Tensor:
    """Keys (batch * copies * T, Hkv, d) of several equal copies of the probed tokens, one
    copy: a Perceiver resampler called on its own with its context the probes themselves
    attends with keys of [context; latents]. Only equal copies are merged: other keys (learned
    ones, a different projection) stay, and the token count then differs."""
    if ks.shape[0] == tokens or tokens % batch or ks.shape[0] % tokens:
        return ks
    copies = ks.reshape(batch, ks.shape[0] // tokens, tokens // batch, *ks.shape[1:])
    if not all(torch.equal(copies[:, 0], copies[:, c]) for c in range(1, copies.shape[1])):
        return ks
    return copies[:, 0].reshape(tokens, *ks.shape[1:])


def _unpadded(rows: Tensor, count: int, zero: Tensor) -> Tensor:
    """The first count rows of a module's q or k rows, where the rest are right padding: a
    module that pads its tokens to whole blocks (Granite Speech 5's context_size) with zero
    states gives each padded slot the q (k) of the zero token, which probe 0 gets at slot 0."""
    extra = rows[count:]
    if rows.shape[0] > count and torch.equal(extra, zero.expand_as(extra)):
        return rows[:count]
    return rows


def _own_tokens(qs, ks, q_index, k_index, kwargs, key_name):
    """(q rows, k rows, k_index) of the module's own tokens: right padding to whole blocks
    dropped (``_unpadded``); in self-attention whose keys are [context; tokens]
    (context_hidden_states, DFlash drafters), the context's keys are not probed (index -1)."""
    qs, ks = _unpadded(qs, len(q_index), qs[0]), _unpadded(ks, len(k_index), ks[0])
    context = kwargs.get("context_hidden_states")
    if (
        key_name is None
        and isinstance(context, Tensor)
        and ks.shape[0] == context.shape[:-1].numel() + len(k_index)
        and context.shape[0] == 1
    ):
        k_index = [-1] * (ks.shape[0] - len(k_index)) + list(k_index)
    if qs.shape[0] != len(q_index) or ks.shape[0] != len(k_index):
        raise RuntimeError("the module changes the number of tokens")
    return qs, ks, k_index


def _run_source(source, x: Tensor, kwargs: dict, q_index: list[int]) -> tuple[dict, list[int]]:
    """Run the key source module on the probe hidden states x, into fresh copies of the dicts
    it shares with the consumer; the consumer's kwargs with those copies, and the key slots."""
    module, args, source_kwargs = source
    shared = {
        name: type(value)()
        for name, value in kwargs.items()
        if isinstance(value, MutableMapping) and source_kwargs.get(name) is value
    }
    if not shared:
        raise RuntimeError("a shared-key module shares no state dict with its source")
    new_args, new_kwargs = list(args), {**source_kwargs, **shared}
    if args:
        new_args[0] = x
    else:
        new_kwargs["hidden_states"] = x
    for cache in ("past_key_values", "past_key_value", "cache"):
        if cache in new_kwargs:
            new_kwargs[cache] = None
    module(*new_args, **new_kwargs)
    return {**kwargs, **shared}, q_index


def _key_sources(calls: list) -> dict[int, nn.Module]:
    """id(module) -> the earlier module whose keys it attends with: its first attention call
    gets the very key tensor an earlier module's call got (Gemma 3n's shared KV layers)."""
    first: dict[int, tuple] = {}
    for call in calls:
        first.setdefault(id(call[0]), call)
    out, seen = {}, []
    for module_id, (module, _, key, _) in first.items():
        for other, other_key in seen:
            if other_key.data_ptr() == key.data_ptr() and other_key.shape == key.shape:
                out[module_id] = other
                break
        seen.append((module, key))
    return out


def _power(first: Tensor, second: Tensor) -> float:
    """a with first = 100^a * second (eps 1e4 x larger): how many norms the path crosses."""
    ratio = float(first.norm() / second.norm())
    return math.log(ratio) / math.log(100.0)


def _unnormed(first: Tensor, second: Tensor, name: str) -> Tensor:
    """first (H, n, d) times sqrt(E)^a, a counted per output dimension: in MLA the key's no-RoPE
    dimensions cross a latent norm and its RoPE dimensions do not."""
    scale = torch.ones(first.shape[0], 1, first.shape[2], dtype=F64)
    norms, norms2 = first.norm(dim=1), second.norm(dim=1)  # (H, d)
    for h, j in zip(*torch.nonzero(norms > 0, as_tuple=True), strict=True):
        a = math.log(float(norms[h, j] / norms2[h, j])) / math.log(100.0)
        if abs(a - round(a)) > 1e-6:
            raise RuntimeError(f"{name} is not linear under huge eps (power {a})")
        scale[h, 0, j] = _EPS ** (round(a) / 2)
    return first * scale


def probe_module(
    model, module, args, kwargs, recorder, source=None, learned=None
) -> tuple[list[Tensor], list[int]]:
    """Per query head W^h (d_in x d_in) of one module, and each head's key head. source:
    (module, args, kwargs) of the module whose keys it uses (``_key_sources``); learned: its
    learned query parameter, replaced by the probes (``_learned_query``)."""
    hidden, key_name = _states(args, kwargs)
    d_in = hidden.shape[-1]
    d_key_in = kwargs[key_name].shape[-1] if key_name else d_in
    saved: dict = {}
    owners = [module] if source is None else [module, source[0]]
    has_norm = any(
        isinstance(getattr(sub, a, None), float)
        for owner in owners
        for sub in owner.modules()
        for a in _EPS_ATTRIBUTES
    )
    saved_source: dict = {}
    try:
        if has_norm:
            _set_eps(module, _EPS, saved)
            if source is not None:
                _set_eps(source[0], _EPS, saved_source)
        q, k, scaling = _probe_once(
            model, module, args, kwargs, recorder, d_in, d_key_in, source, learned
        )
        dq, dk = q[:, 1:] - q[:, :1], k[:, 1:] - k[:, :1]
        if has_norm:
            _set_eps(module, _EPS * 1e4, saved)
            if source is not None:
                _set_eps(source[0], _EPS * 1e4, saved_source)
            q2, k2, _ = _probe_once(
                model, module, args, kwargs, recorder, d_in, d_key_in, source, learned
            )
            dq = _unnormed(dq, q2[:, 1:] - q2[:, :1], "q")
            dk = _unnormed(dk, k2[:, 1:] - k2[:, :1], "k")
    finally:
        _set_eps(module, None, saved)
        if source is not None:
            _set_eps(source[0], None, saved_source)
    heads, kv = dq.shape[0], dk.shape[0]
    if heads % kv:
        raise RuntimeError(f"{heads} query heads, {kv} key heads")
    s = float(scaling) if scaling is not None else dq.shape[-1] ** -0.5
    group = heads // kv
    kv_of_head = [h // group for h in range(heads)]
    return [s * dq[h] @ dk[kv_of_head[h]].T for h in range(heads)], kv_of_head


class _Softmax(torch.overrides.TorchFunctionMode):
    """Records the input of the first softmax called (a module's pre-softmax logits), also one
    inside torch's own functions (F.multi_head_attention_forward), which a mode does not see;
    and those of the softmaxes after it."""

    def __init__(self) -> None:
        super().__init__()
        self.logits: Tensor | None = None
        self.later: list[Tensor] = []  # the inputs of the softmaxes after it
        self._softmax = torch.nn.functional.softmax
        self._seen: list[Tensor] = []  # F.softmax, patched, is seen again by the mode
        self._tanh: tuple[Tensor, Tensor] | None = None  # the last tanh's (input, output)

    def _keep(self, logits: Tensor) -> None:
        """The first softmax's input (later ones: ``later``); a logit softcap c tanh(z / c) of
        it undone (z = c u for u = z / c, the input of the tanh whose output of the logits'
        shape it scales: SPEC leaves softcapping out of W^h, Gemma 3n audio's
        conf_attention_logit_cap)."""
        if any(logits is seen for seen in self._seen):
            return
        self._seen.append(logits)
        logits = logits.detach()
        if self.logits is not None:
            self.later.append(logits)
            return
        if self._tanh is not None and self._tanh[1].shape == logits.shape:
            u, t = self._tanh
            logits = torch.where(t != 0, logits * (u / t), logits)
        self.logits = logits

    def _record(self, *args, **kwargs):
        self._keep(args[0])
        return self._softmax(*args, **kwargs)

    def __enter__(self):
        torch.nn.functional.softmax = self._record
        return super().__enter__()

    def __exit__(self, *exc):
        torch.nn.functional.softmax = self._softmax
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # a softmax written exp(z - logsumexp(z)) (Reformer's local attention) normalizes z
        softmax = (torch.softmax, self._softmax, Tensor.softmax, torch.logsumexp, Tensor.logsumexp)
        if func in softmax:
            self._keep(args[0])
        if func is Tensor.amax and self.logits is None and _row_max(args, kwargs):
            # z - z.amax(-1, keepdim=True) before the softmax (Evolla): a shift the softmax
            # ignores, of each row by its keys, which the probes' differences would not cancel
            return torch.zeros_like(func(*args, **kwargs))
        if func is torch.nn.functional.scaled_dot_product_attention and self.logits is None:
            self.logits = _sdpa_logits(*args, **(kwargs or {})).detach()
        out = func(*args, **(kwargs or {}))
        if func in (torch.tanh, Tensor.tanh) and self.logits is None:
            self._tanh = (args[0].detach(), out.detach())
        return out


def _row_max(args, kwargs) -> bool:
    """Whether x.amax(...) takes each row's maximum over its last axis, keeping it."""
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    keep = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
    return dim in (-1, (-1,), [-1]) and bool(keep)


def _sdpa_logits(
    query, key, value=None, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw
) -> Tensor:
    """The logits torch's scaled_dot_product_attention softmaxes, by its documented formula:
    q.k^T * scale (None: 1/sqrt(d)), plus a float mask, -inf where a bool or causal mask hides
    a key; key heads repeated to the query heads (enable_gqa)."""
    if key.shape[-3] != query.shape[-3]:
        key = key.repeat_interleave(query.shape[-3] // key.shape[-3], dim=-3)
    z = query @ key.transpose(-2, -1) * (query.shape[-1] ** -0.5 if scale is None else scale)
    hidden = torch.zeros_like(z, dtype=torch.bool)
    if is_causal:
        hidden |= torch.ones(z.shape[-2:], dtype=torch.bool).triu(1)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        hidden |= ~attn_mask
    elif attn_mask is not None:
        z = z + attn_mask
    return z.masked_fill(hidden, -math.inf)


class _UnitNorm(torch.overrides.TorchFunctionMode):
    """F.normalize (x / |x|, Swin v2's cosine attention) read as SPEC's QK-norm, whose per-token
    RMS is left out: x / |x| = (x / rms(x)) / sqrt(d), so x / sqrt(d) here."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.normalize:
            x, p = args[0], args[1] if len(args) > 1 else kwargs.get("p", 2.0)
            dim = args[2] if len(args) > 2 else kwargs.get("dim", 1)
            if p != 2:
                raise RuntimeError(f"an L{p} normalization is not a QK-norm")
            return x / math.sqrt(x.shape[dim])
        return func(*args, **kwargs)


def _batched(value, batch: int, lead: int = 1):
    """A tensor input of a call whose hidden states had `lead` sequences made one for `batch`
    sequences (a multiple of lead): a leading 1 expanded, any other leading size (windows of
    Swin's mask, batch * heads of ALiBi) repeated batch-major."""
    if not isinstance(value, Tensor) or value.ndim == 0:
        return value
    if value.shape[0] == 1:
        return value.expand(batch, *value.shape[1:])
    return value.repeat(batch // lead, *[1] * (value.ndim - 1))


def _batched_inside(value, batch: int, lead: int = 1):
    """``_batched`` inside a tuple or list of inputs (Funnel's attention_inputs: positions,
    token types, mask): only tensors whose leading size is the call's own batch, since the
    others (position tables) have none."""
    if isinstance(value, (tuple, list)):
        return type(value)(_batched_inside(v, batch, lead) for v in value)
    if isinstance(value, Tensor) and value.ndim > 1 and value.shape[0] == lead:
        return _batched(value, batch, lead)
    return value


#: states a module keeps across calls: a probe call runs without them
_CACHES = ("past_key_values", "past_key_value", "cache", "layer_past")


#: the states keys come from, in a module that computes its logits itself: also FSMT's and
#: Funnel's key (query, key, value), Perceiver's inputs (latents attend to them)
_OWN_KEY_INPUTS = (*_KEY_INPUTS, "key", "inputs", *(k for _, k in _QK_APART))


def _query_and_key_states(module, args: tuple, kwargs: dict) -> tuple[Tensor, Tensor | None]:
    """The states a module's queries come from, and its keys' where these are others (None:
    self-attention). A positional input named latents other than the first holds the queries,
    and the first input the keys' states (Evolla's compressor: forward(x, latents, mask), keys
    from [x; latents], of which the probes read the x part: ``_pair_logits``)."""
    names = list(inspect.signature(module.forward).parameters)[: len(args)]
    if "latents" in names[1:] and isinstance(args[0], Tensor):
        latents = args[names.index("latents")]
        if isinstance(latents, Tensor) and latents.shape[-1] == args[0].shape[-1]:
            return latents, args[0]
    hidden = args[0] if args else kwargs[_hidden_name(module, kwargs)]
    key_name = _key_name(kwargs, hidden)
    return hidden, kwargs[key_name] if key_name else None


def _hidden_name(module, kwargs: dict) -> str:
    """The keyword of a module's hidden states in a call without positional inputs:
    hidden_states, else the queries of a module that takes q and k apart (``_QK_APART``), else
    its forward's first parameter (FSMT's query)."""
    if "hidden_states" in kwargs:
        return "hidden_states"
    apart = [q for q, _ in _QK_APART if isinstance(kwargs.get(q), Tensor)]
    if apart:  # queries of a module that takes them apart (PEGASUS-X's global tokens)
        return apart[0]
    return next(iter(inspect.signature(module.forward).parameters))


def _key_name(kwargs: dict, hidden: Tensor) -> str | None:
    """The keyword of the states keys come from in cross attention: one of _KEY_INPUTS, or a
    key input that is not the hidden states themselves (FSMT's forward(query, key, ...))."""
    for name in _OWN_KEY_INPUTS:
        value = kwargs.get(name)
        if isinstance(value, Tensor) and value is not hidden:
            return name
    return None


def _probe_input(value, probes: dict, size_up: tuple[int, int] | None):
    """A module input in a probe call: the probes where it is the hidden or key states
    (probes: id -> probes), else itself, made (batch, lead) ``_batched`` where size_up is given
    (inside a tuple or list too)."""
    if id(value) in probes and isinstance(value, Tensor):
        return probes[id(value)]
    if size_up is None:
        return value
    if isinstance(value, (tuple, list)):
        return _batched_inside(value, *size_up)
    return _batched(value, *size_up)


def _keys_by_name(module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A call whose key states are positional (Funnel's forward(query, key, value, ...)) with
    its inputs from the key on passed by name, so that they are found as cross-attention keys."""
    names = list(inspect.signature(module.forward).parameters)
    found = [i for i, n in enumerate(names[: len(args)]) if n in _OWN_KEY_INPUTS and i > 0]
    if not found or any(n in kwargs for n in names[found[0] : len(args)]):
        return args, kwargs
    first = found[0]
    return args[:first], {**dict(zip(names[first:], args[first:], strict=False)), **kwargs}


def _swapped(x: Tensor, swap: tuple[int, int] | None) -> Tensor:
    """x with two axes exchanged (its own inverse), contiguous; x itself for swap None."""
    return x if swap is None else x.transpose(*swap).contiguous()


def _bilinear_once(
    module,
    args,
    kwargs,
    swap: tuple[int, int] | None = None,
    stream: int | None = None,
) -> Tensor:
    """W (H, n, m): e_a^T W^h e_b = z(e_a, e_b) - z(e_a, 0) - z(0, e_b) + z(0, 0), z the logit
    of a query token for a key token at one pair of slots, which cancels biases and every term
    that depends only on the slots (ALiBi, relative buckets, the causal mask's zeros) or on one
    token and the slots (DeBERTa's content-to-position terms, SAM's relative positions).

    The states keep the captured call's layout (batch, *tokens, d), so windowed, 2-D (SAM's
    (B, h, w, d)) and fixed-length inputs (a relative position table sized for the image) run
    as captured. Each sequence holds K disjoint slot pairs, query slot 2k+1 and key slot 2k
    (cross attention, keys from key_value_states, encoder_hidden_states, ...: query slot k and
    key slot k of the key states): the logit of a pair depends on its two tokens only. Every
    pair gets the same query probe e_a (a = 0..n) and its own key probes: e_b for the b of
    round r at pair (b - 1) % K, r = (b - 1) // K + 1, and 0 in round 0; every term of a
    difference is then read at the same slot pair. Tokens of no pair are zero. The sequences
    run in chunks, the first a small one that checks the logits' shape: a module with large
    internal blocks (LongT5's local attention) then fails fast, in little memory. A captured
    batch of several sequences (Swin's windows) is filled whole, so per-window inputs (masks)
    stay aligned. A self-attention call of one token per sequence with no other tensor input
    (MobileViT's patches on a small image) is widened to two tokens. A channel-first map of
    1x1 convolutions (VQGAN: (B, C, H, W)) is probed with its positions as the tokens.

    swap: two axes of the module's states to exchange into (batch, tokens, d): (0, 1) for a
    sequence-first module (FSMT's and XLNet's (tokens, batch, d)), (1, 2) for a channels-first
    one (SqueezeBERT's (batch, d, tokens)); the probes are handed to it in its own layout.
    stream: the first softmax covers only the first `stream` tokens of a self-attention call
    (ProphetNet's main stream, the first of its 1 + ngram streams): the pairs lie in them."""
    args, kwargs = _keys_by_name(module, args, kwargs)
    original, key_states = _query_and_key_states(module, args, kwargs)
    key_name = None if key_states is None else "keys"  # cross attention
    first = swap is None and key_name is None and _channels_first(module, original)
    hidden = original.movedim(1, -1) if first else _swapped(original, swap)
    states = _swapped(key_states, swap) if key_name else hidden
    if hidden.ndim < 3 or states.ndim < 3 or states.shape[0] != hidden.shape[0]:
        raise RuntimeError("hidden states are not (batch, tokens, d)")
    lead, n, m = hidden.shape[0], hidden.shape[-1], states.shape[-1]
    layout = hidden.shape[1:]
    others = [v for v in (*args, *kwargs.values()) if isinstance(v, Tensor) and v is not original]
    if key_name is None and hidden.ndim == 3 and hidden.shape[1] == 1 and not others:
        layout = (2, n)  # one token per sequence (MobileViT's patches), and nothing sized by it
    t_q, t_k = math.prod(layout[:-1]), math.prod(states.shape[1:-1])
    if stream is not None and (key_name is not None or t_q % stream or len(layout) != 2):
        raise RuntimeError(f"logits over {stream} of {t_q} tokens")
    if key_name is None:
        t_k = t_q
        pairs = (stream or t_q) // 2
        q_slots, k_slots = torch.arange(pairs) * 2 + 1, torch.arange(pairs) * 2
    else:
        pairs = min(t_q, t_k)
        q_slots = k_slots = torch.arange(pairs)
    if pairs < 1:
        raise RuntimeError("the module sees fewer than two tokens")
    rounds = math.ceil(m / pairs) + 1
    count = (n + 1) * rounds
    rows = math.ceil(count / lead) * lead
    queries = torch.zeros(rows, t_q, n, dtype=F64)
    keys = queries if key_name is None else torch.zeros(rows, t_k, m, dtype=F64)
    probes_q = torch.cat([torch.zeros(1, n, dtype=F64), torch.eye(n, dtype=F64)])
    for a in range(n + 1):
        queries[a * rounds : (a + 1) * rounds, q_slots] = probes_q[a]
        for r in range(1, rounds):
            for k in range(pairs):
                b = (r - 1) * pairs + k  # e_{b+1}
                if b < m:
                    keys[a * rounds + r, k_slots[k], b] = 1.0
    # then the bilinearity check's sequences: query probes 0, e_1.. e_c and key probes e_1..
    # of the first round, all doubled: a bilinear logit gives 4 w; one a per-token norm
    # (Reformer's LSH keys, x / rms(x)) or a clamp leaves out of W^h does not
    checked, checked_keys = min(n, 3), min(pairs, m)
    extra = math.ceil(2 * (checked + 1) / lead) * lead
    more_q = torch.zeros(extra, t_q, n, dtype=F64)
    more_k = more_q if key_name is None else torch.zeros(extra, t_k, m, dtype=F64)
    for a in range(checked + 1):
        more_q[2 * a : 2 * a + 2, q_slots] = 2 * probes_q[a]
        for k in range(checked_keys):
            more_k[2 * a + 1, k_slots[k], k] = 2.0
    queries = torch.cat([queries, more_q]).reshape(-1, *layout).to(hidden.dtype)
    keys = torch.cat([keys, more_k]) if key_name is not None else keys
    keys = queries if key_name is None else keys.reshape(-1, *states.shape[1:]).to(states.dtype)
    rows += extra
    size = lead * max(1, min(256, 4096 // max(t_q, t_k)) // lead)
    kwargs = {k: None if k in _CACHES else v for k, v in kwargs.items()}

    def logits_of(x: Tensor, y: Tensor) -> Tensor:
        batch = x.shape[0]
        for batched in (False, True):  # other per-batch inputs (residual, ALiBi) follow the probes
            # every input that is the hidden states itself (CPM-Ant's forward(q_states,
            # kv_states, ...) in self-attention) gets the probes
            # and every input that is the key states (Funnel's value) gets the key probes
            probes = {id(original): x.movedim(-1, 1) if first else _swapped(x, swap)}
            if key_states is not None:
                probes[id(key_states)] = _swapped(y, swap)
            size_up = (batch, lead) if batched else None
            new_args = [_probe_input(a, probes, size_up) for a in args]
            new_kwargs = {k: _probe_input(v, probes, size_up) for k, v in kwargs.items()}
            capture = _Softmax()
            skipped = _input_norms_skipped(module, list(probes.values()))
            try:
                with torch.no_grad(), _quiet(), _Float64(), _UnitNorm(), capture, skipped:
                    module(*new_args, **new_kwargs)
                break
            except (RuntimeError, ValueError, AssertionError):  # FSMT asserts its mask's batch
                if batched:
                    raise
        logits, later = capture.logits, capture.later
        if logits is not None and t_q != t_k and logits.shape[-2:] == (t_k, t_q) and later:
            logits = later[0]  # bi-directional: the other direction's transposed logits first
        return logits

    z = []
    left = columns = None
    seen = (stream, stream) if stream else (t_q, t_k)
    bounds = [0, *range(min(4 * lead, rows), rows, size), rows]
    for start, stop in itertools.pairwise(bounds):
        # every later call runs the first sequences again (query 0 against key 0): a constant
        # the module subtracts per call (Grounding DINO's fusion: the call's largest logit) is
        # undone by their difference to the first call's; for any other module it is zero
        again = lead if start else 0
        x = torch.cat([queries[:again], queries[start:stop]])
        y = torch.cat([keys[:again], keys[start:stop]])
        logits = logits_of(x, y)
        if left is None and key_name is None and _blocked_context(logits, x.shape[0], t_q):
            left = _context_offset(logits_of, lead, layout, t_q, logits.shape[-2])
        if columns is None and key_name is not None and logits.shape[-1] == t_q + t_k:
            columns = _key_columns(logits, logits_of(x, y + 1.0), t_q, t_k)
        pair = _pair_logits(logits, x.shape[0], seen, q_slots, k_slots, key_name, left, columns)
        z.append(pair[again:] - (pair[:1] - z[0][:1]) if again else pair)
    zs = torch.cat(z)
    zr = zs[:count].reshape(n + 1, rounds, -1, pairs)  # (a, round, H, pair)
    w = zr - zr[:, :1] - zr[:1] + zr[:1, :1]  # (n + 1, rounds, H, pairs), a = 0 and r = 0 zero
    w = w[1:, 1:].permute(2, 0, 1, 3).reshape(w.shape[2], n, -1)[:, :, :m]  # b - 1 = (r-1)K + k
    ze = zs[rows - extra : rows - extra + 2 * (checked + 1)].reshape(checked + 1, 2, -1, pairs)
    doubled = ze[:, 1] - ze[:, 0] - ze[:1, 1] + ze[:1, 0]  # (c + 1, H, pairs)
    got = doubled[1:, :, :checked_keys].permute(1, 0, 2)
    want = 4 * w[:, :checked, :checked_keys]
    if not torch.allclose(got, want, rtol=1e-6, atol=1e-9 * float(want.abs().max())):
        raise RuntimeError("the logits are not bilinear in the module's inputs")
    return w


def _key_columns(logits: Tensor, moved: Tensor, t_q: int, t_k: int) -> slice:
    """Which t_k of the t_q + t_k key columns of a cross attention that attends the query and
    the key states together are the key states' (Evolla's and resamplers' [inputs; latents],
    PEGASUS-X's [global; token] states): those that change when only the key states do
    (moved: the logits with every key state shifted by 1); the query states' stay equal."""
    changed = (moved != logits).flatten(0, -2).any(0)  # (t_q + t_k,)
    if not changed[t_k:].any() and changed[:t_k].all():
        return slice(0, t_k)
    if not changed[:t_q].any() and changed[t_q:].all():
        return slice(t_q, t_q + t_k)
    raise RuntimeError("the key states' columns are not found among the keys")


def _blocked_context(logits, batch: int, t_q: int) -> bool:
    """Whether logits are (batch, H, blocks, L, C), C >= L: blocks of L queries, each against
    a context of C keys (Gemma 3n audio's local attention)."""
    return (
        logits is not None
        and logits.ndim == 5
        and logits.shape[0] == batch
        and logits.shape[-1] >= logits.shape[-2]
        and logits.shape[2] == math.ceil(t_q / logits.shape[-2])
    )


def _context_offset(logits_of, lead: int, layout: tuple, t_q: int, size: int) -> int:
    """P, where a block's context of keys starts P tokens before its first query, measured:
    one token t x (t = 0, 1, 2) in a block of zeros; z(2x) - 2 z(x) + z(0) in its query row
    keeps only what is quadratic in x, its logit against itself (x^T W^h x), in the column of
    its own key: that column minus its row. Columns of zero keys are linear in x (the query's
    bias and position terms) and vanish; masked columns are not read."""
    n = layout[-1]
    slot = size + size // 2 if t_q >= 2 * size else size // 2
    x = torch.randn(n, generator=torch.Generator().manual_seed(3), dtype=F64)
    zs = []
    for t in (0.0, 1.0, 2.0):
        states = torch.zeros(lead, t_q, n, dtype=F64)
        states[:, slot] = t * x
        states = states.reshape(lead, *layout)
        zs.append(logits_of(states, states)[0, :, slot // size, slot % size].to(F64))  # (H, C)
    stacked = torch.stack(zs)
    readable = (torch.isfinite(stacked) & (stacked > -1e300)).all(0).all(0)  # (C,)
    d2 = (zs[2] - 2 * zs[1] + zs[0]).abs().amax(0)  # (C,)
    d2 = torch.where(readable, d2, torch.zeros_like(d2))
    columns = (d2 > 1e-6 * d2.max()).nonzero().flatten() if d2.max() > 0 else d2[:0]
    if len(columns) != 1:
        raise RuntimeError("a token's own key is not found in its block's context")
    return int(columns[0]) - slot % size


def _pair_logits(
    logits, batch: int, tokens: tuple, q_slots, k_slots, cross, left=None, columns=None
) -> Tensor:
    """(batch, H, pairs): the logits of the slot pairs, from (batch, H, t_q, t_k) or
    (batch * H, t_q, t_k) logits, or from blocked local attention's (batch, blocks, H, L, 3L)
    (LongT5: the keys of a block's queries are the previous, own and next blocks; a query slot
    p is row p % L of block p // L, a key slot p' of that block column L + p' % L), or from
    (batch * blocks, H, L, L) (Granite Speech: blocks of L tokens each attended alone, the last
    padded; a slot p is row and column p % L of block p // L), or from (batch, H, blocks, L, C)
    given left, the measured offset of a block's context (``_context_offset``: a key slot p'
    of block p // L is column left + p' % L). columns: where cross attention's keys are those
    of the query and the key states together, the key states' columns (``_key_columns``)."""
    t_q, t_k = tokens
    if logits is None:
        raise RuntimeError("no softmax was seen")
    if columns is not None and logits.shape[-2:] == (t_q, t_q + t_k):
        logits = logits[..., columns]  # the key states' of keys of [query; key] states, or so
    if logits.ndim == 5 and logits.shape[2] == 1 and logits.shape[-2:] == (t_q, t_k):
        logits = logits[:, :, 0]  # (batch, H, windows, L, L) of one window (Hiera's mask units)
    if logits.shape[-2:] == (t_q, t_k) and (
        (logits.ndim == 4 and logits.shape[0] == batch)
        or (logits.ndim == 3 and logits.shape[0] % batch == 0)
    ):
        return logits.reshape(batch, -1, t_q, t_k)[:, :, q_slots, k_slots].to(F64)
    size = logits.shape[-2] if logits.ndim == 5 else 0
    if (
        size
        and cross is None
        and logits.shape[0] == batch
        and logits.shape[-1] == 3 * size
        and logits.shape[1] * size >= t_q
        and bool((q_slots // size == k_slots // size).all())
    ):
        picked = logits[:, q_slots // size, :, q_slots % size, size + k_slots % size]
        return picked.permute(1, 2, 0).to(F64)  # (pairs, batch, H) -> (batch, H, pairs)
    if left is not None and cross is None and _blocked_context(logits, batch, t_q):
        size = logits.shape[-2]  # the key of slot p' of block u: column left + p' % L
        if bool((q_slots // size == k_slots // size).all()):
            picked = logits[:, :, q_slots // size, q_slots % size, left + k_slots % size]
            return picked.to(F64)  # (batch, H, pairs)
    size = logits.shape[-1] if logits.ndim == 4 else 0
    blocks = math.ceil(t_q / size) if size else 0
    if (
        blocks > 1  # one block longer than the tokens is no evidence of blocks: SqueezeBERT's
        # (batch, d, tokens) read as (batch, tokens, d) gives (batch, H, d, d) logits
        and cross is None
        and logits.shape[0] == batch * blocks
        and logits.shape[-2] == size
        and bool((q_slots // size == k_slots // size).all())
    ):  # blocks of `size` tokens attended alone, folded into the batch, the last right-padded
        blocked = logits.reshape(batch, blocks, -1, size, size)
        picked = blocked[:, q_slots // size, :, q_slots % size, k_slots % size]
        return picked.permute(1, 2, 0).to(F64)
    raise _LogitShape(logits.shape)


class _LogitShape(RuntimeError):
    """Logits of a shape the probe's slots do not index."""

    def __init__(self, shape) -> None:
        super().__init__(f"no (batch, heads, query, key) logits were seen: {tuple(shape)}")
        self.shape = tuple(shape)


def _stream_alone(module, args, kwargs, swap, stream: int) -> bool:
    """Whether the first softmax's logits depend on the first `stream` tokens alone: the same
    for two random fillings of the others (not so where the module pools its tokens)."""
    original = args[0] if args else kwargs[_hidden_name(module, kwargs)]
    generator = torch.Generator().manual_seed(3)
    logits = []
    for _ in range(2):
        x = _swapped(original, swap).clone()
        x[:, stream:] = torch.randn(x[:, stream:].shape, generator=generator, dtype=x.dtype)
        own = _swapped(x, swap)
        new_args = [own if a is original else a for a in args]
        new_kwargs = {
            k: own if v is original else None if k in _CACHES else v for k, v in kwargs.items()
        }
        capture = _Softmax()
        with torch.no_grad(), _quiet(), _Float64(), _UnitNorm(), capture:
            module(*new_args, **new_kwargs)
        logits.append(capture.logits)
    first, second = logits
    return (
        first is not None
        and second is not None
        and first.shape == second.shape
        and torch.allclose(first, second, rtol=1e-12, atol=0.0)
    )


def _in_own_layout(module, args, kwargs) -> tuple[Tensor, dict]:
    """``_bilinear_once`` in the first layout of the module's states that gives finite logits
    for every head: (batch, tokens, d) as captured, else sequence-first, else channels-first
    (a wrong layout fails on the logits' shape), its logits over all tokens or, where they are
    square over fewer, a leading stream of them; and that layout (swap, stream)."""
    hidden = args[0] if args else kwargs[_hidden_name(module, kwargs)]
    swaps: list = [None]
    if hidden.ndim == 3:  # other layouts only where plausible: probes of a wrong one may
        # number in the thousands (a long sequence's tokens read as its width)
        t, b, d = hidden.shape[0], hidden.shape[1], hidden.shape[2]
        swaps += [(0, 1)] if t >= 2 and b <= t else []  # (tokens, batch, d)
        swaps += [(1, 2)] if b <= d else []  # (batch, d, tokens): d no wider than tokens
    error: Exception | None = None
    for swap in swaps:
        stream = None
        try:
            w = _bilinear_once(module, args, kwargs, swap)
        except _LogitShape as failure:  # square logits over fewer tokens: a leading stream
            stream = failure.shape[-1] if failure.shape[-2] == failure.shape[-1] else None
            try:
                alone = stream and _stream_alone(module, args, kwargs, swap, stream)
                w = _bilinear_once(module, args, kwargs, swap, stream) if alone else None
            except Exception:
                w = None
            if w is None:
                error = error or failure
                continue
        except Exception as failure:  # a module asserts its own layout (FSMT)
            error = error or failure
            continue
        if torch.isfinite(w).all() and _measured(list(w)):
            return w, {"swap": swap, "stream": stream}
        error = error or RuntimeError("masked or non-finite logits")
    raise error if isinstance(error, RuntimeError) else RuntimeError(str(error))


def _by_name(module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A call of a module that takes q and k apart (``_QK_APART``) with its positional inputs
    passed by name (Grounding DINO's fusion: attn(vision_features, text_features)), so that its
    key input is found."""
    if not args:
        return args, kwargs
    names = list(inspect.signature(module.forward).parameters)
    if not names or names[0] not in {q for q, _ in _QK_APART} or len(args) > len(names):
        return args, kwargs
    return (), {**dict(zip(names, args, strict=False)), **kwargs}


class _TimeFirst(nn.Module):
    """A module that takes (tokens, batch, d) inputs (DETR-style decoders' attention, which
    permutes them itself), called with them batch-first: the inputs in `flipped` (names, or
    positions of positional ones) are transposed back before the call."""

    def __init__(self, module: nn.Module, flipped: set) -> None:
        super().__init__()
        self.inner, self.flipped = module, flipped

    def forward(self, *args, **kwargs):
        args = [a.transpose(0, 1) if i in self.flipped else a for i, a in enumerate(args)]
        kwargs = {k: v.transpose(0, 1) if k in self.flipped else v for k, v in kwargs.items()}
        return self.inner(*args, **kwargs)


def _time_first(module, args, kwargs) -> tuple[nn.Module, tuple, dict] | None:
    """A captured call whose hidden states are (tokens, 1, d) (the dummy batch of one second),
    made batch-first: every such 3-D input transposed (one tensor, one transposed view: an input
    that is the hidden states stays so), and the module wrapped to transpose them back. None
    where the call is not so laid out."""
    hidden, _ = _states(args, kwargs)
    if hidden.ndim != 3 or hidden.shape[1] != 1 or hidden.shape[0] < 2:
        return None
    views: dict[int, Tensor] = {}

    def flip(value):
        if isinstance(value, Tensor) and value.ndim == 3 and value.shape[1] == 1:
            return views.setdefault(id(value), value.transpose(0, 1))
        return None

    flipped = {i for i, a in enumerate(args) if flip(a) is not None}
    flipped |= {k for k, v in kwargs.items() if flip(v) is not None}
    new_args = tuple(flip(a) if i in flipped else a for i, a in enumerate(args))
    new_kwargs = {k: flip(v) if k in flipped else v for k, v in kwargs.items()}
    return _TimeFirst(module, flipped), new_args, new_kwargs


def probe_logits(module, args, kwargs) -> list[Tensor]:
    """Per query head W^h of a module that computes its logits itself (no attention interface),
    read off its pre-softmax logits on probe tokens (``_bilinear_once``); where its captured
    call cannot be probed so and its inputs are time-first, with them made batch-first. Norms
    applied to its very inputs are probed after (``_input_norms_skipped``)."""
    args, kwargs = _by_name(module, args, kwargs)
    mask = kwargs.get("attention_mask")
    if (
        isinstance(mask, Tensor)
        and mask.is_floating_point()
        and mask.ndim == 2
        and bool((mask < -1e4).any())
    ):
        # an additive padding mask of the key tokens (batch, keys), which the probes fill
        # whole: a key it hides carries no measurement (PEGASUS-X pads its tokens to whole
        # blocks, its staggered layers half a block more), a visible one adds a constant the
        # differences cancel; with every key visible each logit is the same q.k
        kwargs = {**kwargs, "attention_mask": torch.zeros_like(mask)}
    try:
        return _probe_logits(module, args, kwargs)
    except (RuntimeError, ValueError):
        batch_first = _time_first(module, args, kwargs)
        if batch_first is None:
            raise
        return _probe_logits(*batch_first)


def _probe_logits(module, args, kwargs) -> list[Tensor]:
    saved: dict = {}
    has_norm = any(
        isinstance(getattr(sub, a, None), float)
        for sub in module.modules()
        for a in _EPS_ATTRIBUTES
    )

    subset = _query_subset(module, args, kwargs)
    try:
        if has_norm:
            _set_eps(module, _EPS, saved)
        if subset:  # queries of a subset of the tokens (LeViT's subsampling attention)
            w, layout = _subsampled_once(module, args, kwargs), {}
        else:
            w, layout = _in_own_layout(module, args, kwargs)
        if has_norm:
            _set_eps(module, _EPS * 1e4, saved)
            if subset:
                again = _subsampled_once(module, args, kwargs)
            else:
                again = _bilinear_once(module, args, kwargs, **layout)
            a = _power(w, again)
            if abs(a - round(a)) > 1e-6:
                raise RuntimeError(f"logits not bilinear under huge eps (power {a})")
            w = w * _EPS ** (round(a) / 2)
    finally:
        _set_eps(module, None, saved)
    if not torch.isfinite(w).all():
        raise RuntimeError("masked or non-finite logits")
    return list(w)


def _query_subset(module, args, kwargs) -> bool:
    """Whether a self-attention module softmaxes fewer query rows than it has tokens, over all
    of them as keys (LeViT's subsampling attention: the queries of every stride-th token)."""
    hidden = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(hidden, Tensor) or hidden.ndim != 3 or any(k in kwargs for k in _KEY_INPUTS):
        return False
    capture = _Softmax()
    try:
        with torch.no_grad(), _quiet(), _Float64(), capture:
            module(*args, **kwargs)
    except (RuntimeError, ValueError):
        return False
    z = capture.logits
    t = hidden.shape[1]
    if not (z is not None and z.ndim == 4 and z.shape[0] == hidden.shape[0]):
        return False
    if not (z.shape[-1] == t and 1 < z.shape[-2] < t) or hidden.shape[0] != 1:
        return False
    return _rows_read_one_token(module, args, kwargs, hidden)


def _rows_read_one_token(module, args, kwargs, hidden: Tensor) -> bool:
    """Whether the first and the last query row each read exactly one token (a subset of the
    tokens, not a pooling of several, which is no bilinear form): token i changed in sequence i
    of a batch, the rows' logits for the other keys change only where i is the row's token."""
    t = hidden.shape[1]
    generator = torch.Generator().manual_seed(3)
    base = torch.randn(1, t, hidden.shape[2], generator=generator, dtype=F64)
    x = base.expand(t + 1, -1, -1).clone()
    x[torch.arange(t), torch.arange(t)] = torch.randn(
        t, hidden.shape[2], generator=generator, dtype=F64
    )
    x = x.to(hidden.dtype)
    capture = _Softmax()
    try:
        with torch.no_grad(), _quiet(), _Float64(), capture:
            module(
                *[x if a is hidden else a for a in args],
                **(kwargs if args else {"hidden_states": x}),
            )
    except (RuntimeError, ValueError):
        return False
    z = capture.logits
    if z is None or z.shape[0] != t + 1:
        return False
    rows = z[:, :, [0, -1]].to(F64)  # (t + 1, H, 2, t)
    changed = (rows[:t] - rows[t:]).abs() > 1e-9 * float(rows.abs().max())
    own = torch.eye(t, dtype=torch.bool)[:, None, None, :]  # key i's own column changes anyway
    feeds = (changed & ~own).flatten(1, 2).any(-1)  # (t, 2): token i feeds row r's query
    return bool((feeds.sum(0) == 1).all())


def _subsampled_once(module, args, kwargs) -> Tensor:
    """W (H, n, n) of a self-attention whose queries are a subset of its tokens (``_query_subset``),
    which token each query row reads unknown: every token is the query probe e_a but K key
    slots c_k, which hold key probes (0 in round 0, then e_b for b = (r - 1) K + k + 1); the
    logits of the first and the last query row for each key slot, doubly differenced at that
    slot (position terms cancel). A row whose query is a key slot's token would not be
    e_a^T W e_b: both rows must agree."""
    hidden = args[0] if args else kwargs["hidden_states"]
    t, n = hidden.shape[1], hidden.shape[2]
    slots = torch.arange(1, t - 1)[: max(1, min(16, t - 2))]  # key slots, first and last apart
    width = len(slots)
    rounds = math.ceil(n / width) + 1
    probes = torch.cat([torch.zeros(1, n, dtype=F64), torch.eye(n, dtype=F64)])
    x = probes.repeat_interleave(rounds, 0)[:, None].expand(-1, t, -1).clone()  # (a, round)
    x[:, slots] = 0.0
    for r in range(1, rounds):
        for k in range(width):
            b = (r - 1) * width + k
            if b < n:
                x[r::rounds, slots[k], b] = 1.0
    x = x.to(hidden.dtype)
    kwargs = {k: None if k in _CACHES else v for k, v in kwargs.items()}
    rows = []
    for chunk in x.split(64):
        new_args = [chunk if a is hidden else a for a in args]
        new_kwargs = kwargs if args else {**kwargs, "hidden_states": chunk}
        capture = _Softmax()
        with torch.no_grad(), _quiet(), _Float64(), capture, _input_norms_skipped(module, [chunk]):
            module(*new_args, **new_kwargs)
        z = capture.logits
        if z is None or z.shape[0] != chunk.shape[0] or z.shape[-1] != t:
            raise RuntimeError("no (batch, heads, query rows, key) logits were seen")
        rows.append(z[:, :, [0, -1]][..., slots].to(F64))  # (chunk, H, 2, K)
    z = torch.cat(rows).reshape(n + 1, rounds, -1, 2, width)  # (a, round, H, row, k)
    w = (z - z[:, :1] - z[:1] + z[:1, :1])[1:, 1:]  # (n, rounds - 1, H, 2, K)
    w = w.permute(2, 3, 0, 1, 4).reshape(w.shape[2], 2, n, -1)[..., :n]  # (H, row, a, b)
    if not torch.allclose(w[:, 0], w[:, 1], rtol=1e-9, atol=1e-12 * float(w.abs().max())):
        raise RuntimeError("a query row of the subset reads a key slot's token")
    return w[:, 0]


def probe_torch_mha(module: nn.MultiheadAttention) -> list[Tensor]:
    """Per query head W^h of torch's nn.MultiheadAttention over its query and key inputs, from
    the pre-softmax logits F.multi_head_attention_forward computes (need_weights=True) for the
    query probes [0, e_1, ..., e_n] against the key probes [0, e_1, ..., e_m]:
    W^h[i, j] = z(e_i, e_j) - z(e_i, 0) - z(0, e_j) + z(0, 0), which cancels in_proj_bias.
    Reads no parameter: what the module computes, in torch's own code."""
    n, m = module.embed_dim, module.kdim
    dtype = next(module.parameters()).dtype
    query = torch.cat([torch.zeros(1, n, dtype=dtype), torch.eye(n, dtype=dtype)])
    key = torch.cat([torch.zeros(1, m, dtype=dtype), torch.eye(m, dtype=dtype)])
    value = torch.zeros(m + 1, module.vdim, dtype=dtype)
    batch = 0 if module.batch_first else 1
    capture = _Softmax()
    with torch.no_grad(), capture:
        module(
            query.unsqueeze(batch),
            key.unsqueeze(batch),
            value.unsqueeze(batch),
            need_weights=True,
            average_attn_weights=False,
        )
    if capture.logits is None:
        raise RuntimeError("no softmax was seen")
    z = capture.logits.to(F64)[:, :, : m + 1]  # (heads, n + 1, m + 1): bias_k, zero keys cut
    return list(z[:, 1:, 1:] - z[:, 1:, :1] - z[:, :1, 1:] + z[:, :1, :1])


def _projected_inside(model: nn.Module, modules: list[nn.Module], tokens: int) -> set[int]:
    """ids of the nn.MultiheadAttention modules whose query or key input, in a forward pass, is
    the output of a Linear layer of the module holding them (Aria's cross attention: q_proj,
    k_proj, then the MHA's own in_proj): their W^h is not the MHA's alone, so the generic
    probe leaves them to a dedicated test."""
    outputs: dict[int, set[int]] = {}  # id(parent) -> data_ptrs of its Linear outputs
    parents = {id(child): parent for parent in model.modules() for child in parent.children()}
    found: set[int] = set()

    def linear_hook(owner):
        def hook(module, args, output):
            outputs.setdefault(id(owner), set()).add(output.data_ptr())

        return hook

    def mha_hook(module, args, kwargs):
        inputs = list(args[:2]) + [kwargs.get(k) for k in ("query", "key")]
        seen = outputs.get(id(parents.get(id(module))), set())
        if any(isinstance(x, Tensor) and x.data_ptr() in seen for x in inputs):
            found.add(id(module))

    handles = []
    for module in modules:
        parent = parents.get(id(module))
        if parent is None:
            continue
        handles.append(  # only this call's outputs: a freed tensor's memory is reused
            parent.register_forward_pre_hook(lambda p, args: outputs.pop(id(p), None))
        )
        for child in parent.children():
            if isinstance(child, nn.Linear):
                handles.append(child.register_forward_hook(linear_hook(parent)))
        handles.append(module.register_forward_pre_hook(mha_hook, with_kwargs=True))
    try:
        _run(model, tokens)
    finally:
        for handle in handles:
            handle.remove()
    return found


_ATTENTION_CLASS = re.compile("attention|attn")


def _leaf_attention_modules(model: nn.Module, exclude: set[int]) -> list[nn.Module]:
    """Modules whose class is named *Attention* or *Attn* (VQGAN's AttnBlock) and that hold
    no other such module."""
    found = []
    for module in model.modules():
        if not _ATTENTION_CLASS.search(type(module).__name__.lower()) or id(module) in exclude:
            continue
        inner = [m for m in module.modules() if m is not module]
        if any(
            _ATTENTION_CLASS.search(type(m).__name__.lower()) or id(m) in exclude for m in inner
        ):
            continue
        found.append(module)
    return found


def _measured(matrices: list[Tensor]) -> bool:
    """Whether a probe saw every head's q and k move: random weights never give a head W^h = 0,
    so a zero matrix means the probes did not reach its logits (BigBird swaps its attention
    module during forward; TrOCR's cross attention keys), not a measurement."""
    return bool(matrices) and all(bool(m.any()) for m in matrices)


def probe_model(model: nn.Module, tokens: int = 72) -> tuple[list[ProbedModule], list[str]]:
    """Every attention module the model runs, probed; and the paths of those it could not probe.

    Modules that call transformers' attention interface are probed through it; other modules
    named *Attention* through their pre-softmax logits (self-attention only).
    """
    try:
        calls, runs = _run(model, tokens), True
    except RuntimeError:  # no dummy input drives it: each module is called on its own
        calls, runs = [], False
    modules = list(dict.fromkeys(call[0] for call in calls))
    paths = {id(m): name for name, m in model.named_modules()}
    others = _leaf_attention_modules(model, {id(m) for m in modules})
    inputs = _capture_inputs(model, modules, tokens) if modules else {}
    sources = _key_sources(calls)
    short = _capture_inputs(model, others, 2) if others and runs else {}
    # each module's call in the full pass too: a tower that needs more tokens than 2 (or whose
    # decoder then gets one), probed in that call's own layout (``_bilinear_once``)
    long = _capture_inputs(model, others, tokens) if others and runs else {}
    mha = [m for m in others if isinstance(m, nn.MultiheadAttention)]
    projected: set[int] = set()
    for count, group in (
        (2, [m for m in mha if id(m) in short]),
        (tokens, [m for m in mha if id(m) in long and id(m) not in short]),
    ):
        projected |= _projected_inside(model, group, count) if group else set()
    out: list[ProbedModule] = []
    failed: list[str] = []
    retry: list[nn.Module] = []  # run, but not probed in the call that ran them
    with recording(model) as recorder:
        for module in modules:
            if id(module) not in inputs:
                retry.append(module)
                continue
            args, kwargs = inputs[id(module)]
            source = sources.get(id(module))
            if source is not None:
                source = (source, *inputs[id(source)])
            # a rotary module inside the attention module (Kyutai) rotates by the replayed
            # positions: held at position 0 like the ones outside, whose outputs were captured
            inner = [
                m.register_forward_hook(_position_zero)
                for m in module.modules()
                if m is not module and re.search(_ROTARY, type(m).__name__.lower())
            ]
            try:
                matrices, kv = probe_module(model, module, args, kwargs, recorder, source)
            except RuntimeError:
                matrices = []
            finally:
                for hook in inner:
                    hook.remove()
            if not _measured(matrices):
                retry.append(module)
                continue
            out.append(ProbedModule(paths[id(module)], matrices, kv))
    for module in [*others, *retry]:
        calls = [c[id(module)] for c in (short, long) if id(module) in c]
        if len(calls) == 2 and _probe_cost(module, *calls[1]) * 4 < _probe_cost(module, *calls[0]):
            # the full pass's call first where it is far cheaper to probe (cross attention to
            # the 2 keys of the short pass needs d / 2 rounds of probes: Evolla's compressor)
            calls.reverse()
        matrices, kv = None, None
        unrun = isinstance(module, nn.MultiheadAttention) and not calls
        if id(module) in projected or unrun:
            calls = [] if id(module) in projected else calls
            found = _probe_projected(model, module, tokens, ran=not unrun)
            if found is not None:
                out.append(ProbedModule(paths[id(module)], found[0], None, found[1]))
                continue
        elif calls and isinstance(module, nn.MultiheadAttention):
            calls = calls[:1]
        # then, where the captured calls cannot be probed, the module on its own
        direct = (
            []
            if isinstance(module, nn.MultiheadAttention) or id(module) in projected
            else (_direct_calls(model, module, tokens))
        )
        for number, (args, kwargs) in enumerate([*calls, *direct]):
            alone = number >= len(calls)
            try:
                if isinstance(module, nn.MultiheadAttention):
                    matrices = probe_torch_mha(module)
                elif alone:
                    matrices, kv = _probe_direct(model, module, args, kwargs)
                else:
                    matrices = probe_logits(module, args, kwargs)
            except Exception:
                continue
            if _measured(matrices):
                break
            matrices = None
        if matrices is None:
            failed.append(paths[id(module)])
            continue
        out.append(ProbedModule(paths[id(module)], matrices, kv, alone))
    return out, failed


def _probe_projected(
    model: nn.Module, mha: nn.MultiheadAttention, tokens: int, ran: bool
) -> tuple[list, bool] | None:
    """W^h of an nn.MultiheadAttention whose query and key inputs its owner projects first
    (``_projected_inside``: Aria's cross attention, q_proj and k_proj then the MHA's in_proj),
    or that no forward pass runs, read off its owner's logits: the owner called as in a forward
    pass, else on its own (its inputs by name: queries from hidden_states, keys from
    key_value_states), with the probes as the outputs of its input LayerNorms
    (``_input_norms_skipped``: a LayerNorm centers each token; W^h acts on its output, as
    qkmonitor defines it for any layer's input norm). ran: whether a forward pass runs it.
    Also whether the owner was called on its own."""
    owner = next((m for m in model.modules() if any(c is mha for c in m.children())), None)
    if owner is None:
        return None
    signature = inspect.signature(owner.forward)
    calls = []
    for count in dict.fromkeys([2, tokens]) if ran else []:
        seen = _capture_inputs(model, [owner], count)
        if id(owner) in seen:
            args, kwargs = seen[id(owner)]
            calls.append((dict(signature.bind(*args, **kwargs).arguments), False))
    key = next((n for n in signature.parameters if n in _QK_CROSS), None)
    width, key_width = _in_width(owner, _Q_NAME), _in_width(owner, _K_NAME)
    if not calls and key and width and key_width and "hidden_states" in signature.parameters:
        generator = torch.Generator().manual_seed(2)
        x = torch.randn(1, tokens, width, generator=generator, dtype=F64)
        y = torch.randn(1, tokens, key_width, generator=generator, dtype=F64)
        calls.append(({"hidden_states": x, key: y}, True))
    for named, alone in calls:
        if "hidden_states" not in named or any(
            signature.parameters[n].kind in (inspect.Parameter.VAR_POSITIONAL,) for n in named
        ):
            continue
        try:
            matrices = probe_logits(owner, (), named)
        except Exception:
            continue
        if _measured(matrices):
            return matrices, alone
    return None


def _probe_cost(module, args, kwargs) -> float:
    """About the tokens ``_bilinear_once`` runs through a module for one captured call: rounds
    of key probes (key width / slot pairs + 1) times the tokens of a sequence (inf: unknown)."""
    try:
        args, kwargs = _keys_by_name(module, args, kwargs)
        hidden, keys = _query_and_key_states(module, args, kwargs)
    except (KeyError, IndexError, TypeError, ValueError):
        return math.inf
    if not isinstance(hidden, Tensor) or hidden.ndim < 3:
        return math.inf
    t_q = math.prod(hidden.shape[1:-1])
    t_k = math.prod(keys.shape[1:-1]) if isinstance(keys, Tensor) and keys.ndim >= 3 else 0
    pairs = min(t_q, t_k) if t_k else t_q // 2
    width = keys.shape[-1] if t_k else hidden.shape[-1]
    return (math.ceil(width / max(pairs, 1)) + 1) * (t_q + t_k)


def _probe_direct(model, module, args, kwargs) -> tuple[list[Tensor], list[int] | None]:
    """A module called on its own (``_direct_calls``): probed through transformers' attention
    interface where this call reaches it, else through its pre-softmax logits."""
    with recording(model) as recorder:
        with torch.no_grad(), _quiet(), _Float64():
            module(*args, **kwargs)
        if any(call[0] is module for call in recorder.calls):
            try:
                return probe_module(model, module, args, kwargs, recorder)
            except RuntimeError:
                learned = _learned_query(module, args, kwargs)
                if learned is None:
                    raise
                return probe_module(model, module, args, kwargs, recorder, learned=learned)
    return probe_logits(module, args, kwargs), None


def _learned_query(module: nn.Module, args, kwargs) -> str | None:
    """The name of the module's own parameter (1, 1, d) that its query projection reads instead
    of its input (VideoPrism's attention pooling: one learned query attends over the tokens),
    seen in a call: the projection's input is that parameter, expanded over the batch. Its
    W^h is then between that query input and the key tokens: probed with the parameter given
    the probes (as the SigLIP head's nn.MultiheadAttention is over its query input)."""
    projection = _query_projection(module)
    candidates = {
        name: p
        for name, p in module._parameters.items()
        if p is not None and p.ndim == 3 and p.shape[:2] == (1, 1)
    }
    if projection is None or not candidates:
        return None
    seen: list[Tensor] = []
    handle = projection.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    try:
        with torch.no_grad(), _quiet(), _Float64():
            module(*args, **kwargs)
    finally:
        handle.remove()
    for name, p in candidates.items():
        if seen and seen[0].untyped_storage().data_ptr() == p.untyped_storage().data_ptr():
            return name
    return None
