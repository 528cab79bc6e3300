"""Where weights come from: a local folder, a Hub repo, or a model in memory.

A source exposes a model's config and the names, shapes and dtypes of its tensors without
reading any weight bytes, then reads only the tensors asked for:

- local folder: config.json + safetensors (one file, or shards with an index json), the header
  parsed directly and each tensor read by its byte range;
- Hub repo: the same, over HTTP Range requests through huggingface_hub, so an audit downloads
  headers plus the Q/K tensors, never the whole checkpoint; the commit sha is pinned first so
  every read sees one snapshot;
- in-memory model: ``named_modules`` with PEFT/LoRA adapters merged into effective weights.

Pickle checkpoints (.bin/.pt) are refused unless the caller allows them, and then read only
with torch's ``weights_only`` loader. Remote code is never executed.
"""

from __future__ import annotations

import copy
import json
import os
import struct
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from qkmonitor.errors import (
    AccessDeniedError,
    CorruptWeightsError,
    ModelNotFoundError,
    NotAModelError,
    QKMonitorError,
    UnsafeWeightsError,
)

__all__ = [
    "HubSource",
    "LocalSource",
    "ModelSource",
    "TensorSpec",
    "WeightSource",
    "load_config",
    "open_source",
]

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_MAX_HEADER = 100 * 2**20  # the safetensors format caps headers at 100 MB

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
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CorruptWeightsError(
            f"{file} has a malformed safetensors header; re-download it"
        ) from None
    if not isinstance(header, dict):
        raise CorruptWeightsError(f"{file} has a malformed safetensors header; re-download it")
    header.pop("__metadata__", None)
    specs, base = {}, 8 + length
    try:
        for name, entry in header.items():
            start, end = (base + int(offset) for offset in entry["data_offsets"])
            if not base <= start <= end:
                raise ValueError(f"data_offsets of {name} are out of order")
            shape = tuple(int(dim) for dim in entry["shape"])
            specs[name] = TensorSpec(file, start, end, str(entry["dtype"]), shape)
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
    expected = dtype.itemsize * int(torch.Size(spec.shape).numel())
    if len(data) != expected:
        raise CorruptWeightsError(
            f"{name} in {spec.file}: {len(data)} bytes for shape {spec.shape} {spec.dtype}; "
            "the file is corrupt, re-download it"
        )
    if not data:
        return torch.empty(spec.shape, dtype=dtype)
    return torch.frombuffer(data, dtype=dtype).reshape(spec.shape)


class WeightSource(ABC):
    """A model's config and lazily readable tensors."""

    #: "hub", "local" or "model"
    kind: str
    #: what the user named: a repo id, a folder, or the model's class name
    name: str
    #: the commit sha audited (Hub), else None
    sha: str | None = None
    config: Any

    @abstractmethod
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape, from headers only."""

    @abstractmethod
    def dtypes(self) -> dict[str, str]:
        """Every tensor's stored dtype (safetensors names: BF16, F32, ...)."""

    @abstractmethod
    def read(self, names: Iterable[str]) -> dict[str, Tensor]:
        """The named tensors, reading nothing else."""

    @abstractmethod
    def byte_size(self, names: Iterable[str]) -> int:
        """Bytes that reading these tensors transfers (for progress bars)."""


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

    def byte_size(self, names: Iterable[str]) -> int:
        if self._pickled is not None:
            return sum(self._pickled[n].nbytes for n in names)
        return sum(self._specs[n].end - self._specs[n].start for n in names)

    def read(self, names: Iterable[str]) -> dict[str, Tensor]:
        if self._pickled is not None:
            return {name: self._pickled[name] for name in names}
        out = {}
        for name in names:
            spec = self._specs[name]
            out[name] = tensor_from_bytes(
                name, spec, self._read_range(spec.file, spec.start, spec.end)
            )
        return out


