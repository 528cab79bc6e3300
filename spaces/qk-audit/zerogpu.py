"""ZeroGPU without depending on it: the ``@spaces.GPU`` decorator where the ``spaces`` package is
installed (a no-op off ZeroGPU, by that package's design), nothing where it is not; and a source
whose tensors are all read before the decorated call.

On ZeroGPU a GPU is attached for the duration of each decorated call, and that time is metered
per call and per day. So the Space reads every Q/K tensor on CPU first (`prefetch`: Hub byte-range
reads, dequantization of FP8/int weights), then hands the tensors to the decorated compute, which
reads nothing from the network. `Prefetched` holds plain tensors and values only, so it can be
sent to the process that ZeroGPU runs the call in.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib import metadata
from typing import Any, TypeVar

try:  # before torch and gradio: ZeroGPU patches torch's CUDA at import
    import spaces
except ImportError:  # a local run or CPU hardware without the package: plain functions
    spaces = None
if not hasattr(spaces, "GPU"):  # a folder named spaces/ (a qkmonitor checkout's), no package
    spaces = None

from torch import Tensor

from qkmonitor.errors import CorruptWeightsError, QKMonitorError
from qkmonitor.weights.discovery import plan
from qkmonitor.weights.layout import AttentionLayer, layer_tensors
from qkmonitor.weights.quantized import QuantizedSource, quantization_config
from qkmonitor.weights.sources import RowRanges, WeightSource

__all__ = ["Prefetched", "ReadPlan", "compute_mode", "gpu", "on_zerogpu", "plan_reads", "prefetch"]

_Function = TypeVar("_Function", bound=Callable[..., Any])


def on_zerogpu() -> bool:
    """Whether this process runs on ZeroGPU hardware (the Hub sets SPACES_ZERO_GPU there)."""
    value = os.environ.get("SPACES_ZERO_GPU", "").lower()
    return spaces is not None and value in ("1", "t", "true")


def compute_mode() -> str:
    """One line for the log: where the decorated compute runs."""
    if spaces is None:
        return "compute on CPU (the spaces package is not installed: @spaces.GPU is not applied)"
    try:
        version = metadata.version("spaces")  # the package has no __version__
    except metadata.PackageNotFoundError:
        version = "?"
    if on_zerogpu():
        return f"compute inside @spaces.GPU on ZeroGPU (spaces {version})"
    return f"compute on CPU (spaces {version} installed, not on ZeroGPU: @spaces.GPU is a no-op)"


def gpu(duration: Callable[..., float]) -> Callable[[_Function], _Function]:
    """``spaces.GPU(duration=duration)`` where the package is installed, else the function as is.

    duration takes the decorated function's arguments and returns the seconds to reserve
    (ZeroGPU's dynamic duration)."""
    if spaces is None:
        return lambda function: function
    return spaces.GPU(duration=duration)


def _key(rows: RowRanges | None) -> Any:
    """A hashable form of a row selection (None: every row)."""
    if rows is None:
        return None
    return tuple(tuple(span) if isinstance(span, list | tuple) else span for span in rows)


class Prefetched(WeightSource):
    """A source whose tensors were read in advance: the same config, names, shapes, dtypes,
    commit and byte counts as the source it copies, and no I/O. Reading a tensor that was not
    prefetched is a QKMonitorError (it would be a network read inside the metered call)."""

    def __init__(self, source: WeightSource) -> None:
        self.kind, self.name, self.sha = source.kind, source.name, source.sha
        self.config = source.config
        self.revision = getattr(source, "revision", None)
        self._shapes, self._dtypes = source.shapes(), source.dtypes()
        self._tensors: dict[tuple[str, Any], Tensor] = {}
        self._sizes: dict[tuple[str, Any], int] = {}
        self._source: WeightSource | None = source  # dropped once every tensor is read

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    def dtypes(self) -> dict[str, str]:
        return dict(self._dtypes)

    def byte_size(self, names: Iterable[str], rows: Mapping[str, RowRanges] | None = None) -> int:
        if self._source is not None:  # still filling: what the source would transfer
            return self._source.byte_size(names, rows)
        rows = rows or {}
        return sum(self._sizes[self._stored(name, rows)] for name in names)

    def read(
        self, names: Iterable[str], rows: Mapping[str, RowRanges] | None = None
    ) -> dict[str, Tensor]:
        names, rows = list(names), rows or {}
        if self._source is not None:  # still filling: read what is missing, then keep it
            wanted = [n for n in names if (n, _key(rows.get(n))) not in self._tensors]
            if wanted:
                wanted_rows = {n: rows[n] for n in wanted if n in rows}
                for name, tensor in self._source.read(wanted, wanted_rows).items():
                    key = (name, _key(rows.get(name)))
                    self._tensors[key] = tensor
                    self._sizes[key] = self._source.byte_size([name], wanted_rows)
        return {name: self._tensors[self._stored(name, rows)] for name in names}

    def _stored(self, name: str, rows: Mapping[str, RowRanges]) -> tuple[str, Any]:
        key = (name, _key(rows.get(name)))
        if key not in self._tensors:
            raise QKMonitorError(f"{name} was not read before the compute started (a Space bug)")
        return key

    def freeze(self) -> Prefetched:
        """Stop reading: from now on only prefetched tensors are served (and the object holds
        no connection, so it can be pickled)."""
        self._source = None
        return self


@dataclass(frozen=True)
class ReadPlan:
    """What an audit of a source will read, planned before any tensor byte is read."""

    copy: Prefetched  # fills as `reader` reads
    reader: WeightSource  # `copy`, or the dequantizing wrapper over it (FP8, int4 checkpoints)
    layers: list[AttentionLayer]

    @property
    def bytes(self) -> int:
        """Bytes the reads transfer (from the safetensors headers)."""
        rows = {name: r for layer in self.layers for name, r in layer.rows.items()}
        return self.reader.byte_size(layer_tensors(self.layers), rows)


def plan_reads(source: WeightSource) -> ReadPlan:
    """Plan an audit of ``source`` with qkmonitor's planner, through the same dequantizing
    wrapper as ``qkmonitor.audit.audit_source``, and with the same errors, before any read."""
    copy = Prefetched(source)
    quantized = source.kind != "model" and quantization_config(source.config)
    reader: WeightSource = QuantizedSource(copy) if quantized else copy
    try:
        layers, _ = plan(reader.config, reader.shapes())
    except CorruptWeightsError as error:  # as audit_source: name the unreadable format
        if isinstance(reader, QuantizedSource) and error.tensor is not None:
            reader.check([error.tensor])
        raise
    if isinstance(reader, QuantizedSource):
        reader.check(layer_tensors(layers))
    return ReadPlan(copy, reader, layers)


def prefetch(planned: ReadPlan, progress: Callable[[int, int], None] | None = None) -> Prefetched:
    """Every tensor of the plan read now; progress(done, total) after each layer."""
    for index, layer in enumerate(planned.layers):
        planned.reader.read(layer.tensors, layer.rows)
        if progress is not None:
            progress(index + 1, len(planned.layers))
    return planned.copy.freeze()
