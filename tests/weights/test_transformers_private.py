"""The transformers-private names qkmonitor uses are reached through one adapter; a release that
moves one fails there, in one line naming the name, the installed version and the tested range."""

from __future__ import annotations

import pytest
import torch
import transformers
from distributed.tiny import tiny_bert
from transformers.integrations import deepspeed as hf_deepspeed

from qkmonitor.errors import QKMonitorError, UnsupportedModelError
from qkmonitor.training.capture import EntropyCapture
from qkmonitor.weights import discovery
from qkmonitor.weights import transformers_private as hf


def test_a_moved_attention_table_fails_in_one_line_at_the_first_recording(monkeypatch):
    capture = EntropyCapture(tiny_bert())
    for owner in transformers.AttentionInterface.__mro__:  # its base class has one too
        if "_global_mapping" in vars(owner):
            monkeypatch.delattr(owner, "_global_mapping")
    with pytest.raises(hf.TransformersInternalsError) as raised, capture.recording():
        pass
    message = str(raised.value)
    assert "\n" not in message
    assert "AttentionInterface._global_mapping" in message
    assert f"transformers {transformers.__version__}" in message
    assert "is within the tested range transformers>=5,<6" in message


def test_the_message_says_when_the_installed_version_is_outside_the_tested_range(monkeypatch):
    monkeypatch.setattr(hf, "installed_version", lambda: "6.2.0")
    with pytest.raises(hf.TransformersInternalsError, match=r"6\.2\.0 is outside the tested range"):
        hf.bloom_split(torch.nn.Linear(2, 2), torch.zeros(1))


def test_each_accessor_reads_what_transformers_has_today():
    model = tiny_bert()
    assert hf.attention_functions() is transformers.AttentionInterface._global_mapping
    assert hf.attn_implementation(model.config) == model.config._attn_implementation
    built = hf.from_config(type(model), model.config)
    assert type(built) is type(model)


def test_zero3_construction_is_switched_off_inside_and_restored_after(monkeypatch):
    class Zero3:
        def is_zero3(self) -> bool:
            return True

    config = Zero3()
    hf_deepspeed.set_hf_deepspeed_config(config)
    try:
        assert hf_deepspeed.is_deepspeed_zero3_enabled()
        with hf.zero3_construction_off():
            assert not hf_deepspeed.is_deepspeed_zero3_enabled()
        assert hf_deepspeed.is_deepspeed_zero3_enabled()
    finally:
        hf_deepspeed.unset_hf_deepspeed_config()


def test_the_skeleton_is_built_outside_transformers_zero3_switch(monkeypatch):
    """Under an HfDeepSpeedConfig with ZeRO-3 the meta build would go through zero.Init."""
    seen = []

    def record(cls, config, **kwargs):
        seen.append(hf_deepspeed.is_deepspeed_zero3_enabled())
        return cls._from_config(config, **kwargs)

    class Zero3:
        def is_zero3(self) -> bool:
            return True

    monkeypatch.setattr(hf, "from_config", record)
    config, keep = tiny_bert().config, Zero3()
    config.num_hidden_layers = 3  # not a cached skeleton
    hf_deepspeed.set_hf_deepspeed_config(keep)
    try:
        discovery.skeleton(config)
    finally:
        hf_deepspeed.unset_hf_deepspeed_config()
    assert seen == [False]


def test_an_environment_error_while_building_is_not_blamed_on_the_config(monkeypatch):
    def broken(cls, config, **kwargs):
        raise NotImplementedError("Cannot copy out of meta tensor; no data!")

    monkeypatch.setattr(hf, "from_config", broken)
    config = tiny_bert().config
    config.num_hidden_layers = 5  # not a cached skeleton
    with pytest.raises(QKMonitorError, match="failed in this environment") as raised:
        discovery.skeleton(config)
    assert "config" not in str(raised.value)
    assert not isinstance(raised.value, UnsupportedModelError)


def test_a_moved_float_decoder_is_not_blamed_on_config_json(monkeypatch, tmp_path):
    """config.json's {"__float__": "Infinity"} is decoded through the adapter; a release without
    the decoder says so in one line, never that the config is invalid."""
    from transformers import PretrainedConfig

    from qkmonitor.weights.checkpoint import load_config

    values = {"model_type": "llama", "time_step_limit": [0.0, {"__float__": "Infinity"}]}
    assert load_config(dict(values), "here").time_step_limit[1] == float("inf")
    monkeypatch.delattr(PretrainedConfig, "_decode_special_floats")
    with pytest.raises(hf.TransformersInternalsError, match="_decode_special_floats") as raised:
        load_config(dict(values), "here")
    assert "invalid" not in str(raised.value)
