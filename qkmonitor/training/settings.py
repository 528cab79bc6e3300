"""MonitorSettings: what to measure and regularize, validated once, shared by every front end.

``QKMonitor``, ``QKMonitorCallback`` and ``QKMonitorLightningCallback`` take the same keyword
settings and build one frozen ``MonitorSettings`` from them (or take one as ``settings=``). It is
validated in ``__post_init__``, so a bad value fails when the settings are made, in one line,
whatever the front end. ``dataclasses.asdict(settings)`` is its JSON form (alert rules as dicts):
the Trainer callback saves it in checkpoints and ``MonitorSettings(**that)`` restores it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from qkmonitor.statistics import HEAD_STATISTICS
from qkmonitor.training.alerts import DEFAULT_ALERTS, AlertRule, as_rule

__all__ = ["SPECTRAL_STATISTICS", "MonitorSettings"]

#: spectral statistics that can be logged (declared in qkmonitor.statistics.HEAD_STATISTICS)
SPECTRAL_STATISTICS = tuple(statistic.name for statistic in HEAD_STATISTICS)
_DETAILS = ("layer", "head")


@dataclass(frozen=True)
class MonitorSettings:
    """What QKMonitor measures and whether it regularizes or clips (frozen, validated).

    Args:
        regularization: lambda >= 0 of the spectral regularizer (0: monitor only; training is
            then bit-for-bit unchanged).
        interval: monitor every ``interval`` optimizer steps; None: every step for QKMonitor and
            Lightning, every Trainer log (``logging_steps``) for the Trainer callback.
        layers: layer indices to monitor and regularize (in every attention stack); None: all.
        heads: head indices to monitor and regularize in each layer; None: all.
        detail: "layer": per-layer aggregates; "head": also one key per head.
        statistics: spectral statistics to log, from SPECTRAL_STATISTICS.
        entropy: measure attn_entropy / attn_entropy_norm on the monitored steps' forwards.
        max_logit: measure attn_max_logit per head there (from the same pass).
        qk_clip: tau > 0 turns on QK-Clip (max logits then measured on every step); None: off.
        rank_collapse: also log rank_collapse per layer.
        alerts: collapse alert rules (AlertRule or its dict form); None: DEFAULT_ALERTS, () for
            none. Stored as a tuple of AlertRule.

    Raises:
        ValueError: a value no model can make valid (one line).
    """

    regularization: float = 0.0
    interval: int | None = None
    layers: tuple[int, ...] | None = None
    heads: tuple[int, ...] | None = None
    detail: str = "layer"
    statistics: tuple[str, ...] = ("eig_mean", "eig_var")
    entropy: bool = True
    max_logit: bool = True
    qk_clip: float | None = None
    rank_collapse: bool = False
    alerts: tuple[AlertRule, ...] | None = field(default=None)

    def __post_init__(self) -> None:
        regularization = self.regularization
        if isinstance(regularization, bool) or not regularization >= 0:  # also rejects NaN
            raise ValueError(f"regularization (lambda) must be >= 0, got {regularization}")
        interval = self.interval
        if interval is not None and (
            isinstance(interval, bool) or not isinstance(interval, int) or interval <= 0
        ):
            raise ValueError(f"interval must be a positive number of steps, got {interval}")
        if self.detail not in _DETAILS:
            raise ValueError(f"detail must be one of {_DETAILS}, got {self.detail!r}")
        if isinstance(self.statistics, str):
            raise ValueError(f"statistics must be a sequence of names, got {self.statistics!r}")
        unknown = [s for s in self.statistics if s not in SPECTRAL_STATISTICS]
        if unknown:
            raise ValueError(f"unknown statistics {unknown}; choose from {SPECTRAL_STATISTICS}")
        heads = self.heads
        if heads is not None and (not heads or min(heads) < 0):
            raise ValueError(f"heads must be non-empty, non-negative indices, got {heads}")
        qk_clip = self.qk_clip
        if qk_clip is not None and (
            isinstance(qk_clip, bool) or not (0 < qk_clip < math.inf)
        ):  # also rejects NaN
            raise ValueError(f"qk_clip (tau) must be a positive number, got {qk_clip}")
        rules = self.alerts
        normalized: dict[str, Any] = {
            "regularization": float(regularization),
            "layers": None if self.layers is None else tuple(sorted(set(self.layers))),
            "heads": None if heads is None else tuple(sorted(set(heads))),
            "statistics": tuple(self.statistics),
            "qk_clip": None if qk_clip is None else float(qk_clip),
            "alerts": DEFAULT_ALERTS if rules is None else tuple(as_rule(rule) for rule in rules),
        }
        for name, value in normalized.items():
            object.__setattr__(self, name, value)

    @classmethod
    def build(cls, settings: MonitorSettings | None, options: Mapping[str, Any]) -> MonitorSettings:
        """``settings`` with ``options`` (keyword settings) applied; either may be empty."""
        base = settings if settings is not None else cls()
        if not isinstance(base, MonitorSettings):
            raise TypeError(f"settings must be a MonitorSettings, got {type(base).__name__}")
        if not options:
            return base
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown setting(s) {unknown}; MonitorSettings has {sorted(known)}")
        values = {name: getattr(base, name) for name in known}
        return cls(**{**values, **options})
