"""Collapse alerts: thresholds on per-head statistics, relative to the run's own early values.

An ``AlertRule`` watches one per-head statistic (``attn_entropy_norm``, ``eig_var``, ...) and
fires for a head when its value fell by more than a fraction of the head's early value
(``drop_from_early``), crosses an absolute bound, or changed by more than a relative amount
against the extreme of the last ``window`` monitored steps. A head's early value is the mean of
its first ``early_steps`` finite monitored values (default: its first monitored value), so a head
that is focused by design (all-MiniLM-L6-v2's layer 0 head 2, normalized entropy 0.042 before
any training) is measured against itself, not against a bound meant for other heads. A rise can
be required to also reach a floor relative to the early value, so that a statistic recovering
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
    """Fire for a head when ``statistic`` fell from its early value, crossed a bound, or moved
    too fast.

    drop_from_early: relative drop from the head's early value, e.g. 0.5 fires when the value
        fell below half of it. The early value is the mean of the head's first ``early_steps``
        finite monitored values; no alert of this kind fires before it is known.
    below/above: absolute bounds on the value (``below`` is the optional absolute floor).
    max_drop: relative drop from the highest value in the window, e.g. 0.5 fires when the value
        fell below half of that maximum.
    max_rise: relative rise over the lowest value in the window, e.g. 9.0 fires when the value
        grew more than tenfold.
    rise_floor: max_rise fires only when the value also exceeds rise_floor times the head's
        early value (None: no floor).
    window: number of monitored steps the windowed rules look back over (this one included).
    early_steps: number of first monitored values whose mean is a head's early value.
    """

    statistic: str
    below: float | None = None
    above: float | None = None
    max_drop: float | None = None
    max_rise: float | None = None
    rise_floor: float | None = None
    window: int = 10
    drop_from_early: float | None = None
    early_steps: int = 1

    def __post_init__(self) -> None:
        limits = (self.below, self.above, self.max_drop, self.max_rise, self.drop_from_early)
        if all(v is None for v in limits):
            raise ValueError(f"alert on {self.statistic!r} sets no threshold")
        for name in ("max_drop", "drop_from_early"):
            value = getattr(self, name)
            if value is not None and not 0 < value < 1:
                raise ValueError(f"{name} must be in (0, 1), got {value}")
        if self.max_rise is not None and self.max_rise <= 0:
            raise ValueError(f"max_rise must be > 0, got {self.max_rise}")
        if self.rise_floor is not None and (self.max_rise is None or self.rise_floor < 0):
            raise ValueError(f"rise_floor needs max_rise and must be >= 0, got {self.rise_floor}")
        if self.window < 2:
            raise ValueError(f"alert window must be >= 2 monitored steps, got {self.window}")
        if isinstance(self.early_steps, bool) or self.early_steps < 1:
            raise ValueError(f"early_steps must be >= 1 monitored step, got {self.early_steps}")

    @property
    def name(self) -> str:
        """A stable identifier of the rule, for the alert state (early_steps=1, the default,
        left out: the names of rules saved before it existed stay the same)."""
        fields = asdict(self)
        if fields["early_steps"] == 1:
            del fields["early_steps"]
        return ",".join(f"{k}={v}" for k, v in fields.items() if v is not None)

    def early_value(self, early: list[float]) -> float:
        """The head's early value from its first finite values; NaN until there are enough."""
        if len(early) < self.early_steps:
            return math.nan
        return sum(early[: self.early_steps]) / self.early_steps

    def check(self, value: float, history: list[float], early: float = math.nan) -> str | None:
        """Why this value (the last of ``history``) fires the rule, or None; early: the head's
        early value (NaN while unknown)."""
        if self.drop_from_early is not None and math.isfinite(early) and early > 0:
            drop = (early - value) / early
            if drop > self.drop_from_early:
                return (
                    f"{self.statistic} fell from its early value {early:.4g} to {value:.4g} "
                    f"(-{100 * drop:.0f}%)"
                )
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
        if self.rise_floor is not None:
            floor = self.rise_floor * early if math.isfinite(early) else math.inf
        if past and self.max_rise is not None and value > floor:
            low = min(past)
            if low > 0 and (value - low) / low > self.max_rise:
                return (
                    f"{self.statistic} rose from {low:.4g} to {value:.4g} "
                    f"(x{value / low:.3g}) within {len(history)} monitored steps"
                )
        return None


#: entropy collapse (a head's normalized entropy fell below half of its early value, the mean of
#: its first monitored value) and a spreading spectrum (a head's eig_var grown tenfold within 10
#: monitored steps, to above its early value)
DEFAULT_ALERTS: tuple[AlertRule, ...] = (
    AlertRule("attn_entropy_norm", drop_from_early=0.5),
    AlertRule("eig_var", max_rise=9.0, rise_floor=1.0),
)


def as_rule(rule: AlertRule | Mapping[str, Any]) -> AlertRule:
    """An AlertRule from itself or its dict form (as stored in checkpoints)."""
    return rule if isinstance(rule, AlertRule) else AlertRule(**rule)


def _key(head: HeadKey) -> str:
    block, layer, index = head
    return f"{block}/{layer}/{index}"


class AlertMonitor:
    """Histories of the watched statistics per head, their early values, and which alerts are
    active."""

    def __init__(self, rules: Iterable[AlertRule]) -> None:
        self.rules = tuple(rules)
        self._history: dict[str, dict[str, list[float]]] = {}
        # each head's first finite values, as many as the statistic's rules average
        self._early: dict[str, dict[str, list[float]]] = {}
        self._active: set[str] = set()

    @property
    def statistics(self) -> set[str]:
        """The statistics some rule watches."""
        return {rule.statistic for rule in self.rules}

    def update(self, values: Mapping[str, Mapping[HeadKey, float]]) -> list[str]:
        """Record one monitored step's per-head values; messages of the alerts that start now.

        values: statistic -> {(block, layer, head): value}. NaN values are recorded but never
        fire (NaN statistics have their own warning) and never enter an early value.
        """
        depth = max((rule.window for rule in self.rules), default=0)
        kept = {}  # statistic -> how many first values its rules average
        for rule in self.rules:
            kept[rule.statistic] = max(kept.get(rule.statistic, 0), rule.early_steps)
        for statistic, heads in values.items():
            per_head = self._history.setdefault(statistic, {})
            early = self._early.setdefault(statistic, {})
            for head, value in heads.items():
                history = per_head.setdefault(_key(head), [])
                history.append(float(value))
                del history[:-depth]
                first = early.setdefault(_key(head), [])
                if math.isfinite(value) and len(first) < kept.get(statistic, 1):
                    first.append(float(value))
        messages = []
        for rule in self.rules:
            for head, value in values.get(rule.statistic, {}).items():
                history = self._history[rule.statistic][_key(head)][-rule.window :]
                early = rule.early_value(self._early[rule.statistic][_key(head)])
                reason = rule.check(value, history, early) if math.isfinite(value) else None
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
        """JSON-serializable history, early values and active alerts."""
        return {"history": self._history, "early": self._early, "active": sorted(self._active)}

    def load(self, state: Mapping[str, Any]) -> None:
        """Restore what ``state`` returned (e.g. from a checkpoint; a state saved before early
        values were kept holds each head's first value under "first")."""
        self._history = {s: {k: list(v) for k, v in h.items()} for s, h in state["history"].items()}
        if "early" in state:
            self._early = {s: {k: list(v) for k, v in e.items()} for s, e in state["early"].items()}
        else:
            first = state.get("first", {})
            self._early = {s: {k: [v] for k, v in f.items()} for s, f in first.items()}
        self._active = set(state["active"])
