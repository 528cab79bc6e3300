"""QKMonitorLightningCallback: a Lightning Trainer logs what QKMonitor gives a plain loop.

The reference is a hand-written PyTorch loop with ``with monitor.step():`` on the same model,
seed, batches and optimizer (tests/training/test_monitor.py checks that loop against the
Trainer callback, whose numbers tests/training/test_callback.py checks against naive ones).
"""

from __future__ import annotations

import csv
import math
from typing import Any

import pytest

pl = pytest.importorskip("lightning.pytorch")

import torch  # noqa: E402
from distributed.tiny import PaddedTokens, tiny_bert  # noqa: E402

from qkmonitor import QKMonitor  # noqa: E402
from qkmonitor.errors import QKMonitorError  # noqa: E402
from qkmonitor.training.lightning import QKMonitorLightningCallback  # noqa: E402

SETTINGS = {
    "interval": 2,
    "detail": "head",
    "rank_collapse": True,
    "regularization": 0.5,
    "qk_clip": 3.5,  # below this run's max logits (about 4.7 at step 1): heads get clipped
}
STEPS, ACCUMULATE, BATCH, LR = 4, 2, 2, 0.05


class Module(pl.LightningModule):
    def __init__(self, optimizers: int = 1) -> None:
        super().__init__()
        self.model = tiny_bert(dropout=0.0)
        self.optimizers_count = optimizers
        self.automatic_optimization = optimizers == 1  # Lightning's rule for several

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch).loss
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        optimizers = [torch.optim.SGD(self.parameters(), lr=LR)]
        return optimizers * self.optimizers_count


class Recorder(pl.loggers.Logger):
    """A Lightning logger that keeps what it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.logged: list[tuple[int, dict[str, float]]] = []

    name, version = "recorder", 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.logged.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


def trainer(
    callback: pl.Callback, logger: Any, accumulate: int = ACCUMULATE, steps: int = STEPS
) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        accumulate_grad_batches=accumulate,
        callbacks=[callback],
        logger=logger,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )


def loader() -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(PaddedTokens(), batch_size=BATCH, shuffle=False)


def test_lightning_logs_the_plain_loops_keys_and_values(tmp_path):
    """Accumulation 2, lambda > 0, QK-Clip, per-head detail, rank collapse: the qk/ dicts
    Lightning's loggers get after optimizer steps 2 and 4 and the trained weights equal the
    plain loop's; in the CSV they share the step of Lightning's own loss of that step."""
    module, recorder = Module(), Recorder()
    csv_logger = pl.loggers.CSVLogger(tmp_path, name="", version="")
    callback = QKMonitorLightningCallback(**SETTINGS)
    trainer(callback, [recorder, csv_logger]).fit(module, loader())
    qk_logs = [(step, m) for step, m in recorder.logged if "qk/eig_var/mean" in m]
    assert [step for step, _ in qk_logs] == [1, 3]  # Lightning's 0-based index of steps 2, 4
    assert callback.monitor.step_count == STEPS and callback.monitor.measured_step == 4
    with open(tmp_path / "metrics.csv") as file:
        rows = list(csv.DictReader(file))
    assert {r["step"] for r in rows if r["loss"]} == {"0", "1", "2", "3"}
    qk_rows = [r for r in rows if r["qk/reg/R"]]
    assert [r["step"] for r in qk_rows] == ["1", "3"]
    assert float(qk_rows[0]["qk/reg/R"]) == qk_logs[0][1]["qk/reg/R"]  # exact, not float32

    model = tiny_bert(dropout=0.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    monitor = QKMonitor(model, **SETTINGS)
    batches = iter(loader())
    model.train()
    want = []
    for _ in range(STEPS):
        with monitor.step():
            for _ in range(ACCUMULATE):
                (model(**next(batches)).loss / ACCUMULATE).backward()
            optimizer.step()
            optimizer.zero_grad()
        if monitor.metrics():
            want.append(monitor.metrics())
    monitor.close()

    for (_, got), expected in zip(qk_logs, want, strict=True):
        assert "qk/attn_max_logit/head_03/layer_01" in got and "qk/reg/R" in got
        assert set(got) == set(expected)
        for key, value in expected.items():
            if math.isnan(value):
                assert math.isnan(got[key]), key
            else:
                assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-12), key
    assert want[-1]["qk/reg/R"] != pytest.approx(1.0, abs=1e-3)  # the regularizer acted
    assert want[0]["qk/clip/heads"] > 0  # and QK-Clip did
    for (name, got), expected in zip(
        module.model.state_dict().items(), model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-8, msg=name)


def test_lightning_with_two_optimizers_is_refused():
    with pytest.raises(QKMonitorError, match="exactly one optimizer"):
        run = trainer(QKMonitorLightningCallback(), False, accumulate=1)
        run.fit(Module(optimizers=2), loader())


def test_settings_the_callback_owns_are_refused():
    with pytest.raises(ValueError, match="optimizer is set by the callback"):
        QKMonitorLightningCallback(optimizer=None)
    with pytest.raises(ValueError, match="interval"):
        QKMonitorLightningCallback(interval=0)


def test_resuming_from_a_lightning_checkpoint_keeps_the_reference(tmp_path):
    """The callback's state travels in the checkpoint: R stays relative to the first run's
    eig_var_0, and the resumed run logs optimizer step 4 (Lightning's index 3)."""
    first = QKMonitorLightningCallback(**SETTINGS)
    run = trainer(first, False, steps=2)
    run.fit(Module(), loader())
    run.save_checkpoint(tmp_path / "step2.ckpt")

    resumed, recorder = QKMonitorLightningCallback(**SETTINGS), Recorder()
    trainer(resumed, recorder).fit(Module(), loader(), ckpt_path=tmp_path / "step2.ckpt")
    assert resumed.monitor.reference == first.monitor.reference
    assert [step for step, m in recorder.logged if "qk/reg/R" in m] == [3]
    assert resumed.monitor.step_count == STEPS
