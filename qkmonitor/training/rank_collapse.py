"""Rank collapse of attention outputs (docs/metrics.md), recorded from real forward passes.

    rank_collapse = ||X - 1 xbar^T||_F / ||X||_F

for one sequence's attention-output token matrix X (valid tokens only, padding excluded), xbar
its mean token; near 0 means the tokens collapsed onto one vector. Averaged over sequences.
The recorder reads module outputs under no_grad and changes nothing the model computes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from qkmonitor.weights.live import LiveLayer, transformers_model

__all__ = ["RankCollapseRecorder", "rank_collapse_sums"]


def rank_collapse_sums(x: Tensor, mask: Tensor | None = None) -> Tensor:
    """[sum over sequences of rank_collapse, number of sequences] (float64) for x (B, T, D).

    mask: (B, T), non-zero for valid tokens; None: every token is valid. Sequences with no
    valid token or an all-zero X are skipped.
    """
    x = x.detach().float()
    valid = torch.ones(x.shape[:2], device=x.device) if mask is None else (mask != 0).float()
    weights = valid[..., None]
    n = valid.sum(1)  # (B,)
    mean = (x * weights).sum(1) / n.clamp_min(1)[:, None]
    centred = ((x - mean[:, None]) * weights).square().sum((1, 2)).sqrt()
    total = (x * weights).square().sum((1, 2)).sqrt()
    keep = (n > 0) & (total > 0)
    ratio = centred[keep] / total[keep]
    return torch.stack([ratio.sum(), keep.sum()]).double()


def _first_tensor(output: Any) -> Tensor | None:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, tuple | list) and output and isinstance(output[0], Tensor):
        return output[0]
    return None


class RankCollapseRecorder:
    """Per-layer sums of rank_collapse over the forward passes inside ``recording()``."""

    #: blocks whose tokens are the decoder's, masked by decoder_attention_mask
    _DECODER_BLOCKS = ("decoder", "cross")

    def __init__(self, model: nn.Module, layers: Sequence[LiveLayer]) -> None:
        self.model = model
        # the masks are read from the model's forward and, after it, from the transformers
        # model's: a wrapper (a LightningModule, a SentenceTransformer) may call the inner model
        # without passing through its own forward, or get the mask in another form
        inner = transformers_model(model)
        self._mask_sources = [model] if inner is model else [model, inner]
        self.layers = list(layers)
        self._masks: dict[str, Tensor | None] = {}
        self._sums: dict[tuple[str, int], Tensor] = {}

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Record every forward pass of the model while inside (eagerly, outside any
        torch.compile graph: the hooks are dynamo-disabled)."""
        read_masks = torch.compiler.disable(self._read_masks)
        handles = [
            source.register_forward_pre_hook(read_masks, with_kwargs=True)
            for source in self._mask_sources
        ]
        handles += [layer.module.register_forward_hook(self._hook(layer)) for layer in self.layers]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def collect(self) -> dict[tuple[str, int], Tensor]:
        """(block, layer) -> [sum, count] since the last collect (no sync); resets."""
        sums, self._sums = self._sums, {}
        return sums

    def _read_masks(self, module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        self._masks = {
            "attention_mask": kwargs.get("attention_mask"),
            "decoder_attention_mask": kwargs.get("decoder_attention_mask"),
        }

    def _hook(self, layer: LiveLayer):
        decoder = layer.plan.block in self._DECODER_BLOCKS
        name = "decoder_attention_mask" if decoder else "attention_mask"

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            x = _first_tensor(output)
            if x is None or x.dim() != 3:
                return
            mask = self._masks.get(name)
            if mask is not None and tuple(mask.shape) != tuple(x.shape[:2]):
                mask = None
            with torch.no_grad():
                sums = rank_collapse_sums(x, mask)
            previous = self._sums.get(layer.key)
            self._sums[layer.key] = sums if previous is None else previous + sums

        return torch.compiler.disable(hook)
