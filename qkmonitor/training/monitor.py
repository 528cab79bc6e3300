"""QKMonitor: qkmonitor's training monitor for any loop (plain PyTorch, accelerate, Lightning).

It logs QK-eigenspectrum statistics and attention entropy and optionally adds the spectral
regularizer, with the same numbers, keys and cross-rank reductions as the Trainer callback
(``QKMonitorCallback`` is a thin layer over it). One ``step()`` per optimizer step, wrapping all
of its micro-batches and the optimizer update::

    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    monitor = QKMonitor(model, regularization=1e-2, interval=10)   # after prepare/wrapping
    for batch in loader:
        with monitor.step():
            accelerator.backward(model(**batch).loss)
            optimizer.step()
            optimizer.zero_grad()
        accelerator.log(monitor.metrics(), step=monitor.step_count)   # {} between intervals
    monitor.close()

or the explicit calls ``before_step()`` (before the step's first forward) and
``after_optimizer_step()`` (after ``optimizer.step()``; returns the metrics). Every rank must make
the same calls: a monitored step ends with collectives (one all-reduce of the entropy sums;
sharded weights gathered one layer at a time), and creating the monitor with a regularizer
gathers the weights once, so create it on every rank.

Log keys (``qkmonitor.training.keys``; ``{L}`` is ``layer_03`` for a model with one attention
stack, ``encoder_layer_03`` / ``decoder_layer_03`` / ``cross_layer_03`` for T5/BART)::

    qk/{stat}/mean/{L}           mean over the layer's monitored heads
    qk/{stat}/min/{L}, max/{L}   spread across heads (eig_var, attn_entropy, attn_entropy_norm)
    qk/{stat}/head_{hh}/{L}      one head, with detail="head"
    qk/{stat}/mean               mean over layers of qk/{stat}/mean/{L}
    qk/attn_max_logit/max/{L}    max over the layer's heads (head_{hh}/{L} with detail="head")
    qk/attn_max_logit/max        max over layers
    qk/rank_collapse/{L}, qk/rank_collapse/mean        with rank_collapse=True
    qk/reg/R, qk/reg/penalty     R and lambda * R, with regularization > 0
    qk/clip/heads, qk/clip/min_factor   with qk_clip: heads clipped since the previous
                                 monitored step (counted once per optimizer step), smallest gamma

{stat}: the chosen spectral ``statistics`` (default eig_mean, eig_var; docs/metrics.md), then
attn_entropy and attn_entropy_norm measured on the step's training forward passes.
attn_max_logit is the largest logit softcap(s q.k) over the allowed (query, key) pairs of valid
queries of the step's global batch (biases such as ALiBi and attention sinks are not part of it;
``qkmonitor.entropy``); NaN where no pair was seen. Spectral statistics are those of the weights
after the step's optimizer update, computed exactly as ``qkmonitor.audit`` does (float64); NaN
statistics are logged as NaN, with a warning naming layer and head.

Several processes: at the end of each recorded step, one all-reduce (sum) of the entropy and
rank-collapse sums and counts (monitored steps) and one all-reduce (max) of the maximum scores
and each layer's softcap (whenever max logits are measured: monitored steps, every step with
qk_clip), whatever each rank measured (zeros and -inf included, for layers or ranks without
tokens); then per monitored step sharded weights are gathered one layer at a time in the plan's
order (``qkmonitor.weights.live``). Entropy is so averaged over every valid query of the global
batch and the max logit is the global batch's maximum; QK-Clip's factors are identical on every
rank. Every rank returns identical metrics; only the main process (rank 0) warns.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from qkmonitor.entropy import EntropySums, softcapped
from qkmonitor.errors import QKMonitorError, UnsupportedModelError
from qkmonitor.spectrum import HeadMoments, HeadSpectra, head_moments, head_spectra
from qkmonitor.statistics import HEAD_STATISTICS
from qkmonitor.training import qk_clip as clipping
from qkmonitor.training.alerts import AlertMonitor, HeadKey
from qkmonitor.training.capture import EntropyCapture
from qkmonitor.training.console import compact_line
from qkmonitor.training.keys import head_key, layer_key, layer_tag, model_key, summary
from qkmonitor.training.rank_collapse import RankCollapseRecorder
from qkmonitor.training.regularizer import SpectralRegularizer
from qkmonitor.training.settings import SPECTRAL_STATISTICS, MonitorSettings
from qkmonitor.weights.layout import Packing, layer_weights
from qkmonitor.weights.live import LiveLayer, full_weights, plan_live

__all__ = [
    "SPECTRAL_STATISTICS",
    "MonitorSettings",
    "QKMonitor",
    "StepRecord",
    "layer_tag",
    "optimizer_loss_scale",
]

logger = logging.getLogger("qkmonitor")

#: spectral statistics that need no eigendecomposition
_MOMENTS = {statistic.name for statistic in HEAD_STATISTICS if not statistic.eigen}
_ENTROPY_STATISTICS = ("attn_entropy", "attn_entropy_norm")
#: statistics logged with their min and max across heads
_SPREAD = (*(s.name for s in HEAD_STATISTICS if s.spread), *_ENTROPY_STATISTICS)
_MAX_LOGIT = "attn_max_logit"


def optimizer_loss_scale(optimizer: Any) -> float:
    """The fp16 GradScaler's current scale (accelerate keeps it on its optimizer), else 1."""
    return _scale_of(getattr(optimizer, "scaler", None))


