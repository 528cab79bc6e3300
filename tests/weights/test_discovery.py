"""Discovery against the behavioural reference, over a curated list of architectures.

For each model_type a tiny float64 model is built from its shrunken default config, saved with
save_pretrained (safetensors, in whatever key layout transformers writes), and audited. Every
head must equal, to 1e-6 relative, the naive float64 statistics of the W^h that
tests/support/behaviour.py derives from the query and key the model itself passes to its
attention computation; and every attention module the model runs must be audited exactly once.
Or the audit must refuse with the one-line reason listed here. Nothing here reads the table.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
from support.behaviour import build, shrink
from support.checks import one_line_error
from support.verify import verify

import qkmonitor
from qkmonitor.errors import CorruptWeightsError, UnsupportedModelError
from qkmonitor.weights import discovery

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
        "gemma3 llava llava_next qwen3_vl idefics3 smolvlm paligemma "
        # made verifiable by the reference (towers run, ALiBi, torch's MHA, MLA with top-k)
        "qwen2_5_vl mistral3 blip-2 instructblip bloom wavlm deepseek_v2 siglip2_vision_model "
        "parakeet_encoder omniasr_audio patchtst qwen3_5 exaone4_5".split(),
        "exact",
    ),
    "persimmon": "removes the mean (LayerNorm)",
    "codegen": "mp_num model-parallel chunks",
    "led": "two W^h per head",
    "longt5": "does not expose the softmax scale",
    "mobilebert": "two separate input tensors",
    "inkling_text": "mixes neighbouring tokens",
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


def test_qk_norm_gain_convention_is_measured():
    """Gemma 3 multiplies by (1 + w), Qwen3 by w: read by probing the norm, not by name."""
    offsets = {}
    for model_type in ("gemma3_text", "qwen3"):
        (first, *_) = discovery.discover(discovery.skeleton(shrink(model_type)))
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
    """plan_layers of a live model not in the table: the same layers, norms included."""
    from qkmonitor.training.live import plan_layers

    model = build(shrink("olmoe"))
    layers, warnings = plan_layers(model)
    assert warnings == []
    assert [layer.name for layer in layers] == ["layers.0.self_attn", "layers.1.self_attn"]
    for layer in layers:
        assert layer.module is model.get_submodule(layer.name)
        assert layer.plan.q_norm and layer.plan.q_norm in layer.getters
        q = layer.getters[layer.plan.q]()
        assert q is layer.module.q_proj.weight


@pytest.mark.parametrize("model_type", ["olmoe", "gemma3", "whisper", "deepseek_v3"])
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
