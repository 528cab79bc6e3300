"""What every source of checkpoint files shares: the `WeightSource` interface and row
selections, config.json, the choice of weight files (safetensors, an index's shards, or pickles
when allowed), and `FileSource`, which reads safetensors tensors by byte range."""

from __future__ import annotations

import time
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from qkmonitor.errors import (
    CorruptWeightsError,
    NotAModelError,
    TimeLimitError,
    UnsafeWeightsError,
)
from qkmonitor.untrusted_json import parse_json
from qkmonitor.weights.safetensors_io import (
    DTYPE_NAMES,
    TensorSpec,
    parse_safetensors_header,
    tensor_from_bytes,
)
from qkmonitor.weights.transformers_private import decode_special_floats

__all__ = [
    "PICKLE_SUFFIXES",
    "SAFETENSORS_INDEX",
    "RowRanges",
    "WeightSource",
    "load_config",
    "take_rows",
]

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
MAX_CONFIG = 16 * 2**20  # config.json: real ones are well under 1 MB
MAX_INDEX = 64 * 2**20  # the index of a 100k-tensor checkpoint is about 10 MB

#: half-open [start, stop) ranges of a tensor's first dimension, in the order to concatenate
RowRanges = Sequence[tuple[int, int]]


def load_config(values: dict[str, Any], where: str) -> Any:
    """A transformers config from config.json's contents, never running remote code."""
    from transformers import CONFIG_MAPPING, PretrainedConfig

    model_type = values.get("model_type")
    if not model_type:
        raise NotAModelError(
            f"{where}: config.json has no model_type; is this a transformers model?"
        )
    # CONFIG_MAPPING is lazy: its .get() does not see registered types, [] does
    known = model_type in CONFIG_MAPPING
    config_class = CONFIG_MAPPING[model_type] if known else PretrainedConfig
    values = decode_special_floats(config_class, values)  # outside: not the config's fault
    try:
        config = config_class.from_dict(values)
    except Exception as error:  # transformers validates values with many exception types
        reason = " ".join(str(error).split())  # transformers' validation errors span lines
        raise NotAModelError(f"{where}: config.json is invalid ({reason})") from None
    config.model_type = model_type
    return config


def config_values(raw: bytes | bytearray, where: str) -> dict:
    """config.json's contents, checked as far as `load_config` relies on them."""
    values = parse_json(raw, where, MAX_CONFIG)
    model_type = values.get("model_type")
    if model_type is not None and not isinstance(model_type, str):
        raise NotAModelError(f"{where}: model_type is {type(model_type).__name__}, not a string")
    return values


def _checked_ranges(name: str, ranges: RowRanges, rows: int) -> list[tuple[int, int]]:
    """The ranges, adjacent ones merged; a ValueError for an empty or out-of-bounds one."""
    merged: list[tuple[int, int]] = []
    for start, stop in ranges:
        if not 0 <= start < stop <= rows:
            raise ValueError(f"rows {start}:{stop} are not within the {rows} rows of {name}")
        if merged and merged[-1][1] == start:
            merged[-1] = (merged[-1][0], stop)
        else:
            merged.append((start, stop))
    if not merged:
        raise ValueError(f"an empty row selection for {name}")
    return merged


def take_rows(tensor: Tensor, ranges: RowRanges, name: str = "the tensor") -> Tensor:
    """The rows of ``ranges`` of a tensor, concatenated along its first dimension."""
    spans = _checked_ranges(name, ranges, tensor.shape[0])
    return torch.cat([tensor[start:stop] for start, stop in spans])


def _row_count(ranges: RowRanges) -> int:
    return sum(stop - start for start, stop in ranges)


class WeightSource(ABC):
    """A model's config and lazily readable tensors."""

    #: "hub", "local" or "model"
    kind: str
    #: what the user named: a repo id, a folder, or the model's class name
    name: str
    #: the commit sha audited (Hub), else None
    sha: str | None = None
    #: a `time.monotonic` value after which reads fail with TimeLimitError (None: no limit)
    deadline: float | None = None
    config: Any

    @abstractmethod
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape, from headers only."""

    @abstractmethod
    def dtypes(self) -> dict[str, str]:
        """Every tensor's stored dtype (safetensors names: BF16, F32, ...)."""

    @abstractmethod
    def read(
        self, names: Iterable[str], rows: Mapping[str, RowRanges] | None = None
    ) -> dict[str, Tensor]:
        """The named tensors, reading nothing else; for a name in ``rows``, only those rows
        (concatenated, see the module docstring)."""

    @abstractmethod
    def byte_size(self, names: Iterable[str], rows: Mapping[str, RowRanges] | None = None) -> int:
        """Bytes that reading these tensors (with the same ``rows``) transfers."""


