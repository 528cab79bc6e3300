"""Launched by torchrun (2 processes, gloo, DS_ACCELERATOR=cpu) from tests/training/test_zero3.py.

    torchrun --nproc_per_node 2 tests/distributed/zero3.py OUT_DIR

Real DeepSpeed ZeRO-3 on CPU, with transformers seeing it (an HfDeepSpeedConfig alive, as the
Trainer and accelerate keep one): the model is built through zero.Init (its parameters
partitioned across the ranks) and wrapped by deepspeed.initialize. Checks that:
- ``QKMonitor(engine, ...)`` starts (discovery's meta-device skeleton is built outside
  transformers' ZeRO-3 switch) and its eig_var equals the naive float64 value of the full
  weights;
- the regularizer's gradient, gathered from the partitions (safe_get_full_grad) before the
  optimizer step, is exactly d(lambda R)/dW: the difference of a lambda > 0 and a lambda = 0 run
  on the same batch;
- ``qkmonitor.audit(engine)`` equals the audit of the same model unsharded;
- ``transformers.Trainer(args=TrainingArguments(deepspeed=...))`` with ``QKMonitorCallback``
  (the regularizer on, entropy, max logit, rank collapse, per-head detail) logs what the same
  run logs in one process without DeepSpeed: train.py's monitored run, same global batch; and
  that it gathers the partitioned Q/K weights one attention layer at a time (DeepSpeed's own
  GatheredParameters, recorded).
Writes OUT_DIR/rank{r}.pt: {"spectra", "gradient", "audit": max rel. errors, "steps": int,
"logs": the Trainer's qk/ logs, "sharded": whether the Trainer's parameters were partitioned,
"gathers": the GatheredParameters calls during training, each ("enter" | "exit", layer index or
-1 for a set that is not one layer's Q/K parameters)}.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist
from tiny import (
    PaddedTokens,
    attention_modules,
    mean_token_loss,
    naive_gradient,
    naive_reference,
    run_rank,
    tiny_bert,
    training_args,
)
from train import GLOBAL_BATCH, LR, MONITORED, STEPS

LAMBDA = 0.5
CONFIG = {
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 1,
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "zero_allow_untested_optimizer": True,
    "optimizer": {"type": "SGD", "params": {"lr": 0.0}},  # lr 0: the weights stay the reference's
    "steps_per_print": 10**9,
    "wall_clock_breakdown": False,
}


#: the Trainer's DeepSpeed config: batch, accumulation, clipping and optimizer from its arguments
TRAINER_CONFIG = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "zero_allow_untested_optimizer": True,
    "steps_per_print": 10**9,
}


def copy_into_partitions(model: torch.nn.Module, plain: torch.nn.Module) -> None:
    """plain's weights into model's ZeRO-3 partitioned parameters (rank 0 writes, all receive)."""
    import deepspeed

    assert all(hasattr(p, "ds_id") for p in model.parameters())
    for name, parameter in model.named_parameters():
        with deepspeed.zero.GatheredParameters([parameter], modifier_rank=0):
            if dist.get_rank() == 0:
                parameter.data.copy_(dict(plain.named_parameters())[name].data)


def engine_of(plain: torch.nn.Module):
    """plain's weights in a ZeRO-3 engine, built as the Trainer builds it: through zero.Init."""
    import deepspeed
    from transformers import AutoModelForMaskedLM

    model = AutoModelForMaskedLM.from_config(plain.config)  # ZeRO-3 on: through zero.Init
    copy_into_partitions(model, plain)
    engine, *_ = deepspeed.initialize(
        model=model, config=CONFIG, model_parameters=model.parameters()
    )
    return engine


def full_grads(engine) -> dict[str, torch.Tensor]:
    from deepspeed.utils import safe_get_full_grad

    out = {}
    modules = [m for m in engine.module.modules() if type(m).__name__ == "BertSelfAttention"]
    for index, module in enumerate(modules):
        for part in ("query", "key"):
            grad = safe_get_full_grad(getattr(module, part).weight)
            out[f"{index}.{part}"] = grad.detach().double().clone()
    return out


def regularized_grads(plain: torch.nn.Module, strength: float, batch: dict) -> tuple:
    from qkmonitor import QKMonitor

    engine = engine_of(plain)
    monitor = QKMonitor(engine, strength, entropy=False, max_logit=False, statistics=("eig_var",))
    engine.train()
    monitor.before_step()
    loss = engine(**batch).loss
    engine.backward(loss)
    grads = full_grads(engine)
    engine.step()
    metrics = monitor.after_optimizer_step()
    monitor.close()
    return grads, metrics, monitor.step_count, engine