def _scale_of(scaler: Any) -> float:
    """A GradScaler's current scale; 1 for none or a disabled one."""
    return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0


@dataclass
class StepRecord:
    """Where a QKMonitor is in training, counted in optimizer steps (one record, not counters
    spread over the monitor)."""

    #: optimizer steps completed
    completed: int = 0
    #: the step whose attention is (or was last) recorded (entropy, max logits, rank collapse)
    recorded: int = -1
    #: the step last recorded for a log (entropy, rank collapse), not only for QK-Clip
    monitored: int = -1
    #: the step ``measure()`` last measured
    measured: int = -1
    #: monitored steps measured so far (saved in checkpoints as ``monitored_steps``)
    logs: int = 0
    #: QK-Clip since the last log: heads clipped, smallest factor
    clipped: tuple[int, float] = (0, 1.0)
    #: an optimizer step is open across micro-batches (accelerate's ``accumulate()`` said the
    #: last ``step()`` block did not sync gradients)
    accumulating: bool = False


def _calling_grad_scaler() -> Any:
    """The enabled ``torch.amp.GradScaler`` whose ``step`` is calling the optimizer now, if any
    (GradScaler.step -> _maybe_opt_step -> optimizer.step -> its pre-hooks -> here)."""
    frame = sys._getframe(2)
    for _ in range(8):
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if isinstance(owner, torch.amp.GradScaler):
            return owner if owner.is_enabled() else None
        frame = frame.f_back
    return None


def _syncs_gradients() -> bool:
    """False while accelerate's gradient state says the current micro-batch does not sync
    gradients (inside ``accelerator.accumulate``, before the optimizer step's last micro-batch);
    True without accelerate's state."""
    try:
        from accelerate.state import GradientState
    except ImportError:  # accelerate is optional for plain PyTorch loops
        return True
    # read without creating it: GradientState() would initialize accelerate's shared state
    if not GradientState._shared_state:
        return True
    return bool(GradientState().sync_gradients)


def _is_main() -> bool:
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return not distributed or torch.distributed.get_rank() == 0


