"""A custom training loop with accelerate and qkmonitor.QKMonitor: the Trainer callback's
metrics, regularizer and QK-Clip without the Trainer.

    python examples/accelerate_loop.py                               # CPU, a few seconds
    python examples/accelerate_loop.py --steps 200 --lam 0.1 --qk-clip 30
    torchrun --nproc_per_node 2 examples/accelerate_loop.py          # two processes (gloo)

A tiny GPT-2 (2 layers, 4 heads, d=64) built from its config learns a toy byte-level language
(random words from a small vocabulary), 2 micro-batches per optimizer step. Every ``--interval``
steps the loop prints the monitor's compact line and hands its ``qk/`` dict to
``accelerator.log`` (here to a JSON-lines file, ``--out``); every rank gets the same numbers.
The only qkmonitor code is the ``QKMonitor(...)`` line, ``with monitor.step():`` and
``monitor.metrics()``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from accelerate import Accelerator
from transformers import GPT2Config, GPT2LMHeadModel

from qkmonitor import QKMonitor


def toy_corpus(rows: int, length: int, seed: int = 0) -> torch.Tensor:
    """Byte sequences of space-separated words drawn from 40 random 3-7 letter words."""
    generator = torch.Generator().manual_seed(seed)
    letters = torch.arange(ord("a"), ord("z") + 1)
    words = []
    for _ in range(40):
        size = int(torch.randint(3, 8, (1,), generator=generator))
        words.append(letters[torch.randint(0, 26, (size,), generator=generator)].tolist())
    data = []
    for _ in range(rows):
        row: list[int] = []
        while len(row) < length:
            row += [*words[int(torch.randint(0, 40, (1,), generator=generator))], ord(" ")]
        data.append(row[:length])
    return torch.tensor(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--interval", type=int, default=5)
    parser.add_argument("--lam", type=float, default=0.05, help="regularization lambda")
    parser.add_argument("--qk-clip", type=float, default=None, help="QK-Clip tau")
    parser.add_argument("--out", type=Path, default=Path("out/accelerate_loop"))
    args = parser.parse_args()

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64)
    config.bos_token_id = config.eos_token_id = ord(" ")
    model = GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loader = torch.utils.data.DataLoader(toy_corpus(512, 64), batch_size=8, shuffle=True)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    # after prepare (DDP/FSDP wrapping), on every rank
    monitor = QKMonitor(
        model, regularization=args.lam, qk_clip=args.qk_clip, interval=args.interval
    )
    args.out.mkdir(parents=True, exist_ok=True)
    log = (args.out / "metrics.jsonl").open("w") if accelerator.is_main_process else None
    batches = iter(loader)
    model.train()
    for _ in range(args.steps):
        with monitor.step():  # one optimizer step: both micro-batches and the update
            for _ in range(2):
                try:
                    batch = next(batches)
                except StopIteration:
                    batches = iter(loader)
                    batch = next(batches)
                loss = model(input_ids=batch, labels=batch).loss / 2
                accelerator.backward(loss)
            accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
        metrics = monitor.metrics()  # {} between intervals; identical on every rank
        if metrics and log is not None:
            log.write(json.dumps({"step": monitor.step_count, "loss": 2 * loss.item(), **metrics}))
            log.write("\n")
            accelerator.print(f"loss {2 * loss.item():.3f}  {monitor.console_line[1]}")
    monitor.close()
    if log is not None:
        log.close()
        accelerator.print(f"wrote {args.out / 'metrics.jsonl'}")


if __name__ == "__main__":
    main()
