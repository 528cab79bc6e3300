"""Discovery against the behavioural reference, over a curated list of architectures.

For each model_type a tiny float64 model is built from its shrunken default config, saved with
save_pretrained (safetensors, in whatever key layout transformers writes), and audited. Every
head must equal, to 1e-6 relative, the naive float64 statistics of the W^h that
tests/support/behaviour.py derives from the query and key the model itself passes to its
attention computation; and every attention module the model runs must be audited exactly once.
Or the audit must refuse with the one-line reason listed here. Nothing here reads the table.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import re
import time
from dataclasses import replace
from unittest import mock

import pytest
import torch
from support.behaviour import build, probe_logits, probe_model, shrink, shrunken_dict
from support.checks import one_line_error
from support.naive import naive_stats, relative_errors
from support.verify import _loaded_names, verify

import qkmonitor
from qkmonitor.errors import CorruptWeightsError, UnsupportedModelError
from qkmonitor.weights import discovery
from qkmonitor.weights.discovery import plan
from qkmonitor.weights.sources import open_source

#: model_type -> "exact", or a substring of the one-line refusal
EXPECTED = {
    **dict.fromkeys(
        # text decoders (QK-norm, gated q, hybrids, MoE, fused layouts, other scales)
        "llama mistral mixtral qwen2 qwen2_moe qwen3 qwen3_moe qwen3_next gemma gemma2 "  # noqa: SIM905
        "gemma3_text phi phi3 olmo olmo2 olmo3 olmoe exaone4 minimax_m2 lfm2 apertus granite "
        "granitemoe gpt_neo gpt2 gpt_neox gptj opt falcon starcoder2 cohere cohere2 stablelm glm "
        "glm4 ernie4_5 smollm3 arcee seed_oss jamba mpt gpt_bigcode helium gpt_oss "
        # multi-head latent attention
        "deepseek_v3 minicpm3 glm4_moe_lite sarvam_mla "
        # encoder-decoder (self, decoder self and cross attention apart)
        "t5 mt5 umt5 bart mbart marian pegasus m2m_100 nllb-moe blenderbot whisper "
        "switch_transformers "
        # encoders
        "bert roberta xlm-roberta electra camembert distilbert deberta deberta-v2 mpnet albert "
        "modernbert ernie "
        # vision, audio
        "vit deit dinov2 dinov3_vit vit_mae beit siglip clip wav2vec2 hubert "
        # multimodal: every tower
        "gemma3 llava llava_next idefics3 smolvlm paligemma "
        # issue 10: GPT-style Conv1D, renamed or fused projections; q/k that transformers cuts
        # out of one fused checkpoint tensor when loading (Chunk/Split along rows)
        "openai-gpt imagegpt gpt_neox_japanese ibert codegen gte jina_embeddings_v3 nomic_bert "
        "molmo2_text radio sarvam_moe tipsv2_vision_model moshi lara_mini "
        # issue 10: scales, head sizes and norms read off the modules (MODULE_RULES)
        "bigbird_pegasus megatron-bert rembert roformer tapas visual_bert bitnet "
        "diffllama llama4_text muse_spark_text internvl_vision qianfan_ocr "
        "mlcd_vision_model openai_privacy_filter "
        # made verifiable by the reference (towers run, ALiBi, torch's MHA, MLA with top-k)
        "qwen3_vl qwen2_5_vl mistral3 blip-2 instructblip bloom wavlm deepseek_v2 "
        "siglip2_vision_model parakeet_encoder omniasr_audio patchtst qwen3_5 exaone4_5 "
        # issue 17: value norms left out, keys shared across layers; latent attention with a
        # sparse-attention indexer, output gates, a RoPE-key norm, per-head query scales
        "gemma3n_text gemma4_text deepseek_v32 glm_moe_dsa mistral_large4_text hy_v4 "
        "dots3_note_text ctrl".split(),
        "exact",
    ),
    # issue 10: true refusals
    "longformer": "two W^h per head",
    "lilt": "second q.k of the layout stream",
    "xlstm": "no softmax attention",
    "yoso": "LSH collision probabilities",
    "groupvit": "an assignment of tokens to groups",
    "persimmon": "removes the mean (LayerNorm)",
    "jetmoe": "mixture of attention heads",
    "swiftformer": "no W^h",
    "rwkv": "no softmax over q.k",
    "inkling2_text": "short convolution over neighbouring tokens",
    "mamba": "has no attention layers",
    "led": "two W^h per head",
    # its layer passes one tensor as query_tensor and key_tensor in every bottleneck mode
    "mobilebert": "exact",
    "inkling_text": "mixes neighbouring tokens",
    # build helper (issue 10): types the shrinker now builds (were unbuildable)
    **dict.fromkeys(
        "dbrx ministral hunyuan_v1_dense granitemoehybrid nemotron esm recurrent_gemma "  # noqa: SIM905
        "dots1 lfm2_moe".split(),
        "exact",
    ),
    "blt": "normalize its inputs before q_proj and k_proj",
    # issue 17: its q_norm/k_norm are LayerNorms over head_dim with a fixed epsilon (1e-5)
    "chameleon": "removes the mean (LayerNorm)",
    "axk2": "normalized and the raw q latent",
    # saved by transformers itself: never "incomplete"; its fused gqkv_proj is read as rows
    # [gate; Q; K; V] (issue 17.6)
    "hrm_text": "exact",
    # issue 17.5: LUKE's default entity-aware attention has a query projection per pair of
    # token kinds (exact without it: test_luke_without_entity_aware_attention_...)
    "luke": "four W^h per head",
    # issue 17: key heads per layer (full attention in the first and last layers, grouped
    # between), shrunk with the query heads
    "sapiens2": "exact",
    # a Q-Former's self attention audited, its cross attention (64-wide queries, 1408-wide
    # image keys: no square W^h) listed in not_audited; verify checks the model's own form is
    # rectangular there
    "blip_2_qformer": "exact",
    "instructblip_qformer": "exact",
    # its rotary module sits inside the attention module: the reference holds it at position 0
    # while it replays the module (without that it reported a 3% eig_var difference)
    "kyutai_speech_to_text": "exact",
    # DETR-style decoder attention adds position embeddings to its q/k inputs: the reference
    # zeroes them (a position term) while probing; with them it called the exact audit wrong
    "maskformer": "exact",
    # issue 17: Beam's NoPE layers scale the queries by (1 + (pos + 1) / 2048) ** 0.1, read at
    # position 0 (its tiny model runs with one expert group of the shrunken experts);
    # Autoformer's AutoCorrelation is a softmax over time delays, not over q.k
    "beam": "exact",
    "autoformer": "it is auto-correlation",
}


@pytest.mark.parametrize("model_type", sorted(EXPECTED))
def test_audit_equals_what_the_model_computes(model_type, tmp_path):
    config = shrink(model_type)
    if config is None:
        pytest.skip(f"transformers rejects a shrunken {model_type} config")
    outcome = verify(config, tmp_path)
    expected = EXPECTED[model_type]
    if expected == "exact":
        assert outcome.status == "exact", outcome.detail
        assert outcome.heads > 0
    else:
        assert outcome.status == "refused", outcome
        assert expected in outcome.detail and "\n" not in outcome.detail


class _FirstSoftmax(torch.overrides.TorchFunctionMode):
    """Records the input of the first softmax (a module's pre-softmax scores), keeping float64
    where the module casts its scores to float32."""

    scores = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.float and args[0].dtype == torch.float64:
            return args[0]
        if func is torch.nn.functional.softmax and self.scores is None:
            self.scores = args[0].detach()
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind", ["local", "transient-global"])
def test_longt5_heads_equal_its_blocked_logits(kind, tmp_path):
    """LongT5's encoder computes (block, 3 blocks [+ global]) score windows itself, which the
    generic reference cannot read ("unverifiable"). Here two tokens, a key e_j then a query e_i,
    fill one block: the query's score for the key token (window column block_len + 0), with
    the terms of one token alone cancelled, is x_i^T W^h x_j, unscaled like T5."""
    config = shrink("longt5")
    config.encoder_attention_type, config.local_radius = kind, 3
    model = build(config)
    model.save_pretrained(tmp_path)
    heads = {(h.layer, h.head): h for h in qkmonitor.audit(tmp_path).heads if h.block == "encoder"}
    assert heads
    for index, block in enumerate(model.encoder.block[:1]):  # it computes its position bias
        layer = block.layer[0]
        module = getattr(layer, "LocalSelfAttention", None) or layer.TransientGlobalSelfAttention
        n, block_len = config.d_model, module.block_len
        probes = torch.cat(
            [torch.zeros(1, n, dtype=torch.float64), torch.eye(n, dtype=torch.float64)]
        )
        i, j = torch.meshgrid(torch.arange(n + 1), torch.arange(n + 1), indexing="ij")
        x = torch.stack([probes[j.flatten()], probes[i.flatten()]], dim=1)
        capture = _FirstSoftmax()
        mask = {"mask": torch.ones(x.shape[:2])} if kind == "transient-global" else {}
        with torch.no_grad(), capture:
            module(x, **mask)  # transient-global: a batch > 1 needs its token mask
        z = capture.scores[:, 0, :, 1, block_len].T.reshape(-1, n + 1, n + 1)
        w = z[:, 1:, 1:] - z[:, 1:, :1] - z[:, :1, 1:] + z[:, :1, :1]
        for h, matrix in enumerate(w):
            errors = relative_errors(
                heads[(index, h)], naive_stats(matrix, module.key_value_proj_dim)
            )
            assert max(errors.values()) < 1e-6, errors


@pytest.mark.parametrize("model_type", ["data2vec-vision", "blip"])
def test_modules_the_dummy_forward_misses_equal_their_logits(model_type, tmp_path):
    """Types whose forward needs inputs the generic reference does not make (images and text
    together, vision towers it probes at full length): every audited module is called on its
    own with two synthetic tokens, and its pre-softmax logits give W^h (support.behaviour's
    probe_logits), which every audited head must equal."""
    model = build(shrink(model_type))
    model.save_pretrained(tmp_path)
    heads = {(h.block, h.layer, h.head): h for h in qkmonitor.audit(tmp_path).heads}
    source = open_source(tmp_path)
    layers, _ = plan(source.config, source.shapes())
    loaded = _loaded_names(model, [layer.q for layer in layers])
    modules = dict(model.named_modules())
    for layer in layers:
        path = loaded.get(layer.q, layer.q).rsplit(".", 2)[0]
        if path not in modules:  # fused qkv: <module>.qkv.weight
            path = path.rsplit(".", 1)[0]
        hidden = torch.zeros(1, 2, layer.d_in, dtype=torch.float64)
        matrices = probe_logits(modules[path], (hidden,), {})
        assert len(matrices) == layer.n_heads
        for h, matrix in enumerate(matrices):
            want = naive_stats(matrix, layer.head_dim)
            errors = relative_errors(heads[(layer.block, layer.layer, h)], want)
            assert max(errors.values()) < 1e-6, (path, h, errors)


def test_at_least_80_architectures_are_checked():
    assert sum(v == "exact" for v in EXPECTED.values()) >= 80


def _folder(model_type, tmp_path):
    build(shrink(model_type)).save_pretrained(tmp_path)
    return tmp_path


def test_blocks_name_towers_and_roles(tmp_path):
    def blocks(model_type):
        result = qkmonitor.audit(_folder(model_type, tmp_path / model_type))
        return result.model.n_layers

    assert blocks("llama") == {"self": 2}
    assert blocks("whisper") == {"encoder": 2, "decoder": 2, "cross": 2}
    assert set(blocks("gemma3")) == {"vision", "text"}
    layers = blocks("qwen3_next")  # a hybrid: only its softmax attention layers, by index
    assert list(layers) == ["self"] and layers["self"] >= 1


def test_towers_of_different_widths_keep_their_own_d_in(tmp_path):
    """A vision tower narrower than the text model: every head is still exact against the
    model's own q/k, and d_in is recorded per block (one number would be wrong for one tower)."""
    config = shrink("gemma3")
    config.vision_config.hidden_size, config.vision_config.intermediate_size = 32, 48
    outcome = verify(config, tmp_path / "verify")
    assert outcome.status == "exact", outcome.detail
    build(config).save_pretrained(tmp_path / "model")
    info = qkmonitor.audit(tmp_path / "model").model
    assert info.d_in == {"vision": 32, "text": 64}


def test_hybrid_layers_keep_their_index(tmp_path):
    result = qkmonitor.audit(_folder("qwen3_next", tmp_path))
    config = shrink("qwen3_next")
    attention = [i for i, t in enumerate(config.layer_types) if t == "full_attention"]
    assert sorted({h.layer for h in result.heads}) == attention


#: model_type -> (its softmax layer type, the attribute holding a layer's linear attention)
_HYBRIDS = {
    "kimi_linear": ("full_attention", "self_attn"),
    "olmo_hybrid": ("full_attention", "linear_attn"),
    "glm5_next_text": ("indexed_attention", "self_attn"),  # glm5_next's text model
    "bailing_hybrid": ("full_attention", "self_attn"),
}


def _hybrid_config(model_type: str):
    """A tiny hybrid of 4 layers: linear, softmax, linear, softmax attention; dense MLPs (the
    shrunken MoE routers of these types do not run)."""
    from transformers import CONFIG_MAPPING

    softmax, _ = _HYBRIDS[model_type]
    values = shrunken_dict(model_type)
    values.pop("model_type", None)
    values.update(
        num_hidden_layers=4,
        layer_types=["linear_attention", softmax] * 2,
        mlp_layer_types=["dense"] * 4,
        first_k_dense_replace=4,
    )
    if "indexer_types" in values:
        values["indexer_types"] = ["full"] * 4
    if "linear_num_heads" in values:  # the reference runs the linear layers too: keep them small
        values["linear_num_heads"] = 2
    return CONFIG_MAPPING[model_type](**values)


@pytest.mark.parametrize("model_type", sorted(_HYBRIDS))
def test_hybrids_audit_their_softmax_layers_and_list_the_linear_ones(model_type, tmp_path):
    """Kimi Linear, OLMo hybrid, GLM-5-next and Bailing hybrid: every softmax attention layer is
    audited head by head against what the model feeds its attention (1e-6), and each
    linear-attention module (a conv1d on q/k) is listed in not_audited, in layer order."""
    config = _hybrid_config(model_type)
    outcome = verify(config, tmp_path / "verify")
    assert outcome.status == "exact", outcome.detail
    build(config).save_pretrained(tmp_path / "model")
    result = qkmonitor.audit(tmp_path / "model")
    info = result.model
    assert sorted({h.layer for h in result.heads}) == [1, 3]
    _, attribute = _HYBRIDS[model_type]
    assert [r["module"] for r in info.not_audited] == [f"layers.{i}.{attribute}" for i in (0, 2)]
    assert all("mixes neighbouring tokens" in r["reason"] for r in info.not_audited)
    assert len({r["class"] for r in info.not_audited}) == 1
    assert info.not_audited_line().startswith("2 attention-like modules not audited")
    assert info.not_audited_line() in info.warnings


def test_state_space_layers_of_a_hybrid_are_listed(tmp_path):
    """Jamba: its softmax layer is audited, its Mamba mixers (no softmax over q.k) are listed in
    not_audited; a Mamba model alone still has no attention layers (EXPECTED refuses it)."""
    result = qkmonitor.audit(_folder("jamba", tmp_path))
    kinds = {layer: "attention" for layer in {h.layer for h in result.heads}}
    for record in result.model.not_audited:
        assert record["class"] == "JambaMambaMixer" and "state-space" in record["reason"]
        kinds[int(record["module"].split(".")[1])] = "mamba"
    config = shrink("jamba")
    assert len(kinds) == config.num_hidden_layers == len(result.model.not_audited) + 1
    assert [kinds[i] for i in range(len(kinds))] == config.layers_block_type


def test_a_model_with_only_unreadable_attention_is_refused(tmp_path):
    """Nothing to audit: a hybrid whose layers are all linear attention is refused in one line,
    never audited as an empty result."""
    from transformers import CONFIG_MAPPING

    values = shrunken_dict("kimi_linear")
    values.pop("model_type", None)
    values.update(num_hidden_layers=2, layer_types=["linear_attention"] * 2)
    values.update(mlp_layer_types=["dense"] * 2)
    build(CONFIG_MAPPING["kimi_linear"](**values)).save_pretrained(tmp_path)
    message = one_line_error(UnsupportedModelError, lambda: qkmonitor.audit(tmp_path))
    assert "KimiLinearDeltaAttention" in message and "nothing to audit" in message


def test_qk_norm_gain_convention_is_measured():
    """Gemma 3 multiplies by (1 + w), Qwen3 by w: read by probing the norm, not by name."""
    offsets = {}
    for model_type in ("gemma3_text", "qwen3"):
        (first, *_) = discovery.attention_modules(discovery.skeleton(shrink(model_type)))
        assert first.q_norm and first.k_norm
        offsets[model_type] = first.norm_offset
    assert offsets == {"gemma3_text": 1.0, "qwen3": 0.0}


def test_old_and_new_key_layouts_resolve_and_two_readings_are_refused(tmp_path):
    """llava saves 'language_model.model.layers...' (old layout); transformers' conversion maps
    it onto the model's 'language_model.layers...'. A checkpoint with both is ambiguous."""
    folder = _folder("llava", tmp_path / "llava")
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    assert any(n.startswith("language_model.model.layers.") for n in tensors)
    renamed = {
        n.replace("language_model.model.", "language_model."): t.clone() for n, t in tensors.items()
    }
    new = tmp_path / "new"
    new.mkdir()
    (new / "config.json").write_text((folder / "config.json").read_text())
    save_file(renamed, new / "model.safetensors", metadata={"format": "pt"})
    old_result, new_result = qkmonitor.audit(folder), qkmonitor.audit(new)
    assert [h.eig_var for h in old_result.heads] == [h.eig_var for h in new_result.heads]

    save_file({**tensors, **renamed}, new / "model.safetensors", metadata={"format": "pt"})
    message = one_line_error(UnsupportedModelError, lambda: qkmonitor.audit(new))
    assert "two readings" in message


def test_base_model_names_under_a_head_models_architectures_resolve(tmp_path):
    """openai-community/gpt2 stores 'h.0.attn...' (GPT2Model's names) under architectures
    GPT2LMHeadModel, whose parameters are 'transformer.h.0...'; AutoModel loads a causal LM repo
    as the base model, keeping its config's architectures. Both read as from_pretrained would
    (the base_model_prefix added), and a checkpoint with both names is two readings."""
    from safetensors.torch import save_file
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaModel

    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32))
    lm.save_pretrained(tmp_path / "prefixed")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((tmp_path / "prefixed" / "config.json").read_text())
    state = {n: t.contiguous() for n, t in lm.state_dict().items() if n.startswith("transformer.")}
    save_file({n.removeprefix("transformer."): t for n, t in state.items()},
              bare / "model.safetensors", metadata={"format": "pt"})  # fmt: skip
    want = qkmonitor.audit(tmp_path / "prefixed")
    assert [h.eig_var for h in qkmonitor.audit(bare).heads] == [h.eig_var for h in want.heads]
    both = {**state, **{n.removeprefix("transformer."): t.clone() for n, t in state.items()}}
    save_file(both, bare / "model.safetensors", metadata={"format": "pt"})
    assert "two readings" in one_line_error(UnsupportedModelError, lambda: qkmonitor.audit(bare))

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                         architectures=["LlamaForCausalLM"])  # fmt: skip
    base = LlamaModel(config)
    base.save_pretrained(tmp_path / "llama")  # saved as LlamaModel
    live, saved = qkmonitor.audit(base), qkmonitor.audit(tmp_path / "llama")
    assert [h.eig_var for h in live.heads] == [h.eig_var for h in saved.heads]


