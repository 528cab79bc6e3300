"""The qk/ log keys: each names its statistic, how heads (and layers) were combined, and where."""

from __future__ import annotations

import pytest

from qkmonitor.training.keys import MetricKey, head_key, layer_key, model_key, parse_key


def test_keys_name_their_reduction():
    assert layer_key("eig_var", "mean", "self", 3) == "qk/eig_var/mean/layer_03"
    assert (
        layer_key("attn_max_logit", "max", "encoder", 11)
        == "qk/attn_max_logit/max/encoder_layer_11"
    )
    assert head_key("attn_entropy", "cross", 0, 5) == "qk/attn_entropy/head_05/cross_layer_00"
    assert model_key("eig_var", "mean") == "qk/eig_var/mean"


@pytest.mark.parametrize(
    ("key", "parsed", "per_head", "spread"),
    [
        ("qk/eig_var/mean/layer_03", MetricKey("eig_var", "mean", "layer_03"), False, False),
        ("qk/eig_var/min/encoder_layer_03", MetricKey("eig_var", "min", "encoder_layer_03"),
         False, True),
        ("qk/attn_max_logit/max/layer_01", MetricKey("attn_max_logit", "max", "layer_01"),
         False, False),
        ("qk/attn_max_logit/max", MetricKey("attn_max_logit", "max", None), False, False),
        ("qk/eig_var/head_05/layer_03", MetricKey("eig_var", "head_05", "layer_03"), True, False),
        ("qk/rank_collapse/layer_02", MetricKey("rank_collapse", None, "layer_02"), False, False),
        ("qk/rank_collapse/mean", MetricKey("rank_collapse", "mean", None), False, False),
        ("qk/reg/R", MetricKey("reg", "R", None), False, False),
    ],
)  # fmt: skip
def test_keys_read_back(key, parsed, per_head, spread):
    assert parse_key(key) == parsed
    assert (parsed.per_head, parsed.spread) == (per_head, spread)


@pytest.mark.parametrize("key", ["loss", "qk/eig_var", "qk/a/b/c/d", "train/qk/eig_var/mean"])
def test_other_keys_are_not_qk_keys(key):
    assert parse_key(key) is None
