"""QKMonitorLightningCallback: QKMonitor in a Lightning ``Trainer`` (``lightning.pytorch``).

A thin adapter that makes QKMonitor's explicit calls from Lightning's hooks, so the numbers,
keys and cross-rank reductions are QKMonitor's::

    trainer = L.Trainer(callbacks=[QKMonitorLightningCallback(regularization=1e-2, interval=10)])

- ``on_train_start`` (after the strategy wrapped the model and a checkpoint was restored):
  ``QKMonitor(pl_module, ...)`` on every rank; the LightningModule must hold one transformers
  model.
- ``on_train_batch_start`` of the first batch of each optimizer step (every
  ``accumulate_grad_batches`` batches): ``before_step``, so the regularizer injects its gradient
  once per optimizer step and attention is recorded over every micro-batch of it.
- ``on_train_batch_end`` of the batch whose optimizer step ran (``trainer.global_step`` moved):
  ``end_step`` and, every ``interval`` steps, ``measure``; the ``qk/`` dict (Python floats,
  exact) goes to every logger of the Trainer on every monitored step, whatever
  ``log_every_n_steps``, and is ``metrics`` until the next batch.

Steps are Lightning's optimizer steps: QKMonitor's step n is ``trainer.global_step`` after n
optimizer steps (``interval`` counts these, ``console_line`` shows them); the loggers get it at
``step=n - 1``, the index at which Lightning logs that step's own ``self.log`` values, so the
qk/ keys share the loss's step. Validation that Lightning runs
inside an accumulation window (``val_check_interval`` not a multiple of
``accumulate_grad_batches``) is recorded into that step's attention statistics.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl

from qkmonitor.errors import QKMonitorError
from qkmonitor.training.monitor import QKMonitor, optimizer_loss_scale
from qkmonitor.training.settings import MonitorSettings

__all__ = ["QKMonitorLightningCallback"]


class QKMonitorLightningCallback(pl.Callback):
    """Log QKMonitor's ``qk/`` metrics (and add its regularizer / QK-Clip) in Lightning.

    Args:
        regularization: lambda >= 0 (QKMonitor's); 0 leaves training unchanged.
        settings: a ``MonitorSettings``; ``**options`` (its fields: interval, layers, heads,
            detail, statistics, entropy, max_logit, qk_clip, rank_collapse, alerts) override it.
        device: where QKMonitor's cross-rank reductions run (default: the model's device).
    The loss scale is read from Lightning's precision plugin and QKMonitor's state is saved in
    Lightning checkpoints.
    """

    def __init__(
        self,
        regularization: float | None = None,
        *,
        settings: MonitorSettings | None = None,
        device: Any = None,
        **options: Any,
    ) -> None:
        for name in ("model", "optimizer", "state"):
            if name in options:
                raise ValueError(f"{name} is set by the callback; do not pass it")
        if regularization is not None:
            options["regularization"] = regularization
        #: the validated settings (frozen), handed to the QKMonitor
        self.settings = MonitorSettings.build(settings, options)
        self.device = device
        self.monitor: QKMonitor | None = None
        #: the qk/ metrics of the optimizer step that ended in this batch ({} on the other
        #: batches and on steps that were not monitored)
        self.metrics: dict[str, float] = {}
        self._saved: dict[str, Any] | None = None
        self._open_at: int | None = None  # global_step when the open optimizer step began

    # ---- Lightning hooks ----------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if len(trainer.optimizers) != 1:
            raise QKMonitorError(
                f"QKMonitorLightningCallback needs exactly one optimizer, the module has "
                f"{len(trainer.optimizers)}; call QKMonitor yourself around each step"
            )
        self.monitor = QKMonitor(
            pl_module, settings=self.settings, device=self.device, state=self._saved
        )
        self._open_at = None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._open_at is None:  # the first micro-batch of an optimizer step
            self._open_at, self.metrics = trainer.global_step, {}
            self.monitor.before_step(
                step=trainer.global_step + 1,
                loss_scale=optimizer_loss_scale(trainer.precision_plugin),
            )

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self._open_at is None or trainer.global_step == self._open_at:
            return  # an accumulation micro-batch: the optimizer has not stepped yet
        if trainer.global_step != self._open_at + 1:
            raise QKMonitorError(
                f"{trainer.global_step - self._open_at} optimizer steps in one batch; "
                "QKMonitorLightningCallback needs at most one per batch"
            )
        step, self._open_at = trainer.global_step, None
        self.monitor.end_step(step)
        self.metrics = self.monitor.measure(step) if step % self.monitor.interval == 0 else {}
        if self.metrics:  # at the index Lightning logs this step's own metrics at: step - 1
            for logger in trainer.loggers:
                logger.log_metrics(self.metrics, step=step - 1)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.monitor is not None:
            self.monitor.close()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if self.monitor is not None:
            self.monitor.close()

    # ---- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """QKMonitor.state_dict(): the regularizer's reference, alert history, counters."""
        if self.monitor is not None:
            return self.monitor.state_dict()
        return dict(self._saved or {})

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self._saved = dict(state_dict) if state_dict else None