@pytest.mark.parametrize("shape", [(64,), (4, 16, 64), (64, 32)])
def test_malformed_q_weight_is_a_one_line_corrupt_error(tmp_path, shape):
    from safetensors.torch import load_file, save_file

    folder = _folder("olmoe", tmp_path)
    tensors = load_file(folder / "model.safetensors")
    name = next(n for n in tensors if n.endswith("layers.0.self_attn.q_proj.weight"))
    tensors[name] = torch.randn(shape, dtype=torch.float64)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    message = one_line_error(CorruptWeightsError, lambda: qkmonitor.audit(folder))
    assert "shape" in message


def test_config_with_infinity_is_decoded_by_transformers(tmp_path):
    """transformers writes float('inf') as {"__float__": "Infinity"} (nemotron_h, bamba)."""
    folder = _folder("llama", tmp_path)
    values = json.loads((folder / "config.json").read_text())
    values["time_step_limit"] = [0.0, {"__float__": "Infinity"}]
    (folder / "config.json").write_text(json.dumps(values))
    result = qkmonitor.audit(folder)
    assert result.model.n_layers == {"self": 2}


def test_planning_is_cached_and_small(tmp_path):
    """The skeleton is built once per config; a second plan costs a dictionary lookup."""
    config = shrink("qwen3")
    discovery.skeleton(config)
    start = time.perf_counter()
    for _ in range(10):
        discovery.skeleton(config)
    assert (time.perf_counter() - start) / 10 < 0.01


def test_callback_plan_uses_discovery():
    """plan_live of a live model not in the table: the same layers, norms included."""
    from qkmonitor.weights.live import plan_live

    model = build(shrink("olmoe"))
    layers, warnings = plan_live(model)
    assert warnings == []
    assert [layer.name for layer in layers] == ["layers.0.self_attn", "layers.1.self_attn"]
    for layer in layers:
        assert layer.module is model.get_submodule(layer.name)
        assert layer.plan.q_norm and layer.plan.q_norm in layer.getters
        q = layer.getters[layer.plan.q]()
        assert q is layer.module.q_proj.weight


@pytest.mark.parametrize(
    "model_type",
    ["olmoe", "gemma3", "whisper", "deepseek_v3", "swinv2", "xlnet", "levit", "squeezebert"],
)
def test_in_memory_model_equals_its_saved_folder(model_type, tmp_path):
    """audit(model) maps live parameter names (any prefix) the way audit(folder) maps the
    checkpoint's: same blocks, layers and numbers."""
    model = build(shrink(model_type))
    model.save_pretrained(tmp_path)
    from_folder, from_model = qkmonitor.audit(tmp_path), qkmonitor.audit(model)
    assert from_model.model.n_layers == from_folder.model.n_layers
    for a, b in zip(from_folder.heads, from_model.heads, strict=True):
        assert (a.block, a.layer, a.head) == (b.block, b.layer, b.head)
        assert a.eig_var == pytest.approx(b.eig_var, rel=1e-12)


_VISION_QKV = {  # model_type -> the audit's block of its vision tower
    **dict.fromkeys(["qwen3_vl", "exaone4_5"], "vision"),
    **dict.fromkeys(
        "qwen2_5_vl_vision qwen3_5_vision qwen3_5_moe_vision qwen3_vl_moe_vision "  # noqa: SIM905
        "qwen4_exp_vision glm_image_vision exaone4_5_vision".split(),
        "self",
    ),
    # newer than the pinned transformers (5.25): skipped where the installed one lacks them
    "llava_onevision1_5": "vision",
    "llava_onevision1_5_vision": "self",
}


@pytest.mark.parametrize("model_type", sorted(_VISION_QKV))
def test_fused_vision_qkv_equals_what_the_tower_computes(model_type, tmp_path):
    """Vision towers with one qkv Linear (exaone4_5: grouped-query) are audited, head by head
    equal to the query and key the attention module passes to its attention function when run
    on probe tokens (rotary at position 0: cos 1, sin 0). verify() cannot run these towers (no
    dummy pixel inputs), so the module is probed with inputs built here; a composite's text
    model stays checked as before."""
    import inspect

    from support.behaviour import probe_module, recording
    from support.naive import naive_stats, relative_errors

    _installed_or_skip(model_type)
    model = build(shrink(model_type))
    model.save_pretrained(tmp_path)
    result = qkmonitor.audit(tmp_path)
    block = _VISION_QKV[model_type]
    assert block in result.model.n_layers
    tower = (
        model
        if hasattr(model, "blocks")
        else next(m for name, m in model.named_modules() if name.endswith("visual"))
    )
    seq, checked = 8, 0
    for index, layer in enumerate(tower.blocks):
        module, d = layer.attn, layer.attn.head_dim
        kwargs = {"cu_seqlens": torch.tensor([0, seq], dtype=torch.int32)}
        if "position_embeddings" in inspect.signature(module.forward).parameters:
            kwargs["position_embeddings"] = (
                torch.ones(seq, d, dtype=torch.float64),
                torch.zeros(seq, d, dtype=torch.float64),
            )
        hidden = torch.zeros(seq, module.qkv.in_features, dtype=torch.float64)
        with recording(model) as recorder:
            matrices, _ = probe_module(model, module, (hidden,), kwargs, recorder)
        heads = [h for h in result.heads if (h.block, h.layer) == (block, index)]
        assert len(heads) == len(matrices) == module.num_heads
        for head, matrix in zip(heads, matrices, strict=True):
            errors = relative_errors(head, naive_stats(matrix, d), label="behaviour")
            assert max(errors.values()) < 1e-6, errors
            checked += 1
    assert checked == len(tower.blocks) * tower.blocks[0].attn.num_heads > 0


class _FirstSoftmaxInput(torch.overrides.TorchFunctionMode):
    """The input of the first softmax a module calls (after ``skip`` others): its pre-softmax
    logits, kept float64 where the module casts its scores to float32 (XLM's
    softmax(scores.float()))."""

    def __init__(self, skip: int = 0) -> None:
        super().__init__()
        self.logits = None
        self.skip = skip

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.float and args[0].dtype == torch.float64:
            return args[0]
        if func in (torch.softmax, torch.nn.functional.softmax, torch.Tensor.softmax):
            if self.skip == 0 and self.logits is None:
                self.logits = args[0].detach()
            self.skip -= 1
        return func(*args, **(kwargs or {}))


def _own_logits_bilinear(call, d_in: int, skip: int = 0) -> torch.Tensor:
    """(H, d_in, d_in): e_i^T W^h e_j read off the module's own logits of a query token e_i
    (slot 1) for a key token e_j (slot 0), biases and position terms cancelled by
    z(e_i, e_j) - z(e_i, 0) - z(0, e_j) + z(0, 0). A call may pad the pairs with more tokens
    (a window of Swin): the logits of slots 1 and 0 are read."""
    probes = torch.cat([torch.zeros(1, d_in), torch.eye(d_in)]).double()
    n = d_in + 1
    i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    pairs = torch.stack([probes[j.flatten()], probes[i.flatten()]], dim=1)  # (n n, 2, d_in)
    capture = _FirstSoftmaxInput(skip)
    with torch.no_grad(), capture:
        call(pairs)
    tokens = capture.logits.shape[-1]
    z = capture.logits.reshape(n * n, -1, tokens, tokens)[:, :, 1, 0].T.reshape(-1, n, n)
    return z[:, 1:, 1:] - z[:, 1:, :1] - z[:, :1, 1:] + z[:, :1, :1]


