"""Training-step time with QKMonitorCallback, relative to the same training without it.

    .venv/bin/python benchmarks/callback_overhead.py              # CPU, GPT-2-shaped 6 x 256
    .venv/bin/python benchmarks/callback_overhead.py --logging-steps 50 --repeats 7
    .venv/bin/python benchmarks/callback_overhead.py --breakdown  # + qkmonitor's own ms/step

Three configurations run interleaved in one process (baseline, monitor, monitor + regularizer,
then again in a rotated order, ``--repeats`` times), each a fresh Trainer on the same initial
weights and data:

- baseline: no callback;
- monitor: ``QKMonitorCallback()`` with default settings (spectra and attention entropy at every
  logging step);
- regularizer: ``QKMonitorCallback(regularization=0.1)`` (the gradient injection runs on every
  optimizer step, plus the monitoring).

Time per step is measured from the first step's start to the end of training, so the work done
at logging steps (spectra, entropy, the all-reduce) is included; Trainer construction and the
callback's one-time set-up (layer plan, reference eig_var) are not. Reported: the median of the
per-repeat ratios to the baseline of the same repeat. Targets: monitor <= 1.03, regularizer
<= 1.05.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

import qkmonitor.training.capture
import qkmonitor.training.regularizer
from qkmonitor import QKMonitorCallback
from qkmonitor.training.monitor import QKMonitor


class StepClock(TrainerCallback):
    """Seconds from the first step's start to the end of training, and the steps run."""

    def __init__(self) -> None:
        self.start: float | None = None
        self.seconds = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        if self.start is None:
            self.start = time.perf_counter()

    def on_train_end(self, args, state, control, **kwargs):
        self.seconds = time.perf_counter() - self.start


class Tokens(torch.utils.data.Dataset):
    def __init__(self, rows: int, length: int, vocab: int) -> None:
        self.data = torch.randint(
            0, vocab, (rows, length), generator=torch.Generator().manual_seed(0)
        )

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.data[index], "labels": self.data[index]}


def gpt2_config(args: argparse.Namespace) -> GPT2Config:
    """The benchmarked GPT-2's shape, from the command line."""
    return GPT2Config(
        vocab_size=args.vocab,
        n_positions=args.length,
        n_embd=args.width,
        n_layer=args.layers,
        n_head=args.heads,
        bos_token_id=0,
        eos_token_id=0,
    )


def seconds_per_step(
    args: argparse.Namespace, state: dict[str, torch.Tensor], callback: QKMonitorCallback | None
) -> float:
    model = GPT2LMHeadModel(gpt2_config(args))
    model.load_state_dict(state)
    clock = StepClock()
    training = TrainingArguments(
        "/tmp/qkmonitor-benchmark",
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        logging_steps=args.logging_steps,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        seed=0,
    )
    callbacks = [clock] if callback is None else [callback, clock]
    trainer = Trainer(
        model=model,
        args=training,
        train_dataset=Tokens(args.batch * args.steps, args.length, args.vocab),
        callbacks=callbacks,
    )
    trainer.train()
    return clock.seconds / args.steps


def breakdown(args: argparse.Namespace, state: dict[str, torch.Tensor]) -> None:
    """Milliseconds per step spent in qkmonitor's own work, timed inside one run of each."""
    spent: dict[str, float] = {}

    def timed(owner: object, name: str, label: str) -> Callable[[], None]:
        original = getattr(owner, name)

        @functools.wraps(original)
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                spent[label] = spent.get(label, 0.0) + time.perf_counter() - start

        setattr(owner, name, wrapper)
        return lambda: setattr(owner, name, original)

    restore = [
        timed(qkmonitor.training.capture, "attention_entropy", "entropy"),
        timed(QKMonitor, "measure", "statistics, aggregation, alerts"),
        timed(qkmonitor.training.regularizer, "penalty_gradients", "regularizer gradients"),
    ]
    for name, callback in (
        ("monitor", QKMonitorCallback()),
        ("regularizer", QKMonitorCallback(regularization=0.1)),
    ):
        spent.clear()
        step = seconds_per_step(args, state, callback)
        parts = ", ".join(f"{k} {1000 * v / args.steps:.1f}" for k, v in spent.items())
        print(f"{name:12s} {1000 * step:8.1f} ms/step, of which qkmonitor (ms/step): {parts}")
    for undo in restore:
        undo()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--steps", type=int, default=40, help="training steps per run (default: 40)")
    add("--repeats", type=int, default=5, help="rotations of the 3 configurations (default: 5)")
    add("--logging-steps", type=int, default=10, help="steps between logs (default: 10)")
    add("--layers", type=int, default=6, help="GPT-2 layers (default: 6)")
    add("--width", type=int, default=256, help="model width n_embd (default: 256)")
    add("--heads", type=int, default=8, help="attention heads per layer (default: 8)")
    add("--length", type=int, default=128, help="tokens per sequence (default: 128)")
    add("--batch", type=int, default=8, help="sequences per step (default: 8)")
    add("--vocab", type=int, default=2048, help="vocabulary size (default: 2048)")
    parser.add_argument(
        "--breakdown", action="store_true", help="also time qkmonitor's own work inside a run"
    )
    args = parser.parse_args()

    torch.manual_seed(0)
    state = GPT2LMHeadModel(gpt2_config(args)).state_dict()
    configurations = {
        "baseline": lambda: None,
        "monitor": QKMonitorCallback,
        "regularizer": lambda: QKMonitorCallback(regularization=0.1),
    }
    seconds_per_step(args, state, None)  # warm-up: allocator, thread pools, lazy imports
    times: dict[str, list[float]] = {name: [] for name in configurations}
    names = list(configurations)
    for repeat in range(args.repeats):  # rotate the order: no configuration always runs last
        for name in names[repeat % 3 :] + names[: repeat % 3]:
            times[name].append(seconds_per_step(args, state, configurations[name]()))
    device = "cuda" if torch.cuda.is_available() else f"cpu x {torch.get_num_threads()} threads"
    print(
        f"GPT-2 {args.layers} layers x {args.heads} heads, d={args.width}, batch {args.batch} x "
        f"{args.length} tokens, {args.steps} steps, logging every {args.logging_steps}, {device}"
    )
    for name in configurations:
        ratios = [t / b for t, b in zip(times[name], times["baseline"], strict=True)]
        print(
            f"{name:12s} {1000 * statistics.median(times[name]):8.1f} ms/step   "
            f"ratio {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f})"
        )
    if args.breakdown:
        breakdown(args, state)


if __name__ == "__main__":
    main()
