"""A model in memory: the effective weights its forward uses (PEFT/LoRA merged)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from qkmonitor.errors import QKMonitorError
from qkmonitor.weights.checkpoint import RowRanges, WeightSource, take_rows
from qkmonitor.weights.live import is_sharded, live_weights, transformers_model, unwrap_parallel
from qkmonitor.weights.safetensors_io import dtype_name

__all__ = ["ModelSource"]


class ModelSource(WeightSource):
    """A model in memory (PEFT-, DDP-, compile-wrapped or held by a wrapper such as
    SentenceTransformer): the effective weights its forward uses. Sharded models are refused
    (``qkmonitor.audit`` gathers them, on every rank)."""

    kind = "model"

    def __init__(self, model: torch.nn.Module) -> None:
        model = unwrap_parallel(model)
        inner = transformers_model(model)
        if is_sharded(model):
            raise QKMonitorError(
                f"{type(inner).__name__}'s parameters are sharded (FSDP or ZeRO-3), so a "
                "source cannot read them; call qkmonitor.audit(model) on every rank"
            )
        self.config = inner.config
        self.name = type(inner).__name__
        self._weights = dict(live_weights(model))

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(get().shape) for name, get in self._weights.items()}

    def dtypes(self) -> dict[str, str]:
        return {name: dtype_name(get().dtype) for name, get in self._weights.items()}

    def byte_size(self, names: Iterable[str], rows: Mapping[str, RowRanges] | None = None) -> int:
        return sum(t.nbytes for t in self.read(names, rows).values())

    def read(
        self, names: Iterable[str], rows: Mapping[str, RowRanges] | None = None
    ) -> dict[str, Tensor]:
        rows = rows or {}
        with torch.no_grad():
            out = {name: self._weights[name]().detach() for name in names}
            return {
                name: take_rows(tensor, rows[name], name) if name in rows else tensor
                for name, tensor in out.items()
            }