def _window(x: torch.Tensor, module) -> torch.Tensor:
    """Token pairs (N, 2, d) padded with zero tokens to one Swin window (its relative position
    bias is sized for the window): the pair's logit keeps only a constant position term."""
    area = module.window_size[0] * module.window_size[1]
    return torch.cat([x, x.new_zeros(x.shape[0], area - 2, x.shape[-1])], dim=1)


_BY_OWN_LOGITS = {  # model_type -> (attention class, how to call it on token pairs (N, 2, d))
    # issue 17.5: scales read off the forward (the model does not run on dummy inputs): Swin
    # windows with their relative position bias; Grounding DINO's plain self and cross (text)
    # attention, called with the same tokens as queries and keys; the Conformer's relative
    # position attention with zero position embeddings (pos_bias_u.k is a key bias)
    "donut-swin": ("DonutSwinSelfAttention", lambda m, x: m(_window(x, m))),
    "maskformer-swin": ("MaskFormerSwinSelfAttention", lambda m, x: m(_window(x, m))),
    "grounding-dino": ("GroundingDinoMultiheadAttention", lambda m, x: m(x, x, x)),
    "mm-grounding-dino": ("MMGroundingDinoMultiheadAttention", lambda m, x: m(x, x, x)),
    "fastspeech2_conformer": (
        "FastSpeech2ConformerAttention",
        lambda m, x: m(x, pos_emb=x.new_zeros(x.shape[0], 3, x.shape[-1])),
    ),
    # XLM and FlauBERT compute their logits themselves, q / sqrt(head_dim) (issue 17.5)
    "xlm": ("MultiHeadAttention", lambda m, x: m(x, torch.ones(x.shape[0], 2, dtype=x.dtype))),
    "flaubert": ("MultiHeadAttention", lambda m, x: m(x, torch.ones(x.shape[0], 2, dtype=x.dtype))),
    "sam_vision_model": ("SamVisionAttention", lambda m, x: m(x[:, None])),
    "sam_hq_vision_model": ("SamHQVisionAttention", lambda m, x: m(x[:, None])),
    "vitdet": ("VitDetAttention", lambda m, x: m(x[:, None])),
    "seggpt": ("SegGptAttention", lambda m, x: m(x[:, None])),
    "timesformer": ("TimesformerSelfAttention", lambda m, x: m(x)),
    "got_ocr2": ("GotOcr2VisionAttention", lambda m, x: m(x[:, None])),
    "decision_transformer": ("DecisionTransformerGPT2Attention", lambda m, x: m(x)),
    "cpmant": (
        "CpmAntAttention",
        lambda m, x: m(
            x,
            x,
            torch.ones(x.shape[0], 2, 2, dtype=torch.bool),
            torch.zeros(x.shape[0], m.num_heads, 2, 2, dtype=x.dtype),
        ),
    ),
}


#: windows of 2 x 2 tokens (the default 7 x 7 makes each probe 12 times larger)
_OWN_LOGITS_CONFIG = {"donut-swin": {"window_size": 2}, "maskformer-swin": {"window_size": 2}}


@pytest.mark.parametrize("model_type", sorted(_BY_OWN_LOGITS))
def test_modules_verify_cannot_run_equal_their_own_logits(model_type, tmp_path):
    """Types whose model verify() cannot run on dummy inputs (images of a fixed size, states and
    actions, ...): every audited head equals W^h read off its attention module's own logits."""
    kind, call = _BY_OWN_LOGITS[model_type]
    config = shrink(model_type)
    for key, value in _OWN_LOGITS_CONFIG.get(model_type, {}).items():
        setattr(config, key, value)
    _check_own_logits(config, kind, call, tmp_path)


def test_luke_without_entity_aware_attention_equals_its_own_logits(tmp_path):
    """LUKE without entity-aware attention: words and entities share query and key, and q.k is
    divided by sqrt(attention_head_size) in forward (issue 17.5)."""
    config = shrink("luke")
    config.use_entity_aware_attention = False
    _check_own_logits(config, "LukeSelfAttention", lambda m, x: m(x, None), tmp_path)


@pytest.mark.parametrize(
    ("model_type", "kind"),
    [
        ("grounding-dino", "GroundingDinoBiMultiHeadAttention"),
        ("mm-grounding-dino", "MMGroundingDinoBiMultiHeadAttention"),
    ],
)
def test_grounding_dino_fusion_heads_equal_their_image_to_text_logits(model_type, kind, tmp_path):
    """The image-text fusion's heads: image queries (slot 1) over text keys (slot 0), read off
    the logits of its image-to-text softmax (its second; the first is the text-to-image one of
    the transposed logits)."""
    _check_own_logits(shrink(model_type), kind, lambda m, x: m(x, x), tmp_path, skip=1)


def _rms_left_out(x: torch.Tensor, p: float = 2.0, dim: int = 1, **_) -> torch.Tensor:
    """F.normalize read as SPEC's QK-norm: x / |x| = (x / rms(x)) / sqrt(d), with the per-token
    RMS left out."""
    assert p == 2.0
    return x / math.sqrt(x.shape[dim])


@pytest.mark.parametrize(
    ("model_type", "kind"),
    [("swinv2", "Swinv2SelfAttention"), ("swin2sr", "Swin2SRSelfAttention")],
)
def test_cosine_attention_heads_equal_their_logits_with_the_rms_left_out(
    model_type, kind, tmp_path
):
    """Swin v2 cosine attention, with x / |x| read as QK-norm (the per-token RMS left out): every
    head equals the module's own logits, scale 1/d and the learned temperature
    exp(min(logit_scale_h, log 100)) folded in. One head's stored logit_scale is above the clamp."""
    config = shrink(model_type)
    config.window_size = 2

    def above_clamp(model) -> None:
        for module in model.modules():
            if type(module).__name__ == kind:
                with torch.no_grad():
                    module.logit_scale[0] = 6.0  # exp(6) > 100: the forward clamps it

    def call(module, x):
        with mock.patch.object(torch.nn.functional, "normalize", _rms_left_out):
            return module(_window(x, module))

    _check_own_logits(config, kind, call, tmp_path, prepare=above_clamp)


@pytest.mark.parametrize("model_type", ["grounding-dino", "mm-grounding-dino"])
def test_grounding_dino_deformable_attention_is_listed_with_its_reason(model_type):
    """Deformable attention (no q.k) is in not_audited, every one of them, with its reason; the
    plain and fusion attention are audited, the fusion and text cross attention as cross."""
    config = shrink(model_type)
    model = discovery.skeleton(config)
    shapes = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    layers, notes = plan(config, shapes)
    # the modules with parameters (their inner MultiScaleDeformableAttention has none)
    deformable = [
        p
        for p, m in model.named_modules()
        if type(m).__name__.endswith("MultiscaleDeformableAttention")
    ]
    assert deformable and [r["module"] for r in notes.not_audited] == deformable
    assert all("is deformable attention" in r["reason"] for r in notes.not_audited)
    cross = {layer.path.rsplit(".", 1)[-1] for layer in layers if layer.cross}
    assert cross == {"attn", "encoder_attn_text"}  # fusion_layer.attn and the text cross


def _check_own_logits(
    config, kind: str, call, tmp_path, skip: int = 0, prepare=None, select=None
) -> None:
    """Every audited head of the modules of class ``kind`` (those ``select`` accepts, if given)
    equals W^h read off the module's own logits, called on token pairs by ``call`` (``prepare``
    may change the model's weights)."""
    from support.naive import naive_stats, relative_errors

    from qkmonitor.weights.discovery import plan
    from qkmonitor.weights.sources import open_source

    model = build(config)
    if prepare is not None:
        prepare(model)
    model.config._attn_implementation = "eager"
    for sub in model.modules():
        if hasattr(sub, "config") and hasattr(sub.config, "_attn_implementation"):
            sub.config._attn_implementation = "eager"
    model.save_pretrained(tmp_path)
    result = qkmonitor.audit(tmp_path)
    source = open_source(tmp_path)
    layers, _ = plan(source.config, source.shapes())
    modules = [
        (p, m)
        for p, m in model.named_modules()
        if type(m).__name__ == kind and (select is None or select(m))
    ]
    loaded = _loaded_names(model, [x.q for x in layers])  # save_pretrained's key layout
    owned = {
        p: [
            x
            for x in layers
            if x.path == p or (q := loaded.get(x.q, x.q)).endswith(f"{p}.{q.split('.')[-2]}.weight")
        ]
        for p, _ in modules
    }
    layers = [x for found in owned.values() for x in found]
    assert modules and len(layers) == len(modules)
    checked = 0
    for path, module in modules:
        (layer,) = owned[path]
        heads = [h for h in result.heads if (h.block, h.layer) == (layer.block, layer.layer)]
        matrices = _own_logits_bilinear(lambda x, m=module: call(m, x), layer.d_in, skip)
        assert len(heads) == matrices.shape[0] > 0
        for head, matrix in zip(heads, matrices, strict=True):
            errors = relative_errors(head, naive_stats(matrix, layer.head_dim), label="logits")
            assert max(errors.values()) < 1e-6, (path, errors)
            checked += 1
    assert checked == sum(layer.n_heads for layer in layers)


def _identity_rotary(shape) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ones(shape, dtype=torch.float64), torch.zeros(shape, dtype=torch.float64)


def _gemma_like_call(seq: int, d: int, d_in: int) -> tuple[tuple, dict]:
    """A text attention's (hidden_states,), position_embeddings (of position 0), no mask."""
    hidden = torch.zeros(1, seq, d_in, dtype=torch.float64)
    return (hidden,), {"position_embeddings": _identity_rotary((1, seq, d)), "attention_mask": None}


_TOWER_CALLS = {  # model_type -> (attention class, the audit's block, (args, kwargs) for seq, d)
    # Kimi K2.5's vision wqkv is cut by Chunk and then PermuteForRope (rows within each head,
    # alike for q and k) when loading: the audit reads the checkpoint, the model the permuted rows
    "kimi_k25": (
        "Kimi_K25VisionAttention",
        "vision",
        lambda seq, d, d_in: (
            (torch.zeros(seq, d_in, dtype=torch.float64),),
            {
                "cu_seqlens": torch.tensor([0, seq], dtype=torch.int32),
                "position_embeddings": _identity_rotary((seq, d)),
            },
        ),
    ),
    # Gemma 4 vision: q/k through Gemma4ClippableLinear (unclipped) and float32 QK-norms
    "gemma4_vision": (
        "Gemma4VisionAttention",
        "self",
        lambda seq, d, d_in: (
            (torch.zeros(1, seq, d_in, dtype=torch.float64),),
            {
                "position_embeddings": _identity_rotary((1, seq, d)),
                "position_ids": torch.arange(seq)[None],
                "attention_mask": None,
            },
        ),
    ),
    # issue 17.6: saved by transformers itself, never "incomplete". DiffusionGemma's encoder text
    # layers are tied to its decoder layers (the checkpoint stores the decoder's only);
    # Step3p7's vision in_proj_weight loads under the base model's prefix
    "diffusion_gemma": ("DiffusionGemmaEncoderTextAttention", "text", _gemma_like_call),
    "diffusion_gemma:decoder": ("DiffusionGemmaDecoderTextAttention", "decoder", _gemma_like_call),
    "step3p7": ("Step3p7Attention", "text", _gemma_like_call),
    "step3p7:vision": ("Step3p7VisionAttention", "vision", _gemma_like_call),
    # issue 17: Kyutai STT's decoder wraps q/k in KyutaiSpeechToTextLinear; rotary from
    # position_ids (0: the identity)
    "kyutai_speech_to_text": (
        "KyutaiSpeechToTextAttention",
        "self",
        lambda seq, d, d_in: (
            (torch.zeros(1, seq, d_in, dtype=torch.float64),),
            {"position_ids": torch.zeros(1, seq, dtype=torch.long), "attention_mask": None},
        ),
    ),
}


@pytest.mark.parametrize("model_type", sorted(_TOWER_CALLS))
def test_towers_verify_cannot_run_equal_their_attention_calls(model_type, tmp_path):
    """Each audited head equals the q/k the tower's attention module passes to its attention
    function on probe tokens (rotary at position 0), where verify() cannot run the model."""
    from support.behaviour import probe_module, recording
    from support.naive import naive_stats, relative_errors

    kind, block, inputs = _TOWER_CALLS[model_type]
    model = build(shrink(model_type.split(":")[0]))
    model.save_pretrained(tmp_path)
    result = qkmonitor.audit(tmp_path)
    modules = [m for m in model.modules() if type(m).__name__ == kind]
    assert result.model.n_layers[block] == len(modules) > 0
    for index, module in enumerate(modules):
        d_in = module.k_proj.weight.shape[1] if hasattr(module.k_proj, "weight") else None
        d_in = d_in or module.k_proj.linear.weight.shape[1]
        args, kwargs = inputs(8, module.head_dim, d_in)
        with recording(model) as recorder:
            matrices, _ = probe_module(model, module, args, kwargs, recorder)
        heads = [h for h in result.heads if (h.block, h.layer) == (block, index)]
        assert len(heads) == len(matrices) > 0
        for head, matrix in zip(heads, matrices, strict=True):
            errors = relative_errors(head, naive_stats(matrix, module.head_dim), label="tower")
            assert max(errors.values()) < 1e-6, errors


