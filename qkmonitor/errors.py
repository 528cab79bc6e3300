"""Errors qkmonitor raises for bad input.

Every error carries one line that names the problem and what to do about it; front ends
(CLI, Space, callback) print ``str(error)`` as is, never a traceback.
"""

from __future__ import annotations


class QKMonitorError(Exception):
    """Base class: a problem with the user's input or environment, explained in one line."""


class ModelNotFoundError(QKMonitorError):
    """The repo, revision, folder or file does not exist (or is not visible to this token)."""


class AccessDeniedError(QKMonitorError):
    """The repo is gated or private and the token (HF_TOKEN) does not grant access."""


class NotAModelError(QKMonitorError):
    """The folder or repo has no config.json, or no weights qkmonitor can read."""


class UnsupportedModelError(QKMonitorError):
    """The architecture has no attention, or a layout qkmonitor does not know."""


class UnsafeWeightsError(QKMonitorError):
    """Only pickle weights (.bin/.pt) exist and the caller did not allow reading them."""


class CorruptWeightsError(QKMonitorError):
    """A safetensors file is malformed or truncated, or disagrees with the config.

    tensor: the checkpoint tensor at fault, where there is one.
    """

    def __init__(self, message: str, *, tensor: str | None = None) -> None:
        super().__init__(message)
        self.tensor = tensor


class CardConflictError(QKMonitorError):
    """The card changed on the Hub between reading it and committing; nothing was written."""


class CardFormatError(QKMonitorError):
    """The existing card cannot be edited safely (invalid YAML header, unmatched markers)."""


class NetworkError(QKMonitorError):
    """The Hub could not be reached, stopped answering within the timeout (QKMONITOR_HUB_TIMEOUT),
    rate-limited for longer than qkmonitor waits, or sent bytes other than those asked for."""


class TimeLimitError(QKMonitorError):
    """A caller's deadline (``open_source(..., deadline=)``, ``source.deadline``) passed."""
