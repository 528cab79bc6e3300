"""Where weights come from: a local folder, a Hub repo, or a model in memory.

A source exposes a model's config and the names, shapes and dtypes of its tensors without
reading any weight bytes, then reads only the tensors asked for:

- local folder: config.json + safetensors (one file, or shards with an index json), the header
  parsed directly and each tensor read by its byte range;
- Hub repo: the same, over HTTP Range requests through huggingface_hub, so an audit downloads
  headers plus the Q/K tensors, never the whole checkpoint; the commit sha is pinned first so
  every read sees one snapshot;
- in-memory model: ``named_modules`` with PEFT/LoRA adapters merged into effective weights.

``read`` and ``byte_size`` take an optional row selection: for a tensor named there, only those
half-open ranges of its first dimension are read (one byte range each, adjacent ranges merged;
over HTTP up to 8 at a time), and the result is their concatenation. MLA reads only the key
rows of ``kv_b_proj`` this way, not its value rows.

Pickle checkpoints (.bin/.pt) are refused unless the caller allows them, and then read only
with torch's ``weights_only`` loader. Remote code is never executed.

Untrusted input is bounded: JSON files are capped in size and nesting and refused with one line
when malformed; shard names from an index must be plain files of the checkpoint (listed in the
repo at the pinned commit, or inside the folder); every Hub request goes through
`qkmonitor.hub.client` (timeouts, capped retries, exact Content-Range). A source's
``deadline`` (a `time.monotonic` value, or None) ends its reads with `TimeLimitError` once passed,
also in the middle of a tensor.
"""

from __future__ import annotations

import math
import os
import shutil
import struct
import tempfile
import time
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from qkmonitor.errors import (
    CorruptWeightsError,
    ModelNotFoundError,
    NotAModelError,
    QKMonitorError,
    TimeLimitError,
    UnsafeWeightsError,
)
from qkmonitor.hub.client import RepoInfo, get_file, hub_commit, hub_timeout, model_info
from qkmonitor.untrusted_json import one_line, parse_json
from qkmonitor.weights.live import is_sharded, live_weights, transformers_model, unwrap_parallel
from qkmonitor.weights.targets import target_kind

__all__ = [
    "HubSource",
    "LocalSource",
    "ModelSource",
    "RowRanges",
    "TensorSpec",
    "WeightSource",
    "dtype_name",
    "hub_commit",
    "load_config",
    "open_source",
    "parse_json",
    "take_rows",
]

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_MAX_HEADER = 100 * 2**20  # the safetensors format caps headers at 100 MB
_MAX_CONFIG = 16 * 2**20  # config.json: real ones are well under 1 MB
_MAX_INDEX = 64 * 2**20  # the index of a 100k-tensor checkpoint is about 10 MB
_MAX_INT = 2**63 - 1  # safetensors offsets and dims are u64 (and torch sizes int64)
_CHUNK = 16 * 2**20  # bytes read between two deadline checks (local files)
_PARALLEL_RANGES = 8  # concurrent range requests of one row selection over HTTP

#: half-open [start, stop) ranges of a tensor's first dimension, in the order to concatenate
RowRanges = Sequence[tuple[int, int]]

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype ("BF16", ...), "?" for others."""
    return _DTYPE_NAMES.get(dtype, "?")


@dataclass(frozen=True)
class TensorSpec:
    """Where one tensor lives: file, absolute byte range, dtype and shape."""

    file: str
    start: int
    end: int
    dtype: str
    shape: tuple[int, ...]


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
    try:
        # transformers writes inf/nan as {"__float__": "Infinity"} (nemotron_h, bamba, ...)
        values = config_class._decode_special_floats(values)
        config = config_class.from_dict(values)
    except Exception as error:  # transformers validates values with many exception types
        reason = " ".join(str(error).split())  # transformers' validation errors span lines
        raise NotAModelError(f"{where}: config.json is invalid ({reason})") from None
    config.model_type = model_type
    return config


def _config_values(raw: bytes | bytearray, where: str) -> dict:
    """config.json's contents, checked as far as `load_config` relies on them."""
    values = parse_json(raw, where, _MAX_CONFIG)
    model_type = values.get("model_type")
    if model_type is not None and not isinstance(model_type, str):
        raise NotAModelError(f"{where}: model_type is {type(model_type).__name__}, not a string")
    return values


