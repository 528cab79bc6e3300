"""Launched by torchrun (1 or 2 processes, gloo, CPU): max logit and QK-Clip across ranks.

    torchrun --nproc_per_node N tests/distributed/clip.py OUT_DIR

Same global batch whatever N (as train.py). Writes OUT_DIR/rank{r}.pt with "logs" (the qk/
training logs: per-head max logits and clip counts at every step) and "weights" (the final Q/K
weights and biases, which QK-Clip rescaled).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from tiny import (
    PaddedTokens,
    attention_modules,
    mean_token_loss,
    run_rank,
    tiny_bert,
    training_args,
)
from transformers import Trainer

from qkmonitor import QKMonitorCallback

GLOBAL_BATCH, TAU = 8, 3.5  # the initial heads' max logits are 3.2 to 5.1


def main(out: str) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    args = training_args(
        out,
        per_device_train_batch_size=GLOBAL_BATCH // world,
        gradient_accumulation_steps=2,
        ddp_backend="gloo",
        max_steps=3,
        optim="sgd",
        learning_rate=0.05,
    )
    trainer = Trainer(
        model=tiny_bert(dropout=0.0),
        args=args,
        train_dataset=PaddedTokens(),
        callbacks=[QKMonitorCallback(detail="head", interval=1, qk_clip=TAU, entropy=False)],
        compute_loss_func=mean_token_loss,
    )
    trainer.train()
    logs = [
        {k: v for k, v in entry.items() if k.startswith("qk/")}
        for entry in trainer.state.log_history
        if "qk/clip/heads" in entry
    ]
    weights = {}
    for index, module in enumerate(attention_modules(trainer.model)):
        for name in ("query", "key"):
            linear = getattr(module, name)
            weights[f"{index}.{name}"] = torch.cat([linear.weight, linear.bias[:, None]], 1)
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.save(
        {"logs": logs, "weights": {k: v.detach().clone() for k, v in weights.items()}},
        os.path.join(out, f"rank{rank}.pt"),
    )


if __name__ == "__main__":
    run_rank(main)
