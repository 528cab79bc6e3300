"""Launched by torchrun (1 or 2 processes, gloo, CPU) from tests/test_callback_distributed.py.

    torchrun --nproc_per_node N tests/distributed/train.py OUT_DIR

Same global batch whatever N (per-device batch = 8 / N, 2 accumulation steps, sequential
sampling, no dropout, a loss normalized over the global batch: tiny.mean_token_loss).
Writes OUT_DIR/rank{r}.pt with
- "logs": the qk/ training logs of a monitored run (entropy, rank collapse, per-head detail);
- "injected": Q/K gradients at the first optimizer step with lambda minus without lambda;
- "expected": the naive d(lambda R)/dW on the initial weights;
- "custom_logs": the qk/ metrics of the same monitored run written as a custom accelerate loop
  with ``qkmonitor.QKMonitor`` (the Trainer's SGD, linear schedule, clipping, loss scaling and
  data sharding, spelled out).
Sequence lengths differ by sample, so ranks do different amounts of attention work.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from tiny import (
    PaddedTokens,
    mean_token_loss,
    naive_gradient,
    naive_reference,
    qk_grads,
    run_rank,
    tiny_bert,
    training_args,
)
from transformers import Trainer, TrainerCallback

from qkmonitor import QKMonitor, QKMonitorCallback

GLOBAL_BATCH, LAMBDA = 8, 0.5


class GradProbe(TrainerCallback):
    """The Q/K gradients the optimizer sees at the first step (after the all-reduce)."""

    grads: dict[str, torch.Tensor] | None = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            self.grads = qk_grads(model)


def run(out: str, callback: QKMonitorCallback, probe=None, **overrides) -> Trainer:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    args = training_args(
        out,
        per_device_train_batch_size=GLOBAL_BATCH // world,
        gradient_accumulation_steps=2,
        ddp_backend="gloo",
        **overrides,
    )
    callbacks = [callback] if probe is None else [callback, probe]
    trainer = Trainer(
        model=tiny_bert(dropout=0.0),
        args=args,
        train_dataset=PaddedTokens(),
        callbacks=callbacks,
        compute_loss_func=mean_token_loss,
    )
    trainer.train()
    return trainer


MONITORED = {"detail": "head", "rank_collapse": True, "interval": 1, "regularization": LAMBDA}
STEPS, LR = 3, 0.05


def custom_loop() -> list[dict[str, float]]:
    """The monitored Trainer run as an accelerate loop: per rank 2 micro-batches of 8 / N per
    step, loss = token CE sum / global token count * N (DDP averages over ranks), clipping at
    1.0, SGD with the Trainer's linear decay."""
    from accelerate import Accelerator
    from transformers import get_linear_schedule_with_warmup

    accelerator = Accelerator(cpu=True)
    world = accelerator.num_processes
    model = tiny_bert(dropout=0.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, STEPS)
    loader = torch.utils.data.DataLoader(PaddedTokens(), batch_size=GLOBAL_BATCH // world)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    monitor = QKMonitor(model, **MONITORED)
    batches, logs = iter(loader), []
    model.train()
    for _ in range(STEPS):
        micro = [next(batches) for _ in range(2)]
        tokens = sum((batch["labels"] != -100).sum() for batch in micro)
        tokens = accelerator.reduce(tokens, reduction="sum")
        with monitor.step():
            for batch in micro:
                outputs = model(**batch)
                loss = mean_token_loss(outputs, batch["labels"], tokens) * world
                accelerator.backward(loss)
            accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        logs.append(monitor.metrics())
    monitor.close()
    return logs


def main(out: str) -> None:
    monitored = run(
        out,
        QKMonitorCallback(**MONITORED),
        max_steps=STEPS,
        optim="sgd",  # unlike Adam's g / sqrt(v), rounding differences stay at rounding level
        learning_rate=LR,
    )
    logs = [
        {k: v for k, v in entry.items() if k.startswith("qk/") or k == "loss"}
        for entry in monitored.state.log_history
        if "qk/eig_var/mean" in entry
    ]
    probes = {}
    for strength in (0.0, LAMBDA):
        probes[strength] = GradProbe()
        run(out, QKMonitorCallback(strength), probes[strength], max_steps=1, max_grad_norm=0.0)
    initial = tiny_bert(dropout=0.0)
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.save(
        {
            "logs": logs,
            "injected": {
                k: probes[LAMBDA].grads[k] - probes[0.0].grads[k] for k in probes[0.0].grads
            },
            "expected": naive_gradient(initial, LAMBDA, naive_reference(initial)),
            "custom_logs": custom_loop(),
        },
        os.path.join(out, f"rank{rank}.pt"),
    )


if __name__ == "__main__":
    run_rank(main)
