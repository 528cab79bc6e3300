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
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from qkmonitor.entropy import EntropySums, softcapped
from qkmonitor.errors import QKMonitorError, UnsupportedModelError
from qkmonitor.spectrum import HeadMoments, HeadSpectra, head_moments, head_spectra
from qkmonitor.statistics import HEAD_STATISTICS
from qkmonitor.training import qk_clip as clipping
from qkmonitor.training.alerts import DEFAULT_ALERTS, AlertMonitor, AlertRule, HeadKey, as_rule
from qkmonitor.training.capture import EntropyCapture
from qkmonitor.training.console import compact_line
from qkmonitor.training.keys import head_key, layer_key, layer_tag, model_key, summary
from qkmonitor.training.rank_collapse import RankCollapseRecorder
from qkmonitor.training.regularizer import SpectralRegularizer
from qkmonitor.weights.layout import layer_weights
from qkmonitor.weights.live import LiveLayer, full_weights, plan_live

__all__ = [
    "SPECTRAL_STATISTICS",
    "QKMonitor",
    "check_settings",
    "layer_tag",
    "optimizer_loss_scale",
]

logger = logging.getLogger("qkmonitor")

#: spectral statistics that can be logged (declared in qkmonitor.statistics.HEAD_STATISTICS)
SPECTRAL_STATISTICS = tuple(statistic.name for statistic in HEAD_STATISTICS)
#: spectral statistics that need no eigendecomposition
_MOMENTS = {statistic.name for statistic in HEAD_STATISTICS if not statistic.eigen}
_ENTROPY_STATISTICS = ("attn_entropy", "attn_entropy_norm")
#: statistics logged with their min and max across heads
_SPREAD = (*(s.name for s in HEAD_STATISTICS if s.spread), *_ENTROPY_STATISTICS)
_MAX_LOGIT = "attn_max_logit"
_DETAILS = ("layer", "head")


def check_settings(
    *,
    regularization: float,
    interval: int | None,
    heads: Sequence[int] | None,
    detail: str,
    statistics: Sequence[str],
    qk_clip: float | None = None,
) -> None:
    """Raise ValueError for settings no model can make valid."""
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


def optimizer_loss_scale(optimizer: Any) -> float:
    """The fp16 GradScaler's current scale (accelerate keeps it on its optimizer), else 1."""
    scaler = getattr(optimizer, "scaler", None)
    if scaler is not None and scaler.is_enabled():
        return float(scaler.get_scale())
    return 1.0


