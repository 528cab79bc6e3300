"""Where weights come from: a local folder, a Hub repo, or a model in memory. `open_source`
picks the source; each kind lives in a module of its own:

- ``weights/safetensors_io.py``: the format (dtypes, header parsing with caps, tensor decoding);
- ``weights/checkpoint.py``: `WeightSource`, row selections, config.json, the choice of weight
  files, and the byte-range reads every file source shares;
- ``weights/local_source.py`` (`LocalSource`), ``weights/hub_source.py`` (`HubSource`),
  ``weights/model_source.py`` (`ModelSource`).

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

import os

import torch

from qkmonitor.errors import QKMonitorError
from qkmonitor.hub.client import hub_commit
from qkmonitor.untrusted_json import parse_json
from qkmonitor.weights.checkpoint import RowRanges, WeightSource, load_config, take_rows
from qkmonitor.weights.hub_source import HubSource
from qkmonitor.weights.local_source import LocalSource
from qkmonitor.weights.model_source import ModelSource
from qkmonitor.weights.safetensors_io import TensorSpec, dtype_name
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