def _index_int(value: Any) -> int:
    """A safetensors size or offset: a JSON integer in [0, 2^63)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_INT:
        raise ValueError(value)
    return value


def parse_safetensors_header(file: str, prefix: bytes, size: int, read: Callable) -> dict:
    """Tensor specs of one safetensors file from its header.

    prefix: the first bytes of the file (at least 8); read(start, end) fetches more bytes;
    size: the file's length, to detect truncation.
    """
    if len(prefix) < 8:
        raise CorruptWeightsError(f"{file} is truncated (no safetensors header); re-download it")
    (length,) = struct.unpack("<Q", prefix[:8])
    if length > _MAX_HEADER or 8 + length > size:
        raise CorruptWeightsError(f"{file} is not a valid safetensors file; re-download it")
    raw = prefix[8 : 8 + length] if len(prefix) >= 8 + length else read(8, 8 + length)
    header = parse_json(raw, f"the safetensors header of {file}", _MAX_HEADER, CorruptWeightsError)
    header.pop("__metadata__", None)
    specs, base = {}, 8 + length
    try:
        for name, entry in header.items():
            first, last = (_index_int(offset) for offset in entry["data_offsets"])
            start, end = base + first, base + last
            if not start <= end:
                raise ValueError(f"data_offsets of {name} are out of order")
            shape = tuple(_index_int(dim) for dim in entry["shape"])
            if not isinstance(entry["dtype"], str):
                raise ValueError(f"dtype of {name}")
            specs[name] = TensorSpec(file, start, end, entry["dtype"], shape)
    except (KeyError, TypeError, ValueError):
        raise CorruptWeightsError(
            f"{file} has a malformed safetensors header; re-download it"
        ) from None
    if specs and max(spec.end for spec in specs.values()) > size:
        raise CorruptWeightsError(
            f"{file} is truncated ({size} bytes, the header needs "
            f"{max(spec.end for spec in specs.values())}); re-download it"
        )
    return specs


def tensor_from_bytes(name: str, spec: TensorSpec, data: bytes | bytearray) -> Tensor:
    """Decode one tensor's bytes (little-endian, as safetensors stores them)."""
    dtype = _DTYPES.get(spec.dtype)
    if dtype is None:
        raise CorruptWeightsError(f"{name} in {spec.file} has unsupported dtype {spec.dtype}")
    expected = dtype.itemsize * math.prod(spec.shape)
    if len(data) != expected:
        raise CorruptWeightsError(
            f"{name} in {spec.file}: {len(data)} bytes for shape {spec.shape} {spec.dtype}; "
            "the file is corrupt, re-download it"
        )
    if not data:
        return torch.empty(spec.shape, dtype=dtype)
    return torch.frombuffer(data, dtype=dtype).reshape(spec.shape)


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


class _FileSource(WeightSource):
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
                name: _DTYPE_NAMES.get(t.dtype, str(t.dtype)) for name, t in self._pickled.items()
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
            _check_deadline(self.deadline, f"reading {name}")
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


def _check_deadline(deadline: float | None, doing: str) -> None:
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