def _is_main() -> bool:
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return not distributed or torch.distributed.get_rank() == 0


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
            the optimizer once per ``step()``, whatever the micro-batches and world size.
            0 (default) only monitors and leaves training bit-for-bit unchanged.
        interval: monitor every ``interval`` steps (``metrics()`` is {} on the others).
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
        rank_collapse: also log rank_collapse per layer.
        alerts: collapse alert rules (AlertRule or its dict form); None: DEFAULT_ALERTS,
            () for none. ``alerts_fired`` holds the last monitored step's messages.
        optimizer: with fp16 under accelerate, its optimizer (whose GradScaler scale the
            injected gradient must carry); or pass ``loss_scale`` to ``before_step``.
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
        regularization: float = 0.0,
        *,
        interval: int = 1,
        layers: Sequence[int] | None = None,
        heads: Sequence[int] | None = None,
        detail: str = "layer",
        statistics: Sequence[str] = ("eig_mean", "eig_var"),
        entropy: bool = True,
        max_logit: bool = True,
        qk_clip: float | None = None,
        rank_collapse: bool = False,
        alerts: Sequence[AlertRule | Mapping[str, Any]] | None = None,
        optimizer: Any = None,
        device: torch.device | str | None = None,
        state: Mapping[str, Any] | None = None,
    ) -> None:
        check_settings(
            regularization=regularization,
            interval=interval,
            heads=heads,
            detail=detail,
            statistics=statistics,
            qk_clip=qk_clip,
        )
        self.regularization = float(regularization)
        self.interval = interval
        self.layers = None if layers is None else sorted(set(layers))
        self.heads = None if heads is None else sorted(set(heads))
        self.detail = detail
        self.statistics = tuple(statistics)
        self.entropy = entropy
        self.max_logit = max_logit
        self.qk_clip = None if qk_clip is None else float(qk_clip)
        self.rank_collapse = rank_collapse
        rules = DEFAULT_ALERTS if alerts is None else tuple(as_rule(rule) for rule in alerts)
        self._alerts = AlertMonitor(rules)
        self.optimizer = optimizer
        if device is None:
            first = next(model.parameters(), None)
            device = first.device if first is not None else "cpu"
        self.device = torch.device(device)
        self.main = _is_main()
        #: optimizer steps completed (``step()`` / ``after_optimizer_step()`` calls)
        self.step_count = 0
        #: alert messages of the last monitored step
        self.alerts_fired: list[str] = []
        #: the step ``measure()`` last measured, and its metrics in one readable line (model
        #: means and the worst head of eig_var, entropy_norm and max logit; R, clip counts)
        self.measured_step = -1
        self.console_line: str | None = None
        self._reference: float | None = None
        self._monitored_steps = 0
        if state is not None:
            self.load_state_dict(state)
        self._recording = contextlib.ExitStack()
        self._recorded_step = -1
        self._monitored_step = -1  # recorded for a log (entropy, rank collapse), not only clipping
        self._clipped = (0, 1.0)  # QK-Clip since the last log: heads clipped, smallest gamma
        self._readings: tuple[int, dict[str, dict[HeadKey, float]], dict] = (-1, {}, {})
        self._metrics: dict[str, float] = {}
        self._checked_trainable = False
        self._capture: EntropyCapture | None = None
        self._rank_collapse: RankCollapseRecorder | None = None
        self._regularizer: SpectralRegularizer | None = None
        self._plan = self._select(plan_live(model))
        if any(layer.plan.mla is not None for layer in self._plan):
            raise UnsupportedModelError(
                "multi-head latent attention (MLA) is audited from weights (qkmonitor.audit), but "
                "the training monitor does not measure or regularize it yet"
            )
        self._make_recorders(model)
        if self.qk_clip is not None:
            self._check_clip(model)
        if self.regularization > 0:
            self._start_regularizer()

    # ---- state --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What resuming needs (JSON): the regularizer's reference, alert history, counters."""
        return {
            "reference": self._reference,
            "monitored_steps": self._monitored_steps,
            "step_count": self.step_count,
            "alerts": self._alerts.state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict()`` (before the first step of the resumed run)."""
        self._reference = state["reference"]
        self._monitored_steps = int(state["monitored_steps"])
        self.step_count = int(state.get("step_count", self.step_count))
        self._alerts.load(state["alerts"])

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
        with collectives on monitored steps; nothing is measured if the block raises."""
        self.before_step()
        try:
            yield self
        except BaseException:
            self._recording.close()
            raise
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
        step = self.step_count + 1 if step is None else step
        if self._regularizer is not None:
            if loss_scale is None:
                loss_scale = optimizer_loss_scale(self.optimizer)
            self._regularizer.arm(loss_scale)
        monitored = step % self.interval == 0 if record is None else record
        if self._capture is not None and (monitored or self.qk_clip is not None):
            entropy = self.entropy and monitored
            self._recording.enter_context(self._capture.recording(entropy=entropy))
            self._recorded_step = step
        if self._rank_collapse is not None and monitored:
            self._recording.enter_context(self._rank_collapse.recording())
            self._recorded_step = step
        if monitored:
            self._monitored_step = step

    def end_step(self, step: int | None = None) -> None:
        """After the optimizer step: stop recording, reduce what was recorded across ranks
        (collectives on recorded steps), QK-Clip; after the first step, check that the
        regularizer reached a trainable weight."""
        self.step_count = self.step_count + 1 if step is None else step
        self._recording.close()
        if self._recorded_step == self.step_count:
            scores = self._reduce_recordings(self.step_count)
            if self.qk_clip is not None:
                self._clip(scores)
        if self._regularizer is not None and not self._checked_trainable:
            self._checked_trainable = True
            self._check_trainable()

    def after_optimizer_step(self) -> dict[str, float]:
        """``end_step()``, then on monitored steps (``step_count % interval == 0``) the
        metrics (``measure()``); returns them ({} on other steps)."""
        self.end_step()
        monitored = self.step_count % self.interval == 0
        self._metrics = self.measure() if monitored else {}
        return self._metrics

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
            elif self.main:
                logger.warning(
                    "qkmonitor: attention entropy and max logit are not measured: %s", reason
                )
        if self.rank_collapse:
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
        if frozen and self.main:
            logger.warning(
                "qkmonitor: %d regularized layers have no trainable Q/K weight and are not "
                "regularized (e.g. %s)",
                len(frozen),
                sorted(frozen)[0],
            )

    # ---- measuring -----------------------------------------------------------------------
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

    def measure(self, step: int | None = None) -> dict[str, float]:
        """Every qk/ metric at ``step`` (default: the last completed one): the weights' spectra
        now (sharded ones gathered, a collective) and what that step recorded; updates the
        alerts (``alerts_fired``)."""
        step = self.step_count if step is None else step
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
            metrics["qk/reg/penalty"] = self.regularization * r
        if self.qk_clip is not None:
            heads, smallest = self._clipped
            metrics["qk/clip/heads"] = extra["clipped heads"] = float(heads)
            metrics["qk/clip/min_factor"] = extra["min factor"] = smallest
            self._clipped = (0, 1.0)
        self.measured_step, self.console_line = step, compact_line(step, per_head, extra)
        self._warn_nan(step, per_head)
        self._monitored_steps += 1
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