def test_only_a_plain_row_split_of_a_fused_tensor_is_read():
    """A converter that cuts one fused tensor along its rows gives each target its rows (Split:
    sized by the model's parameters); any other operation is refused by name."""
    from transformers.core_model_loading import Chunk, Split, WeightConverter

    meta = {
        f"a.{name}.weight": torch.empty(rows, 8, device="meta")
        for name, rows in (("q_proj", 8), ("k_proj", 4), ("v_proj", 4))
    }
    targets = ["q_proj", "k_proj", "v_proj"]
    split = WeightConverter("qkv", targets, [Split(dim=0)])
    rows = discovery._split_rows(split, "a.q_proj.weight", meta, None)
    assert [(r.start, r.stop, r.total) for r in rows.values()] == [
        (0, 8, 16),
        (8, 12, 16),
        (12, 16, 16),
    ]
    chunk = WeightConverter("qkv", targets, [Chunk(dim=0)])
    assert "equal chunks" in discovery._split_rows(chunk, "a.q_proj.weight", meta, None)
    columns = WeightConverter("qkv", targets, [Chunk(dim=1)])
    assert "not a plain split" in discovery._split_rows(columns, "a.q_proj.weight", meta, None)


def test_a_fused_tensor_is_read_only_as_qkv_or_gate_qkv_rows():
    """q and k that transformers cuts out of one tensor are read as its rows [Q; K; V] or
    [gate (H d); Q; K; V] (HRM's gqkv_proj); any other order of the cut is refused."""
    from qkmonitor.weights.layout import AttentionLayer, Packing

    h, d = 2, 4
    layer = AttentionLayer("", 0, "a.q_proj.weight", "a.k_proj.weight", Packing.SEPARATE,
                           h, h, d, 8, 0.5, True)  # fmt: skip
    names = dict.fromkeys([layer.q, layer.k], "a.gqkv.weight")

    def rows(q_start: int, k_start: int) -> dict:
        q, k = discovery._Rows(q_start, q_start + 8, 32), discovery._Rows(k_start, k_start + 8, 32)
        return {layer.q: q, layer.k: k}

    read = discovery._fused_reading(layer, names, rows(8, 16))
    assert read.packing is Packing.GATE_QKV and read.q == read.k == layer.q
    fused = torch.arange(32.0)[:, None]
    wq, wk = Packing.GATE_QKV.split(fused, fused, h, h, d)
    assert wq.flatten().tolist() == list(range(8, 16))
    assert wk.flatten().tolist() == list(range(16, 24))
    stacked = {n: discovery._Rows(r.start - 8, r.stop - 8, 24) for n, r in rows(8, 16).items()}
    assert discovery._fused_reading(layer, names, stacked).packing is Packing.STACKED_QKV
    for q_start, k_start in ((0, 16), (16, 8), (8, 24)):  # [Q; gate; K; V], [gate; K; Q; V], ...
        with pytest.raises(UnsupportedModelError, match="in another way"):
            discovery._fused_reading(layer, names, rows(q_start, k_start))


def test_unreadable_attention_like_modules_are_named():
    class ToyAttention(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mixed = torch.nn.Linear(4, 12)

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), ToyAttention())
    (skipped,) = discovery._attention_like(model)
    assert (skipped.path, skipped.kind) == ("1", "ToyAttention") and "(mixed)" in skipped.reason
    assert discovery._attention_like(torch.nn.Sequential(torch.nn.Linear(4, 4))) == []
    assert discovery._attention_like(model, ["1"]) == []  # the found attention itself


def test_attention_like_modules_left_unaudited_are_listed(tmp_path):
    """Gemma 3's vision tower builds SigLIP's pooling head (an nn.MultiheadAttention) and runs
    it, but Gemma 3 discards its output: not audited, listed in not_audited with that reason,
    and said so in a warning."""
    result = qkmonitor.audit(_folder("gemma3", tmp_path))
    (record,) = result.model.not_audited
    assert record["module"] == "vision_tower.head.attention"
    assert record["class"] == "MultiheadAttention"
    assert "whose output Gemma3Model discards" in record["reason"]
    assert result.model.warnings == [result.model.not_audited_line()]
    assert set(result.model.n_layers) == {"vision", "text"}


#: model_type -> the blocks of its torch nn.MultiheadAttention modules (issue 17.4)
_TORCH_MHA = {
    "siglip": {"vision_pool"},
    "siglip2": {"vision_pool"},
    "siglip_vision_model": {"pool"},
    "siglip2_vision_model": {"pool"},
    "phi4_multimodal_vision": {"pool"},  # Phi4MultimodalVisionModel: pooler_output
    "bridgetower": {"vision"},  # its CLIP-style vision tower's self-attention
    "mask2former": {"cross"},
    "oneformer": {"decoder", "decoder_multihead_attn", "cross"},
}


def _mha_heads(result, layers, model) -> dict[str, list]:
    """Module path of each audited nn.MultiheadAttention -> its audited heads, in order."""
    loaded = _loaded_names(model, [layer.q for layer in layers])
    out = {}
    for layer in layers:
        path = loaded.get(layer.q, layer.q).rpartition(".")[0]
        if isinstance(model.get_submodule(path), torch.nn.MultiheadAttention):
            heads = [h for h in result.heads if (h.block, h.layer) == (layer.block, layer.layer)]
            out[path] = (layer, sorted(heads, key=lambda h: h.head))
    return out


@pytest.mark.parametrize("model_type", sorted(_TORCH_MHA))
def test_torch_multihead_attention_equals_what_torch_computes(model_type, tmp_path):
    """Every torch nn.MultiheadAttention a model uses (SigLIP's pooling head, BridgeTower's
    vision tower, Mask2Former/OneFormer decoders) is audited, from the checkpoint and from the
    live model, head by head equal (1e-6) to W^h read off the pre-softmax logits torch's
    F.multi_head_attention_forward computes for probe tokens (support.behaviour's
    probe_torch_mha: no parameter read)."""
    from support.behaviour import probe_torch_mha

    model = build(shrink(model_type))
    model.save_pretrained(tmp_path)
    source = open_source(tmp_path)
    layers, _ = plan(source.config, source.shapes())
    modules = [p for p, m in model.named_modules() if isinstance(m, torch.nn.MultiheadAttention)]
    for result in (qkmonitor.audit(tmp_path), qkmonitor.audit(model)):
        audited = _mha_heads(result, layers, model)
        assert sorted(audited) == sorted(modules)
        assert {layer.block for layer, _ in audited.values()} == _TORCH_MHA[model_type]
        assert not result.model.not_audited or all(
            r["class"] != "MultiheadAttention" for r in result.model.not_audited
        )
        for path, (layer, heads) in audited.items():
            matrices = probe_torch_mha(model.get_submodule(path))
            assert len(heads) == len(matrices) == layer.n_heads > 0
            for head, matrix in zip(heads, matrices, strict=True):
                errors = relative_errors(head, naive_stats(matrix, layer.head_dim), label="torch")
                assert max(errors.values()) < 1e-6, (path, head.head, errors)


def test_lora_on_a_pooling_head_is_audited_merged():
    """PEFT's LoRA on an nn.MultiheadAttention merges into in_proj_weight around each forward:
    the live audit reads the effective in_proj_weight, equal to that of the merged model and
    not that of the frozen base."""
    from peft import LoraConfig, get_peft_model

    base = build(shrink("siglip_vision_model"))
    lora = LoraConfig(target_modules=["head.attention"], r=2, init_lora_weights=False)
    adapted = get_peft_model(copy.deepcopy(base), lora)

    def pool(model) -> list[float]:
        return [h.eig_var for h in qkmonitor.audit(model).heads if h.block == "pool"]

    got = pool(adapted)
    assert len(got) == 4 and got != pytest.approx(pool(base), rel=1e-3)
    assert got == pytest.approx(pool(adapted.merge_and_unload()), rel=1e-12)


def _image_features(model, model_type: str, noise: float):
    """The model's image features (what it feeds the rest of the model) for one image, with
    ``noise`` added to every output of its pooling head (the nn.MultiheadAttention's parent)."""
    config = model.config.vision_config
    size, channels = config.image_size, config.num_channels
    pixels = torch.randn(1, channels, size, size, generator=torch.Generator().manual_seed(3))
    pixels = pixels.to(torch.float64)
    (head,) = [m for m in model.modules() if type(m).__name__.endswith("PoolingHead")]

    def perturb(module, args, output):
        return output + noise

    handle = head.register_forward_hook(perturb)
    try:
        with torch.no_grad():
            out = model.get_image_features(pixel_values=pixels)
    finally:
        handle.remove()
    features = out.pooler_output if hasattr(out, "pooler_output") else out
    return features if isinstance(features, torch.Tensor) else torch.cat(list(features))


@pytest.mark.parametrize(
    ("model_type", "used"),
    [("siglip", True), ("gemma3", False), ("deepseek_vl", False), ("cohere2_vision", False)],
)
def test_pooling_heads_are_audited_where_the_model_uses_their_output(model_type, used, tmp_path):
    """Whether a pooling head matters is read off the model itself: a change of the head's
    output changes SiglipModel's image features (audited, block vision_pool), and leaves those
    of Gemma 3, DeepSeek-VL and Cohere2-vision unchanged (their towers' heads run but their
    output is discarded: listed in not_audited, never audited as if it mattered)."""
    config = shrink(model_type)
    if model_type == "gemma3":  # one image token: its pooling of the patches fits a tiny tower
        config.mm_tokens_per_image = 1
    model = build(config)
    changed = not torch.equal(
        _image_features(model, model_type, 0.0), _image_features(model, model_type, 1.0)
    )
    assert changed == used
    model.save_pretrained(tmp_path)
    result = qkmonitor.audit(tmp_path)
    listed = [r for r in result.model.not_audited if r["class"] == "MultiheadAttention"]
    pools = [block for block in result.model.n_layers if block.endswith("pool")]
    assert (pools, len(listed)) == ((["vision_pool"], 0) if used else ([], 1))
    if not used:
        assert (
            f"whose output {type(discovery.skeleton(shrink(model_type))).__name__} discards"
            in (listed[0]["reason"])
        )


