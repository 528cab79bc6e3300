"""AlertMonitor and AlertRule: when an alert starts, what it says, and what it remembers."""

from __future__ import annotations

import pytest

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
        ({"max_rise": -1.0}, "max_rise"),
        ({"below": 0.1, "rise_floor": 1.0}, "rise_floor needs max_rise"),
        ({}, "sets no threshold"),
    ],
)
def test_bad_rules_are_refused(rule, match):
    with pytest.raises(ValueError, match=match):
        AlertRule("eig_var", **rule)
