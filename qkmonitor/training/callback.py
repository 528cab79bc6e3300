"""QKMonitorCallback: QK-eigenspectrum, attention entropy and max logit in every Trainer log,
optionally the spectral regularizer and QK-Clip, correct with several processes (accelerate
launch / torchrun).

Usage::

    from qkmonitor import QKMonitorCallback
    Trainer(..., callbacks=[QKMonitorCallback()])                      # monitor
    Trainer(..., callbacks=[QKMonitorCallback(regularization=1e-2)])   # + lambda * R
    Trainer(..., callbacks=[QKMonitorCallback(qk_clip=100.0)])         # + QK-Clip at tau = 100

Log keys (added to the training logs, i.e. the entries of ``trainer.state.log_history`` that
hold ``"loss"``, and to every report_to integration; ``{L}`` is ``layer_03`` for a model with one
attention stack, ``encoder_layer_03`` / ``decoder_layer_03`` / ``cross_layer_03`` for T5/BART):

    qk/{stat}/{L}                mean over the layer's monitored heads
    qk/{stat}/{L}/min, /max      spread across heads (eig_var, attn_entropy, attn_entropy_norm)
    qk/{stat}/{L}/head_{hh}      per head, with detail="head"
    qk/{stat}/mean               mean over layers
    qk/attn_max_logit/{L}        max over the layer's heads (/head_{hh} with detail="head")
    qk/attn_max_logit/max        max over layers
    qk/rank_collapse/{L}, qk/rank_collapse/mean        with rank_collapse=True
    qk/reg/R, qk/reg/penalty     R and lambda * R, with regularization > 0
    qk/clip/heads, qk/clip/min_factor   with qk_clip: heads clipped since the previous log
                                 (counted once per optimizer step) and the smallest gamma

{stat}: the chosen spectral ``statistics`` (default eig_mean, eig_var; see SPEC.md), then
attn_entropy and attn_entropy_norm measured on the training forward passes of that step.
attn_max_logit is the largest logit softcap(s q.k) over the allowed (query, key) pairs of valid
queries of the step's global batch (biases such as ALiBi and attention sinks are not part of it;
``qkmonitor.entropy``); NaN where no pair was seen. The console (the Trainer's progress printer)
shows one compact qk line instead of these keys (``console="full"``: every key;
``qkmonitor.training.console``).
Spectral statistics are those of the weights after that step's optimizer update (the weights a
checkpoint of that step holds), computed exactly as ``qkmonitor.audit`` does (float64). NaN
statistics are logged as NaN, with a warning naming layer and head.

How the metrics reach log_history and the integrations: the Trainer appends a copy of ``logs``
to ``state.log_history`` and then calls ``on_log`` on its callbacks in order, report_to
integrations first and user callbacks after them, so keys added in a user callback's on_log
reach neither. At ``on_train_begin`` this callback moves itself right after
DefaultFlowCallback in the Trainer's callback list (it is handed the list's owner through the
event's caller; if that ever fails it warns and keeps its place), and in ``on_log`` it adds its
keys to ``logs``, which the integrations then see, and to the entry the Trainer just appended to
``state.log_history``. With console="compact" it also puts a ``ConsoleView`` in place of the
progress printer until training ends (``qkmonitor.training.console``).

Several processes: every rank runs the same hooks and the same collectives in the same order:
per recorded step, at on_optimizer_step, one all-reduce (sum) of the entropy and rank-collapse
sums and counts (monitored steps) and one all-reduce (max) of the maximum scores and each layer's
softcap (whenever max logits are measured: monitored steps, every step with qk_clip), whatever
each rank measured (zeros and -inf included, for layers or ranks without tokens); then per
monitored step, at on_log, sharded weights are gathered one layer at a time in the plan's order
(``qkmonitor.training.live``). Entropy is so averaged over every valid query of the global batch
and the max logit is the global batch's maximum; QK-Clip's factors are identical on every rank.
Spectral statistics need no communication (weights are replicated or gathered). Every rank adds
identical keys; only the main process warns, and the integrations log only there.

Model card: with ``model_card=True``, ``trainer.push_to_hub()`` also publishes qkmonitor's card
section (the final audit and the first/last/min of the logged qk/ metrics) in the repo's
README.md, in a commit right after the Trainer's own; see ``qkmonitor.hub.card.attach_to_trainer``
for why and how. The callback finds its Trainer through the event's caller, like the callback
list above, when the Trainer is built (``on_init_end``) or, if added later, when training begins.

Checkpoints: the callback is an ``ExportableState``: its arguments, the regularizer's reference
scale and the alert history are saved in ``trainer_state.json`` and restored when training
resumes from a checkpoint (with or without ``restore_callback_states_from_checkpoint``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback, ExportableState

from qkmonitor.audit import layer_weights
from qkmonitor.entropy import EntropySums, softcapped
from qkmonitor.errors import QKMonitorError
from qkmonitor.spectrum import HeadMoments, HeadSpectra, head_moments, head_spectra
from qkmonitor.training import qk_clip as clipping
from qkmonitor.training.alerts import DEFAULT_ALERTS, AlertMonitor, AlertRule, HeadKey, as_rule
from qkmonitor.training.capture import EntropyCapture
from qkmonitor.training.console import ConsoleView, compact_line
from qkmonitor.training.live import LiveLayer, full_weights, plan_layers
from qkmonitor.training.rank_collapse import RankCollapseRecorder
from qkmonitor.training.regularizer import SpectralRegularizer

__all__ = ["SPECTRAL_STATISTICS", "QKMonitorCallback"]

logger = logging.getLogger("qkmonitor")

#: spectral statistics that can be logged (SPEC.md)
SPECTRAL_STATISTICS = (
    "eig_mean",
    "eig_var",
    "eig_var_complex",
    "spectral_norm",
    "positive_fraction",
    "eig_concentration",
)
#: spectral statistics that need no eigendecomposition
_MOMENTS = {"eig_mean", "eig_var", "eig_concentration"}
#: statistics logged with their min and max across heads
_SPREAD = ("eig_var", "attn_entropy", "attn_entropy_norm")
_ENTROPY_STATISTICS = ("attn_entropy", "attn_entropy_norm")
_MAX_LOGIT = "attn_max_logit"
_DETAILS = ("layer", "head")
_CONSOLES = ("compact", "full")


def eig_concentration(eig_mean: torch.Tensor, eig_var: torch.Tensor) -> torch.Tensor:
    """eig_mean / sqrt(eig_var + eig_mean^2) (SPEC.md), in [-1, 1]; NaN where that RMS is 0."""
    rms = (eig_var + eig_mean.square()).sqrt()
    return torch.where(rms > 0, eig_mean / rms, torch.nan)


def _statistic(stats: HeadSpectra | HeadMoments, name: str) -> torch.Tensor:
    """A spectral statistic per head; eig_concentration from the moments where not provided."""
    values = getattr(stats, name, None)
    if values is None and name == "eig_concentration":
        return eig_concentration(stats.eig_mean, stats.eig_var)
    return values


def layer_tag(block: str, layer: int) -> str:
    """``layer_03`` for the single self-attention stack, ``{block}_layer_03`` otherwise."""
    return f"layer_{layer:02d}" if block == "self" else f"{block}_layer_{layer:02d}"


class QKMonitorCallback(TrainerCallback, ExportableState):
    """Log QK-eigenspectrum statistics and attention entropy; optionally add lambda * R.

    Args:
        regularization: lambda >= 0. With lambda > 0 the training objective becomes
            task loss + lambda * R, R = mean eig_var of the monitored heads divided by its value
            at the start of training (so R = 1 then, for any model). Useful range 1e-3 to 1e-1
            (see README); 0 (default) only monitors and leaves training bit-for-bit unchanged.
        interval: monitor every ``interval`` optimizer steps, asking the Trainer to log there;
            None (default): at every Trainer logging step (``logging_steps``). Entropy is
            measured on steps known in advance to be logged: with logging_strategy="epoch",
            set an interval to get it.
        layers: layer indices to monitor and regularize (in every attention stack); None: all.
        heads: head indices to monitor and regularize in each layer; None: all.
        detail: "layer" (default): per-layer aggregates; "head": also one key per head.
        statistics: spectral statistics to log, from SPECTRAL_STATISTICS.
        entropy: measure attn_entropy / attn_entropy_norm on the monitored steps' forwards.
        max_logit: measure attn_max_logit per head there (from the same pass: no extra cost).
        qk_clip: tau > 0 turns on QK-Clip: after every optimizer step, each monitored head whose
            max logit on that step exceeded tau has its query/key weights rescaled so that the
            same logits would peak at tau (``qkmonitor.training.qk_clip``). Max logits are then
            measured on every step. None (default): off.
        rank_collapse: also log rank_collapse per layer (one forward hook per layer on
            monitored steps).
        alerts: collapse alert rules (AlertRule or its dict form); None: DEFAULT_ALERTS,
            () for none.
        stop_on_alert: stop training (``control.should_training_stop``) when an alert fires.
        model_card: make ``trainer.push_to_hub()`` publish the final audit and the training
            trajectory in the model card (qkmonitor.hub.card).
        console: "compact" (default): the Trainer's console printer shows one qk line per log
            instead of the qk/ keys (integrations and log_history keep every key); "full": the
            printer shows every key.

    Raises:
        ValueError: negative regularization, interval <= 0, unknown detail, statistic or
            console, qk_clip not a positive number.
    """

    def __init__(
        self,
        regularization: float = 0.0,
        *,
        interval: int | None = None,
        layers: Sequence[int] | None = None,
        heads: Sequence[int] | None = None,
        detail: str = "layer",
        statistics: Sequence[str] = ("eig_mean", "eig_var"),
        entropy: bool = True,
        rank_collapse: bool = False,
        alerts: Sequence[AlertRule | Mapping[str, Any]] | None = None,
        stop_on_alert: bool = False,
        model_card: bool = False,
        max_logit: bool = True,
        qk_clip: float | None = None,
        console: str = "compact",
    ) -> None:
        if not regularization >= 0:  # also rejects NaN
            raise ValueError(f"regularization (lambda) must be >= 0, got {regularization}")
        if interval is not None and (isinstance(interval, bool) or interval <= 0):
            raise ValueError(f"interval must be a positive number of steps, got {interval}")
        if detail not in _DETAILS:
            raise ValueError(f"detail must be one of {_DETAILS}, got {detail!r}")
        unknown = [s for s in statistics if s not in SPECTRAL_STATISTICS]
        if unknown:
            raise ValueError(f"unknown statistics {unknown}; choose from {SPECTRAL_STATISTICS}")
        if heads is not None and (not heads or min(heads) < 0):
            raise ValueError(f"heads must be non-empty, non-negative indices, got {heads}")
        if qk_clip is not None and (
            isinstance(qk_clip, bool) or not (0 < qk_clip < math.inf)
        ):  # also rejects NaN
            raise ValueError(f"qk_clip (tau) must be a positive number, got {qk_clip}")
        if console not in _CONSOLES:
            raise ValueError(f"console must be one of {_CONSOLES}, got {console!r}")
        self.regularization = float(regularization)
        self.interval = interval
        self.layers = None if layers is None else sorted(set(layers))
        self.heads = None if heads is None else sorted(set(heads))
        self.detail = detail
        self.statistics = tuple(statistics)
        self.entropy = entropy
        self.rank_collapse = rank_collapse
        rules = DEFAULT_ALERTS if alerts is None else tuple(as_rule(rule) for rule in alerts)
        self.stop_on_alert = stop_on_alert
        self.model_card = model_card
        self.max_logit = max_logit
        self.qk_clip = None if qk_clip is None else float(qk_clip)
        self.console = console
        self._alerts = AlertMonitor(rules)
        self._reference: float | None = None
        self._monitored_steps = 0
        self._plan: list[LiveLayer] = []
        self._regularizer: SpectralRegularizer | None = None
        self._capture: EntropyCapture | None = None
        self._rank_collapse: RankCollapseRecorder | None = None
        self._recording = contextlib.ExitStack()
        self._recorded_step = -1
        self._monitored_step = -1  # recorded for a log (entropy, rank collapse), not only clipping
        #: (step, per-head attention statistics, rank collapse per layer) reduced over ranks
        self._readings: tuple[int, dict[str, dict[HeadKey, float]], dict] = (-1, {}, {})
        self._clipped = (0, 1.0)  # QK-Clip since the last log: heads clipped, smallest gamma
        self._handler: CallbackHandler | None = None
        self._line: tuple[int, str] | None = None
        self._device = torch.device("cpu")
        self._main = True
        self._last_alerts: list[str] = []
        self._checked_trainable = False

    # ---- checkpoint state (ExportableState) ----------------------------------------------
    def state(self) -> dict[str, Any]:
        """Constructor arguments and the state to resume with (JSON, in trainer_state.json)."""
        return {
            "args": {
                "regularization": self.regularization,
                "interval": self.interval,
                "layers": self.layers,
                "heads": self.heads,
                "detail": self.detail,
                "statistics": list(self.statistics),
                "entropy": self.entropy,
                "rank_collapse": self.rank_collapse,
                "alerts": [asdict(rule) for rule in self._alerts.rules],
                "stop_on_alert": self.stop_on_alert,
                "model_card": self.model_card,
                "max_logit": self.max_logit,
                "qk_clip": self.qk_clip,
                "console": self.console,
            },
            "attributes": {"checkpoint_state": self.checkpoint_state},
        }

    @property
    def checkpoint_state(self) -> dict[str, Any]:
        """What resuming needs: the regularizer's reference, alert history, step counter."""
        return {
            "reference": self._reference,
            "monitored_steps": self._monitored_steps,
            "alerts": self._alerts.state(),
        }

    @checkpoint_state.setter
    def checkpoint_state(self, saved: Mapping[str, Any]) -> None:
        self._reference = saved["reference"]
        self._monitored_steps = int(saved["monitored_steps"])
        self._alerts.load(saved["alerts"])

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
        """Validate the model and settings, plan the layers, restore, attach the regularizer."""
        self._main = state.is_world_process_zero
        self._handler = self._place_before_integrations()
        self._attach_card()
        saved = state.stateful_callbacks.get(type(self).__name__)
        if state.global_step > 0 and isinstance(saved, dict):  # resumed from a checkpoint
            self.checkpoint_state = saved["attributes"]["checkpoint_state"]
        if model is None:
            raise QKMonitorError("QKMonitorCallback got no model from the Trainer")
        self._device = args.device
        self._plan = self._select(plan_layers(model))
        self._make_recorders(model)
        if self.qk_clip is not None:
            self._check_clip(args, model)
        if self.regularization > 0:
            self._start_regularizer(args)
        if self.interval is None and args.logging_strategy == "no" and self._main:
            logger.warning("qkmonitor: logging_strategy='no' and no interval: nothing is logged")
        if (
            self.interval is None
            and args.logging_strategy == "epoch"
            and self._capture is not None
            and self._main
        ):
            logger.warning(
                "qkmonitor: with logging_strategy='epoch', attention entropy and max logit are "
                "not measured (the logged steps are not known in advance); set interval=N"
            )
        if self.console == "compact" and self._handler is not None:
            ConsoleView.install(self._handler, self._console_line)

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Arm the regularizer; record entropy and max logits if this step will be monitored,
        max logits alone on the other steps under QK-Clip."""
        if self._regularizer is not None:
            self._regularizer.arm(_loss_scale(kwargs.get("optimizer")))
        step = state.global_step + 1
        monitored = self._will_monitor(args, state, step)
        if self._capture is not None and (monitored or self.qk_clip is not None):
            entropy = self.entropy and monitored
            self._recording.enter_context(self._capture.recording(entropy=entropy))
            self._recorded_step = step
        if self._rank_collapse is not None and monitored:
            self._recording.enter_context(self._rank_collapse.recording())
            self._recorded_step = step
        if monitored:
            self._monitored_step = step

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """The step's forwards are done: reduce what they recorded over ranks; QK-Clip."""
        step = state.global_step + 1
        self._recording.close()
        if self._recorded_step != step:
            return
        scores = self._reduce_recordings(step)
        if self.qk_clip is not None:
            self._clip(scores)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Stop recording; ask for a log on interval steps; check the regularizer had effect."""
        self._recording.close()
        if self._regularizer is not None and not self._checked_trainable:
            self._checked_trainable = True
            self._check_trainable()
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
        if logs is None or "loss" not in logs or not self._plan:
            return
        step = state.global_step
        if self.interval is not None and step % self.interval:
            return
        metrics = self._measure(step)
        logs.update(metrics)
        last = state.log_history[-1] if state.log_history else {}
        if last.get("step") == step and "loss" in last:
            last.update(metrics)
        if self.stop_on_alert and self._last_alerts:
            control.should_training_stop = True

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Remove every hook; give the console printer back."""
        self._recording.close()
        if self._handler is not None:
            ConsoleView.restore(self._handler)
        if self._capture is not None:
            self._capture.detach()
        if self._regularizer is not None:
            self._regularizer.detach()
            self._regularizer = None

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
        """Find the Trainer calling this event and let qkmonitor.hub.card wrap its push_to_hub."""
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

    def _select(self, planned: tuple[list[LiveLayer], list[str]]) -> list[LiveLayer]:
        layers, warnings = planned
        if self._main:
            for message in warnings:
                logger.warning("qkmonitor: %s", message)
        if self.layers is not None:
            available = sorted({layer.plan.layer for layer in layers})
            missing = [i for i in self.layers if i not in available]
            if missing:
                raise QKMonitorError(
                    f"layers {missing} do not exist; the model's attention layers are "
                    f"{available[0]}..{available[-1]}"
                )
            layers = [layer for layer in layers if layer.plan.layer in self.layers]
        if self.heads is not None:
            fewest = min(layer.plan.n_heads for layer in layers)
            if self.heads[-1] >= fewest:
                raise QKMonitorError(
                    f"head {self.heads[-1]} does not exist; some layers have {fewest} heads"
                )
        return layers

    def _make_recorders(self, model: torch.nn.Module) -> None:
        if self.entropy or self.max_logit or self.qk_clip is not None:
            try:
                capture = EntropyCapture(model, layers=self._plan)
                reason = capture.unsupported
            except QKMonitorError as error:
                reason = str(error)
            if reason is None:
                self._capture = capture
            elif self.qk_clip is not None:
                raise QKMonitorError(f"QK-Clip needs the max attention logit: {reason}")
            elif self._main:
                logger.warning(
                    "qkmonitor: attention entropy and max logit are not measured: %s", reason
                )
        if self.rank_collapse:
            self._rank_collapse = RankCollapseRecorder(model, self._plan)

    def _check_clip(self, args: TrainingArguments, model: torch.nn.Module) -> None:
        """Refuse QK-Clip, in one line, where rescaling weights cannot cap the logits exactly."""
        if args.deepspeed:
            raise QKMonitorError(
                "QK-Clip under DeepSpeed is not supported: its optimizer's fp32 master weights "
                "would overwrite the rescaled ones; train without DeepSpeed or without qk_clip"
            )
        model_type = getattr(self._capture.model.config, "model_type", None)
        for layer in self._plan:
            reason = clipping.unsupported(layer, model_type)
            if reason is not None:
                raise QKMonitorError(f"QK-Clip: {reason}")

    def _start_regularizer(self, args: TrainingArguments) -> None:
        if args.fp16 and args.deepspeed:
            raise QKMonitorError(
                "regularization under DeepSpeed fp16 loss scaling is not supported; use bf16"
            )
        if self._reference is None:
            eig_var = [s.eig_var[self._head_index(layer)] for layer, s in self._spectra()]
            reference = float(torch.cat(eig_var).mean())
            if not (math.isfinite(reference) and reference > 0):
                raise QKMonitorError(
                    f"the monitored heads' mean eig_var is {reference} at the start of "
                    "training; the regularizer normalizes by it and needs it finite and > 0"
                )
            self._reference = reference
        self._regularizer = SpectralRegularizer(
            self._plan, self.regularization, self._reference, self.heads
        )
        self._regularizer.attach()

    def _check_trainable(self) -> None:
        """After the first step: refuse a regularizer that reached no trainable Q/K weight."""
        frozen = self._regularizer.untrainable
        if len(frozen) == len(self._plan):
            raise QKMonitorError(
                "regularization has no effect: no Q/K weight of the regularized layers is "
                "trainable (frozen, or adapted by a PEFT tuner other than plain LoRA, e.g. DoRA "
                "or IA3, whose merged weight carries no gradient); use LoRA on q/k, unfreeze "
                "them, or train with regularization=0"
            )
        if frozen and self._main:
            logger.warning(
                "qkmonitor: %d regularized layers have no trainable Q/K weight and are not "
                "regularized (e.g. %s)",
                len(frozen),
                sorted(frozen)[0],
            )

    # ---- measuring -----------------------------------------------------------------------
    def _will_monitor(self, args: TrainingArguments, state: TrainerState, step: int) -> bool:
        """Whether the Trainer will log at ``step`` (DefaultFlowCallback's rule) or interval."""
        if self.interval is not None:
            return step % self.interval == 0
        if step == 1 and args.logging_first_step:
            return True
        return args.logging_strategy == "steps" and step % state.logging_steps == 0

    def _head_index(self, layer: LiveLayer) -> list[int]:
        return list(range(layer.plan.n_heads)) if self.heads is None else self.heads

    @property
    def _spectral_statistics(self) -> set[str]:
        """The spectral statistics each log needs: logged, watched by alerts, eig_var for R."""
        return {"eig_var", *self.statistics, *self._alerts.statistics} & set(SPECTRAL_STATISTICS)

    def _spectra(self) -> list[tuple[LiveLayer, HeadSpectra | HeadMoments]]:
        """Exact statistics of every planned layer, gathering one layer at a time; without
        eigendecompositions when only the moments are wanted (the default)."""
        moments_only = self._spectral_statistics <= _MOMENTS
        compute = head_moments if moments_only else head_spectra
        out = []
        with torch.no_grad():
            for layer in self._plan:
                with full_weights(layer) as tensors:
                    wq, wk = layer_weights(layer.plan, tensors)
                    out.append((layer, compute(wq, wk, layer.plan.scale)))
        return out

    def _measure(self, step: int) -> dict[str, float]:
        """Every qk/ metric of this step (collectives included) and the alerts it fires."""
        per_head: dict[str, dict[HeadKey, float]] = {}
        for layer, stats in self._spectra():
            for name in self._spectral_statistics:
                values = _statistic(stats, name)
                for head in self._head_index(layer):
                    per_head.setdefault(name, {})[(*layer.key, head)] = float(values[head])
        read_step, attention, rank_collapse = self._readings
        if read_step == step:
            per_head.update(attention)
        else:
            rank_collapse = {}
        metrics = self._aggregate(per_head, rank_collapse)
        extra: dict[str, float] = {}
        if self._regularizer is not None:
            eig_var = list(per_head["eig_var"].values())
            r = sum(eig_var) / len(eig_var) / self._regularizer.reference
            metrics["qk/reg/R"] = extra["R"] = r
            metrics["qk/reg/penalty"] = self.regularization * r
        if self.qk_clip is not None:
            heads, smallest = self._clipped
            metrics["qk/clip/heads"] = extra["clipped heads"] = float(heads)
            metrics["qk/clip/min_factor"] = extra["min factor"] = smallest
            self._clipped = (0, 1.0)
        self._line = (step, compact_line(step, per_head, extra))
        self._warn_nan(step, per_head)
        self._monitored_steps += 1
        self._last_alerts = self._alerts.update(per_head)
        if self._main:
            for message in self._last_alerts:
                logger.warning("qkmonitor alert at step %d: %s", step, message)
        return metrics

    def _console_line(self, step: int) -> str | None:
        """The compact console line of the log at ``step`` (ConsoleView), if this one made it."""
        return self._line[1] if self._line is not None and self._line[0] == step else None

    def _reduce_recordings(self, step: int) -> dict[tuple[str, int], tuple[torch.Tensor, Any]]:
        """All-reduce this step's recordings, whatever each rank measured (the same collectives
        on every rank): sums and counts with SUM on monitored steps, the maximum scores and
        softcaps with MAX whenever they are measured.

        Keeps the step's per-head attention statistics and rank collapse for on_log; returns
        per layer (maximum scores (H,) float64, softcap) for QK-Clip ({} without max logits).
        """
        capture = self._capture.collect() if self._capture is not None else None
        collapse = self._rank_collapse.collect() if self._rank_collapse is not None else None
        monitored = self._monitored_step == step
        per_head: dict[str, dict[HeadKey, float]] = {}
        rank_collapse: dict[tuple[str, int], float] = {}
        entropy = capture if self.entropy and monitored else None
        if entropy is not None or (collapse is not None and monitored):
            rank_collapse = self._reduce_sums(entropy, collapse, per_head)
        scores = {}
        if capture is not None and (self.max_logit or self.qk_clip is not None):
            scores = self._reduce_max(capture)
            if self.max_logit and monitored:
                for layer in self._plan:
                    score, softcap = scores[layer.key]
                    unseen = torch.isneginf(score)  # NaN, not softcap(-inf) = -c
                    logits = torch.where(unseen, torch.nan, softcapped(score, softcap))
                    for head in self._head_index(layer):
                        per_head.setdefault(_MAX_LOGIT, {})[(*layer.key, head)] = float(
                            logits[head]
                        )
        self._readings = (step, per_head, rank_collapse)
        return scores

    def _reduce_sums(
        self,
        entropy: dict[tuple[str, int], EntropySums] | None,
        collapse: dict[tuple[str, int], torch.Tensor] | None,
        per_head: dict[str, dict[HeadKey, float]],
    ) -> dict[tuple[str, int], float]:
        """One SUM all-reduce of entropy and rank-collapse sums; adds attn_entropy and
        attn_entropy_norm per head to ``per_head``, returns rank_collapse per layer."""
        parts = []
        for layer in self._plan:
            if entropy is not None:
                sums = entropy.get(layer.key)
                width = 4 * layer.plan.n_heads  # EntropySums.stacked(): (4, H)
                parts.append(sums.stacked().flatten() if sums is not None else torch.zeros(width))
            if collapse is not None:
                parts.append(collapse.get(layer.key, torch.zeros(2)))
        flat = torch.cat([part.to(self._device, torch.float64) for part in parts])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flat)
        rank_collapse, offset = {}, 0
        for layer in self._plan:
            if entropy is not None:
                width = 4 * layer.plan.n_heads
                stacked = flat[offset : offset + width].view(4, -1)
                offset += width
                means = EntropySums.from_stacked(stacked).means()  # NaN where no row counted
                for name, values in zip(_ENTROPY_STATISTICS, means, strict=True):
                    for head in self._head_index(layer):
                        per_head.setdefault(name, {})[(*layer.key, head)] = float(values[head])
            if collapse is not None:
                total, count = flat[offset : offset + 2].tolist()
                offset += 2
                rank_collapse[layer.key] = total / count if count else math.nan
        return rank_collapse

    def _reduce_max(
        self, capture: dict[tuple[str, int], EntropySums]
    ) -> dict[tuple[str, int], tuple[torch.Tensor, float | None]]:
        """One MAX all-reduce of every layer's maximum scores (-inf where this rank saw none)
        and softcap (-inf: layer not seen here, 0: none), so that a rank without tokens for a
        layer still learns both. Returns per layer (scores (H,) float64 on CPU, softcap)."""
        parts = []
        for layer in self._plan:
            sums = capture.get(layer.key)
            scores = torch.full((layer.plan.n_heads,), -math.inf, dtype=torch.float64)
            softcap = -math.inf
            if sums is not None:
                scores = sums.max_score
                softcap = self._capture.softcaps.get(layer.key) or 0.0
            parts += [scores.to(self._device, torch.float64), torch.tensor([softcap])]
        flat = torch.cat([part.to(self._device, torch.float64) for part in parts])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.MAX)
        flat = flat.cpu()
        out, offset = {}, 0
        for layer in self._plan:
            heads = layer.plan.n_heads
            softcap = float(flat[offset + heads])
            out[layer.key] = (flat[offset : offset + heads], softcap if softcap > 0 else None)
            offset += heads + 1
        return out

    def _clip(self, scores: dict[tuple[str, int], tuple[torch.Tensor, float | None]]) -> None:
        """QK-Clip every monitored head whose max logit on this step exceeded tau (every rank
        applies the same factors: the scores were all-reduced)."""
        heads, smallest = self._clipped
        for layer in self._plan:
            score, softcap = scores[layer.key]
            gamma = clipping.clip_factors(score, self.qk_clip, softcap)
            if self.heads is not None:
                chosen = torch.zeros_like(gamma, dtype=torch.bool)
                chosen[self.heads] = True
                gamma = torch.where(chosen, gamma, 1.0)
            clipped = gamma < 1
            if clipped.any():
                clipping.apply_factors(layer, gamma)
                heads += int(clipped.sum())
                smallest = min(smallest, float(gamma.min()))
        self._clipped = (heads, smallest)

    def _aggregate(
        self,
        per_head: dict[str, dict[HeadKey, float]],
        rank_collapse: dict[tuple[str, int], float],
    ) -> dict[str, float]:
        metrics: dict[str, float] = {}
        measured = [name for name in (*_ENTROPY_STATISTICS, _MAX_LOGIT) if name in per_head]
        for name in [*self.statistics, *measured]:
            by_layer: dict[tuple[str, int], list[float]] = {}
            for (block, layer, head), value in per_head[name].items():
                by_layer.setdefault((block, layer), []).append(value)
                if self.detail == "head":
                    metrics[f"qk/{name}/{layer_tag(block, layer)}/head_{head:02d}"] = value
            if name == _MAX_LOGIT:  # a maximum: max over heads, then over layers
                for key, values in by_layer.items():
                    metrics[f"qk/{name}/{layer_tag(*key)}"] = _nanmax(values)
                metrics[f"qk/{name}/max"] = _nanmax(
                    [metrics[f"qk/{name}/{layer_tag(*key)}"] for key in by_layer]
                )
                continue
            for (block, layer), values in by_layer.items():
                tag = layer_tag(block, layer)
                metrics[f"qk/{name}/{tag}"] = sum(values) / len(values)
                if name in _SPREAD:
                    metrics[f"qk/{name}/{tag}/min"] = min(values)
                    metrics[f"qk/{name}/{tag}/max"] = max(values)
            means = [metrics[f"qk/{name}/{layer_tag(*key)}"] for key in by_layer]
            metrics[f"qk/{name}/mean"] = sum(means) / len(means)
        if rank_collapse:
            for key, value in rank_collapse.items():
                metrics[f"qk/rank_collapse/{layer_tag(*key)}"] = value
            metrics["qk/rank_collapse/mean"] = sum(rank_collapse.values()) / len(rank_collapse)
        return metrics

    def _warn_nan(self, step: int, per_head: dict[str, dict[HeadKey, float]]) -> None:
        if not self._main:
            return
        for name, values in per_head.items():
            bad = [key for key, value in values.items() if math.isnan(value)]
            if bad:
                where = ", ".join(f"{layer_tag(b, la)} head {h}" for b, la, h in bad[:8])
                more = f" and {len(bad) - 8} more" if len(bad) > 8 else ""
                logger.warning(
                    "qkmonitor: %s is NaN at step %d for %s%s (NaN/Inf in weights or "
                    "activations); logged as NaN",
                    name,
                    step,
                    where,
                    more,
                )


def _nanmax(values: Sequence[float]) -> float:
    """The largest value that is not NaN; NaN when all are (no pair seen anywhere)."""
    finite = [value for value in values if not math.isnan(value)]
    return max(finite) if finite else math.nan


def _loss_scale(optimizer: Any) -> float:
    """The fp16 GradScaler's current scale (accelerate keeps it on its optimizer), else 1."""
    scaler = getattr(optimizer, "scaler", None)
    if scaler is not None and scaler.is_enabled():
        return float(scaler.get_scale())
    return 1.0