def test_torch_mha_reading_refuses_unequal_widths_and_names_extra_keys():
    """nn.MultiheadAttention with kdim != embed_dim, or Aria's q_proj/k_proj of two input widths,
    have no square W^h: listed with that reason;
    an unknown pooling head is listed, not guessed; add_bias_kv's learned key is left out of W^h
    and named; with vdim != embed_dim its q/k sit in q_proj_weight/k_proj_weight, and the heads
    equal torch's own logits."""
    from support.behaviour import probe_torch_mha

    from qkmonitor.weights.layout import Packing, layer_weights

    class ToyPoolingHead(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention = torch.nn.MultiheadAttention(8, 2, batch_first=True)

    class AriaCrossAttention(torch.nn.Module):  # Aria's row, with keys of another width
        def __init__(self) -> None:
            super().__init__()
            self.q_proj, self.k_proj = torch.nn.Linear(8, 8), torch.nn.Linear(4, 8)
            self.multihead_attn = torch.nn.MultiheadAttention(8, 2, batch_first=True)

    wide = torch.nn.MultiheadAttention(8, 2, kdim=4, vdim=4)
    model = torch.nn.ModuleDict(
        {"wide": wide, "head": ToyPoolingHead(), "biased": torch.nn.MultiheadAttention(8, 2)}
    )
    model["aria"] = AriaCrossAttention()
    model["separate"] = torch.nn.MultiheadAttention(8, 2, vdim=6, add_bias_kv=True).double()
    found, skipped = discovery._survey(model)
    reasons = {s.path: s.reason for s in skipped}
    assert "different widths" in reasons["wide"] and "(8) and keys (4)" in reasons["wide"]
    assert "(8) and keys (4)" in reasons["aria"] and "aria.multihead_attn" not in reasons
    unknown = reasons["head.attention"]
    assert "ToyPoolingHead" in unknown and "not known" in unknown
    layers = {layer.path: layer for layer in found}
    assert set(layers) == {"biased", "separate"}
    assert layers["biased"].packing is Packing.IN_PROJ_QKV and not layers["biased"].left_out
    separate = layers["separate"]
    assert separate.packing is Packing.IN_PROJ_SEPARATE
    assert (separate.q, separate.k) == ("separate.q_proj_weight", "separate.k_proj_weight")
    assert any(item.startswith("bias_k:") for item in separate.left_out)
    tensors = dict(model["separate"].named_parameters(prefix="separate"))
    wq, wk = layer_weights(separate, tensors, torch.float64)
    for h, matrix in enumerate(probe_torch_mha(model["separate"])):
        naive = separate.scale * wq[h].T @ wk[h]
        assert torch.allclose(naive, matrix, rtol=1e-10, atol=1e-12)


def test_aria_cross_attention_is_the_product_of_its_two_projections(tmp_path):
    """Aria's projector: q_proj and k_proj, then an nn.MultiheadAttention's own in_proj. Every
    head, from the checkpoint and the live model, equals (1e-6) W^h read off the pre-softmax
    logits the module computes when called on query and key probes; its input LayerNorms are
    made the identity for that (W^h acts on their outputs, as on a layer's input norm), and are
    named as left out."""
    from support.behaviour import _Softmax

    model = build(shrink("aria"))
    model.save_pretrained(tmp_path)
    module = copy.deepcopy(model.multi_modal_projector.cross_attn)
    module.layer_norm, module.layer_norm_kv = torch.nn.Identity(), torch.nn.Identity()
    n = module.q_proj.in_features
    probes = torch.cat([torch.zeros(1, n), torch.eye(n)]).double()[None]
    capture = _Softmax()
    with torch.no_grad(), capture:
        module(key_value_states=probes, hidden_states=probes)
    z = capture.logits
    matrices = z[:, 1:, 1:] - z[:, 1:, :1] - z[:, :1, 1:] + z[:, :1, :1]
    head_dim = n // module.multihead_attn.num_heads
    for result in (qkmonitor.audit(tmp_path), qkmonitor.audit(model)):
        heads = sorted(
            (h for h in result.heads if h.block == "pool"), key=lambda h: (h.layer, h.head)
        )
        assert len(heads) == len(matrices) == module.multihead_attn.num_heads
        for head, matrix in zip(heads, matrices, strict=True):
            errors = relative_errors(head, naive_stats(matrix, head_dim), label="aria")
            assert max(errors.values()) < 1e-6, (head.head, errors)
        assert any("layer_norm_kv:" in w for w in result.model.warnings)


def _shared_kv_text_config(model_type: str):
    """A tiny text config whose last two layers reuse the keys of layers 0 and 1."""
    from transformers import CONFIG_MAPPING

    values = shrunken_dict(model_type)
    values.pop("model_type", None)
    kinds = ["sliding_attention", "full_attention"] * 2
    values.update(num_hidden_layers=4, layer_types=kinds, num_kv_shared_layers=2)
    return CONFIG_MAPPING[model_type](**values)


@pytest.mark.parametrize("model_type", ["gemma3n_text", "gemma4_text"])
def test_shared_keys_pair_this_layers_queries_with_the_source_keys(model_type, tmp_path):
    """Gemma 3n/4 layers past num_kv_shared_layers attend with an earlier layer's keys: W^h
    pairs their own W_Q with the source's W_K. A stale k_proj of their own in the checkpoint
    (older exports stored one), different from the source's, must not enter; v_norm is named
    as left out."""
    from safetensors.torch import load_file, save_file

    config = _shared_kv_text_config(model_type)
    model = build(config)
    model.save_pretrained(tmp_path)
    (file,) = tmp_path.glob("*.safetensors")
    tensors = load_file(file)
    q3 = next(n for n in tensors if "layers.3." in n and n.endswith("q_proj.weight"))
    source_k = q3.replace("layers.3.", "layers.1.").replace("q_proj", "k_proj")
    stale = torch.randn_like(tensors[source_k])
    tensors[q3.replace("q_proj", "k_proj")] = stale
    save_file(tensors, file, metadata={"format": "pt"})
    layers, warnings = plan(*(lambda s: (s.config, s.shapes()))(open_source(tmp_path)))
    last = next(layer for layer in layers if layer.layer == 3)
    assert last.k == source_k and last.q == q3
    assert any("keys" in w and "layers.1." in w for w in warnings)
    assert any("v_norm" in w for w in warnings)
    result = qkmonitor.audit(tmp_path)
    probed, _ = probe_model(model)
    assert len(probed) == len(layers) == 4
    for module, layer in zip(probed, layers, strict=True):
        assert module.path.endswith(f"layers.{layer.layer}.self_attn")
        for head, matrix in enumerate(module.matrices):
            (got,) = [h for h in result.heads if h.layer == layer.layer and h.head == head]
            errors = relative_errors(got, naive_stats(matrix, layer.head_dim), label="behaviour")
            assert all(v <= 1e-6 for v in errors.values()), (module.path, head, errors)


@pytest.mark.parametrize(
    ("model_type", "parts"),
    [
        ("glm_moe_dsa", ["indexer"]),
        ("hy_v4", ["indexer", "gate_proj"]),
        ("dots3_note_text", ["indexer", "g_proj"]),
        ("mistral_large4_text", ["indexer", "softmax_scaling"]),
        ("gemma4_text", ["v_norm"]),
    ],
)
def test_parts_left_out_of_w_are_named(model_type, parts):
    """Indexers, output gates and value norms never change q.k: each is named in the plan's
    notes (the result's warnings), with what it does."""
    config = shrink(model_type)
    shapes = {n: tuple(p.shape) for n, p in discovery.skeleton(config).state_dict().items()}
    layers, warnings = plan(config, shapes)
    assert layers
    for part in parts:
        assert any(w.startswith("left out of W^h") and f" {part}:" in w for w in warnings), (
            part,
            warnings,
        )


# issue 17: softmax scales read off the forward of the last modules refused for not exposing
# one (CLAP's audio tower, SuperGlue, PVT-style efficient attention, Perceiver, Reformer's
# local attention); the models do not run on the reference's dummy inputs, so each audited
# head is checked against its module's own logits
_SCALES_READ_OFF = {  # model_type -> (attention class, how to call it on token pairs)
    # CLAP's audio tower: Swin windows (padded with zero tokens) with a relative position bias,
    # alone and in the audio-text model (whose text tower the sweep's reference checks)
    "clap_audio_model": ("ClapAudioSelfAttention", lambda m, x: m(_window(x, m))),
    "clap": ("ClapAudioSelfAttention", lambda m, x: m(_window(x, m))),
    # SuperGlue's self and cross GNN layers are one module class, called here as self attention
    "superglue": ("SuperGlueSelfAttention", lambda m, x: m(x)),
}


@pytest.mark.parametrize("model_type", sorted(_SCALES_READ_OFF))
def test_scales_read_off_the_forward_equal_the_own_logits(model_type, tmp_path):
    """q.k / sqrt(attention_head_size), computed in forward and stored nowhere: every audited
    head equals its module's own logits."""
    kind, call = _SCALES_READ_OFF[model_type]
    config = shrink(model_type)
    if model_type.startswith("clap"):  # windows of 2 x 2 tokens, not 8 x 8: 16 times smaller
        getattr(config, "audio_config", config).window_size = 2
    _check_own_logits(config, kind, call, tmp_path)


#: PVT-style efficient attention: model_type -> (class, its sequence-reduction ratio attribute)
_SPATIAL_REDUCTION = {
    "glpn": ("GLPNEfficientSelfAttention", "sr_ratio"),
    "pvt": ("PvtEfficientSelfAttention", "sequences_reduction_ratio"),
    "pvt_v2": ("PvtV2SelfAttention", "spatial_reduction_ratio"),
    "segformer": ("SegformerAttention", "sequence_reduction_ratio"),
}


@pytest.mark.parametrize("model_type", sorted(_SPATIAL_REDUCTION))
def test_spatial_reduction_attention_is_audited_only_where_keys_are_not_reduced(
    model_type, tmp_path
):
    """Where the sequence-reduction ratio is 1 the keys are key(x) of the queries' own tokens:
    those heads equal their module's own logits (q.k / sqrt(d)). Where it is above 1 the keys
    come from a strided convolution over neighbouring tokens and a LayerNorm: every such module
    is listed in not_audited with that reason, none is audited (SegFormer's convolution sits
    in a child module of its own, which the plain check for a convolution child missed)."""
    kind, ratio = _SPATIAL_REDUCTION[model_type]
    config = shrink(model_type)
    config.hidden_sizes = [16, 32, 48, 64]  # probes of the last stage's width, not of 256
    _check_own_logits(
        config, kind, lambda m, x: m(x, 1, 2), tmp_path, select=lambda m: getattr(m, ratio) == 1
    )
    model = discovery.skeleton(config)
    reduced = [
        p for p, m in model.named_modules() if type(m).__name__ == kind and getattr(m, ratio) > 1
    ]
    shapes = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    layers, notes = plan(config, shapes)
    assert reduced and [r["module"] for r in notes.not_audited] == reduced
    assert all("strided" in r["reason"] and "LayerNorm" in r["reason"] for r in notes.not_audited)
    assert not {layer.path for layer in layers} & set(reduced)


def test_pvt_v2_linear_attention_is_listed_with_its_pooled_keys():
    """PVT v2's linear_attention pools the keys' tokens to 7 x 7 at every ratio: no module is
    audited, so the model is refused, and each module's reason names the pooling."""
    config = shrink("pvt_v2")
    config.linear_attention = True
    model = discovery.skeleton(config)
    shapes = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    modules = [p for p, m in model.named_modules() if type(m).__name__ == "PvtV2SelfAttention"]
    skipped = discovery._survey(model)[1]
    assert [s.path for s in skipped] == modules
    assert all("average pool" in s.reason for s in skipped)
    message = one_line_error(UnsupportedModelError, lambda: plan(config, shapes))
    assert "average pool" in message


class _InputNormsOff:
    """Perceiver's layernorm1/layernorm2 (the query's and a cross attention's key's input
    norms) replaced by the identity while the module runs: W^h acts on their outputs, like a
    layer's input norm, so the probes must reach the projections unnormalized."""

    def __init__(self, module) -> None:
        self.module, self.saved = module, {}

    def __enter__(self):
        for name in ("layernorm1", "layernorm2"):
            self.saved[name] = getattr(self.module, name)
            setattr(self.module, name, torch.nn.Identity())
        return self.saved

    def __exit__(self, *exc) -> None:
        for name, norm in self.saved.items():
            setattr(self.module, name, norm)


def _perceiver_call(module, x):
    with _InputNormsOff(module) as norms:
        cross = isinstance(norms["layernorm2"], torch.nn.LayerNorm)
        return module(x, inputs=x if cross else None)


@pytest.mark.parametrize(
    ("head", "blocks"),
    [
        (None, {("cross", True, 4), ("encoder", False, 4)}),
        # the masked-LM decoder's cross attention: output queries over the latents, with its
        # own qk_channels (8 heads of 32)
        (
            "PerceiverForMaskedLM",
            {("cross", True, 4), ("encoder", False, 4), ("cross_decoder", True, 32)},
        ),
    ],
)
def test_perceiver_self_and_cross_attention_equal_their_own_logits(head, blocks, tmp_path):
    """Perceiver divides by sqrt(qk_channels_per_head), which differs from the hidden width per
    head when qk_channels is set: here 32 channels in 8 heads of 4 over 64-wide latents. The
    latents' cross attention over the inputs (keys from the inputs, layernorm2) is audited as
    cross attention, the self-attention blocks as the encoder."""
    import transformers

    config = shrink("perceiver")
    config.num_self_attends_per_block, config.qk_channels = 2, 32
    with contextlib.ExitStack() as stack:
        if head is not None:  # build() makes AutoModel's class (PerceiverModel) otherwise
            cls = getattr(transformers, head)
            stack.enter_context(mock.patch("support.behaviour.model_class", lambda c: cls))
        _check_own_logits(config, "PerceiverSelfAttention", _perceiver_call, tmp_path)
    layers, _ = plan(*(lambda s: (s.config, s.shapes()))(open_source(tmp_path)))
    assert {(layer.block, layer.cross, layer.head_dim) for layer in layers} == blocks


def _logsumexp_seen_as_softmax(x, dim, keepdim=False):
    """Reformer normalizes its logits with exp(z - logsumexp(z)): the softmax of z, which is
    shown to the logit capture before the real logsumexp runs."""
    torch.nn.functional.softmax(x, dim=dim)
    return _REAL_LOGSUMEXP(x, dim, keepdim=keepdim)


_REAL_LOGSUMEXP = torch.logsumexp


def _reformer_call(module, x):
    with mock.patch.object(torch, "logsumexp", _logsumexp_seen_as_softmax):
        return module(x)


@pytest.mark.parametrize("is_decoder", [False, True])
def test_reformer_local_attention_equals_its_own_logits(is_decoder, tmp_path):
    """Reformer's local attention divides its keys by sqrt(attention_head_size); its LSH
    attention (one shared query_key projection, keys normalized to unit length) is listed in
    not_audited, every one of them."""
    config = shrink("reformer")
    config.is_decoder = is_decoder
    _check_own_logits(config, "LocalSelfAttention", _reformer_call, tmp_path)
    result = qkmonitor.audit(tmp_path)
    model = build(config)
    lsh = [p for p, m in model.named_modules() if type(m).__name__ == "LSHSelfAttention"]
    listed = [r["module"] for r in result.model.not_audited]
    assert lsh and [m.removeprefix("reformer.") for m in listed] == lsh
    assert all("query_key" in r["reason"] for r in result.model.not_audited)


def test_qwen2_5_omni_dit_attention_equals_its_attention_calls(tmp_path):
    """The token2wav DiT passes no scaling to its attention function (SDPA's default
    1/sqrt(head_dim), heads of inner_dim / heads, which it does not store as head_dim): each
    audited head equals the q/k each block passes, rotary at position 0 (RoPE, on its first head
    only, the identity there). The reference's recorder would route the calls to the file's
    eager function, which requires a scaling: with none there, they run on SDPA, as the model's
    own attention does."""
    from support.behaviour import probe_module, recording
    from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni

    model = build(shrink("qwen2_5_omni_dit"))
    model.save_pretrained(tmp_path)
    result = qkmonitor.audit(tmp_path)
    modules = [m for m in model.modules() if type(m).__name__ == "DiTAttention"]
    assert result.model.n_layers["self"] == len(modules) > 0
    for index, module in enumerate(modules):
        d, d_in = module.inner_dim // module.heads, module.to_k.in_features
        hidden = torch.zeros(1, 8, d_in, dtype=torch.float64)
        kwargs = {"position_embeddings": _identity_rotary((1, 8, d)), "attention_mask": None}
        with (
            mock.patch.object(modeling_qwen2_5_omni, "eager_attention_forward", None),
            recording(model) as recorder,
        ):
            matrices, _ = probe_module(model, module, (hidden,), kwargs, recorder)
        heads = [h for h in result.heads if h.layer == index]
        assert len(heads) == len(matrices) == module.heads
        for head, matrix in zip(heads, matrices, strict=True):
            errors = relative_errors(head, naive_stats(matrix, d), label="attention call")
            assert max(errors.values()) < 1e-6, errors


# --- issue 17: relative-position attention (XLNet, Funnel, Granite Speech), SLANet, MiniCPM 5 ----


def _xlnet_call(stream: str):
    """XLNet's attention on token pairs (N, 2, d) as its (qlen, batch, d) content stream h, with
    random relative-position embeddings r (qlen + klen of them, the same for every pair, as the
    model's) and tokens in two segments: the position, segment and r_w_bias terms must cancel
    out of W^h. "query": the same tokens are
    also the query stream g, whose logits are the second softmax's."""

    def call(module, x):
        h = x.transpose(0, 1)
        generator = torch.Generator().manual_seed(0)
        r = torch.randn(4, 1, h.shape[2], generator=generator, dtype=h.dtype).expand(
            -1, h.shape[1], -1
        )
        different = torch.tensor([[0, 1], [1, 0]])  # token 0 and token 1 in two segments
        seg_mat = torch.nn.functional.one_hot(different, 2).to(h.dtype)[:, :, None]
        seg_mat = seg_mat.expand(2, 2, h.shape[1], 2)
        g = h if stream == "query" else None
        return module(h, g, None, None, r, seg_mat)

    return call


@pytest.mark.parametrize("stream", ["content", "query"])
def test_xlnet_heads_equal_their_own_logits(stream, tmp_path):
    """XLNet's q and k are (d_model, n_head, d_head) parameters used through einsum: every
    audited head equals W^h read off XLNetRelativeAttention's own logits, in the content stream
    and in the query stream (g), which uses the same q and k."""
    model = build(shrink("xlnet"))
    model.save_pretrained(tmp_path)
    result = qkmonitor.audit(tmp_path)
    layers, _ = plan(*(lambda s: (s.config, s.shapes()))(open_source(tmp_path)))
    modules = dict(model.named_modules())
    assert len(layers) == model.config.n_layer
    call = _xlnet_call(stream)
    for layer in layers:
        module = modules[layer.path]
        assert type(module).__name__ == "XLNetRelativeAttention"
        matrices = _own_logits_bilinear(
            lambda x, m=module: call(m, x), layer.d_in, skip=int(stream == "query")
        )
        heads = [h for h in result.heads if (h.block, h.layer) == (layer.block, layer.layer)]
        assert len(heads) == matrices.shape[0] == module.n_head
        for head, matrix in zip(heads, matrices, strict=True):
            errors = relative_errors(head, naive_stats(matrix, layer.head_dim), label="xlnet")
            assert max(errors.values()) < 1e-6, (layer.path, errors)


def _funnel_call(module, x):
    """Funnel's attention on token pairs with random relative-position embeddings (per block,
    shifts 1 and 2) and the two tokens of different token types: those terms and r_w_bias must
    cancel out of W^h."""
    generator = torch.Generator().manual_seed(0)
    d, blocks = x.shape[-1], len(module.config.block_sizes)
    position = [
        [torch.randn(8, d, generator=generator, dtype=x.dtype) for _ in range(2)]
        for _ in range(blocks)
    ]
    token_types = torch.tensor([[True, False], [False, True]]).expand(x.shape[0], 2, 2)
    return module(x, x, x, (position, token_types, None, None))


def _eager_sdpa(query, key, value, attn_mask=None, scale=None, **_):
    """F.scaled_dot_product_attention written out: softmax(scale q k^T + attn_mask) v, so that
    its logits are seen by the softmax capture."""
    logits = scale * query @ key.transpose(-2, -1) + attn_mask
    return torch.softmax(logits, dim=-1) @ value


def _granite_call(module, x):
    """A Granite Speech conformer attention on token pairs, in blocks of context_size (4: the
    pair padded as the forward pads a last short block), with its relative distances as the
    encoder computes them; pre_norm (the module's input LayerNorm, which W^h follows) is the
    identity, and sdpa is written out so that its logits are seen."""
    n = module.context_size
    seq = torch.arange(n)
    dists = (seq[:, None] - seq[None, :]).clamp(-n, n) + module.max_pos_emb
    with (
        mock.patch.object(module, "pre_norm", torch.nn.Identity()),
        mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", _eager_sdpa),
    ):
        return module(x, dists)


_RELATIVE = {  # model_type -> (attention class, call on token pairs, config changes)
    "funnel": ("FunnelRelMultiheadAttention", _funnel_call, {}),
    "granite_speech_encoder": (
        "GraniteSpeechConformerAttention",
        _granite_call,
        {"context_size": 4},
    ),
    "granite_speech_plus_encoder": (
        "GraniteSpeechPlusConformerAttention",
        _granite_call,
        {"context_size": 4},
    ),
}


@pytest.mark.parametrize("model_type", sorted(_RELATIVE))
def test_relative_position_attention_equals_its_own_logits(model_type, tmp_path):
    """Funnel and the Granite Speech conformers add relative-position (and token-type) terms to
    q.k; every audited head equals W^h read off the module's own logits, those terms cancelled.
    Granite's k is the first half of to_kv ([K; V])."""
    kind, call, changes = _RELATIVE[model_type]
    config = shrink(model_type)
    for key, value in changes.items():
        setattr(config, key, value)
    _check_own_logits(config, kind, call, tmp_path)


def test_head_parameters_are_read_off_their_shapes_or_refused():
    """XLNet's row reads heads and head_dim off the (d_in, heads, head_dim) parameters q and k
    (k with fewer heads: grouped keys); parameters of other shapes are refused in one line."""

    class XLNetRelativeAttention(torch.nn.Module):  # the table's row, on other parameters
        def __init__(self, k_shape) -> None:
            super().__init__()
            self.q = torch.nn.Parameter(torch.zeros(8, 2, 4))
            self.k = torch.nn.Parameter(torch.zeros(k_shape))
            self.scale = 0.5

    (layer,) = discovery.attention_modules(torch.nn.ModuleList([XLNetRelativeAttention((8, 1, 4))]))
    assert (layer.n_heads, layer.n_kv_heads, layer.head_dim, layer.d_in) == (2, 1, 4, 8)
    assert layer.scale == 0.5 and (layer.q, layer.k) == ("0.q", "0.k")
    for k_shape, reason in [((8, 2, 3), "do not pair into heads"), ((8, 8), "are not (d_in")]:
        with pytest.raises(UnsupportedModelError, match=re.escape(reason)):
            discovery.attention_modules(torch.nn.ModuleList([XLNetRelativeAttention(k_shape)]))


def test_kyutai_flexible_projections_are_refused():
    """Kyutai STT's model builds its attention with plain linear q/k; one built with flexible
    linears (a weight per codebook position, as Moshi's depth decoder) has no single W^h."""
    from transformers.models.kyutai_speech_to_text import modeling_kyutai_speech_to_text as kyutai

    config = shrink("kyutai_speech_to_text")
    for flexible in (False, True):
        with torch.device("meta"):
            holder = torch.nn.ModuleList(
                [kyutai.KyutaiSpeechToTextAttention(config, 0, use_flexible_linear=flexible)]
            )
        if flexible:
            with pytest.raises(UnsupportedModelError, match="one weight per codebook"):
                discovery.attention_modules(holder)
        else:
            (layer,) = discovery.attention_modules(holder)
            assert layer.q == "0.q_proj.linear.weight" and layer.k == "0.k_proj.linear.weight"


def test_funnel_pooled_query_layers_are_audited_with_their_block():
    """The first layer of each later Funnel block takes pooled queries (the same W^h on pooled
    tokens): every encoder and decoder layer is audited, none listed as not audited, and a
    config without architectures builds FunnelModel (the first of the Auto class's two)."""
    config = shrink("funnel")
    model = discovery.skeleton(config)
    assert type(model).__name__ == "FunnelModel"
    shapes = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    layers, notes = plan(config, shapes)
    modules = [p for p, m in model.named_modules() if type(m).__name__.startswith("FunnelRel")]
    assert sorted(layer.path for layer in layers) == sorted(modules)
    assert len(modules) == sum(config.block_sizes) + config.num_decoder_layers
    assert not notes.not_audited


def test_additive_attention_has_no_w_and_says_so(tmp_path):
    """SLANet's structure decoder attends by additive attention (no q.k): SLANet, which has
    nothing else, is refused with that one line; SLANeXt audits its vision tower and lists the
    cell as not audited with the same reason."""
    reason = "is additive attention"
    with pytest.raises(UnsupportedModelError) as refused:
        qkmonitor.audit(_folder("slanet", tmp_path / "slanet"))
    assert reason in str(refused.value) and "\n" not in str(refused.value)
    source = open_source(_folder("slanext", tmp_path / "slanext"))
    layers, notes = plan(source.config, source.shapes())
    assert layers
    assert [r["class"] for r in notes.not_audited] == ["SLANeXtAttentionGRUCell"]
    assert reason in notes.not_audited[0]["reason"]


def test_minicpm5_gated_queries_equal_what_the_model_computes(tmp_path):
    """MiniCPM 5 MoE's q_gate_proj holds per head [q_h; gate_h] (transformers 5.25 and later;
    skipped where the installed transformers has no minicpm5_moe)."""
    from transformers import CONFIG_MAPPING

    if "minicpm5_moe" not in CONFIG_MAPPING:
        pytest.skip("the installed transformers has no minicpm5_moe")
    outcome = verify(shrink("minicpm5_moe"), tmp_path)
    assert outcome.status == "exact" and outcome.heads > 0, outcome


# issue 17: fixed per-dimension query scaling (TimesFM, Gemma 3n/4 audio): softplus(v) on each
# query dimension, a diagonal on W_Q folded in like a QK-norm gain


@pytest.mark.parametrize(
    ("model_type", "kind"),
    [("timesfm", "TimesFmAttention"), ("timesfm2_5", "TimesFm2_5Attention")],
)
def test_per_dimension_query_scaling_equals_what_timesfm_attends_with(model_type, kind, tmp_path):
    """TimesFM scales query dimension i by softplus(scaling_i) 1.442695041 / sqrt(d) and passes
    scaling=1.0 (2.5 after its q_norm, RoPE at position 0): every audited head equals the q/k
    the module passes to its attention function on probe tokens. The model does not run on
    verify()'s dummy inputs."""
    from support.behaviour import probe_module, recording

    model = build(shrink(model_type))
    modules = [m for m in model.modules() if type(m).__name__ == kind]
    scales = torch.nn.functional.softplus(torch.stack([m.scaling.detach() for m in modules]))
    assert scales.std() > 0.01  # random per-dimension scales: a constant would not show
    model.save_pretrained(tmp_path)
    result = qkmonitor.audit(tmp_path)
    assert result.model.n_layers["self"] == len(modules) > 0
    for index, module in enumerate(modules):
        args, kwargs = _gemma_like_call(8, module.head_dim, module.k_proj.weight.shape[1])
        if model_type == "timesfm":  # no rotary: (hidden_states, attention_mask)
            kwargs.pop("position_embeddings")
        with recording(model) as recorder:
            matrices, _ = probe_module(model, module, args, kwargs, recorder)
        heads = [h for h in result.heads if h.layer == index]
        assert len(heads) == len(matrices) > 0
        for head, matrix in zip(heads, matrices, strict=True):
            errors = relative_errors(head, naive_stats(matrix, module.head_dim), label="call")
            assert max(errors.values()) < 1e-6, (index, head.head, errors)


def test_videoprism_pooling_query_scaling_equals_what_the_head_attends_with(tmp_path):
    """VideoPrism's attention pooling head scales its (learned) queries by 1.442695041 /
    sqrt(head_dim) and softplus(per_dim_scale) and passes scaling=1.0: every audited head,
    the pooling head's included, equals the reference's (its learned query given the probes)."""
    config = shrink("videoprism")
    outcome = verify(config, tmp_path)
    assert outcome.status == "exact" and outcome.heads > 0, outcome
    model = build(config)
    (head,) = [m for m in model.modules() if type(m).__name__.endswith("AttentionPoolingHead")]
    assert torch.nn.functional.softplus(head.per_dim_scale).std() > 0.01  # not a constant


#: model_type -> (attention class, config changes, call on token pairs (N, 2, d) given the model)
_AUDIO_SCALED = {
    # the softcap c tanh(z / c) made linear (c huge): SPEC leaves it out of W^h; 2 conformer
    # layers of the default 12 (the shrinking keeps them)
    "gemma3n_audio": (
        "Gemma3nAudioAttention",
        {"conf_attention_logit_cap": 1e12, "conf_num_hidden_layers": 2},
        lambda model, m, x: m(x, torch.zeros(x.shape[:2], dtype=torch.bool)),
    ),
    # clipped q/k linears (its default), finite bounds the probes stay within; the model's own
    # relative position embeddings
    "gemma4_audio": (
        "Gemma4AudioAttention",
        {"attention_logit_cap": 1e12},
        lambda model, m, x: m(x, _gemma4_audio_positions(model, x), None),
    ),
}


def _gemma4_audio_positions(model, x: torch.Tensor) -> torch.Tensor:
    (encoding,) = [
        m for m in model.modules() if type(m).__name__ == "Gemma4AudioRelPositionalEncoding"
    ]
    return encoding(x)


@pytest.mark.parametrize("model_type", sorted(_AUDIO_SCALED))
def test_audio_attention_with_per_dimension_query_scaling_equals_its_logits(model_type, tmp_path):
    """Gemma 3n/4 audio attention: queries times a constant and softplus(per_dim_scale), chunked
    local attention with a relative position term. Every audited head equals W^h read off the
    module's own logits of a query token (slot 1) for a key token (slot 0) in its first chunk,
    with the position term cancelled by the double difference; the position term and the
    softcap are named as left out."""
    kind, changes, call = _AUDIO_SCALED[model_type]
    config = shrink(model_type)
    for key, value in changes.items():
        setattr(config, key, value)
    model = build(config)
    clipped = [m for m in model.modules() if getattr(m, "use_clipped_linears", False)]
    for linear in clipped:  # stored bounds, as a trained checkpoint has them
        for name, bound in (("input", 50.0), ("output", 50.0)):
            getattr(linear, f"{name}_min").fill_(-bound)
            getattr(linear, f"{name}_max").fill_(bound)
    model.save_pretrained(tmp_path)
    result = qkmonitor.audit(tmp_path)
    assert any("softcap" in w for w in result.model.warnings)
    assert any("relative position term" in w for w in result.model.warnings)
    clamps = any("use_clipped_linears" in w for w in result.model.warnings)
    assert clamps == bool(clipped) == (model_type == "gemma4_audio")
    modules = [(p, m) for p, m in model.named_modules() if type(m).__name__ == kind]
    layers, _ = plan(*(lambda s: (s.config, s.shapes()))(open_source(tmp_path)))
    assert [layer.path for layer in layers] == [p for p, _ in modules] != []
    for layer, (_, module) in zip(layers, modules, strict=True):
        d_in = layer.d_in
        probes = torch.cat([torch.zeros(1, d_in), torch.eye(d_in)]).double()
        n = d_in + 1
        i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
        pairs = torch.stack([probes[j.flatten()], probes[i.flatten()]], dim=1)
        capture = _FirstSoftmaxInput()
        with torch.no_grad(), capture:
            call(model, module, pairs)
        # (pairs, heads, blocks, chunk, context): query slot 1 in the first chunk, key slot 0
        # at its place in that chunk's context (after max_past_horizon padded slots)
        z = capture.logits[:, :, 0, 1, module.max_past_horizon].T.reshape(-1, n, n)
        matrices = z[:, 1:, 1:] - z[:, 1:, :1] - z[:, :1, 1:] + z[:, :1, :1]
        heads = [h for h in result.heads if h.layer == layer.layer]
        assert len(heads) == matrices.shape[0] == module.num_heads
        for head, matrix in zip(heads, matrices, strict=True):
            errors = relative_errors(head, naive_stats(matrix, layer.head_dim), label="logits")
            assert max(errors.values()) < 1e-6, (layer.path, head.head, errors)


# issue 17: checkpoints whose q/k rows transformers reorders when loading (a lone PermuteForRope)


def test_rope_permuted_q_and_k_are_read_as_stored(tmp_path):
    """Mistral Large 4 saves its vision wq/wk for interleaved RoPE; loading permutes the rows
    within each head back (PermuteForRope), alike for q and k, so W^h of the stored tensors is
    the model's. The stored rows do differ from the model's, and every head equals the
    reference (text MLA heads included)."""
    from safetensors.torch import load_file

    config = shrink("mistral_large4")
    model = build(config)
    model.save_pretrained(tmp_path / "saved")
    tensors = {}
    for file in (tmp_path / "saved").glob("*.safetensors"):
        tensors.update(load_file(file))
    attention = model.vision_tower.transformer.layers[0].attention
    for stored, loaded in (("wq", attention.q_proj), ("wk", attention.k_proj)):
        (name,) = [
            n
            for n in tensors
            if n.startswith("vision") and n.endswith(f"layers.0.attention.{stored}.weight")
        ]
        assert not torch.equal(tensors[name], loaded.weight)  # another order of the rows
        rows = {tuple(r.tolist()) for r in loaded.weight}
        assert {tuple(r.tolist()) for r in tensors[name]} == rows
    outcome = verify(config, tmp_path / "verified")
    assert outcome.status == "exact", outcome.detail
    vision = [m for m in model.vision_tower.modules() if type(m).__name__ == "PixtralAttention"]
    assert outcome.heads > sum(m.num_heads for m in vision) > 0  # the text heads too


def test_rope_permutation_is_read_only_where_it_keeps_each_heads_q_dot_k():
    """A lone PermuteForRope reorders rows in blocks of rows / heads: read as stored only where
    q and k are reordered alike inside each head (equal blocks dividing head_dim, no gain or
    per-dimension scale that the permutation would have to follow); else refused."""
    from transformers.core_model_loading import PermuteForRope

    from qkmonitor.weights.layout import AttentionLayer, Packing

    class Config:
        num_attention_heads = 4

    meta = {
        "a.q_proj.weight": torch.empty(64, 64, device="meta"),
        "a.k_proj.weight": torch.empty(32, 64, device="meta"),  # 2 key heads of 16
    }
    permute = PermuteForRope()
    q = discovery._permuted_rows(permute, "wq", "a.q_proj.weight", meta, Config)
    k = discovery._permuted_rows(permute, "wk", "a.k_proj.weight", meta, Config)
    assert q["a.q_proj.weight"].block == 16 and k["a.k_proj.weight"].block == 8
    only_q = PermuteForRope(permute_layer_names=["wq"])
    assert discovery._permuted_rows(only_q, "wk", "a.k_proj.weight", meta, Config)[
        "a.k_proj.weight"
    ] == discovery._Rows(0, 32, 32)
    Config.num_attention_heads = 3
    assert "do not divide" in discovery._permuted_rows(
        permute, "wq", "a.q_proj.weight", meta, Config
    )

    layer = AttentionLayer("", 0, "a.q_proj.weight", "a.k_proj.weight", Packing.SEPARATE,
                           4, 4, 16, 64, 0.25, False)  # fmt: skip
    names = {layer.q: "wq", layer.k: "wk"}
    whole = discovery._Rows(0, 64, 64, 16)
    assert discovery._fused_reading(layer, names, {layer.q: whole, layer.k: whole}) is layer
    refused = [
        (layer, {layer.q: whole, layer.k: discovery._Rows(0, 64, 64, 8)}),  # other blocks
        (layer, {layer.q: whole}),  # k not reordered
        (replace(layer, q_norm="a.q_norm.weight", k_norm="a.k_norm.weight"),
         {layer.q: whole, layer.k: whole}),  # gains the permutation would have to follow
        (replace(layer, q_dim_scale="a.scaling"), {layer.q: whole, layer.k: whole}),
    ]  # fmt: skip
    for case, parts in refused:
        with pytest.raises(UnsupportedModelError, match=r"does not keep each head's q\.k"):
            discovery._fused_reading(case, names, parts)


def test_phi4_multimodal_qkv_text_and_every_tower_equal_what_the_model_computes(tmp_path):
    """Phi-4-multimodal's text decoder fuses qkv_proj as [Q; K; V] rows (as Phi-3): its heads
    and the vision tower's equal the reference's probes of the whole model; the audio
    conformer's attention, which the dummy forward does not reach, equals the q/k it passes to
    its attention function on probe tokens. The pooling head the model discards and the audio
    relative attention bias are listed as not audited."""
    from support.behaviour import probe_module, recording

    from qkmonitor.weights.layout import Packing

    model = build(shrink("phi4_multimodal"))
    model.save_pretrained(tmp_path)
    result = qkmonitor.audit(tmp_path)
    layers, _ = plan(*(lambda s: (s.config, s.shapes()))(open_source(tmp_path)))
    probed, failed = probe_model(model)
    matrices = {p.path: p.matrices for p in probed}
    with recording(model) as recorder:
        for path in failed:
            module = model.get_submodule(path)
            if type(module).__name__ == "Phi4MultimodalAudioAttention":
                hidden = torch.zeros(1, 8, module.q_proj.in_features, dtype=torch.float64)
                args, kwargs = (hidden,), {"attention_mask": None}
                matrices[path], _ = probe_module(model, module, args, kwargs, recorder)
    fused = [x for x in layers if x.packing is Packing.STACKED_QKV]
    assert [x.path for x in fused] == ["layers.0.self_attn", "layers.1.self_attn"]
    assert {x.block for x in layers} == {"self", "vision", "audio"}
    for layer in layers:
        heads = [h for h in result.heads if (h.block, h.layer) == (layer.block, layer.layer)]
        assert len(heads) == len(matrices[layer.path]) == layer.n_heads > 0
        for head, matrix in zip(heads, matrices[layer.path], strict=True):
            errors = relative_errors(head, naive_stats(matrix, layer.head_dim), label="model")
            assert max(errors.values()) < 1e-6, (layer.path, head.head, errors)
    kinds = {r["class"] for r in result.model.not_audited}
    assert kinds == {"MultiheadAttention", "Phi4MultimodalAudioRelativeAttentionBias"}


# --- packed or unusual q/k parts (issue 17) ---------------------------------------------------


def _padded(x: torch.Tensor, tokens: int) -> torch.Tensor:
    """Token pairs (N, 2, d) padded with zero tokens to ``tokens`` (a window the module needs
    whole): the pair's logits are read in slots 1 and 0."""
    return torch.cat([x, x.new_zeros(x.shape[0], tokens - 2, x.shape[-1])], dim=1)


def _input_norm_off(call):
    """``call`` with the module's input GroupNorm (VQGAN blocks normalize the tokens q, k and v
    all read, as a pre-norm layer's input norm) replaced by the identity."""

    def run(module, x):
        with mock.patch.object(module, "norm", torch.nn.Identity()):
            return call(module, x)

    return run


def _hiera_call(module, x):
    window = module.query_stride * module.window_size if module.use_mask_unit_attn else 2
    return module(_padded(x, window))


#: model_type -> (attention class, call on token pairs (N, 2, d), config changes, softmaxes to
#: skip: SAM 2's forward first softmaxes an unused product over heads); widths cut to keep the
#: (d_in + 1)^2 probe pairs small
_PACKED = {
    "hiera": ("HieraMaskUnitAttention", _hiera_call, {}, 0),
    "sam2_vision_model": ("Sam2MultiScaleAttention", lambda m, x: m(x[:, None]), {}, 1),
    "florence_vision": (
        "Florence2VisionWindowAttention",
        lambda m, x: m(x[:, None]),
        {"window_size": 2, "embed_dim": [16, 32, 32, 32], "num_groups": [4, 8, 8, 8]},
        0,
    ),
    "mgp-str": ("MgpstrAttention", lambda m, x: m(x), {}, 0),
    "chameleon_vqgan": (
        "ChameleonVQVAEEncoderAttnBlock",
        _input_norm_off(lambda m, x: m(x.transpose(1, 2)[..., None])),
        {"channel_multiplier": [1, 2]},
        0,
    ),
    "janus_vqgan": (
        "JanusVQVAEAttnBlock",
        _input_norm_off(lambda m, x: m(x.transpose(1, 2)[..., None])),
        {"channel_multiplier": [1, 2]},
        0,
    ),
    "wavtokenizer": (
        "WavTokenizerVocosAttention",
        _input_norm_off(lambda m, x: m(x.transpose(1, 2))),
        {},
        0,
    ),
    # query and key in 4 and 2 groups: W_Q and W_K block diagonal with blocks of two sizes
    "squeezebert": (
        "SqueezeBertSelfAttention",
        lambda m, x: m(x.transpose(1, 2), None, False),
        {"q_groups": 4, "k_groups": 2},
        0,
    ),
}


def _pooled(module) -> bool:
    """Whether a Hiera / SAM 2 attention max-pools its queries (query_stride)."""
    stride = getattr(module, "query_stride", None)
    return bool(stride) and stride != 1


@pytest.mark.parametrize("model_type", sorted(_PACKED))
def test_packed_and_pointwise_projections_equal_their_own_logits(model_type, tmp_path):
    """Fused qkv rows (Hiera, SAM 2, DaViT windows, MGP-STR), 1x1 convolutions (VQGAN attention
    blocks, one head of all channels) and grouped pointwise convolutions (SqueezeBERT, block
    diagonal): every audited head equals W^h read off the module's own logits. Layers that
    max-pool their queries are not audited (the next test)."""
    kind, call, changes, skip = _PACKED[model_type]
    config = shrink(model_type)
    for key, value in changes.items():
        setattr(config, key, value)
    _check_own_logits(config, kind, call, tmp_path, skip, select=lambda m: not _pooled(m))


@pytest.mark.parametrize(
    ("model_type", "kind", "reason"),
    [
        ("hiera", "HieraMaskUnitAttention", "max-pools its projected queries"),
        ("sam2_vision_model", "Sam2MultiScaleAttention", "max-pools its projected queries"),
        ("florence_vision", "Florence2VisionChannelAttention", "attends between channels"),
    ],
)
def test_pooled_queries_and_channel_attention_are_listed_not_audited(
    model_type, kind, reason, tmp_path
):
    """A layer that max-pools its projected queries (a maximum of projections is not bilinear)
    and DaViT's channel attention (channels attend to channels) are each in not_audited with
    the reason; the unpooled layers of the same class are audited (the test above)."""
    model = build(shrink(model_type))
    model.save_pretrained(tmp_path)
    result = qkmonitor.audit(tmp_path)
    modules = {p: m for p, m in model.named_modules() if type(m).__name__ == kind}
    listed = {r["module"]: r["reason"] for r in result.model.not_audited}
    channels = kind.endswith("ChannelAttention")
    expected = sorted(p for p, m in modules.items() if channels or _pooled(m))
    assert expected and sorted(p for p in listed if p in modules) == expected
    assert all(reason in listed[p] for p in expected)
    assert result.heads  # the window / unpooled attention of the same tower is audited


def _installed_or_skip(model_type: str) -> None:
    """Skip a test of a model_type the installed transformers does not have (newer ones are
    checked with the newest transformers' venv)."""
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"model_type {model_type!r} is not in this transformers")