def _weight_files(
    available: list[str], read_index: Callable[[], dict], where: str, allow_pickle: bool
) -> tuple[str, list[str]]:
    """('safetensors' | 'pickle', files) for a checkpoint given its file list."""
    if SAFETENSORS_INDEX in available:
        weight_map = read_index().get("weight_map")
        if not isinstance(weight_map, dict):
            raise CorruptWeightsError(f"{where}: {SAFETENSORS_INDEX} has no weight_map")
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

    def __init__(self, folder: str | os.PathLike, *, allow_pickle: bool = False) -> None:
        self.folder = Path(folder)
        self.name = str(folder)
        if not self.folder.is_dir():
            raise ModelNotFoundError(f"folder '{folder}' does not exist")
        config_path = self.folder / "config.json"
        if not config_path.is_file():
            raise NotAModelError(
                f"'{folder}' has no config.json: point qkmonitor at a transformers model folder"
            )
        self.config = load_config(_read_json(config_path, str(config_path)), self.name)
        available = sorted(p.name for p in self.folder.iterdir() if p.is_file())
        index = self.folder / SAFETENSORS_INDEX
        fmt, files = _weight_files(
            available, lambda: _read_json(index, str(index)), f"'{folder}'", allow_pickle
        )
        missing = [f for f in files if not (self.folder / f).is_file()]
        if missing:
            raise CorruptWeightsError(
                f"'{folder}': shard {missing[0]} named by the index is missing"
            )
        if fmt == "pickle":
            super().__init__([], _load_pickles([self.folder / f for f in files]))
        else:
            super().__init__(files)

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
                count = handle.readinto(view[done:])
                if not count:
                    raise CorruptWeightsError(f"{file} is truncated; re-download it")
                done += count
        return buffer


def _read_json(path: Path, where: str) -> dict:
    try:
        values = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise NotAModelError(f"{where} is not valid JSON ({error})") from None
    if not isinstance(values, dict):
        raise NotAModelError(f"{where} is not a JSON object")
    return values


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
    """A Hub repo at one commit: config, safetensors headers, then Q/K byte ranges only."""

    kind = "hub"

    def __init__(
        self,
        repo_id: str,
        *,
        revision: str | None = None,
        token: str | bool | None = None,
        allow_pickle: bool = False,
    ) -> None:
        from huggingface_hub import HfApi

        self.name, self.revision, self._token = repo_id, revision, token
        self._api = HfApi(token=token)
        info = _hub_call(
            lambda: self._api.model_info(repo_id, revision=revision), repo_id, revision
        )
        self.sha = info.sha
        available = [s.rfilename for s in info.siblings or []]
        if "config.json" not in available:
            raise NotAModelError(
                f"Hub repo '{repo_id}' has no config.json; is it a transformers model?"
            )
        self.config = load_config(self._download_json("config.json"), f"Hub repo '{repo_id}'")
        fmt, files = _weight_files(
            available,
            lambda: self._download_json(SAFETENSORS_INDEX),
            f"Hub repo '{repo_id}'",
            allow_pickle,
        )
        if fmt == "pickle":
            super().__init__([], _load_pickles([Path(self._download(f)) for f in files]))
        else:
            super().__init__(files)

    def _download(self, filename: str) -> str:
        from huggingface_hub import hf_hub_download

        return _hub_call(
            lambda: hf_hub_download(self.name, filename, revision=self.sha, token=self._token),
            self.name,
            self.revision,
        )

    def _download_json(self, filename: str) -> dict:
        return _read_json(Path(self._download(filename)), f"{self.name}/{filename}")

    def _url(self, file: str) -> str:
        from huggingface_hub import hf_hub_url

        return hf_hub_url(self.name, file, revision=self.sha)

    def _get(self, file: str, byte_range: str):
        from huggingface_hub.utils import build_hf_headers, hf_raise_for_status, http_backoff

        def call():
            headers = {"range": f"bytes={byte_range}", **build_hf_headers(token=self._token)}
            response = http_backoff("GET", self._url(file), headers=headers)
            hf_raise_for_status(response)
            return response

        return _hub_call(call, self.name, self.revision)

    def _size_and_prefix(self, file: str) -> tuple[int, bytes]:
        # 8 bytes give the header length; the header itself is then fetched exactly, so an
        # audit transfers headers and Q/K tensors and nothing else.
        response = self._get(file, "0-7")
        content_range = response.headers.get("content-range", "")
        if response.status_code != 206 or "/" not in content_range:
            raise QKMonitorError(
                f"the Hub at {self._url(file)} ignored an HTTP Range request; qkmonitor reads "
                "only Q/K tensors and needs Range support"
            )
        return int(content_range.rsplit("/", 1)[1]), response.content

    def _read_range(self, file: str, start: int, end: int) -> bytearray:
        if end <= start:
            return bytearray()
        data = bytearray(self._get(file, f"{start}-{end - 1}").content)  # writable for torch
        if len(data) != end - start:
            raise CorruptWeightsError(f"{self.name}/{file}: short read; the file may be truncated")
        return data


