"""A Lightning Trainer with qkmonitor's QKMonitorLightningCallback: the Trainer callback's
metrics, regularizer and QK-Clip in Lightning.

    python examples/lightning_loop.py                                 # CPU, a few seconds
    python examples/lightning_loop.py --steps 200 --lam 0.1 --qk-clip 30 --accumulate 4

The tiny GPT-2 and toy language of examples/accelerate_loop.py, trained by ``lightning.pytorch``
with ``accumulate_grad_batches`` micro-batches per optimizer step. Every ``--interval`` optimizer
steps the callback hands its ``qk/`` dict to the Trainer's loggers (here a CSVLogger under
``--out``; the qk/ keys share the step of Lightning's own ``loss``) and the module prints the
monitor's compact line. The only qkmonitor code is the
``QKMonitorLightningCallback(...)`` line (and the print).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning.pytorch as pl
import torch
from accelerate_loop import toy_corpus
from transformers import GPT2Config, GPT2LMHeadModel

from qkmonitor.training.lightning import QKMonitorLightningCallback


class TinyGPT(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64)
        config.bos_token_id = config.eos_token_id = ord(" ")
        self.model = GPT2LMHeadModel(config)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.model(input_ids=batch, labels=batch).loss
        self.log("loss", loss)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        qk = next(c for c in self.trainer.callbacks if isinstance(c, QKMonitorLightningCallback))
        if qk.metrics:  # set by the callback's hook, which runs first; {} on other batches
            print(f"loss {self.trainer.callback_metrics['loss']:.3f}  {qk.monitor.console_line}")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps")
    parser.add_argument("--interval", type=int, default=5, help="monitor every N steps")
    parser.add_argument("--accumulate", type=int, default=2, help="micro-batches per step")
    parser.add_argument("--lam", type=float, default=0.05, help="regularization lambda")
    parser.add_argument("--qk-clip", type=float, default=None, help="QK-Clip tau")
    parser.add_argument("--out", type=Path, default=Path("out/lightning_loop"), help="CSV logs")
    args = parser.parse_args()

    pl.seed_everything(0, verbose=False)
    loader = torch.utils.data.DataLoader(toy_corpus(512, 64), batch_size=8, shuffle=True)
    callback = QKMonitorLightningCallback(
        regularization=args.lam, qk_clip=args.qk_clip, interval=args.interval
    )
    logger = pl.loggers.CSVLogger(args.out, name="", version="")
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=args.steps,
        accumulate_grad_batches=args.accumulate,
        callbacks=[callback],
        logger=logger,
        log_every_n_steps=args.interval,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(TinyGPT(), loader)
    print(f"wrote {Path(logger.log_dir) / 'metrics.csv'}")


if __name__ == "__main__":
    main()
