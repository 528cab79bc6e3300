"""qkmonitor: is your transformer's attention healthy?

Audit the QK-eigenspectrum of every attention head from a model's weights, monitor it and the
attention entropy during fine-tuning, and publish the results. Definitions: docs in README.md.
"""

from __future__ import annotations

__version__ = "0.1.0"

from qkmonitor.audit import audit
from qkmonitor.errors import QKMonitorError
from qkmonitor.result import AuditResult, HeadResult, LayerSummary, ModelInfo

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


def __getattr__(name: str):
    # the training API imports transformers' models and Trainer (seconds): only when asked for
    if name == "QKMonitorCallback":
        from qkmonitor.training.callback import QKMonitorCallback

        return QKMonitorCallback
    if name == "QKMonitor":
        from qkmonitor.training.monitor import QKMonitor

        return QKMonitor
    raise AttributeError(f"module 'qkmonitor' has no attribute {name!r}")
