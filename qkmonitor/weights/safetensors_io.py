"""The safetensors format: dtypes, the header (parsed with caps: offsets and dimensions JSON
integers in [0, 2^63), the header at most the format's 100 MB) and tensors decoded from bytes."""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from qkmonitor.errors import CorruptWeightsError
from qkmonitor.untrusted_json import parse_json

__all__ = [
    "DTYPES",
    "DTYPE_NAMES",
    "TensorSpec",
    "dtype_name",
    "parse_safetensors_header",
    "tensor_from_bytes",
]

_MAX_HEADER = 100 * 2**20  # the safetensors format caps headers at 100 MB
_MAX_INT = 2**63 - 1  # safetensors offsets and dims are u64 (and torch sizes int64)

DTYPES = {
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
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype ("BF16", ...), "?" for others."""
    return DTYPE_NAMES.get(dtype, "?")


@dataclass(frozen=True)
class TensorSpec:
    """Where one tensor lives: file, absolute byte range, dtype and shape."""

    file: str
    start: int
    end: int
    dtype: str
    shape: tuple[int, ...]


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
    dtype = DTYPES.get(spec.dtype)
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
