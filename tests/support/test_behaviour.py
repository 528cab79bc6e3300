"""The behavioural reference's dummy inputs (support/behaviour.py `_inputs`, `_run`): types
whose model it once could not run ("the model does not run on dummy inputs") are run, and every
audited head equals what the model computes (verify(): "exact")."""

from __future__ import annotations

import pytest

from support.behaviour import _run, build, shrink
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
