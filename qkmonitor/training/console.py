"""What the console shows of the qk/ metrics: one compact line instead of every key.

The Trainer hands one ``logs`` dict to its callbacks in order; its console printer
(``ProgressCallback``, or ``PrinterCallback`` with ``disable_tqdm``) prints that dict whole, so a
12-layer model printed 124 qk/ keys (5 KB) per logging step. ``ConsoleView`` stands in for the
printer in the Trainer's callback list while training runs: it forwards every event unchanged,
except that the printer's ``on_log`` receives a copy of ``logs`` without the qk/ keys, after which
the view writes one line through the printer's own channel (tqdm's ``write``, or ``print``).
Every other callback (the report_to integrations, user callbacks) and ``state.log_history``
still get every key. ``restore`` puts the original printer back.

``compact_line`` builds that line from per-head values: for each of eig_var, attn_entropy_norm
and attn_max_logit the model mean over heads and the worst head (largest eig_var, smallest
normalized entropy, largest max logit), plus R and the QK-Clip counts when present.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import CallbackHandler, PrinterCallback, ProgressCallback

from qkmonitor.training.keys import head_key

__all__ = ["ConsoleView", "compact_line"]

HeadKey = tuple[str, int, int]  # (block, layer, head)

#: (statistic, label, worst head is the largest)
_SHOWN = (
    ("eig_var", "eig_var", True),
    ("attn_entropy_norm", "entropy_norm", False),
    ("attn_max_logit", "max_logit", True),
)


def _tag(block: str, layer: int, head: int) -> str:
    """``head_05/layer_03``: the head's log key without ``qk/<statistic>/``."""
    return head_key("", block, layer, head).removeprefix("qk//")


def compact_line(
    step: int, per_head: Mapping[str, Mapping[HeadKey, float]], extra: Mapping[str, float]
) -> str:
    """``qk step 20: eig_var 0.0021 (max 0.0098 head_05/layer_03) | ...`` (the worst head named
    as in its log key ``qk/eig_var/head_05/layer_03``); NaN heads are left out of means and
    worst heads. extra: label -> value appended as is (R, clip counts)."""
    parts = []
    for name, label, largest in _SHOWN:
        values = {k: v for k, v in per_head.get(name, {}).items() if not math.isnan(v)}
        if not values:
            continue
        mean = sum(values.values()) / len(values)
        worst = (max if largest else min)(values, key=values.__getitem__)
        which = "max" if largest else "min"
        parts.append(f"{label} {mean:.4g} ({which} {values[worst]:.4g} {_tag(*worst)})")
    parts += [f"{label} {value:.4g}" for label, value in extra.items()]
    return f"qk step {step}: " + " | ".join(parts)


class ConsoleView:
    """The Trainer's console printer, shown the logs without qk/ keys plus one line (module doc).

    printer: the ProgressCallback or PrinterCallback it stands in for; line: returns the compact
    line for a step, or None (nothing of qkmonitor in this log).
    """

    def __init__(self, printer: TrainerCallback, line: Callable[[int], str | None]) -> None:
        self.printer = printer
        self._line = line

    def __getattr__(self, name: str) -> Any:  # every other event and attribute: the printer's
        return getattr(self.printer, name)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> TrainerControl | None:
        """The printer's on_log on the logs without qk/ keys, then the compact line."""
        if logs is None or not any(key.startswith("qk/") for key in logs):
            return self.printer.on_log(args, state, control, logs=logs, **kwargs)
        shown = {key: value for key, value in logs.items() if not key.startswith("qk/")}
        result = self.printer.on_log(args, state, control, logs=shown, **kwargs)
        line = self._line(state.global_step)
        if line is not None:
            bar = getattr(self.printer, "training_bar", None)
            if isinstance(self.printer, ProgressCallback):
                if state.is_world_process_zero and bar is not None:
                    bar.write(line)
            elif state.is_local_process_zero:
                print(line)
        return result

    @classmethod
    def install(cls, handler: CallbackHandler, line: Callable[[int], str | None]) -> None:
        """Stand in for the handler's console printers (ProgressCallback, PrinterCallback)."""
        handler.callbacks = [
            cls(cb, line) if isinstance(cb, ProgressCallback | PrinterCallback) else cb
            for cb in handler.callbacks
        ]

    @staticmethod
    def restore(handler: CallbackHandler) -> None:
        """Put the original printers back."""
        handler.callbacks = [
            cb.printer if isinstance(cb, ConsoleView) else cb for cb in handler.callbacks
        ]
