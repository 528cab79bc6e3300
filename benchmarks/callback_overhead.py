"""Training-step time with QKMonitorCallback, relative to the same training without it.

    .venv/bin/python benchmarks/callback_overhead.py              # CPU, GPT-2-shaped 6 x 256
    .venv/bin/python benchmarks/callback_overhead.py --logging-steps 50 --repeats 7
    .venv/bin/python benchmarks/callback_overhead.py --breakdown  # + qkmonitor's own ms/step
    .venv/bin/python benchmarks/callback_overhead.py --pass-timing  # the measuring pass alone
    .venv/bin/python benchmarks/callback_overhead.py --attn sdpa flash_attention_2  # on a GPU
    git show REV:qkmonitor/entropy.py > /tmp/entropy_before.py   # another commit's passes,
    .venv/bin/python benchmarks/callback_overhead.py --before /tmp/entropy_before.py  # side by side

The configurations run interleaved in one process (in a rotated order, ``--repeats`` times),
each a fresh Trainer on the same initial weights and data:

- baseline: no callback;
- monitor: ``QKMonitorCallback()`` with default settings (spectra, attention entropy and max
  logit at every logging step);
- no max logit: ``QKMonitorCallback(max_logit=False)``, so that monitor / no max logit is the
  cost of the max logit on top of entropy;
- regularizer: ``QKMonitorCallback(regularization=0.1)`` (the gradient injection runs on every
  optimizer step, plus the monitoring);
- qk_clip: ``QKMonitorCallback(qk_clip=100.0)`` (max logits measured on every step, max-only
  between logging steps, and the clip check after every optimizer step; at this model's logits
  nothing is clipped, so the weights are untouched).

``--before FILE`` (a copy of ``qkmonitor/entropy.py`` from another commit) adds "monitor
(before)" and "qk_clip (before)": the same callbacks measuring with that file's
``attention_entropy``, so that the cost of a change to the measuring passes is read side by side
in one process, against the same baselines; ``--pass-timing`` then times both files' passes.
``--configs`` picks configurations (baseline always runs). The load average is printed with
each table: on a shared machine, read the ratios against it.

The Trainer's console printer runs in every configuration (``disable_tqdm``: PrinterCallback), so
the compact qk line is part of each monitored log; ``--breakdown`` times it on its own.

Time per step is measured from the first step's start to the end of training, so the work done
at logging steps (spectra, entropy, the all-reduce) is included; Trainer construction and the
callback's one-time set-up (layer plan, reference eig_var) are not. Reported: the median of the
per-repeat ratios to the baseline of the same repeat. Targets: monitor <= 1.03, regularizer
<= 1.05, max logit on top of entropy: no measurable cost.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from types import ModuleType

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

import qkmonitor.training.capture
import qkmonitor.training.monitor
import qkmonitor.training.qk_clip
import qkmonitor.training.regularizer
from qkmonitor import QKMonitorCallback
from qkmonitor.entropy import attention_entropy
from qkmonitor.training.console import ConsoleView
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


def load_before(path: str) -> ModuleType:
    """Another commit's qkmonitor/entropy.py, loaded as its own module."""
    spec = importlib.util.spec_from_file_location("entropy_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def measuring_with(module: ModuleType | None) -> Iterator[None]:
    """The capture measures with module's attention_entropy inside (None: the current one).
    Arguments left at None are dropped, so that older signatures get their own defaults."""
    if module is None:
        yield
        return

    def before(*args, **kwargs):
        return module.attention_entropy(*args, **{k: v for k, v in kwargs.items() if v is not None})

    current = qkmonitor.training.capture.attention_entropy
    qkmonitor.training.capture.attention_entropy = before
    try:
        yield
    finally:
        qkmonitor.training.capture.attention_entropy = current


def seconds_per_step(
    args: argparse.Namespace,
    state: dict[str, torch.Tensor],
    callback: QKMonitorCallback | None,
    before: ModuleType | None = None,
) -> float:
    model = GPT2LMHeadModel(gpt2_config(args))
    model.load_state_dict(state)
    model.set_attn_implementation(args.implementation)
    clock = StepClock()
    training = TrainingArguments(
        "/tmp/qkmonitor-benchmark",
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        logging_steps=args.logging_steps,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,  # PrinterCallback: the console line is printed at every log
        use_cpu=not torch.cuda.is_available(),
        bf16=torch.cuda.is_available(),  # flash attention needs half precision
        seed=0,
    )
    callbacks = [clock] if callback is None else [callback, clock]
    trainer = Trainer(
        model=model,
        args=training,
        train_dataset=Tokens(args.batch * args.steps, args.length, args.vocab),
        callbacks=callbacks,
    )
    with measuring_with(before):
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
        timed(qkmonitor.training.capture, "attention_entropy", "entropy + max logit pass"),
        timed(QKMonitor, "measure", "statistics, aggregation, alerts"),
        timed(QKMonitor, "_reduce_recordings", "reductions"),
        timed(qkmonitor.training.regularizer, "penalty_gradients", "regularizer gradients"),
        timed(QKMonitor, "_clip", "QK-Clip factors and rescale"),
        timed(qkmonitor.training.monitor, "compact_line", "console line"),
        timed(ConsoleView, "on_log", "console printer"),
    ]
    for name, callback in (
        ("monitor", QKMonitorCallback()),
        ("no max logit", QKMonitorCallback(max_logit=False)),
        ("regularizer", QKMonitorCallback(regularization=0.1)),
        ("qk_clip", QKMonitorCallback(qk_clip=100.0)),
        ("qk_clip 0.5", QKMonitorCallback(qk_clip=0.5)),  # clips, rescaling weights
    ):
        spent.clear()
        step = seconds_per_step(args, state, callback)
        parts = ", ".join(f"{k} {1000 * v / args.steps:.1f}" for k, v in spent.items())
        print(f"{name:12s} {1000 * step:8.1f} ms/step, of which qkmonitor (ms/step): {parts}")
    for undo in restore:
        undo()


