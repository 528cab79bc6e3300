"""A tiny BERT, a padded token dataset, Trainer arguments, and a naive reference for R.

Shared by tests/test_callback.py, tests/test_regularizer.py and the scripts in this folder that
torchrun launches (which import it as ``tiny``). Nothing here imports qkmonitor except
``naive_gradient``'s caller: the reference is written from SPEC.md with full d_in x d_in
matrices in float64.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

HIDDEN, LAYERS, HEADS, VOCAB, LENGTH = 64, 2, 4, 97, 16


def tiny_bert(seed: int = 0, dropout: float = 0.1) -> Any:
    """A 2-layer, 4-head, width-64 BertForMaskedLM, seeded."""
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=128,
        max_position_embeddings=LENGTH,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = BertForMaskedLM(config)
    with torch.no_grad():  # BERT's 0.02 init makes eig_var ~1e-6; widen Q/K for visible dynamics
        for module in model.modules():
            if type(module).__name__ == "BertSelfAttention":
                module.query.weight.normal_(0, 0.15)
                module.key.weight.normal_(0, 0.15)
    return model


class PaddedTokens(torch.utils.data.Dataset):
    """Deterministic token sequences of varying length, right-padded; labels = inputs."""

    def __init__(self, size: int = 64, length: int = LENGTH) -> None:
        self.size, self.length = size, length

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(index)
        valid = 2 + (index * 5) % (self.length - 1)  # 2..length valid tokens
        ids = torch.zeros(self.length, dtype=torch.long)
        ids[:valid] = torch.randint(1, VOCAB, (valid,), generator=generator)
        mask = (ids != 0).long()
        labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def mean_token_loss(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None):
    """Token cross-entropy summed and divided by the token count of the whole accumulated batch.

    BertForMaskedLM's own loss is a per-micro-batch mean although its forward accepts
    num_items_in_batch, so under transformers 5.24 the Trainer scales it as if normalized over
    the accumulated batch (x accumulation steps x processes). This loss is what that scaling
    assumes, which makes 1 and 2 processes see the same gradient.
    """
    logits = outputs.logits.flatten(0, 1)
    loss = torch.nn.functional.cross_entropy(
        logits, labels.flatten(), ignore_index=-100, reduction="sum"
    )
    return loss / num_items_in_batch


def training_args(output_dir: str, **overrides: Any) -> Any:
    """CPU TrainingArguments for a few quick steps; overrides win."""
    from transformers import TrainingArguments

    values = {
        "max_steps": 4,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-3,
        "logging_steps": 2,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "seed": 0,
        "data_seed": 0,
        "disable_tqdm": True,
        "train_sampling_strategy": "sequential",
        "dataloader_num_workers": 0,
    }
    values.update(overrides)
    return TrainingArguments(output_dir, **values)


def _eig_var(wq: torch.Tensor, wk: torch.Tensor, scale: float) -> torch.Tensor:
    """eig_var of every head from the full W^h = s Wq_h^T Wk_h (float64, differentiable)."""
    values = []
    for head in range(HEADS):
        rows = slice(head * (HIDDEN // HEADS), (head + 1) * (HIDDEN // HEADS))
        w = scale * wq[rows].T @ wk[rows]
        sym = (w + w.T) / 2
        n = w.shape[0]
        values.append(sym.square().sum() / n - (torch.trace(sym) / n) ** 2)
    return torch.stack(values)


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The BertSelfAttention modules, in order."""
    return [m for m in model.modules() if type(m).__name__ == "BertSelfAttention"]


def naive_reference(model: torch.nn.Module) -> float:
    """Mean eig_var over all heads (the regularizer's eig_var_0 for these weights)."""
    scale = (HIDDEN // HEADS) ** -0.5
    with torch.no_grad():
        values = [
            _eig_var(m.query.weight.double(), m.key.weight.double(), scale)
            for m in attention_modules(model)
        ]
    return float(torch.cat(values).mean())


def naive_gradient(
    model: torch.nn.Module, strength: float, reference: float
) -> dict[str, torch.Tensor]:
    """d(lambda * R)/dW for every query/key weight, R = mean eig_var / reference (float64)."""
    scale = (HIDDEN // HEADS) ** -0.5
    leaves, values = {}, []
    for index, module in enumerate(attention_modules(model)):
        wq = module.query.weight.detach().double().requires_grad_()
        wk = module.key.weight.detach().double().requires_grad_()
        leaves[f"{index}.query"], leaves[f"{index}.key"] = wq, wk
        values.append(_eig_var(wq, wk, scale))
    penalty = strength * torch.cat(values).mean() / reference
    grads = torch.autograd.grad(penalty, list(leaves.values()))
    return dict(zip(leaves, grads, strict=True))


def qk_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The current .grad of every query/key weight, float64 copies."""
    out = {}
    for index, module in enumerate(attention_modules(model)):
        out[f"{index}.query"] = module.query.weight.grad.detach().double().clone()
        out[f"{index}.key"] = module.key.weight.grad.detach().double().clone()
    return out


def run_rank(main: Callable[[str], None]) -> None:
    """Run a launched script's main(out folder from argv), then leave without the interpreter's
    teardown: every rank meets at a barrier, closes its process group, flushes its output and
    exits 0 at once (finalizers of a gloo group and of threads others started can hang)."""
    main(sys.argv[1])
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
