"""Every use of transformers' private names, in one module, behind one version guard.

qkmonitor measures attention where transformers computes it and builds models on the meta
device; for that it touches a few names transformers does not promise to keep:

- ``AttentionInterface._global_mapping`` (the shared table of attention functions, where the
  capture swaps in its measuring function) and an interface's ``_local_mapping``;
- ``PretrainedConfig._attn_implementation`` (the implementation a model really runs);
- BLOOM's ``_reshape`` and Falcon's ``_split_heads`` (their fused q/k/v split);
- ``PreTrainedModel._from_config`` (a model from a config, no weights loaded);
- ``transformers.integrations.deepspeed._hf_deepspeed_config_weak_ref`` (whether transformers
  routes model construction through DeepSpeed ZeRO-3's ``zero.Init``).

Each is reached only through a function here. If a transformers release moves one, that function
raises ``TransformersInternalsError`` with one line naming the name, the installed version and
the versions qkmonitor was tested with: the failure is here, never an AttributeError deep inside
a training step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any

import transformers
from packaging.version import Version

from qkmonitor.errors import QKMonitorError

__all__ = [
    "TESTED",
    "TransformersInternalsError",
    "attention_functions",
    "attn_implementation",
    "bloom_split",
    "decode_special_floats",
    "falcon_split",
    "from_config",
    "installed_version",
    "local_attention_functions",
    "zero3_construction_off",
]

#: the transformers versions qkmonitor's use of these names was tested with: [first, last major)
TESTED = ((5, 0), (6, 0))


class TransformersInternalsError(QKMonitorError):
    """A transformers-private name qkmonitor relies on is gone (a newer or older release)."""


def installed_version() -> str:
    """The installed transformers' version."""
    return transformers.__version__


def _gone(name: str) -> TransformersInternalsError:
    installed = installed_version()
    (lo_major, _), (hi_major, _) = TESTED
    tested = f"transformers>={lo_major},<{hi_major}"
    inside = TESTED[0] <= Version(installed).release[:2] < TESTED[1]
    where = "is within" if inside else "is outside"
    return TransformersInternalsError(
        f"transformers {installed} has no {name}, which qkmonitor relies on (transformers "
        f"{installed} {where} the tested range {tested}); install {tested}"
    )


def _get(owner: Any, attribute: str, name: str) -> Any:
    try:
        return getattr(owner, attribute)
    except AttributeError:
        raise _gone(name) from None


def attention_functions() -> MutableMapping[str, Callable[..., Any]]:
    """The shared table of attention functions by implementation name (sdpa, flash, ...)."""
    name = "AttentionInterface._global_mapping"
    table = _get(transformers.AttentionInterface, "_global_mapping", name)
    if not isinstance(table, MutableMapping):
        raise _gone(f"{name} as a mutable mapping")
    return table


def local_attention_functions(interface: Any) -> MutableMapping[str, Callable[..., Any]]:
    """An AttentionInterface instance's own overrides of the shared table."""
    return _get(interface, "_local_mapping", "AttentionInterface._local_mapping")


def attn_implementation(config: Any) -> str | None:
    """The attention implementation a model built from ``config`` runs (eager, sdpa, ...)."""
    return _get(config, "_attn_implementation", "PretrainedConfig._attn_implementation")


def bloom_split(module: Any, fused: Any) -> tuple[Any, Any, Any]:
    """BLOOM: (query, key, value) from the fused query_key_value output, as the module splits."""
    return _get(module, "_reshape", "BloomAttention._reshape")(fused)


def falcon_split(module: Any, fused: Any) -> tuple[Any, Any, Any]:
    """Falcon: (query, key, value) from the fused query_key_value output, as the module splits."""
    return _get(module, "_split_heads", "FalconAttention._split_heads")(fused)


def decode_special_floats(config_class: type, values: dict[str, Any]) -> dict[str, Any]:
    """config.json's values with transformers' encoding of inf/nan (``{"__float__":
    "Infinity"}``, written by nemotron_h, bamba, ...) decoded, as its own loading does."""
    name = "PretrainedConfig._decode_special_floats"
    return _get(config_class, "_decode_special_floats", name)(values)


def from_config(cls: type, config: Any, **kwargs: Any) -> Any:
    """``cls`` built from ``config`` without loading weights (PreTrainedModel._from_config)."""
    return _get(cls, "_from_config", "PreTrainedModel._from_config")(config, **kwargs)


@contextlib.contextmanager
def zero3_construction_off() -> Iterator[None]:
    """Inside: transformers does not see DeepSpeed ZeRO-3 (an HfDeepSpeedConfig made by the
    Trainer or accelerate), so building a model does not go through ``zero.Init``, which would
    partition a meta-device skeleton and fail. Restored on exit."""
    from transformers.integrations import deepspeed as hf_deepspeed

    name = "transformers.integrations.deepspeed._hf_deepspeed_config_weak_ref"
    reference = _get(hf_deepspeed, "_hf_deepspeed_config_weak_ref", name)
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = reference
