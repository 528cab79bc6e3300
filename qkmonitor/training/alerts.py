"""Collapse alerts: thresholds on per-head statistics, absolute and relative within a window.

An ``AlertRule`` watches one per-head statistic (``attn_entropy_norm``, ``eig_var``, ...) and
fires for a head when its value crosses an absolute bound, or changed by more than a relative
amount against the extreme of the last ``window`` monitored steps. A rise can be required to
also reach a floor relative to the head's first monitored value, so that a statistic recovering
from a suppressed level (eig_var under a strong regularizer, 1e-4 down to 1e-8 and back up to
1e-7) is not mistaken for a spreading spectrum. An alert is reported when its
condition starts (not again while it persists), so a collapsed head gives one warning, and again
only if it recovers and collapses anew. ``AlertMonitor`` keeps the history and that state, both
JSON-serializable for Trainer checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["DEFAULT_ALERTS", "AlertMonitor", "AlertRule", "HeadKey"]

#: (block, layer, head), e.g. ("self", 3, 5)
HeadKey = tuple[str, int, int]


@dataclass(frozen=True)
class AlertRule:
    """Fire for a head when ``statistic`` crosses a bound or moves too fast.

    below/above: absolute bounds on the value.
    max_drop: relative drop from the highest value in the window, e.g. 0.5 fires when the value
        fell below half of that maximum.
    max_rise: relative rise over the lowest value in the window, e.g. 9.0 fires when the value
        grew more than tenfold.
    rise_floor: max_rise fires only when the value also exceeds rise_floor times the head's
        first monitored value (None: no floor).
    window: number of monitored steps the relative rules look back over (this one included).
    """

    statistic: str
    below: float | None = None
    above: float | None = None
    max_drop: float | None = None
    max_rise: float | None = None
    rise_floor: float | None = None
    window: int = 10

    def __post_init__(self) -> None:
        if all(v is None for v in (self.below, self.above, self.max_drop, self.max_rise)):
            raise ValueError(f"alert on {self.statistic!r} sets no threshold")
        if self.max_drop is not None and not 0 < self.max_drop < 1:
            raise ValueError(f"max_drop must be in (0, 1), got {self.max_drop}")
        if self.max_rise is not None and self.max_rise <= 0:
            raise ValueError(f"max_rise must be > 0, got {self.max_rise}")
        if self.rise_floor is not None and (self.max_rise is None or self.rise_floor < 0):
            raise ValueError(f"rise_floor needs max_rise and must be >= 0, got {self.rise_floor}")
        if self.window < 2:
            raise ValueError(f"alert window must be >= 2 monitored steps, got {self.window}")

    @property
    def name(self) -> str:
        """A stable identifier of the rule, for the alert state."""
        return ",".join(f"{k}={v}" for k, v in asdict(self).items() if v is not None)

    def check(self, value: float, history: list[float], first: float = math.nan) -> str | None:
        """Why this value (the last of ``history``) fires the rule, or None; first: the head's
        first finite monitored value (for rise_floor)."""
        if self.below is not None and value < self.below:
            return f"{self.statistic} = {value:.4g} is below {self.below:g}"
        if self.above is not None and value > self.above:
            return f"{self.statistic} = {value:.4g} is above {self.above:g}"
        past = [v for v in history[:-1] if math.isfinite(v)]
        if past and self.max_drop is not None:
            top = max(past)
            if top > 0 and (top - value) / top > self.max_drop:
                return (
                    f"{self.statistic} fell from {top:.4g} to {value:.4g} "
                    f"(-{100 * (top - value) / top:.0f}%) within {len(history)} monitored steps"
                )
        floor = -math.inf
        if self.rise_floor is not None and math.isfinite(first):
            floor = self.rise_floor * first
        if past and self.max_rise is not None and value > floor:
            low = min(past)
            if low > 0 and (value - low) / low > self.max_rise:
                return (
                    f"{self.statistic} rose from {low:.4g} to {value:.4g} "
                    f"(x{value / low:.3g}) within {len(history)} monitored steps"
                )
        return None


#: entropy collapse (a head's normalized entropy under 0.05, or halved within 10 monitored
#: steps) and a spreading spectrum (a head's eig_var grown tenfold within 10 monitored steps,
#: to above its value at the first monitored step)
DEFAULT_ALERTS: tuple[AlertRule, ...] = (
    AlertRule("attn_entropy_norm", below=0.05, max_drop=0.5),
    AlertRule("eig_var", max_rise=9.0, rise_floor=1.0),
)


def as_rule(rule: AlertRule | Mapping[str, Any]) -> AlertRule:
    """An AlertRule from itself or its dict form (as stored in checkpoints)."""
    return rule if isinstance(rule, AlertRule) else AlertRule(**rule)


def _key(head: HeadKey) -> str:
    block, layer, index = head
    return f"{block}/{layer}/{index}"


class AlertMonitor:
    """Histories of the watched statistics per head, and which alerts are active."""

    def __init__(self, rules: Iterable[AlertRule]) -> None:
        self.rules = tuple(rules)
        self._history: dict[str, dict[str, list[float]]] = {}
        self._first: dict[str, dict[str, float]] = {}  # each head's first finite value
        self._active: set[str] = set()

    @property
    def statistics(self) -> set[str]:
        """The statistics some rule watches."""
        return {rule.statistic for rule in self.rules}

    def update(self, values: Mapping[str, Mapping[HeadKey, float]]) -> list[str]:
        """Record one monitored step's per-head values; messages of the alerts that start now.

        values: statistic -> {(block, layer, head): value}. NaN values are recorded but never
        fire (NaN statistics have their own warning).
        """
        depth = max((rule.window for rule in self.rules), default=0)
        for statistic, heads in values.items():
            per_head = self._history.setdefault(statistic, {})
            first = self._first.setdefault(statistic, {})
            for head, value in heads.items():
                history = per_head.setdefault(_key(head), [])
                history.append(float(value))
                del history[:-depth]
                if math.isfinite(value):
                    first.setdefault(_key(head), float(value))
        messages = []
        for rule in self.rules:
            for head, value in values.get(rule.statistic, {}).items():
                history = self._history[rule.statistic][_key(head)][-rule.window :]
                first = self._first[rule.statistic].get(_key(head), math.nan)
                reason = rule.check(value, history, first) if math.isfinite(value) else None
                active = f"{rule.name}@{_key(head)}"
                if reason and active not in self._active:
                    block, layer, index = head
                    where = f"layer {layer}" if block == "self" else f"{block} layer {layer}"
                    messages.append(f"{where} head {index}: {reason}")
                    self._active.add(active)
                elif not reason:
                    self._active.discard(active)
        return messages

    def state(self) -> dict[str, Any]:
        """JSON-serializable history and active alerts."""
        return {"history": self._history, "first": self._first, "active": sorted(self._active)}

    def load(self, state: Mapping[str, Any]) -> None:
        """Restore what ``state`` returned (e.g. from a checkpoint)."""
        self._history = {s: {k: list(v) for k, v in h.items()} for s, h in state["history"].items()}
        self._first = {s: dict(f) for s, f in state.get("first", {}).items()}
        self._active = set(state["active"])
