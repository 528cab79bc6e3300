"""AlertMonitor and AlertRule: when an alert starts, what it says, and what it remembers."""

from __future__ import annotations

import pytest
import torch

from qkmonitor.training.alerts import DEFAULT_ALERTS, AlertMonitor, AlertRule

HEAD = ("self", 2, 1)


def test_alert_rules_absolute_and_relative_fire_once_per_episode():
    monitor = AlertMonitor([AlertRule("attn_entropy_norm", below=0.1, max_drop=0.5, window=3)])
    series = [0.9, 0.8, 0.35, 0.3, 0.9, 0.05]
    fired = [monitor.update({"attn_entropy_norm": {HEAD: v}}) for v in series]
    assert [bool(m) for m in fired] == [False, False, True, False, False, True]
    assert "layer 2 head 1" in fired[2][0] and "fell from 0.9 to 0.35" in fired[2][0]
    assert "below 0.1" in fired[5][0]
    rising = AlertMonitor([AlertRule("eig_var", max_rise=9.0)])
    assert not rising.update({"eig_var": {HEAD: 1.0}})
    assert "rose from 1 to 12" in rising.update({"eig_var": {HEAD: 12.0}})[0]


def test_a_rise_from_a_suppressed_level_is_not_a_spreading_spectrum():
    """Under a strong regularizer eig_var goes 1e-4 -> 1e-8; a tenfold rise back to 1e-7 stays
    far under the head's first value: the default rule stays quiet, a floorless one fires."""
    series = [1e-4, 1e-6, 1e-8, 2e-7, 5e-4]
    default = AlertMonitor(DEFAULT_ALERTS)
    floorless = AlertMonitor([AlertRule("eig_var", max_rise=9.0)])
    quiet = [default.update({"eig_var": {HEAD: v}}) for v in series]
    noisy = [floorless.update({"eig_var": {HEAD: v}}) for v in series]
    assert [bool(m) for m in noisy] == [False, False, False, True, False]  # one episode
    assert [bool(m) for m in quiet] == [False, False, False, False, True]
    assert "rose from 1e-08 to 0.0005" in quiet[4][0]


def test_entropy_collapse_is_a_drop_from_the_heads_early_value():
    """The default rule: a head focused from the start (0.042) stays quiet; the same head
    halving from its early value fires once; a wide head at 0.3 from 0.9 fires too."""
    monitor = AlertMonitor(DEFAULT_ALERTS)
    focused, wide = ("self", 0, 2), ("self", 0, 3)
    series = [(0.042, 0.9), (0.040, 0.8), (0.030, 0.6), (0.020, 0.3), (0.019, 0.29)]
    fired = [monitor.update({"attn_entropy_norm": {focused: f, wide: w}}) for f, w in series]
    assert [len(m) for m in fired] == [0, 0, 0, 2, 0]  # one episode per head
    assert (
        "layer 0 head 2: attn_entropy_norm fell from its early value 0.042 to 0.02 (-52%)"
        in (fired[3])
    )
    assert (
        "layer 0 head 3: attn_entropy_norm fell from its early value 0.9 to 0.3 (-67%)"
        in (fired[3])
    )


def test_the_early_value_is_the_mean_of_the_first_k_finite_values():
    rule = AlertRule("attn_entropy_norm", drop_from_early=0.5, early_steps=3)
    monitor = AlertMonitor([rule])
    series = [float("nan"), 0.2, 0.01, 0.9, 0.2, 0.18]  # early value: (0.2 + 0.01 + 0.9) / 3
    fired = [monitor.update({"attn_entropy_norm": {HEAD: v}}) for v in series]
    assert [bool(m) for m in fired] == [False, False, False, False, False, True]
    assert "early value 0.37 to 0.18" in fired[5][0]  # 0.2 is not below half of 0.37; 0.18 is
    resumed = AlertMonitor([rule])
    resumed.load(monitor.state())
    assert resumed.state()["early"] == {"attn_entropy_norm": {"self/2/1": [0.2, 0.01, 0.9]}}


def test_an_absolute_floor_is_an_option():
    """below= fires for any head under the floor, the focused one at its first measurement."""
    floor = AlertMonitor([AlertRule("attn_entropy_norm", below=0.05, drop_from_early=0.5)])
    first = floor.update({"attn_entropy_norm": {HEAD: 0.042}})
    assert first == ["layer 2 head 1: attn_entropy_norm = 0.042 is below 0.05"]
    assert not floor.update({"attn_entropy_norm": {HEAD: 0.041}})  # the same episode


def test_a_checkpoint_from_before_early_values_still_loads():
    monitor = AlertMonitor(DEFAULT_ALERTS)
    monitor.load({"history": {"attn_entropy_norm": {"self/2/1": [0.8]}},
                  "first": {"attn_entropy_norm": {"self/2/1": 0.8}}, "active": []})  # fmt: skip
    assert monitor.update({"attn_entropy_norm": {HEAD: 0.3}})


def test_first_values_survive_a_checkpoint():
    monitor = AlertMonitor(DEFAULT_ALERTS)
    for value in (float("nan"), 1e-4, 1e-8):  # NaN is never a reference
        monitor.update({"eig_var": {HEAD: value}})
    resumed = AlertMonitor(DEFAULT_ALERTS)
    resumed.load(monitor.state())
    assert not resumed.update({"eig_var": {HEAD: 1e-6}})  # x100, still under 1e-4
    assert resumed.update({"eig_var": {HEAD: 2e-4}})


@pytest.mark.parametrize(
    ("rule", "match"),
    [
        ({"max_drop": 1.5}, "max_drop"),
        ({"drop_from_early": 1.0}, "drop_from_early"),
        ({"drop_from_early": 0.5, "early_steps": 0}, "early_steps"),
        ({"max_rise": -1.0}, "max_rise"),
        ({"below": 0.1, "rise_floor": 1.0}, "rise_floor needs max_rise"),
        ({}, "sets no threshold"),
    ],
)
def test_bad_rules_are_refused(rule, match):
    with pytest.raises(ValueError, match=match):
        AlertRule("eig_var", **rule)


def test_the_bundled_models_focused_head_does_not_fire_at_the_first_measurement():
    """all-MiniLM-L6-v2's layer 0 head 2 is focused by design (normalized entropy under 0.05
    before any training): the default rules stay quiet at the first measurement, where an
    absolute floor of 0.05 fires for exactly that head."""
    from transformers import AutoTokenizer, BertModel

    from qkmonitor.training.monitor import QKMonitor
    from qkmonitor.weights.targets import bundled_model_path

    path = bundled_model_path()
    model = BertModel.from_pretrained(path)
    batch = AutoTokenizer.from_pretrained(path)(
        ["The cat sat on the mat because it was tired, and then it fell asleep."],
        return_tensors="pt",
    )
    floor = AlertRule("attn_entropy_norm", below=0.05)
    measured = []
    for alerts in (None, [floor]):  # None: DEFAULT_ALERTS
        monitor = QKMonitor(model, detail="head", alerts=alerts)
        with monitor.step(), torch.no_grad():
            model(**batch)
        measured.append((monitor.step_count, monitor.metrics(), monitor.alerts_fired))
        monitor.close()
    (steps, metrics, fired), (_, _, floored) = measured
    assert steps == 1 and metrics["qk/attn_entropy_norm/head_02/layer_00"] < 0.05
    assert fired == []
    assert [message.split(":")[0] for message in floored] == ["layer 0 head 2"]