def pass_timing(args: argparse.Namespace, repeats: int = 21) -> None:
    """The measuring pass on one layer's q/k at the benchmark's shape, min over interleaved
    repeats on one thread: entropy + max logit (monitored steps) vs max only (QK-Clip's other
    steps), and with ``--before`` the same passes of that file. Less noisy than whole runs on a
    shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    head_dim = args.width // args.heads
    generator = torch.Generator().manual_seed(0)
    shape = (args.batch, args.heads, args.length, head_dim)
    query, key = (torch.randn(shape, generator=generator) for _ in range(2))
    passes = {"": attention_entropy}
    if args.before:
        passes[" (before)"] = load_before(args.before).attention_entropy
    runs = [
        (f"{label}{suffix}", function, entropy)
        for suffix, function in passes.items()
        for label, entropy in (("entropy + max logit", True), ("max logit only", False))
    ]
    for tile in args.tiles:  # the max-only pass in square tiles of another size
        tiled = functools.partial(attention_entropy, key_chunk=tile, query_chunk=tile)
        runs.append((f"max logit only, tile {tile}", tiled, False))
    best = dict.fromkeys((name for name, _, _ in runs), math.inf)
    for _ in range(repeats):
        for name, function, entropy in runs:
            start = time.perf_counter()
            function(query, key, head_dim**-0.5, is_causal=True, entropy=entropy)
            best[name] = min(best[name], time.perf_counter() - start)
    torch.set_num_threads(threads)
    print(
        f"measuring pass per layer, q/k {shape}, causal, 1 thread, min of {repeats}, "
        f"load average {load_average()}:"
    )
    for name, seconds in best.items():
        print(f"  {name:30s} {1000 * seconds:8.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--steps", type=int, default=40, help="training steps per run (default: 40)")
    add("--repeats", type=int, default=5, help="rotations of the configurations (default: 5)")
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
    parser.add_argument(
        "--pass-timing", action="store_true", help="only time the measuring pass on one layer"
    )
    add("--pass-repeats", type=int, default=21, help="--pass-timing: repeats (default: 21)")
    add(
        "--tiles",
        type=int,
        nargs="*",
        default=[],
        help="--pass-timing: also the max-only pass in square tiles of these sizes",
    )
    add(
        "--before",
        metavar="FILE",
        help="another commit's qkmonitor/entropy.py: also run monitor and qk_clip measuring "
        "with it, side by side",
    )
    add(
        "--configs",
        nargs="+",
        choices=sorted(CONFIGURATIONS),
        default=sorted(CONFIGURATIONS),
        help="configurations to run besides the baseline (default: all)",
    )
    add(
        "--attn",
        nargs="+",
        default=["sdpa"],
        help="the model's attention implementations, each baseline its own table (default: "
        "sdpa; flash_attention_2 needs CUDA and flash-attn, and is skipped without them)",
    )
    args = parser.parse_args()
    if args.pass_timing:
        pass_timing(args, args.pass_repeats)
        return
    for implementation in args.attn:
        if implementation.startswith("flash") and not _flash_available():
            print(f"{implementation}: skipped (needs CUDA and the flash-attn package)")
            continue
        args.implementation = implementation
        overhead(args)


def _flash_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


#: configuration -> the callback it trains with (baseline: none)
CONFIGURATIONS: dict[str, Callable[[], QKMonitorCallback]] = {
    "monitor": QKMonitorCallback,
    "no max logit": lambda: QKMonitorCallback(max_logit=False),
    "regularizer": lambda: QKMonitorCallback(regularization=0.1),
    "qk_clip": lambda: QKMonitorCallback(qk_clip=100.0),
}


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def overhead(args: argparse.Namespace) -> None:
    """The ratio table of every configuration against the baseline, on one implementation."""
    torch.manual_seed(0)
    state = GPT2LMHeadModel(gpt2_config(args)).state_dict()
    before = load_before(args.before) if args.before else None
    configurations = {"baseline": (lambda: None, None)}
    for name in args.configs:
        configurations[name] = (CONFIGURATIONS[name], None)
        if before is not None and name in ("monitor", "qk_clip"):
            configurations[f"{name} (before)"] = (CONFIGURATIONS[name], before)
    start_load = load_average()
    seconds_per_step(args, state, None)  # warm-up: allocator, thread pools, lazy imports
    times: dict[str, list[float]] = {name: [] for name in configurations}
    names = list(configurations)
    for repeat in range(args.repeats):  # rotate the order: no configuration always runs last
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            make, module = configurations[name]
            times[name].append(seconds_per_step(args, state, make(), module))
    device = "cuda" if torch.cuda.is_available() else f"cpu x {torch.get_num_threads()} threads"
    print(
        f"GPT-2 {args.layers} layers x {args.heads} heads, d={args.width}, batch {args.batch} x "
        f"{args.length} tokens, {args.steps} steps, logging every {args.logging_steps}, {device}, "
        f"attention {args.implementation}, {args.repeats} repeats; load average (1, 5, 15 min) "
        f"{start_load} at start, {load_average()} at end"
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