class FileSource(WeightSource):
    """Common logic of checkpoint files: safetensors read by byte range, or allowed pickles."""

    def __init__(self, files: list[str], pickled: dict[str, Tensor] | None = None) -> None:
        self._pickled = pickled
        self._specs: dict[str, TensorSpec] = {}
        for file in files:
            size, prefix = self._size_and_prefix(file)
            self._specs.update(parse_safetensors_header(file, prefix, size, self._reader(file)))

    @abstractmethod
    def _size_and_prefix(self, file: str) -> tuple[int, bytes]:
        """The file's length and its first bytes (header included when small)."""

    @abstractmethod
    def _read_range(self, file: str, start: int, end: int) -> bytes | bytearray:
        """Bytes [start, end) of a file."""

    def _reader(self, file: str) -> Callable[[int, int], bytes | bytearray]:
        return lambda start, end: self._read_range(file, start, end)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        if self._pickled is not None:
            return {name: tuple(t.shape) for name, t in self._pickled.items()}
        return {name: spec.shape for name, spec in self._specs.items()}

    def dtypes(self) -> dict[str, str]:
        if self._pickled is not None:
            return {
                name: DTYPE_NAMES.get(t.dtype, str(t.dtype)) for name, t in self._pickled.items()
            }
        return {name: spec.dtype for name, spec in self._specs.items()}

    def _read_spans(self, file: str, spans: list[tuple[int, int]]) -> list[bytes | bytearray]:
        """Byte ranges [start, end) of one file, in order (over HTTP: several at a time)."""
        return [self._read_range(file, start, end) for start, end in spans]

    def byte_size(self, names: Iterable[str], rows: Mapping[str, RowRanges] | None = None) -> int:
        rows = rows or {}
        total = 0
        for name in names:
            if self._pickled is not None:
                tensor = self._pickled[name]
                size, count = tensor.nbytes, tensor.shape[0] if tensor.dim() else 1
            else:
                spec = self._specs[name]
                size, count = spec.end - spec.start, spec.shape[0] if spec.shape else 1
            total += size if name not in rows else size // count * _row_count(rows[name])
        return total

    def read(
        self, names: Iterable[str], rows: Mapping[str, RowRanges] | None = None
    ) -> dict[str, Tensor]:
        rows = rows or {}
        if self._pickled is not None:
            return {
                name: take_rows(self._pickled[name], rows[name], name)
                if name in rows
                else self._pickled[name]
                for name in names
            }
        out = {}
        for name in names:
            check_deadline(self.deadline, f"reading {name}")
            spec = self._specs[name]
            if name not in rows:
                data = self._read_range(spec.file, spec.start, spec.end)
                out[name] = tensor_from_bytes(name, spec, data)
                continue
            spans = _checked_ranges(name, rows[name], spec.shape[0] if spec.shape else 0)
            row_bytes = (spec.end - spec.start) // spec.shape[0]
            pieces = self._read_spans(
                spec.file,
                [(spec.start + a * row_bytes, spec.start + b * row_bytes) for a, b in spans],
            )
            selected = replace(spec, shape=(_row_count(spans), *spec.shape[1:]))
            out[name] = tensor_from_bytes(name, selected, bytearray().join(pieces))
        return out


def check_deadline(deadline: float | None, doing: str) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise TimeLimitError(f"the time limit was reached before {doing}")


def _plain_name(name: Any) -> bool:
    """Whether an index's shard name is a relative path that stays where it is (no '..')."""
    return (
        isinstance(name, str)
        and not name.startswith("/")
        and "\\" not in name
        and "\0" not in name
        and all(part not in ("", ".", "..") for part in name.split("/"))
    )


def weight_files(
    available: list[str], read_index: Callable[[], dict], where: str, allow_pickle: bool
) -> tuple[str, list[str]]:
    """('safetensors' | 'pickle', files) for a checkpoint given its file list.

    Shard names from an index are checked to be plain relative names; the caller checks that
    each is a file of the checkpoint.
    """
    if SAFETENSORS_INDEX in available:
        weight_map = read_index().get("weight_map")
        if not isinstance(weight_map, dict):
            raise CorruptWeightsError(f"{where}: {SAFETENSORS_INDEX} has no weight_map")
        for name, shard in weight_map.items():
            if not _plain_name(shard):
                raise CorruptWeightsError(
                    f"{where}: {SAFETENSORS_INDEX} maps {name[:80]!r} to {str(shard)[:80]!r}, "
                    "which is not a plain file name inside the checkpoint; refusing the index"
                )
        return "safetensors", sorted(set(weight_map.values()))
    safetensors = sorted(
        f
        for f in available
        if f.endswith(".safetensors") and "/" not in f and not f.startswith("adapter")
    )
    if safetensors:
        return "safetensors", safetensors
    pickles = sorted(f for f in available if f.endswith(PICKLE_SUFFIXES) and "/" not in f)
    if pickles and not allow_pickle:
        raise UnsafeWeightsError(
            f"{where} has only pickle weights ({', '.join(pickles[:3])}), which can run code when "
            "loaded; convert them to safetensors, or pass --allow-pickle to read them with "
            "torch's weights_only loader"
        )
    if pickles:
        return "pickle", [f for f in pickles if not f.startswith(("training_args", "optimizer"))]
    raise NotAModelError(f"{where} has no model weights (no .safetensors files)")


def load_pickles(paths: list[Path]) -> dict[str, Tensor]:
    """Pickle checkpoints through torch's weights_only unpickler (no code execution)."""
    tensors: dict[str, Tensor] = {}
    for path in paths:
        try:
            # mmap needs the zip format (torch >= 1.6); older checkpoints use the legacy one
            mmap = zipfile.is_zipfile(path)
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except Exception as error:  # the unpickler raises many types on hostile input
            raise CorruptWeightsError(
                f"{path.name} could not be read with the weights_only loader "
                f"({type(error).__name__}); convert it to safetensors"
            ) from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise CorruptWeightsError(f"{path.name} does not hold a state dict")
        tensors.update({k: v for k, v in state.items() if isinstance(v, Tensor)})
    return tensors