def test_ergo_global_layers_fold_their_qk_scale_into_w(tmp_path):
    """Ergo's global layers multiply q and k, after the QK-norm, by the buffer qk_scale =
    sqrt(global_attention_scale): the logits by global_attention_scale, which the audit folds
    into the scale (sliding layers do not). Checked against the query and key the model passes
    to its attention function."""
    _installed_or_skip("ergo")
    config = shrink("ergo")
    config.global_attention_scale = 2.5
    outcome = verify(config, tmp_path)
    assert outcome.status == "exact", outcome.detail
    source = open_source(tmp_path)
    layers, _ = plan(source.config, source.shapes())
    kinds = [
        (t == "full_attention", x.scale * x.head_dim**0.5)
        for t, x in zip(config.layer_types, layers, strict=True)
    ]
    assert {full for full, _ in kinds} == {True, False}
    for full, factor in kinds:
        assert factor == pytest.approx(2.5 if full else 1.0, rel=1e-12)


def _running_statistics(model) -> None:
    """BatchNorm running statistics far from their initial (0, 1), so that folding them in
    (or not) shows."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm1d):
            size = module.running_var.shape
            with torch.no_grad():
                module.running_var.copy_(0.25 + 2 * torch.rand(size, generator=generator))
                module.running_mean.copy_(torch.randn(size, generator=generator))


def test_levit_heads_fold_the_batch_norm_and_equal_their_own_logits(tmp_path):
    """LeViT's queries_keys_values (Linear + BatchNorm1d, per head [q; k; v] with a wider v):
    every head of LevitAttention equals W^h read off its own logits in inference, with the
    BatchNorm's running variance folded in (the running mean is a bias) and the attention
    biases (a position term per offset) cancelled; the subsampling attention is listed in
    not_audited and the attention biases are named as left out."""
    config = shrink("levit")
    config.image_size, config.hidden_sizes = 128, [32, 48, 64]  # 64, 16, 4 tokens per stage

    def call(module, x):  # the bias table is sized for resolution^2 tokens
        return module(_padded(x, module.len_points))

    _check_own_logits(config, "LevitAttention", call, tmp_path, prepare=_running_statistics)
    result = qkmonitor.audit(tmp_path)
    assert not result.model.not_audited
    source = open_source(tmp_path)
    layers, notes = plan(source.config, source.shapes())
    block = [x for x in layers if x.packing.name == "PER_HEAD_BLOCK"]
    assert len(block) == 3 and all(x.batch_norm and x.head_block == 64 for x in block)
    assert any("attention_biases:" in w for w in notes)


def test_levit_subsampling_heads_fold_both_batch_norms_and_equal_their_own_logits(tmp_path):
    """LevitAttentionSubsample: queries from every stride-th token through queries (Linear +
    BatchNorm1d), keys from every token through keys_values (Linear + BatchNorm1d, per head
    [k; v]). Every head, from the checkpoint and the live model, equals W^h read off its own
    logits in inference of the query at token 0 (a subsampled one) for the key at token 1,
    both running variances folded in, biases and the position term cancelled."""
    config = shrink("levit")
    config.image_size, config.hidden_sizes = 128, [32, 48, 64]
    model = build(config).double().eval()
    _running_statistics(model)
    model.save_pretrained(tmp_path)
    paths = {m: p for p, m in model.named_modules()}
    modules = [m for m in model.modules() if type(m).__name__ == "LevitAttentionSubsample"]
    source = open_source(tmp_path)
    layers, _ = plan(source.config, source.shapes())
    assert modules and all(x.packing.name == "SEPARATE_KV_BLOCK" for x in layers if x.k_batch_norm)
    for result in (qkmonitor.audit(tmp_path), qkmonitor.audit(model)):
        checked = 0
        for module in modules:
            d_in = module.queries.linear.in_features
            probes = torch.cat([torch.zeros(1, d_in), torch.eye(d_in)]).double()
            n = d_in + 1
            i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
            hidden = torch.zeros(n * n, module.len_points, d_in, dtype=torch.float64)
            hidden[:, 0], hidden[:, 1] = probes[i.flatten()], probes[j.flatten()]
            capture = _FirstSoftmaxInput()
            with torch.no_grad(), capture:
                module(hidden)
            z = capture.logits[:, :, 0, 1].T.reshape(-1, n, n)
            matrices = z[:, 1:, 1:] - z[:, 1:, :1] - z[:, :1, 1:] + z[:, :1, :1]
            (layer,) = [x for x in layers if x.path == paths[module]]
            heads = [h for h in result.heads if (h.block, h.layer) == (layer.block, layer.layer)]
            assert len(heads) == matrices.shape[0] == module.num_attention_heads
            for head, matrix in zip(heads, matrices, strict=True):
                errors = relative_errors(head, naive_stats(matrix, module.key_dim), "subsample")
                assert max(errors.values()) < 1e-6, (head.layer, head.head, errors)
                checked += 1
        assert checked == sum(m.num_attention_heads for m in modules)


# --- issue 17: DeepSeek-V4's latent queries over one shared key head ---------------------------


class _RmsLeftOut(torch.overrides.TorchFunctionMode):
    """Leaves every RMS normalization's per-token factor out (torch.rsqrt gives ones: the norms
    keep only their gains, as SPEC's W^h does) and keeps float64 where a norm casts to float32."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.rsqrt:
            return torch.ones_like(args[0])
        to_float32 = torch.float32 in (*args[1:], kwargs.get("dtype"))
        if func is torch.Tensor.to and args[0].dtype == torch.float64 and to_float32:
            return args[0]
        return func(*args, **kwargs)


