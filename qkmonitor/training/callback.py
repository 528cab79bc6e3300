"""QKMonitorCallback: QK-eigenspectrum, attention entropy and max logit in every Trainer log,
optionally the spectral regularizer and QK-Clip, correct with several processes (accelerate
launch / torchrun).

Usage::

    from qkmonitor import QKMonitorCallback
    Trainer(..., callbacks=[QKMonitorCallback()])                      # monitor
    Trainer(..., callbacks=[QKMonitorCallback(regularization=1e-2)])   # + lambda * R
    Trainer(..., callbacks=[QKMonitorCallback(qk_clip=100.0)])         # + QK-Clip at tau = 100

The numbers, keys and cross-rank reductions are ``qkmonitor.training.monitor.QKMonitor``'s
(its module doc lists the keys); this callback maps the Trainer's events to it: on_train_begin
creates it (after restoring a checkpoint's state), on_step_begin calls ``before_step`` (recording
attention on the steps the Trainer will log), on_step_end ``end_step`` (the cross-rank
reductions, QK-Clip) and on_log ``measure``. The keys go into the training logs, i.e. the entries
of ``trainer.state.log_history`` that hold ``"loss"``, and every report_to integration. The
console (the Trainer's progress printer) shows one compact qk line instead of these keys
(``console="full"``: every key; ``qkmonitor.training.console``).

How the metrics reach log_history and the integrations: the Trainer appends a copy of ``logs``
to ``state.log_history`` and then calls ``on_log`` on its callbacks in order, report_to
integrations first and user callbacks after them, so keys added in a user callback's on_log
reach neither. At ``on_train_begin`` this callback moves itself right after
DefaultFlowCallback in the Trainer's callback list (it is handed the list's owner through the
event's caller; if that ever fails it warns and keeps its place), and in ``on_log`` it adds its
keys to ``logs``, which the integrations then see, and to the entry the Trainer just appended to
``state.log_history``. With console="compact" it also puts a ``ConsoleView`` in place of the
progress printer until training ends (``qkmonitor.training.console``).

Several processes: every rank runs the same hooks and the same collectives in the same order
(QKMonitor's); every rank adds identical keys; only the main process warns, and the
integrations log only there.

Model card: with ``model_card=True``, every card the Trainer writes (``create_model_card``, which
``push_to_hub`` and TRL's trainers call, and the card of each checkpoint push) carries qkmonitor's
section (the audit at that step and the first/last/min of the logged qk/ metrics), uploaded in the
Trainer's own commit; see ``qkmonitor.hub.card.attach_to_trainer`` for why and how. The callback
finds its Trainer through the event's caller, like the callback list above, when the Trainer is
built (``on_init_end``) or, if added later, when training begins.

Checkpoints: the callback is an ``ExportableState``: its arguments, the regularizer's reference
scale and the alert history are saved in ``trainer_state.json`` and restored when training
resumes from a checkpoint (with or without ``restore_callback_states_from_checkpoint``).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback, ExportableState

from qkmonitor.errors import QKMonitorError
from qkmonitor.training.console import ConsoleView
from qkmonitor.training.monitor import QKMonitor, layer_tag, optimizer_loss_scale
from qkmonitor.training.settings import SPECTRAL_STATISTICS, MonitorSettings

__all__ = ["SPECTRAL_STATISTICS", "MonitorSettings", "QKMonitorCallback", "layer_tag"]

logger = logging.getLogger("qkmonitor")

_CONSOLES = ("compact", "full")


class QKMonitorCallback(TrainerCallback, ExportableState):
    """Log QK-eigenspectrum statistics and attention entropy; optionally add lambda * R.

    Args:
        regularization: lambda >= 0. With lambda > 0 the training objective becomes
            task loss + lambda * R, R = mean eig_var of the monitored heads divided by its value
            at the start of training (so R = 1 then, for any model). Useful range 1e-3 to 1e-1
            (see docs/training.md); 0 (default) only monitors and leaves training bit-for-bit
            unchanged.
        settings: a ``MonitorSettings``; the keyword settings (``**options``) override its
            fields: interval (every ``interval`` optimizer steps, asking the Trainer to log
            there; None, the default: at every Trainer logging step. Entropy is measured on
            steps known in advance to be logged: with logging_strategy="epoch", set an
            interval to get it), layers, heads, detail, statistics, entropy, max_logit,
            qk_clip, rank_collapse, alerts (``qkmonitor.training.settings``).
        stop_on_alert: stop training (``control.should_training_stop``) when an alert fires.
        model_card: make ``trainer.push_to_hub()`` publish the final audit and the training
            trajectory in the model card (qkmonitor.hub.card).
        console: "compact" (default): the Trainer's console printer shows one qk line per log
            instead of the qk/ keys (integrations and log_history keep every key); "full": the
            printer shows every key.

    Raises:
        ValueError: a bad setting (MonitorSettings') or console; TypeError: an unknown one.
    """

    def __init__(
        self,
        regularization: float | None = None,
        *,
        settings: MonitorSettings | None = None,
        stop_on_alert: bool = False,
        model_card: bool = False,
        console: str = "compact",
        **options: Any,
    ) -> None:
        if regularization is not None:
            options["regularization"] = regularization
        if console not in _CONSOLES:
            raise ValueError(f"console must be one of {_CONSOLES}, got {console!r}")
        #: the validated settings (frozen), handed to the QKMonitor
        self.settings = MonitorSettings.build(settings, options)
        self.stop_on_alert = stop_on_alert
        self.model_card = model_card
        self.console = console
        #: the monitor doing the work, from on_train_begin on
        self.monitor: QKMonitor | None = None
        self._saved: Mapping[str, Any] | None = None  # checkpoint state to resume with
        self._main = True
        self._handler: CallbackHandler | None = None

    @property
    def interval(self) -> int | None:
        """The settings' interval (None: at every Trainer log)."""
        return self.settings.interval

    # ---- checkpoint state (ExportableState) ----------------------------------------------
    def state(self) -> dict[str, Any]:
        """Constructor arguments and the state to resume with (JSON, in trainer_state.json)."""
        own = {"stop_on_alert": self.stop_on_alert, "model_card": self.model_card}
        return {
            "args": {**asdict(self.settings), **own, "console": self.console},
            "attributes": {"checkpoint_state": self.checkpoint_state},
        }

    @property
    def checkpoint_state(self) -> dict[str, Any]:
        """What resuming needs (QKMonitor.state_dict): reference, alert history, counters."""
        if self.monitor is not None:
            return self.monitor.state_dict()
        return dict(self._saved) if self._saved is not None else {}

    @checkpoint_state.setter
    def checkpoint_state(self, saved: Mapping[str, Any]) -> None:
        self._saved = dict(saved) if saved else None
        if self.monitor is not None and self._saved is not None:
            self.monitor.load_state_dict(self._saved)

    # ---- Trainer events -------------------------------------------------------------------
    def on_init_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """With model_card=True, hook the card into the Trainer's push_to_hub."""
        self._attach_card()

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        """Place the callback, restore a checkpoint's state, create the QKMonitor."""
        self._main = state.is_world_process_zero
        self._handler = self._place_before_integrations()
        self._attach_card()
        saved = state.stateful_callbacks.get(type(self).__name__)
        if state.global_step > 0 and isinstance(saved, dict):  # resumed from a checkpoint
            self._saved = saved["attributes"]["checkpoint_state"]
        if model is None:
            raise QKMonitorError("QKMonitorCallback got no model from the Trainer")
        if self.settings.regularization > 0 and args.fp16 and args.deepspeed:
            raise QKMonitorError(
                "regularization under DeepSpeed fp16 loss scaling is not supported; use bf16"
            )
        if self.settings.qk_clip is not None and args.deepspeed:
            raise QKMonitorError(
                "QK-Clip under DeepSpeed is not supported: its optimizer's fp32 master weights "
                "would overwrite the rescaled ones; train without DeepSpeed or without qk_clip"
            )
        self.monitor = QKMonitor(
            model, settings=self.settings, device=args.device, state=self._saved or None
        )
        if self.interval is None and args.logging_strategy == "no" and self._main:
            logger.warning("qkmonitor: logging_strategy='no' and no interval: nothing is logged")
        by_epoch = self.interval is None and args.logging_strategy == "epoch"
        if by_epoch and self.monitor.measures_attention and self._main:
            logger.warning(
                "qkmonitor: with logging_strategy='epoch', attention entropy and max logit are "
                "not measured (the logged steps are not known in advance); set interval=N"
            )
        if self.console == "compact" and self._handler is not None:
            ConsoleView.install(self._handler, self._console_line)

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Arm the regularizer; record attention if this step will be logged (max logits alone
        on the other steps under QK-Clip)."""
        step = state.global_step + 1
        self.monitor.before_step(
            step=step,
            record=self._will_monitor(args, state, step),
            loss_scale=optimizer_loss_scale(kwargs.get("optimizer")),
        )

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """After the optimizer update: the monitor reduces the step's recordings over ranks,
        QK-Clips and checks the regularizer; ask for a log on interval steps."""
        self.monitor.end_step(state.global_step)
        if self.interval is not None and state.global_step % self.interval == 0:
            control.should_log = True

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        """Add the qk/ metrics to a training log (all ranks, the same collectives)."""
        if logs is None or "loss" not in logs or self.monitor is None:
            return
        step = state.global_step
        if self.interval is not None and step % self.interval:
            return
        metrics = self.monitor.measure(step)
        logs.update(metrics)
        last = state.log_history[-1] if state.log_history else {}
        if last.get("step") == step and "loss" in last:
            last.update(metrics)
        if self.stop_on_alert and self.monitor.alerts_fired:
            control.should_training_stop = True

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Remove every hook; give the console printer back."""
        if self._handler is not None:
            ConsoleView.restore(self._handler)
        if self.monitor is not None:
            self.monitor.close()

    def _console_line(self, step: int) -> str | None:
        """The compact console line of the log at ``step`` (ConsoleView), if this one made it."""
        monitor = self.monitor
        return monitor.console_line if monitor and monitor.measured_step == step else None

    # ---- setup ---------------------------------------------------------------------------
    def _place_before_integrations(self) -> CallbackHandler | None:
        """Move this callback right after DefaultFlowCallback in the calling CallbackHandler;
        returns that handler (None if it could not be reached)."""
        frame = sys._getframe(1)
        for _ in range(4):  # on_train_begin <- call_event <- CallbackHandler.on_train_begin
            handler = frame.f_locals.get("self") if frame else None
            if isinstance(handler, CallbackHandler):
                break
            frame = frame.f_back if frame else None
        else:
            if self._main:
                logger.warning(
                    "qkmonitor: could not reach the Trainer's callback list; qk/ metrics reach "
                    "state.log_history but report_to integrations that run before this "
                    "callback will not see them"
                )
            return None
        others = [cb for cb in handler.callbacks if cb is not self]
        flow = [i for i, cb in enumerate(others) if isinstance(cb, DefaultFlowCallback)]
        others.insert(flow[-1] + 1 if flow else 0, self)
        handler.callbacks = others  # a new list: the loop calling us keeps iterating the old one
        return handler

    def _attach_card(self) -> None:
        """Find the Trainer calling this event and let qkmonitor.hub.card wrap its card writer."""
        if not self.model_card:
            return
        from transformers import Trainer

        from qkmonitor.hub.card import attach_to_trainer

        frame = sys._getframe(2)  # the callback event <- CallbackHandler.call_event <- ...
        for _ in range(4):  # ... <- CallbackHandler.on_<event> <- the Trainer's method
            if frame is None or isinstance(frame.f_locals.get("self"), Trainer):
                break
            frame = frame.f_back
        if frame is None or not isinstance(frame.f_locals.get("self"), Trainer):
            raise QKMonitorError(
                "QKMonitorCallback(model_card=True) could not reach its Trainer; call "
                "qkmonitor.hub.card.attach_to_trainer(trainer) instead"
            )
        attach_to_trainer(frame.f_locals["self"])

    # ---- which steps -------------------------------------------------------------------
    def _will_monitor(self, args: TrainingArguments, state: TrainerState, step: int) -> bool:
        """Whether the Trainer will log at ``step`` (DefaultFlowCallback's rule) or interval."""
        if self.interval is not None:
            return step % self.interval == 0
        if step == 1 and args.logging_first_step:
            return True
        return args.logging_strategy == "steps" and step % state.logging_steps == 0
