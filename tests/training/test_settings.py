"""MonitorSettings: one validated, frozen settings object for QKMonitor, the Trainer callback
and the Lightning callback; its asdict form is the callback's checkpointed arguments."""

from __future__ import annotations

import dataclasses
import json

import pytest
from distributed.tiny import tiny_bert

from qkmonitor import MonitorSettings, QKMonitor, QKMonitorCallback
from qkmonitor.training.alerts import DEFAULT_ALERTS, AlertRule
from qkmonitor.training.lightning import QKMonitorLightningCallback


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"regularization": -1.0}, "must be >= 0"),
        ({"interval": 0}, "interval"),
        ({"interval": 1.5}, "interval"),
        ({"detail": "neuron"}, "detail"),
        ({"statistics": "eig_var"}, "sequence of names"),
        ({"statistics": ["eig_median"]}, "unknown statistics"),
        ({"heads": [-1]}, "heads"),
        ({"qk_clip": 0.0}, "qk_clip"),
        ({"alerts": [{"statistic": "eig_var"}]}, "no threshold"),
    ],
)
def test_each_front_end_refuses_a_bad_setting_through_the_same_check(kwargs, match):
    for make in (MonitorSettings, QKMonitorCallback, QKMonitorLightningCallback):
        with pytest.raises(ValueError, match=match):
            make(**kwargs)


def test_settings_are_frozen_normalized_and_round_trip_through_json():
    settings = MonitorSettings(
        0.1, layers=[3, 1, 1], heads=[2, 0], alerts=[{"statistic": "eig_var", "above": 2.0}]
    )
    assert settings.layers == (1, 3) and settings.heads == (0, 2)
    assert settings.alerts == (AlertRule("eig_var", above=2.0),)
    assert MonitorSettings().alerts == DEFAULT_ALERTS
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.interval = 3
    restored = MonitorSettings(**json.loads(json.dumps(dataclasses.asdict(settings))))
    assert restored == settings


def test_keyword_settings_override_a_settings_object_and_unknown_ones_are_refused():
    base = MonitorSettings(0.1, interval=5)
    assert MonitorSettings.build(base, {"interval": 2}) == MonitorSettings(0.1, interval=2)
    assert QKMonitorCallback(settings=base, detail="head").settings == MonitorSettings(
        0.1, interval=5, detail="head"
    )
    with pytest.raises(TypeError, match="unknown setting"):
        QKMonitorCallback(intervall=3)


def test_the_callback_checkpoints_its_settings_and_is_rebuilt_from_them():
    """The Trainer restores an ExportableState as type(cb)(**state["args"])."""
    callback = QKMonitorCallback(0.1, interval=3, heads=[1], stop_on_alert=True, console="full")
    state = json.loads(json.dumps(callback.state()))
    rebuilt = QKMonitorCallback(**state["args"])
    assert rebuilt.settings == callback.settings
    assert (rebuilt.stop_on_alert, rebuilt.console) == (True, "full")


def test_the_monitor_uses_the_settings_it_is_given():
    settings = MonitorSettings(heads=[0, 1], statistics=("eig_var",), interval=2)
    monitor = QKMonitor(tiny_bert(), settings=settings)
    try:
        assert monitor.settings is settings and monitor.interval == 2
        assert QKMonitor(tiny_bert(), 0.0).interval == 1  # interval None: every step
    finally:
        monitor.close()
