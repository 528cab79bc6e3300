"""Launched by torchrun (2 processes, gloo, CPU) from tests/test_callback.py.

    torchrun --nproc_per_node 2 tests/distributed/sharded.py OUT_DIR

For FSDP2 (fully_shard per layer), FSDP1 with use_orig_params and FSDP1 with flat parameters,
each rank feeding a different sequence, checks that:
- ``plan_live`` finds the layers of the wrapped model;
- ``full_weights`` gathers one layer at a time (FSDP1: only that layer's unit is summoned) and
  gives the statistics of the unsharded model;
- the regularizer's gradient after the framework's reduce-scatter is exactly d(lambda R)/dW
  (FSDP1 flat parameters: its norm over all shards, which is all that is addressable there);
- ``qkmonitor.audit`` of the wrapped model (called on every rank) equals the unsharded audit;
  so does the audit of a DDP-wrapped and of an accelerate-prepared model.
Writes OUT_DIR/rank{r}.pt: {variant: {"spectra": max rel. error, "gradient": max rel. error,
"max_summoned": most FSDP1 units summoned at once, "audit": max rel. error}} and
{"ddp": {"audit": ...}, "accelerate": {"audit": ...}}.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
from tiny import PaddedTokens, naive_gradient, naive_reference, run_rank, tiny_bert
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from transformers.models.bert.modeling_bert import BertLayer

from qkmonitor import audit
from qkmonitor.spectrum import head_spectra
from qkmonitor.training.regularizer import SpectralRegularizer
from qkmonitor.weights.layout import layer_weights
from qkmonitor.weights.live import full_weights, plan_live

LAMBDA = 0.5


def wrap(variant: str) -> torch.nn.Module:
    model = tiny_bert(dropout=0.0)
    if variant == "fsdp2":
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for layer in model.bert.encoder.layer:
            fully_shard(layer, mesh=mesh)
        return fully_shard(model, mesh=mesh)
    return FullyShardedDataParallel(
        model,
        auto_wrap_policy=ModuleWrapPolicy({BertLayer}),
        use_orig_params=variant == "fsdp1",
        device_id=torch.device("cpu"),
    )


class SummonCounter:
    """Counts FSDP1 units summoned at the same time."""

    def __init__(self) -> None:
        self.active = self.most = 0
        self.original = FullyShardedDataParallel.summon_full_params

    @contextlib.contextmanager
    def summon(self, module, *args, **kwargs):
        with self.original(module, *args, **kwargs):
            self.active += 1
            self.most = max(self.most, self.active)
            yield
            self.active -= 1


def qk_gradients(model: torch.nn.Module, variant: str) -> list[torch.Tensor]:
    """Full Q/K gradients (FSDP2, FSDP1 orig params) or every rank's flat-gradient shard."""
    if variant == "fsdp1_flat":
        return [p.grad.detach().double().clone() for p in model.parameters() if p.grad is not None]
    grads = []
    full = contextlib.nullcontext()
    if variant == "fsdp1":
        full = FullyShardedDataParallel.summon_full_params(model, with_grads=True)
    with torch.no_grad(), full:
        for name, parameter in model.named_parameters():
            if name.endswith(("query.weight", "key.weight")):
                grad = parameter.grad
                grad = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
                grads.append(grad.detach().double().clone())
    return grads


def check(variant: str) -> dict[str, float]:
    reference_model = tiny_bert(dropout=0.0)
    plain, _ = plan_live(reference_model)
    model = wrap(variant)
    counter = SummonCounter()
    FullyShardedDataParallel.summon_full_params = counter.summon
    try:
        layers, _ = plan_live(model)
        counter.most = 0  # planning summons the whole model once, by design
        spectra_error = 0.0
        for layer, expected_layer in zip(layers, plain, strict=True):
            with torch.no_grad(), full_weights(layer) as tensors:
                got = head_spectra(*layer_weights(layer.plan, tensors), layer.plan.scale).eig_var
            with torch.no_grad(), full_weights(expected_layer) as tensors:
                want = head_spectra(*layer_weights(layer.plan, tensors), layer.plan.scale).eig_var
            spectra_error = max(spectra_error, float(((got - want) / want).abs().max()))
    finally:
        # summon_full_params is a staticmethod: restore it as one
        FullyShardedDataParallel.summon_full_params = staticmethod(counter.original)

    regularizer = SpectralRegularizer(layers, LAMBDA, naive_reference(reference_model))
    regularizer.attach()
    inputs = {k: v[None] for k, v in PaddedTokens()[dist.get_rank()].items()}
    runs = []
    for armed in (True, False):
        model.zero_grad()
        if armed:
            regularizer.arm()
        model(**inputs)["loss"].backward()
        runs.append(qk_gradients(model, variant))
    injected = [a - b for a, b in zip(*runs, strict=True)]
    expected = list(
        naive_gradient(reference_model, LAMBDA, naive_reference(reference_model)).values()
    )
    if variant == "fsdp1_flat":
        squares = torch.stack([(g**2).sum() for g in injected]).sum()
        dist.all_reduce(squares)
        want = torch.stack([(g**2).sum() for g in expected]).sum()
        gradient_error = float((squares.sqrt() - want.sqrt()).abs() / want.sqrt())
    else:
        gradient_error = max(
            float((got - want).abs().max() / want.abs().max())
            for got, want in zip(injected, expected, strict=True)
        )
    return {
        "spectra": spectra_error,
        "gradient": gradient_error,
        "max_summoned": counter.most,
        "audit": audit_error(model, reference_model),
    }


def audit_error(wrapped: torch.nn.Module, plain: torch.nn.Module) -> float:
    """Largest relative difference of any head statistic between the two models' audits."""
    got, want = audit(wrapped), audit(plain)
    assert len(got.heads) == len(want.heads) > 0
    error = 0.0
    for a, b in zip(got.heads, want.heads, strict=True):
        assert (a.block, a.layer, a.head) == (b.block, b.layer, b.head)
        for stat in ("eig_mean", "eig_var", "spectral_norm", "eig_var_complex"):
            x, y = getattr(a, stat), getattr(b, stat)
            error = max(error, abs(x - y) / abs(y))
    return error


def replicated() -> dict[str, dict[str, float]]:
    """DDP and accelerate's prepare (DDP under torchrun) of the same model."""
    from accelerate import Accelerator

    plain = tiny_bert(dropout=0.0)
    ddp = torch.nn.parallel.DistributedDataParallel(tiny_bert(dropout=0.0))
    prepared = Accelerator(cpu=True).prepare(tiny_bert(dropout=0.0))
    assert isinstance(prepared, torch.nn.parallel.DistributedDataParallel)
    return {
        "ddp": {"audit": audit_error(ddp, plain)},
        "accelerate": {"audit": audit_error(prepared, plain)},
    }


def main(out: str) -> None:
    dist.init_process_group("gloo")
    results = {variant: check(variant) for variant in ("fsdp2", "fsdp1", "fsdp1_flat")}
    results |= replicated()
    torch.save(results, os.path.join(out, f"rank{dist.get_rank()}.pt"))


if __name__ == "__main__":
    run_rank(main)
