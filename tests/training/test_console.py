"""The console: one compact qk line for the printer, every key for everything else."""

from __future__ import annotations

import math

import pytest
from distributed.tiny import PaddedTokens, tiny_bert, training_args
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from qkmonitor import QKMonitorCallback
from qkmonitor.training.console import ConsoleView, compact_line


def test_compact_line_shows_means_and_the_worst_heads():
    per_head = {
        "eig_var": {("self", 0, 0): 1.0, ("self", 1, 2): 3.0, ("self", 0, 1): math.nan},
        "attn_entropy_norm": {("self", 0, 0): 0.9, ("encoder", 3, 5): 0.1},
        "attn_max_logit": {("self", 0, 0): 12.0, ("self", 0, 1): 30.5},
        "eig_mean": {("self", 0, 0): 7.0},  # not on the line
    }
    line = compact_line(20, per_head, {"R": 0.5})
    assert line == (
        "qk step 20: eig_var 2 (max 3 head_02/layer_01) | entropy_norm 0.5 (min 0.1 "
        "head_05/encoder_layer_03) | max_logit 21.25 (max 30.5 head_01/layer_00) | R 0.5"
    )


class Seen(TrainerCallback):
    """A user callback after the printer: it must still get every key."""

    def __init__(self) -> None:
        self.keys: list[set[str]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.keys.append(set(logs))


@pytest.mark.parametrize("disable_tqdm", [True, False], ids=["printer", "progress"])
def test_console_gets_one_line_and_everything_else_every_key(tmp_path, capsys, disable_tqdm):
    seen = Seen()
    trainer = Trainer(
        model=tiny_bert(),
        args=training_args(str(tmp_path), max_steps=2, disable_tqdm=disable_tqdm),
        train_dataset=PaddedTokens(),
        callbacks=[QKMonitorCallback(detail="head")],
    )
    trainer.add_callback(seen)  # after the printer in the list
    trainer.train()
    out = capsys.readouterr().out
    assert "qk/" not in out
    lines = [line for line in out.splitlines() if line.startswith("qk step 2:")]
    assert len(lines) == 1 and "max_logit" in lines[0] and "entropy_norm" in lines[0]
    assert "'loss'" in out  # the printer still prints the Trainer's own keys
    entry = next(e for e in trainer.state.log_history if "loss" in e)
    assert "qk/attn_max_logit/head_03/layer_00" in entry
    assert "qk/attn_max_logit/head_03/layer_00" in seen.keys[0]
    printers = (PrinterCallback, ProgressCallback)
    callbacks = trainer.callback_handler.callbacks  # the printer is back after training
    assert any(isinstance(cb, printers) for cb in callbacks)
    assert not any(isinstance(cb, ConsoleView) for cb in callbacks)


def test_full_console_prints_every_key(tmp_path, capsys):
    trainer = Trainer(
        model=tiny_bert(),
        args=training_args(str(tmp_path), max_steps=2, disable_tqdm=True),
        train_dataset=PaddedTokens(),
        callbacks=[QKMonitorCallback(console="full")],
    )
    trainer.train()
    out = capsys.readouterr().out
    assert "'qk/eig_var/mean'" in out and "qk step" not in out


def test_unknown_console_is_rejected():
    with pytest.raises(ValueError, match="console"):
        QKMonitorCallback(console="quiet")