def _without_torch_mha(
    planned: tuple[list[LiveLayer], list[str]], main: bool
) -> tuple[list[LiveLayer], list[str]]:
    """The plan without layers of torch's nn.MultiheadAttention (SigLIP's pooling head, Aria's
    projector, ...): qkmonitor.audit reads them from the weights, but their attention runs in
    F.multi_head_attention_forward, outside transformers' attention interface, where the
    monitor measures entropy, max logits and rank collapse; said once."""
    layers, warnings = planned
    torch_mha = (Packing.IN_PROJ_QKV, Packing.IN_PROJ_SEPARATE)
    left = [layer.name for layer in layers if layer.plan.packing in torch_mha]
    if left and main:
        logger.warning(
            "qkmonitor: %d torch nn.MultiheadAttention layer%s (%s) audited from weights "
            "(qkmonitor.audit) but not monitored in training",
            len(left),
            "s" * (len(left) > 1),
            ", ".join(left),
        )
    return [layer for layer in layers if layer.plan.packing not in torch_mha], warnings


class QKMonitor:
    """QK-eigenspectrum statistics and attention entropy of a model in training; optionally
    lambda * R (module doc for the loop it expects).

    Args:
        model: the model as trained: plain, PEFT, DDP/FSDP/ZeRO-3/compile-wrapped (create the
            monitor after ``accelerator.prepare`` or the wrapping), or a wrapper holding one
            transformers model (SentenceTransformer).
        regularization: lambda >= 0. With lambda > 0 the training objective becomes
            task loss + lambda * R, R = mean eig_var of the monitored heads divided by its value
            when the monitor is created (so R = 1 then, for any model); its gradient reaches
            the optimizer once per optimizer step, whatever the micro-batches and world size.
            0 (default) only monitors and leaves training bit-for-bit unchanged.
        settings: a ``MonitorSettings``; the keyword settings below override its fields.
        **options: ``MonitorSettings``' fields: interval (every ``interval`` optimizer steps,
            default every step; ``metrics()`` is {} on the others), layers, heads, detail,
            statistics, entropy, max_logit, qk_clip (tau: after every optimizer step each
            monitored head whose max logit exceeded tau has its query/key weights rescaled,
            ``qkmonitor.training.qk_clip``), rank_collapse, alerts (``alerts_fired`` holds the
            last monitored step's messages).
        optimizer: with fp16 under accelerate, its optimizer (whose GradScaler scale the
            injected gradient must carry); or pass ``loss_scale`` to ``before_step``.
        scaler: with fp16 and torch's own ``torch.amp.GradScaler``, that scaler: the injected
            gradient then carries its scale, so that ``unscale_`` leaves exactly lambda * grad R.
            A ``step()`` whose optimizer is stepped by a GradScaler of another scale than the one
            the gradient carried is refused in one line (the regularizer would be weakened by
            the scale, silently).
        device: where the cross-rank reductions run (default: the model's parameters' device).
        state: ``state_dict()`` of a previous run, to resume (the regularizer's reference,
            alert history and step counter).

    Raises:
        ValueError: bad settings; QKMonitorError: a model or layer/head selection that cannot
            be monitored, or a regularizer that cannot work on it (one line each).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        regularization: float | None = None,
        *,
        settings: MonitorSettings | None = None,
        optimizer: Any = None,
        scaler: Any = None,
        device: torch.device | str | None = None,
        state: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> None:
        if regularization is not None:
            options["regularization"] = regularization
        #: the validated settings (frozen)
        self.settings = MonitorSettings.build(settings, options)
        self._alerts = AlertMonitor(self.settings.alerts)
        self.optimizer = optimizer
        self.scaler = scaler
        if device is None:
            first = next(model.parameters(), None)
            device = first.device if first is not None else "cpu"
        self.device = torch.device(device)
        self.main = _is_main()
        #: where the monitor is in training: counters of optimizer steps, one record
        self.steps = StepRecord()
        #: alert messages of the last monitored step
        self.alerts_fired: list[str] = []
        #: the last measured step's metrics in one readable line (model means and the worst
        #: head of eig_var, entropy_norm and max logit; R, clip counts)
        self.console_line: str | None = None
        self._reference: float | None = None
        if state is not None:
            self.load_state_dict(state)
        self._recording = contextlib.ExitStack()
        self._readings: tuple[int, dict[str, dict[HeadKey, float]], dict] = (-1, {}, {})
        self._metrics: dict[str, float] = {}
        self._checked_trainable = False
        self._parameters: set[int] | None = None  # ids of the monitored layers' parameters
        self._capture: EntropyCapture | None = None
        self._rank_collapse: RankCollapseRecorder | None = None
        self._regularizer: SpectralRegularizer | None = None
        self._plan = self._select(_without_torch_mha(plan_live(model), self.main))
        if any(layer.plan.mla is not None for layer in self._plan):
            raise UnsupportedModelError(
                "multi-head latent attention (MLA) is audited from weights (qkmonitor.audit), but "
                "the training monitor does not measure or regularize it yet"
            )
        self._make_recorders(model)
        if self.settings.qk_clip is not None:
            self._check_clip(model)
        if self.settings.regularization > 0:
            self._start_regularizer()

    # ---- state --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What resuming needs (JSON): the regularizer's reference, alert history, counters."""
        return {
            "reference": self._reference,
            "monitored_steps": self.steps.logs,
            "step_count": self.steps.completed,
            "alerts": self._alerts.state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict()`` (before the first step of the resumed run)."""
        self._reference = state["reference"]
        self.steps.logs = int(state["monitored_steps"])
        self.steps.completed = int(state.get("step_count", self.steps.completed))
        self._alerts.load(state["alerts"])

    @property
    def step_count(self) -> int:
        """Optimizer steps completed (``steps.completed``)."""
        return self.steps.completed

    @property
    def measured_step(self) -> int:
        """The step ``measure()`` last measured (-1: none yet)."""
        return self.steps.measured

    @property
    def interval(self) -> int:
        """Monitor every ``interval`` optimizer steps (the settings' interval; None: 1)."""
        return self.settings.interval or 1

    @property
    def measures_attention(self) -> bool:
        """Whether attention entropy or max logits are measured (the model supports it)."""
        return self._capture is not None

    @property
    def reference(self) -> float | None:
        """The regularizer's eig_var_0 (None without a regularizer and no restored state)."""
        return self._reference

    # ---- the loop -----------------------------------------------------------------------
    @contextlib.contextmanager
    def step(self) -> Iterator[QKMonitor]:
        """``with monitor.step(): <forwards, backwards, optimizer.step()>``, one per optimizer
        step; ``metrics()`` then holds that step's metrics ({} if it was not monitored). Ends
        with collectives on monitored steps; nothing is measured if the block raises.

        Under accelerate's ``with accelerator.accumulate(model), monitor.step():`` around each
        micro-batch, a block after which accelerate does not sync gradients is a micro-batch:
        the optimizer step stays open (the regularizer armed once, attention recorded over
        every micro-batch) until the block after which it does."""
        self.before_step()
        stepped: list[torch.optim.Optimizer] = []
        hooks = [register_optimizer_step_post_hook(lambda opt, *_: stepped.append(opt))]
        if self._regularizer is not None:
            hooks.append(register_optimizer_step_pre_hook(self._check_loss_scale))
        try:
            yield self
        except BaseException:
            self.steps.accumulating = False
            self._recording.close()
            raise
        finally:
            for hook in hooks:
                hook.remove()
        if not _syncs_gradients():
            if any(self._optimizes_model(optimizer) for optimizer in stepped):
                self.steps.accumulating = False
                self._recording.close()
                raise QKMonitorError(
                    "accelerate's gradient state says this step() block did not sync gradients "
                    "(a micro-batch of accumulate()), yet an optimizer of the model stepped; "
                    "pass the optimizer through accelerator.prepare, or wrap every micro-batch "
                    "of an optimizer step in one monitor.step()"
                )
            self.steps.accumulating = True  # a micro-batch: the optimizer step goes on
            self._metrics = {}
            return
        self.after_optimizer_step()

    def before_step(
        self,
        *,
        step: int | None = None,
        record: bool | None = None,
        loss_scale: float | None = None,
    ) -> None:
        """Call before the optimizer step's first forward: arms the regularizer, starts
        recording attention when the step is monitored (max logits alone on the other steps
        under QK-Clip).

        step: the step about to run (default ``step_count + 1``); record: whether to measure
        attention in it (default: ``step % interval == 0``); loss_scale: the fp16 GradScaler's
        scale (default: read from ``optimizer``, else 1).
        """
        if self.steps.accumulating:  # a later micro-batch of the open optimizer step
            return
        step = self.steps.completed + 1 if step is None else step
        if self._regularizer is not None:
            if loss_scale is None and self.scaler is not None:
                loss_scale = _scale_of(self.scaler)
            if loss_scale is None:
                loss_scale = optimizer_loss_scale(self.optimizer)
            self._regularizer.arm(loss_scale)
        monitored = step % self.interval == 0 if record is None else record
        if self._capture is not None and (monitored or self.settings.qk_clip is not None):
            entropy = self.settings.entropy and monitored
            self._recording.enter_context(self._capture.recording(entropy=entropy))
            self.steps.recorded = step
        if self._rank_collapse is not None and monitored:
            self._recording.enter_context(self._rank_collapse.recording())
            self.steps.recorded = step
        if monitored:
            self.steps.monitored = step

    def end_step(self, step: int | None = None) -> None:
        """After the optimizer step: stop recording, reduce what was recorded across ranks
        (collectives on recorded steps), QK-Clip; after the first step, check that the
        regularizer reached a trainable weight."""
        steps = self.steps
        steps.accumulating = False
        steps.completed = steps.completed + 1 if step is None else step
        self._recording.close()
        if steps.recorded == steps.completed:
            scores = self._reduce_recordings(steps.completed)
            if self.settings.qk_clip is not None:
                self._clip(scores)
        if self._regularizer is not None and not self._checked_trainable:
            self._checked_trainable = True
            self._check_trainable()

    def after_optimizer_step(self) -> dict[str, float]:
        """``end_step()``, then on monitored steps (``step_count % interval == 0``) the
        metrics (``measure()``); returns them ({} on other steps)."""
        self.end_step()
        monitored = self.steps.completed % self.interval == 0
        self._metrics = self.measure() if monitored else {}
        return self._metrics

    def _check_loss_scale(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        """Before an optimizer of the model steps: refuse if a GradScaler is stepping it with a
        scale other than the one the injected gradient carried (it would divide lambda * grad R
        by that scale)."""
        if self._regularizer is None or not self._optimizes_model(optimizer):
            return
        scaler = _calling_grad_scaler()
        if scaler is None:
            return
        scale = float(scaler.get_scale())
        if scale != self._regularizer.loss_scale:
            raise QKMonitorError(
                f"a GradScaler (scale {scale:g}) is stepping the optimizer, but the "
                f"regularizer's gradient carried scale {self._regularizer.loss_scale:g}: "
                "unscaling would weaken it by that factor; pass QKMonitor(..., scaler=scaler) "
                "(or the accelerate-prepared optimizer as optimizer=)"
            )

    def _optimizes_model(self, optimizer: torch.optim.Optimizer) -> bool:
        """Whether ``optimizer`` updates a parameter of a monitored layer."""
        if self._parameters is None:
            self._parameters = {id(p) for layer in self._plan for p in layer.module.parameters()}
        groups = getattr(optimizer, "param_groups", [])
        return any(id(p) in self._parameters for group in groups for p in group["params"])

    def metrics(self) -> dict[str, float]:
        """The qk/ metrics of the last ``step()`` ({} if it was not monitored)."""
        return dict(self._metrics)

    def close(self) -> None:
        """Stop recording and remove every hook (the regularizer's included)."""
        self._recording.close()
        if self._capture is not None:
            self._capture.detach()
        if self._regularizer is not None:
            self._regularizer.detach()
            self._regularizer = None

    # ---- setup ---------------------------------------------------------------------------
    def _select(self, planned: tuple[list[LiveLayer], list[str]]) -> list[LiveLayer]:
        layers, warnings = planned
        if self.main:
            for message in warnings:
                logger.warning("qkmonitor: %s", message)
        if self.settings.layers is not None:
            available = sorted({layer.plan.layer for layer in layers})
            missing = [i for i in self.settings.layers if i not in available]
            if missing:
                raise QKMonitorError(
                    f"layers {missing} do not exist; the model's attention layers are "
                    f"{available[0]}..{available[-1]}"
                )
            layers = [layer for layer in layers if layer.plan.layer in self.settings.layers]
        if self.settings.heads is not None:
            fewest = min(layer.plan.n_heads for layer in layers)
            last = self.settings.heads[-1]
            if last >= fewest:
                raise QKMonitorError(f"head {last} does not exist; some layers have {fewest} heads")
        return layers

    def _make_recorders(self, model: torch.nn.Module) -> None:
        if self.settings.entropy or self.settings.max_logit or self.settings.qk_clip is not None:
            try:
                capture = EntropyCapture(model, layers=self._plan)
                reason = capture.unsupported
            except QKMonitorError as error:
                reason = str(error)
            if reason is None:
                self._capture = capture
            elif self.settings.qk_clip is not None:
                raise QKMonitorError(f"QK-Clip needs the max attention logit: {reason}")
            elif self.main:
                logger.warning(
                    "qkmonitor: attention entropy and max logit are not measured: %s", reason
                )
        if self.settings.rank_collapse:
            self._rank_collapse = RankCollapseRecorder(model, self._plan)

    def _check_clip(self, model: torch.nn.Module) -> None:
        """Refuse QK-Clip, in one line, where rescaling weights cannot cap the logits exactly."""
        if type(model).__name__ == "DeepSpeedEngine":
            raise QKMonitorError(
                "QK-Clip under DeepSpeed is not supported: its optimizer's fp32 master weights "
                "would overwrite the rescaled ones; train without DeepSpeed or without qk_clip"
            )
        for layer in self._plan:
            reason = clipping.unsupported(layer)
            if reason is not None:
                raise QKMonitorError(f"QK-Clip: {reason}")

    def _start_regularizer(self) -> None:
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
            self._plan, self.settings.regularization, self._reference, self.settings.heads
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
        if frozen and self.main:
            logger.warning(
                "qkmonitor: %d regularized layers have no trainable Q/K weight and are not "
                "regularized (e.g. %s)",
                len(frozen),
                sorted(frozen)[0],
            )

    # ---- measuring -----------------------------------------------------------------------
    def _head_index(self, layer: LiveLayer) -> list[int]:
        heads = self.settings.heads
        return list(range(layer.plan.n_heads)) if heads is None else list(heads)

    @property
    def _spectral_statistics(self) -> set[str]:
        """The spectral statistics each log needs: logged, watched by alerts, eig_var for R."""
        wanted = {"eig_var", *self.settings.statistics, *self._alerts.statistics}
        return wanted & set(SPECTRAL_STATISTICS)

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

    def measure(self, step: int | None = None) -> dict[str, float]:
        """Every qk/ metric at ``step`` (default: the last completed one): the weights' spectra
        now (sharded ones gathered, a collective) and what that step recorded; updates the
        alerts (``alerts_fired``)."""
        step = self.steps.completed if step is None else step
        per_head: dict[str, dict[HeadKey, float]] = {}
        for layer, stats in self._spectra():
            for name in self._spectral_statistics:
                values = getattr(stats, name)
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
            metrics["qk/reg/penalty"] = self.settings.regularization * r
        if self.settings.qk_clip is not None:
            heads, smallest = self.steps.clipped
            metrics["qk/clip/heads"] = extra["clipped heads"] = float(heads)
            metrics["qk/clip/min_factor"] = extra["min factor"] = smallest
            self.steps.clipped = (0, 1.0)
        self.steps.measured, self.console_line = step, compact_line(step, per_head, extra)
        self._warn_nan(step, per_head)
        self.steps.logs += 1
        self.alerts_fired = self._alerts.update(per_head)
        if self.main:
            for message in self.alerts_fired:
                logger.warning("qkmonitor alert at step %d: %s", step, message)
        return metrics

    def _reduce_recordings(self, step: int) -> dict[tuple[str, int], tuple[torch.Tensor, Any]]:
        """All-reduce this step's recordings, whatever each rank measured (the same collectives
        on every rank): sums and counts with SUM on monitored steps, the maximum scores and
        softcaps with MAX whenever they are measured.

        Keeps the step's per-head attention statistics and rank collapse for on_log; returns
        per layer (maximum scores (H,) float64, softcap) for QK-Clip ({} without max logits).
        """
        capture = self._capture.collect() if self._capture is not None else None
        collapse = self._rank_collapse.collect() if self._rank_collapse is not None else None
        monitored = self.steps.monitored == step
        per_head: dict[str, dict[HeadKey, float]] = {}
        rank_collapse: dict[tuple[str, int], float] = {}
        entropy = capture if self.settings.entropy and monitored else None
        if entropy is not None or (collapse is not None and monitored):
            rank_collapse = self._reduce_sums(entropy, collapse, per_head)
        scores = {}
        if capture is not None and (self.settings.max_logit or self.settings.qk_clip is not None):
            scores = self._reduce_max(capture)
            if self.settings.max_logit and monitored:
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
        flat = torch.cat([part.to(self.device, torch.float64) for part in parts])
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
            parts += [scores.to(self.device, torch.float64), torch.tensor([softcap])]
        flat = torch.cat([part.to(self.device, torch.float64) for part in parts])
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
        heads, smallest = self.steps.clipped
        for layer in self._plan:
            score, softcap = scores[layer.key]
            gamma = clipping.clip_factors(score, self.settings.qk_clip, softcap)
            if self.settings.heads is not None:
                chosen = torch.zeros_like(gamma, dtype=torch.bool)
                chosen[list(self.settings.heads)] = True
                gamma = torch.where(chosen, gamma, 1.0)
            clipped = gamma < 1
            if clipped.any():
                clipping.apply_factors(layer, gamma)
                heads += int(clipped.sum())
                smallest = min(smallest, float(gamma.min()))
        self.steps.clipped = (heads, smallest)

    def _aggregate(
        self,
        per_head: dict[str, dict[HeadKey, float]],
        rank_collapse: dict[tuple[str, int], float],
    ) -> dict[str, float]:
        metrics: dict[str, float] = {}
        measured = [name for name in (*_ENTROPY_STATISTICS, _MAX_LOGIT) if name in per_head]
        for name in [*self.settings.statistics, *measured]:
            by_layer: dict[tuple[str, int], list[float]] = {}
            for (block, layer, head), value in per_head[name].items():
                by_layer.setdefault((block, layer), []).append(value)
                if self.settings.detail == "head":
                    metrics[head_key(name, block, layer, head)] = value
            reduction = summary(name)  # a maximum stays a maximum: max over heads, then layers
            reduce = _nanmax if reduction == "max" else _mean
            for (block, layer), values in by_layer.items():
                metrics[layer_key(name, reduction, block, layer)] = reduce(values)
                if name in _SPREAD:
                    metrics[layer_key(name, "min", block, layer)] = min(values)
                    metrics[layer_key(name, "max", block, layer)] = max(values)
            per_layer = [metrics[layer_key(name, reduction, *key)] for key in by_layer]
            metrics[model_key(name, reduction)] = reduce(per_layer)
        if rank_collapse:
            for key, value in rank_collapse.items():
                metrics[f"qk/rank_collapse/{layer_tag(*key)}"] = value
            metrics[model_key("rank_collapse", "mean")] = _mean(list(rank_collapse.values()))
        return metrics

    def _warn_nan(self, step: int, per_head: dict[str, dict[HeadKey, float]]) -> None:
        if not self.main:
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


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _nanmax(values: Sequence[float]) -> float:
    """The largest value that is not NaN; NaN when all are (no pair seen anywhere)."""
    finite = [value for value in values if not math.isnan(value)]
    return max(finite) if finite else math.nan
