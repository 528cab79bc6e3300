"""The behavioural reference's dummy inputs (support/behaviour.py `_inputs`, `_run`): types
whose model it once could not run ("the model does not run on dummy inputs") are run, and every
audited head equals what the model computes (verify(): "exact")."""

from __future__ import annotations

import pytest

from support.behaviour import _run, build, shrink, shrunken_dict
from support.verify import verify

#: model_type -> the input rule that makes it run
_NOW_RUN = {
    "kimi_k25_vision": "flattened patches with their grid, for a pixel_values tower",
    "muse_spark_vision": "two frames per patch, which its tower config does not state",
    "gemma4_vision": "patches with their (x, y) positions",
    "time_series_transformer": "past values over the context and lags, time features, mask",
    "qwen3_omni_moe_talker_text": "embeddings where input_ids must be None",
    "siglip_text_model": "no more tokens than its learned positions",
    "swin": "a failed small image leaves neither window sizes nor captured calls behind",
    "lightglue": "image pairs; its keypoint rotation made the identity",
    "vjepa2": "a short clip; its in-module 3D RoPE at index 0",
    "xmod": "a language per sequence",
    "mimi_decoder": "a codec decoder's latents",
    "xclip_vision_model": "a clip's frames as the batch",
}


@pytest.mark.parametrize("model_type", sorted(_NOW_RUN))
def test_types_the_reference_now_runs_are_exact(model_type, tmp_path):
    outcome = verify(shrink(model_type), tmp_path)
    assert outcome.status == "exact", (_NOW_RUN[model_type], outcome.detail)
    assert outcome.heads > 0


def test_a_failed_candidate_leaves_no_calls():
    """Swin's first candidate (a small image) fails after its first attention calls ran: those
    calls are dropped, so each module's calls are those of the image that ran."""
    model = build(shrink("swin"))
    calls = _run(model, 72)
    assert len(calls) == len({id(call[0]) for call in calls}) > 0


# --- tiny configs (support/behaviour.py `shrunken_dict`): fields the model derives from others
# kept consistent with the shrunken sizes

#: model_type -> the shrinking rule that makes its tiny model run (each was "the model does not
#: run on dummy inputs")
_SHRUNK_CONSISTENT = {
    "glm4v_moe_text": "M-RoPE sections of the model code's default, rescaled to the rotary width",
    "deepseek_ocr2_text": "a top-k the default leaves None",
    "kimi_linear": "top-k within the shrunken experts",
    "beam": "one expert group of the shrunken experts",
    "bros": "widths its __post_init__ computes from hidden / heads, recomputed",
    "zamba2": "hybrid_layer_ids recomputed from the kept layers",
    "mistral4": "MLA's partial rotary factor of the shrunken rope and nope parts",
    "eomt": "its query blocks within the kept layers",
    # its pixel-shuffle width; its complex rotary buffer kept complex and held at position 0;
    # its attention's own eager function found under the forward's decorators
    "llama4_vision_model": "intermediate_size = hidden / pixel_shuffle_ratio^2",
}


@pytest.mark.parametrize("model_type", sorted(_SHRUNK_CONSISTENT))
def test_types_whose_shrunken_config_now_runs_are_exact(model_type, tmp_path):
    outcome = verify(shrink(model_type), tmp_path)
    assert outcome.status == "exact", (_SHRUNK_CONSISTENT[model_type], outcome.detail)
    assert outcome.heads > 0


def _half_rotary(config) -> int:
    head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return int(head * config.rope_parameters.get("partial_rotary_factor", 1.0)) // 2


@pytest.mark.parametrize("model_type", ["glm4v_moe_text", "paddleocr_vl_text", "qwen2_5_omni_text"])
def test_code_default_mrope_sections_fill_half_the_shrunken_rotary_width(model_type):
    config = shrink(model_type)
    sections = config.rope_parameters["mrope_section"]
    assert len(sections) == 3 and min(sections) > 0
    assert sum(sections) == _half_rotary(config)


@pytest.mark.parametrize(
    ("model_type", "top_k", "experts"),
    [
        ("kimi_linear", "num_experts_per_token", "num_experts"),
        ("longcat_flash", "moe_topk", "n_routed_experts"),
        ("deepseek_ocr2_text", "num_experts_per_tok", "n_routed_experts"),
        ("axk1", "num_experts_per_tok", "n_routed_experts"),
    ],
)
def test_routers_pick_at_most_the_shrunken_experts(model_type, top_k, experts):
    values = shrunken_dict(model_type)
    assert isinstance(values[top_k], int) and 1 <= values[top_k] <= values[experts]
    for group in ("n_group", "num_expert_group"):
        if isinstance(values.get(group), int):
            assert values[experts] % values[group] == 0
            assert values["topk_group"] <= values[group]


def test_attributes_post_init_derives_are_recomputed():
    bros = shrink("bros")
    assert bros.dim_bbox_projection == bros.hidden_size // bros.num_attention_heads
    assert bros.dim_bbox_sinusoid_emb_1d == bros.hidden_size // 4 // bros.dim_bbox
    zamba2 = shrink("zamba2")
    kinds = zamba2.layers_block_type
    assert zamba2.hybrid_layer_ids == [i for i, kind in enumerate(kinds) if kind == "hybrid"]
    mla = shrink("axk1")
    assert mla.qk_head_dim == mla.qk_nope_head_dim + mla.qk_rope_head_dim


def test_hiera_patch_width_is_its_first_stage_width():
    config = shrink("sam2_hiera_det_model")
    assert config.hidden_size == config.embed_dim_per_stage[0] < 96


@pytest.mark.parametrize("model_type", ["fsmt", "mra"])
def test_float64_models_casting_to_float32_inside_run(model_type):
    """FSMT fills its float32-cast mask with float64's minimum, MRA multiplies float32 q, k, v
    into float64 layers: run last with those casts keeping float64."""
    _run(build(shrink(model_type)), 72)
