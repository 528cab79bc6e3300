"""Errors qkmonitor raises for bad input.

Every error carries one line that names the problem and what to do about it; front ends
(CLI, Space, callback) print ``str(error)`` as is, never a traceback. A front end that words its
own advice (the Space has no HF_TOKEN to set, nor a ``--direct`` flag) reads the fields instead of
the text: ``problem`` (the line without its advice), ``hint`` (the advice, or None),
``repo_id`` and ``revision`` (the Hub repo and revision concerned, where there is one), and the
subclasses' own fields below; ``with_hint`` gives the same error with other advice.
"""

from __future__ import annotations

import copy
from typing import Self


class QKMonitorError(Exception):
    """Base class: a problem with the user's input or environment, explained in one line.

    ``str(error)`` is ``problem`` followed by ``; hint`` when there is a hint.
    """

    def __init__(
        self,
        problem: str,
        *,
        hint: str | None = None,
        repo_id: str | None = None,
        revision: str | None = None,
    ) -> None:
        super().__init__(f"{problem}; {hint}" if hint else problem)
        self.problem, self.hint = problem, hint
        self.repo_id, self.revision = repo_id, revision

    def with_hint(self, hint: str | None) -> Self:
        """The same error (class and fields) with ``hint`` as its advice."""
        changed = copy.copy(self)
        changed.hint = hint
        changed.args = (f"{self.problem}; {hint}" if hint else self.problem,)
        return changed


class ModelNotFoundError(QKMonitorError):
    """The repo, revision, folder or file does not exist (or is not visible to this token).

    missing: what was not found: "repo" (may also be a private repo the token cannot see),
    "revision", "branch" (a commit needs a branch), "id" (not a valid repo id), or "folder".
    """

    def __init__(self, problem: str, *, missing: str | None = None, **fields: str | None) -> None:
        super().__init__(problem, **fields)
        self.missing = missing


class AccessDeniedError(QKMonitorError):
    """The repo is gated or private and the token (HF_TOKEN) does not grant access.

    refused: what the Hub (or the lack of a token) refused: "read" (a gated or private repo),
    "write" (no token, or one the Hub rejects), "push" (a direct commit to a branch; a pull
    request may still be allowed) or "pull_request".
    """

    def __init__(self, problem: str, *, refused: str | None = None, **fields: str | None) -> None:
        super().__init__(problem, **fields)
        self.refused = refused


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

    def __init__(self, problem: str, *, tensor: str | None = None, **fields: str | None) -> None:
        super().__init__(problem, **fields)
        self.tensor = tensor


class ConflictError(QKMonitorError):
    """The repo changed on the Hub between reading it and committing; nothing was written."""


class CardConflictError(ConflictError):
    """The card changed on the Hub between reading it and committing; nothing was written."""


class CardFormatError(QKMonitorError):
    """The existing card cannot be edited safely (invalid YAML header, unmatched markers)."""


class MetadataRejectedError(QKMonitorError, ValueError):
    """The Hub refused a README's metadata (its YAML header fails the Hub's schema check).

    A ValueError too, as huggingface_hub's own refusal is. reasons: the Hub's own words, one per
    refused field.
    """

    def __init__(
        self, problem: str, *, reasons: tuple[str, ...] = (), **fields: str | None
    ) -> None:
        super().__init__(problem, **fields)
        self.reasons = reasons


class NetworkError(QKMonitorError):
    """The Hub could not be reached, stopped answering within the timeout (QKMONITOR_HUB_TIMEOUT),
    rate-limited for longer than qkmonitor waits, or sent bytes other than those asked for."""


class TimeLimitError(QKMonitorError):
    """A caller's deadline (``open_source(..., deadline=)``, ``source.deadline``) passed."""
