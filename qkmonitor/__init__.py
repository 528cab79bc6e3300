"""qkmonitor: is your transformer's attention healthy?

Audit the QK-eigenspectrum of every attention head from a model's weights, monitor it and the
attention entropy during fine-tuning, and publish the results. Definitions: docs/metrics.md.
"""

from __future__ import annotations

__version__ = "0.1.0"

import importlib
import sys
import types

from qkmonitor.errors import QKMonitorError

__all__ = [
    "AuditResult",
    "HeadResult",
    "LayerSummary",
    "ModelInfo",
    "QKMonitor",
    "QKMonitorCallback",
    "QKMonitorError",
    "__version__",
    "audit",
]

# Imported on first use: torch and transformers take seconds to import, and the command line
# must be inside its own Ctrl-C handling (exit 130, one line) before they start.
_LAZY = {
    "audit": "qkmonitor.audit",
    "AuditResult": "qkmonitor.result",
    "HeadResult": "qkmonitor.result",
    "LayerSummary": "qkmonitor.result",
    "ModelInfo": "qkmonitor.result",
    "QKMonitor": "qkmonitor.training.monitor",
    "QKMonitorCallback": "qkmonitor.training.callback",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'qkmonitor' has no attribute {name!r}")


class _Package(types.ModuleType):
    """``qkmonitor.audit`` stays the function when the submodule of that name is imported
    (the import system then sets the package attribute to the module)."""

    def __setattr__(self, name: str, value: object) -> None:
        if name == "audit" and isinstance(value, types.ModuleType):
            value = value.audit
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