def _weight_files(
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


class LocalSource(_FileSource):
    """A model folder on disk: config.json plus safetensors weights (or pickle, if allowed)."""

    kind = "local"

    def __init__(
        self,
        folder: str | os.PathLike,
        *,
        allow_pickle: bool = False,
        deadline: float | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.name = str(folder)
        self.deadline = deadline
        if not self.folder.is_dir():
            raise ModelNotFoundError(f"folder '{folder}' does not exist", missing="folder")
        config_path = self.folder / "config.json"
        if not config_path.is_file():
            raise NotAModelError(
                f"'{folder}' has no config.json: point qkmonitor at a transformers model folder"
            )
        raw = _read_capped(config_path, _MAX_CONFIG, NotAModelError)
        self.config = load_config(_config_values(raw, str(config_path)), self.name)
        available = sorted(p.name for p in self.folder.iterdir() if p.is_file())
        index = self.folder / SAFETENSORS_INDEX
        fmt, files = _weight_files(
            available,
            lambda: parse_json(
                _read_capped(index, _MAX_INDEX, NotAModelError), str(index), _MAX_INDEX
            ),
            f"'{folder}'",
            allow_pickle,
        )
        missing = [f for f in files if not (self.folder / f).is_file()]
        if missing:
            raise CorruptWeightsError(
                f"'{folder}': shard {missing[0]} named by the index is missing"
            )
        for file in files:
            self._check_inside(file)
        if fmt == "pickle":
            super().__init__([], _load_pickles([self.folder / f for f in files]))
        else:
            super().__init__(files)

    def _check_inside(self, file: str) -> None:
        """Refuse a weight file whose real path (links followed) is outside the folder.

        A snapshot folder of the Hugging Face cache (``.../snapshots/<sha>``) links its files to
        that repo's ``blobs`` folder, which counts as inside.
        """
        root = self.folder.resolve()
        roots = [root]
        if root.parent.name == "snapshots":
            roots.append(root.parent.parent / "blobs")
        real = (self.folder / file).resolve()
        if not any(real.is_relative_to(allowed) for allowed in roots):
            raise CorruptWeightsError(
                f"'{self.name}': {file} leads to {real}, outside the folder; refusing to read it "
                "(copy the file into the folder instead of linking to it)"
            )

    def _path(self, file: str) -> Path:
        return self.folder / file

    def _size_and_prefix(self, file: str) -> tuple[int, bytes]:
        path = self._path(file)
        with path.open("rb") as handle:
            return path.stat().st_size, handle.read(64 * 1024)

    def _read_range(self, file: str, start: int, end: int) -> bytearray:
        buffer = bytearray(end - start)
        with self._path(file).open("rb", buffering=0) as handle:
            handle.seek(start)
            view, done = memoryview(buffer), 0
            while done < len(buffer):
                _check_deadline(self.deadline, f"reading {file} of '{self.name}'")
                count = handle.readinto(view[done : done + _CHUNK])
                if not count:
                    raise CorruptWeightsError(f"{file} is truncated; re-download it")
                done += count
        return buffer


def _read_capped(path: Path, limit: int, error: type[QKMonitorError]) -> bytes:
    """A file's bytes, at most limit + 1 of them (so that `parse_json` can say it is too big)."""
    try:
        with path.open("rb") as handle:
            return handle.read(limit + 1)
    except OSError as problem:
        raise error(f"{path} cannot be read ({one_line(problem)})") from None


def _load_pickles(paths: list[Path]) -> dict[str, Tensor]:
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


class HubSource(_FileSource):
    """A Hub repo at one commit: config, safetensors headers, then Q/K byte ranges only.

    timeout: seconds any one wait for the Hub may take (default: $QKMONITOR_HUB_TIMEOUT, else
    15; see `qkmonitor.hub.client`); deadline: a `time.monotonic` value after which every
    read, in progress or not, fails with TimeLimitError (also settable later as ``.deadline``).
    Opening asks the Hub for the repo's model info; `HubSource.at_commit` opens a revision
    already resolved by `qkmonitor.hub.client.model_info`, without asking again.
    """

    kind = "hub"

    def __init__(
        self,
        repo_id: str,
        *,
        revision: str | None = None,
        token: str | bool | None = None,
        allow_pickle: bool = False,
        timeout: float | None = None,
        deadline: float | None = None,
    ) -> None:
        seconds = hub_timeout(timeout)
        info = model_info(
            repo_id, revision=revision, token=token, timeout=seconds, deadline=deadline
        )
        self._open(info, token, allow_pickle, seconds, deadline)

    @classmethod
    def at_commit(
        cls,
        info: RepoInfo,
        *,
        token: str | bool | None = None,
        allow_pickle: bool = False,
        timeout: float | None = None,
        deadline: float | None = None,
    ) -> HubSource:
        """The source of a revision already resolved (its commit and files in ``info``): reads
        config.json and the headers at ``info.sha``, with no model-info request of its own."""
        source = cls.__new__(cls)
        source._open(info, token, allow_pickle, hub_timeout(timeout), deadline)
        return source

    def _open(
        self,
        info: RepoInfo,
        token: str | bool | None,
        allow_pickle: bool,
        timeout: float,
        deadline: float | None,
    ) -> None:
        repo_id = info.repo_id
        self.name, self.revision, self._token = repo_id, info.revision, token
        self.timeout, self.deadline = timeout, deadline
        self._sizes: dict[str, int] = {}
        self.sha, available = info.sha, list(info.files)
        where = f"Hub repo '{repo_id}'"
        if "config.json" not in available:
            raise NotAModelError(f"{where} has no config.json; is it a transformers model?")
        raw = self._fetch("config.json", _MAX_CONFIG)
        self.config = load_config(_config_values(raw, f"{repo_id}/config.json"), where)
        fmt, files = _weight_files(
            available,
            lambda: parse_json(
                self._fetch(SAFETENSORS_INDEX, _MAX_INDEX),
                f"{repo_id}/{SAFETENSORS_INDEX}",
                _MAX_INDEX,
            ),
            where,
            allow_pickle,
        )
        listed = set(available)
        unlisted = [f for f in files if f not in listed]
        if unlisted:
            raise CorruptWeightsError(
                f"{where}: shard {unlisted[0][:100]!r} named by the index is not a file of the "
                f"repo at commit {self.sha}; refusing the index"
            )
        if fmt == "pickle":
            _FileSource.__init__(self, [], self._load_pickles(files))
        else:
            _FileSource.__init__(self, files)

    def _get(self, file: str, **bounds: Any) -> tuple[bytearray, int | None]:
        """One bounded GET of a file of the pinned commit (see `client.get_file` for
        ``bounds``)."""
        return get_file(
            self.name,
            self.sha,
            file,
            token=self._token,
            timeout=self.timeout,
            deadline=self.deadline,
            asked=self.revision,
            **bounds,
        )

    def _fetch(self, file: str, limit: int) -> bytearray:
        """A whole small file, at most limit + 1 bytes of it (`parse_json` refuses more)."""
        return self._get(file, limit=limit + 1)[0]

    def _load_pickles(self, files: list[str]) -> dict[str, Tensor]:
        folder = Path(tempfile.mkdtemp(prefix="qkmonitor-pickles-"))
        try:
            paths = []
            for file in files:  # top-level names (see _weight_files)
                path = folder / file
                with path.open("w+b") as sink:
                    self._get(file, sink=sink)
                paths.append(path)
            return _load_pickles(paths)  # memory-mapped tensors outlive the unlinked files
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _size_and_prefix(self, file: str) -> tuple[int, bytes]:
        # 8 bytes give the header length; the header itself is then fetched exactly, so an
        # audit transfers headers and Q/K tensors and nothing else.
        data, total = self._get(file, span=(0, 7))
        assert total is not None  # a range answer always carries it
        self._sizes[file] = total
        return total, bytes(data)

    def _read_range(self, file: str, start: int, end: int) -> bytearray:
        if end <= start:
            return bytearray()
        return self._get(file, span=(start, end - 1), size=self._sizes.get(file))[0]

    def _read_spans(self, file: str, spans: list[tuple[int, int]]) -> list[bytes | bytearray]:
        # one request each (the Hub's CDN answers one range per request), a few at a time over
        # huggingface_hub's shared, thread-safe connection pool, so latency does not add up
        if len(spans) < 2:
            return super()._read_spans(file, spans)
        with ThreadPoolExecutor(min(_PARALLEL_RANGES, len(spans))) as pool:
            return list(pool.map(lambda span: self._read_range(file, *span), spans))


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


def open_source(
    target: str | os.PathLike | torch.nn.Module,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    allow_pickle: bool = False,
    timeout: float | None = None,
    deadline: float | None = None,
) -> WeightSource:
    """The right source for a model, a local folder, or a Hub repo id.

    timeout: seconds any one wait for the Hub may take (default: $QKMONITOR_HUB_TIMEOUT, else
    15); deadline: a `time.monotonic` value after which reads fail with TimeLimitError.
    """
    if isinstance(target, torch.nn.Module):
        return ModelSource(target)
    text = os.fspath(target)
    if target_kind(text) == "folder":
        if revision:
            raise QKMonitorError(f"--revision applies to Hub repos, not to the folder '{text}'")
        return LocalSource(text, allow_pickle=allow_pickle, deadline=deadline)
    return HubSource(
        text,
        revision=revision,
        token=token,
        allow_pickle=allow_pickle,
        timeout=timeout,
        deadline=deadline,
    )