def _hub_call(call: Callable, repo_id: str, revision: str | None):
    """Run a huggingface_hub call, turning its exceptions into one-line qkmonitor errors."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return call()
    except GatedRepoError:
        raise AccessDeniedError(
            f"'{repo_id}' is gated: accept its conditions on the Hub and set HF_TOKEN to a token "
            "of that account"
        ) from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(
            f"Hub repo '{repo_id}' not found (or private: set HF_TOKEN to a token with access)"
        ) from None
    except RevisionNotFoundError:
        raise ModelNotFoundError(
            f"revision '{revision}' not found in '{repo_id}'; use a branch, tag or commit sha"
        ) from None
    except EntryNotFoundError as error:
        raise NotAModelError(
            f"'{repo_id}': a file is missing ({error.args[0].splitlines()[0]})"
        ) from None
    except HFValidationError:
        raise ModelNotFoundError(
            f"'{repo_id}' is neither a local folder nor a valid Hub repo id (org/name)"
        ) from None
    except OfflineModeIsEnabled:
        raise QKMonitorError(f"cannot fetch '{repo_id}': HF_HUB_OFFLINE is set") from None
    except HfHubHTTPError as error:
        raise QKMonitorError(
            f"the Hub refused a request for '{repo_id}': {error.args[0].splitlines()[0]}"
        ) from None
    except OSError as error:  # httpx connection errors derive from it in huggingface_hub 2
        raise QKMonitorError(f"cannot reach the Hub for '{repo_id}': {error}") from None


class ModelSource(WeightSource):
    """A model in memory (PEFT-wrapped included): the effective weights its forward uses."""

    kind = "model"

    def __init__(self, model: torch.nn.Module) -> None:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.config = getattr(base, "config", None)
        if self.config is None:
            raise NotAModelError(
                f"{type(model).__name__} has no .config; pass a transformers model"
            )
        self.name = type(base).__name__
        self._weights = dict(live_weights(model))

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(get().shape) for name, get in self._weights.items()}

    def dtypes(self) -> dict[str, str]:
        return {name: _DTYPE_NAMES.get(get().dtype, "?") for name, get in self._weights.items()}

    def byte_size(self, names: Iterable[str]) -> int:
        return sum(self._weights[name]().nbytes for name in names)

    def read(self, names: Iterable[str]) -> dict[str, Tensor]:
        with torch.no_grad():
            return {name: self._weights[name]().detach() for name in names}


def live_weights(model: torch.nn.Module) -> Iterator[tuple[str, Callable[[], Tensor]]]:
    """(state-dict style name, getter of the effective weight) for every weighted module.

    A PEFT tuner layer (LoRA on q/k, ...) is reported under its own name with the weight its
    forward uses, unless merged or disabled; its inner base_layer and adapter modules are
    skipped. Plain LoRA is base + sum of active adapters' scaled B A, with autograd kept so the
    regularizer can use it; other tuners (DoRA, LoHa, LoKr, IA3, OFT, VeRA, ...) are merged by
    PEFT on a copy of the layer, values only.
    """
    skipped: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(s) for s in skipped):
            continue
        if hasattr(module, "base_layer") and hasattr(module, "active_adapters"):
            skipped.append(name + ".")
            yield name + ".weight", _adapted_weight(module)
        elif isinstance(getattr(module, "weight", None), Tensor):
            yield name + ".weight", (lambda m=module: m.weight)


def _adapted_weight(module: torch.nn.Module) -> Callable[[], Tensor]:
    def effective() -> Tensor:
        weight = module.get_base_layer().weight
        if getattr(module, "merged", False) or getattr(module, "disable_adapters", False):
            return weight
        adapters = [
            adapter
            for adapter in module.active_adapters
            if any(adapter in getattr(module, n, {}) for n in module.adapter_layer_names)
        ]
        variants = getattr(module, "lora_variant", {})
        if all(a in getattr(module, "lora_A", {}) and a not in variants for a in adapters):
            for adapter in adapters:  # plain LoRA: the delta is additive, keep autograd
                weight = weight + module.get_delta_weight(adapter).to(weight.dtype)
            return weight
        # DoRA rescales, IA3 and OFT multiply, ...: let PEFT merge a copy
        merged = copy.deepcopy(module)
        merged.merge(adapter_names=adapters)
        return merged.get_base_layer().weight.detach()

    return effective


def open_source(
    target: str | os.PathLike | torch.nn.Module,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    allow_pickle: bool = False,
) -> WeightSource:
    """The right source for a model, a local folder, or a Hub repo id."""
    if isinstance(target, torch.nn.Module):
        return ModelSource(target)
    text = os.fspath(target)
    if os.path.isdir(text):
        if revision:
            raise QKMonitorError(f"--revision applies to Hub repos, not to the folder '{text}'")
        return LocalSource(text, allow_pickle=allow_pickle)
    if os.path.exists(text):
        raise NotAModelError(f"'{text}' is a file; pass a model folder or a Hub repo id")
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or text.endswith("/"):
        raise ModelNotFoundError(f"folder '{text}' does not exist")
    return HubSource(text, revision=revision, token=token, allow_pickle=allow_pickle)