def _dsv4_logits(model, module, d_in: int) -> torch.Tensor:
    """(H, d_in, d_in): e_i^T W^h e_j read off what DeepseekV4Attention feeds its attention
    function (scaling q k^T for query token e_i, key token e_j), RoPE at position 0 (the
    model's own rotary there), the norms' per-token factors left out (``_RmsLeftOut``)."""
    from transformers.models.deepseek_v4 import modeling_deepseek_v4

    probes = torch.cat([torch.zeros(1, d_in), torch.eye(d_in)]).double()
    n = d_in + 1
    i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    pairs = torch.stack([probes[j.flatten()], probes[i.flatten()]], dim=1)  # (n n, 2, d_in)
    positions = torch.zeros(pairs.shape[0], 2, dtype=torch.long)
    rotary = getattr(model, "model", model).rotary_emb
    embeddings = {t: rotary(pairs, positions, layer_type=t) for t in ("main", "compress")}
    seen = []
    original = modeling_deepseek_v4.eager_attention_forward

    def record(module, query, key, value, attention_mask, scaling, **kwargs):
        seen.append(scaling * query @ key.transpose(-2, -1))
        return original(module, query, key, value, attention_mask, scaling, **kwargs)

    with (
        torch.no_grad(),
        mock.patch.object(modeling_deepseek_v4, "eager_attention_forward", record),
        _RmsLeftOut(),
    ):
        module(pairs, embeddings, positions, None)
    (logits,) = seen
    assert logits.shape[-1] == 2  # two tokens' keys; no compressed entry of two tokens
    z = logits[:, :, 1, 0].T.reshape(-1, n, n)
    return z[:, 1:, 1:] - z[:, 1:, :1] - z[:, :1, 1:] + z[:, :1, :1]