@contextlib.contextmanager
def recording_gathers(layers: list[frozenset[int]], events: list) -> Iterator[None]:
    """deepspeed.zero.GatheredParameters, still DeepSpeed's, records each call inside: (kind,
    the index of the layer whose parameter ids it gathers, -1 for any other set)."""
    import deepspeed

    real = deepspeed.zero.GatheredParameters

    @contextlib.contextmanager
    def recorded(params, *args, **kwargs):
        params = list(params) if isinstance(params, (list, tuple)) else [params]
        ids = frozenset(id(p) for p in params)
        layer = layers.index(ids) if ids in layers else -1
        events.append(("enter", layer))
        with real(params, *args, **kwargs):
            yield
        events.append(("exit", layer))

    deepspeed.zero.GatheredParameters = recorded
    try:
        yield
    finally:
        deepspeed.zero.GatheredParameters = real


def trainer_logs(out: str, plain: torch.nn.Module) -> tuple[list[dict[str, float]], bool, list]:
    """train.py's monitored Trainer run (same global batch, accumulation, SGD, clipping, loss)
    under TrainingArguments(deepspeed=...) ZeRO-3: its qk/ logs, whether the model the
    callback saw had partitioned parameters, and the gathers it made (recording_gathers)."""
    from transformers import AutoModelForMaskedLM, Trainer

    from qkmonitor import QKMonitorCallback

    args = training_args(
        out,
        per_device_train_batch_size=GLOBAL_BATCH // dist.get_world_size(),
        gradient_accumulation_steps=2,
        max_steps=STEPS,
        optim="sgd",
        learning_rate=LR,
        deepspeed=TRAINER_CONFIG,  # transformers sees ZeRO-3 from here on, as users set it up
    )
    model = AutoModelForMaskedLM.from_config(plain.config)  # through zero.Init
    copy_into_partitions(model, plain)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=PaddedTokens(),
        callbacks=[QKMonitorCallback(**MONITORED)],
        compute_loss_func=mean_token_loss,
    )
    layers = [
        frozenset(id(p) for p in (*m.query.parameters(), *m.key.parameters()))
        for m in attention_modules(model)
    ]
    gathers: list[tuple[str, int]] = []
    with recording_gathers(layers, gathers):
        trainer.train()
    sharded = all(
        p.ds_tensor.numel() < p.ds_numel for p in trainer.model.parameters() if p.ds_numel > 1
    )
    logs = [
        {k: v for k, v in entry.items() if k.startswith("qk/") or k == "loss"}
        for entry in trainer.state.log_history
        if "qk/eig_var/mean" in entry
    ]
    return logs, sharded, gathers


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def main(out: str) -> None:
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    deepspeed.init_distributed(dist_backend="gloo")
    keep = HfDeepSpeedConfig(CONFIG)  # transformers now sees ZeRO-3, as under the Trainer
    from transformers.integrations import is_deepspeed_zero3_enabled

    from qkmonitor import audit

    assert is_deepspeed_zero3_enabled()
    plain = tiny_bert(dropout=0.0)
    rank = dist.get_rank()
    data = PaddedTokens()
    batch = {k: torch.stack([data[2 * rank + j][k] for j in range(2)]) for k in data[0]}
    with_reg, metrics, steps, engine = regularized_grads(plain, LAMBDA, batch)
    without, _, _, _ = regularized_grads(plain, 0.0, batch)
    want = naive_gradient(plain, LAMBDA, naive_reference(plain))
    gradient = max(relative(with_reg[k] - without[k], want[k]) for k in want)
    eig_var = metrics["qk/eig_var/mean"]
    reference = naive_reference(plain)
    spectra = abs(eig_var - reference) / reference
    sharded, unsharded = audit(engine), audit(plain)
    errors = [
        abs(a.eig_var - b.eig_var) / abs(b.eig_var)
        for a, b in zip(sharded.heads, unsharded.heads, strict=True)
    ]
    del keep
    logs, sharded, gathers = trainer_logs(out, plain)
    results = {"spectra": spectra, "gradient": gradient, "audit": max(errors), "steps": steps}
    results.update(logs=logs, sharded=sharded, gathers=gathers)
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))


if __name__ == "__main__":
    run_rank(main)