def test_deepseek_v4_heads_equal_what_its_attention_computes(tmp_path):
    """DeepSeek-V4: q = q_b_norm(q_b_proj(q_a_norm(q_a_proj x))) per head, k = v =
    kv_norm(kv_proj x), one key head for all; sinks and the compressor's extra keys (CSA, HCA
    layers) are not a token's key. Every head, from the saved checkpoint and from the live
    model, equals (1e-6) W^h read off what each attention module feeds its attention function,
    with random norm gains; the parts left out are named."""
    config = shrink("deepseek_v4")
    model = build(config).double()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("q_a_norm.weight", "kv_norm.weight")):
                parameter.copy_(torch.rand(parameter.shape, generator=generator) + 0.5)
    model.config._attn_implementation = "eager"
    model.save_pretrained(tmp_path)
    modules = [m for m in model.modules() if type(m).__name__ == "DeepseekV4Attention"]
    assert {m.layer_type for m in modules} >= {"compressed_sparse_attention"}
    for result in (qkmonitor.audit(tmp_path), qkmonitor.audit(model)):
        assert result.model.n_layers == {"self": len(modules)}
        assert result.model.n_kv_heads == {"self": 1}
        for index, module in enumerate(modules):
            d_in = module.q_a_proj.in_features
            matrices = _dsv4_logits(model, module, d_in)
            heads = [h for h in result.heads if h.layer == index]
            assert len(heads) == matrices.shape[0] == module.num_heads
            for head, matrix in zip(heads, matrices, strict=True):
                errors = relative_errors(head, naive_stats(matrix, module.head_dim), "dsv4")
                assert max(errors.values()) < 1e-6, (index, head.head, errors)
        notes = " ".join(result.model.warnings)
        assert "sinks:" in notes and "compressor: extra keys" in notes


def test_deepseek_v4_sliding_layers_are_exact_by_the_reference(tmp_path):
    """The behavioural reference cannot replay a layer with a compressor (its extra keys change
    the number of keys); with sliding-window layers only it verifies every head as exact."""
    config = shrink("deepseek_v4")
    config.layer_types = ["sliding_attention"] * len(config.layer_types)
    outcome = verify(config, tmp_path)
    assert outcome.status == "exact", outcome.detail
    assert outcome.heads == config.num_hidden_layers * config.num_attention_heads


class _FirstMatmul(torch.overrides.TorchFunctionMode):
    """The output of the first torch.matmul a module calls (Evolla's q k^T, q pre-scaled)."""

    product = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.matmul and self.product is None:
            self.product = out.detach()
        return out


def test_evolla_sequence_compressor_heads_equal_their_own_logits(tmp_path):
    """Evolla's sequence compressor: queries to_q of the latents, keys the [K; V] rows of to_kv
    over the protein states and latents. Every head, from the checkpoint and the live model,
    equals W^h read off the module's q k^T (before its max subtraction) for a latent query e_i
    and a protein-state key e_j, its input LayerNorms made the identity (W^h acts on their
    outputs, named as left out)."""
    model = build(shrink("evolla")).double()
    model.save_pretrained(tmp_path)
    kind = "EvollaSequenceCompressorAttention"
    modules = [(p, m) for p, m in model.named_modules() if type(m).__name__ == kind]
    source = open_source(tmp_path)
    layers = {x.path: x for x in plan(source.config, source.shapes())[0]}
    assert modules
    for result in (qkmonitor.audit(tmp_path), qkmonitor.audit(model)):
        assert not [r for r in result.model.not_audited if r["class"] == kind]
        assert any("norm_media, norm_latents:" in w for w in result.model.warnings)
        for path, module in modules:
            module = copy.deepcopy(module)
            module.norm_media = module.norm_latents = torch.nn.Identity()
            d_in, head_dim = module.to_q.in_features, module.to_q.out_features // module.heads
            probes = torch.cat([torch.zeros(1, d_in), torch.eye(d_in)]).double()
            n = d_in + 1
            i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
            queries, keys = probes[i.flatten()][:, None], probes[j.flatten()][:, None]
            capture = _FirstMatmul()
            with torch.no_grad(), capture:
                module(keys, queries, torch.ones(n * n, 2, dtype=torch.float64))
            z = capture.product[:, :, 0, 0].T.reshape(-1, n, n)
            matrices = z[:, 1:, 1:] - z[:, 1:, :1] - z[:, :1, 1:] + z[:, :1, :1]
            layer = layers[path]
            heads = [h for h in result.heads if (h.block, h.layer) == (layer.block, layer.layer)]
            assert len(heads) == matrices.shape[0] == module.heads
            for head, matrix in zip(heads, matrices, strict=True):
                errors = relative_errors(head, naive_stats(matrix, head_dim), label="evolla")
                assert max(errors.values()) < 1e-6, (path, head.head, errors)


class _TopkIndices(torch.overrides.TorchFunctionMode):
    """The indices of the first topk a module takes (Informer's kept queries)."""

    def __init__(self) -> None:
        super().__init__()
        self.indices = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.Tensor.topk and self.indices is None:
            self.indices = out[1].detach()
        return out


def test_informer_probsparse_heads_equal_the_logits_of_the_queries_it_keeps(tmp_path):
    """Informer's ProbSparse attention keeps the top-u queries (u = all of them with a large
    sampling factor) in topk's unsorted order and softmaxes their q.k: every audited head equals
    W^h read off those logits on probe tokens [0, e_1, ..., e_n], each row put back at its
    query by the topk indices the module took; the query selection is named as left out. The
    sweep's reference cannot read these logits (their rows are not in token order)."""
    config = shrink("informer")
    config.sampling_factor = 20  # u = min(20 ceil(ln(1 + L)), L) = L: every query kept
    model = build(config)
    model.save_pretrained(tmp_path)
    result = qkmonitor.audit(tmp_path)
    assert any("ProbSparse" in w for w in result.model.warnings)
    modules = [
        (p, m)
        for p, m in model.named_modules()
        if type(m).__name__ == "InformerProbSparseAttention"
    ]
    layers, _ = plan(*(lambda s: (s.config, s.shapes()))(open_source(tmp_path)))
    by_path = {layer.path: layer for layer in layers}
    assert modules and all(p in by_path for p, _ in modules)
    for path, module in modules:
        layer = by_path[path]
        n = layer.d_in
        probes = torch.cat([torch.zeros(1, n), torch.eye(n)]).double()[None]
        capture, kept = _FirstSoftmaxInput(), _TopkIndices()
        with torch.no_grad(), kept, capture:
            module(probes)
        logits = capture.logits  # (H, u, L): row r is query kept.indices[h, r]
        assert logits.shape == (module.num_heads, n + 1, n + 1)
        z = torch.empty_like(logits)
        for h in range(module.num_heads):
            z[h, kept.indices[h]] = logits[h]
        matrices = z[:, 1:, 1:] - z[:, 1:, :1] - z[:, :1, 1:] + z[:, :1, :1]
        heads = [h for h in result.heads if (h.block, h.layer) == (layer.block, layer.layer)]
        assert len(heads) == module.num_heads
        for head, matrix in zip(heads, matrices, strict=True):
            errors = relative_errors(head, naive_stats(matrix, layer.head_dim), label="logits")
            assert max(errors.values()) < 1e-6, (path, head.head, errors)
