"""Editing a card's text with an audit (`edit_card`: only qkmonitor's section and key change),
and a local model folder's README.md (`update_local_card`)."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

from qkmonitor.errors import CardFormatError, QKMonitorError
from qkmonitor.hub.card_edit import get_metadata_key, set_metadata_key, set_section
from qkmonitor.hub.card_render import (
    DETAILS_FILE,
    METADATA_KEY,
    TrainingTrajectory,
    card_details,
    card_metadata,
    render_section,
)
from qkmonitor.result import AuditResult, write_atomically

__all__ = [
    "CARD_FILE",
    "CardUpdate",
    "details_text",
    "edit_card",
    "local_card_path",
    "update_local_card",
]

CARD_FILE = "README.md"


@dataclass(frozen=True)
class CardUpdate:
    """What an update did."""

    #: False when nothing was written: the card already held this section and key, or an open
    #: pull request already proposes exactly this card (its url is pr_url)
    changed: bool
    #: the card's full text after the update
    text: str
    #: the README.md written (local folders)
    path: Path | None = None
    #: the commit made (Hub), and the pull request it opened or found open (create_pr=True)
    commit_url: str | None = None
    pr_url: str | None = None


def _template(title: str) -> str:
    return (
        f"# {title}\n\n"
        "This model card was started by qkmonitor. Describe the model, its training data and "
        "its intended uses here; qkmonitor only maintains the section below and the `qkmonitor` "
        "metadata key.\n"
    )


def _edit(text: str, result: AuditResult, training: TrainingTrajectory | None) -> str:
    text = set_metadata_key(text, METADATA_KEY, card_metadata(result, training))
    return set_section(text, render_section(result, training))


def _recorded_commit(text: str) -> str | None:
    recorded = get_metadata_key(text, METADATA_KEY)
    commit = recorded.get("commit") if isinstance(recorded, dict) else None
    return commit if isinstance(commit, str) else None


def edit_card(
    text: str | None,
    result: AuditResult,
    training: TrainingTrajectory | None = None,
    *,
    title: str = "Model card",
) -> str:
    """The card ``text`` with qkmonitor's section and YAML key set from ``result``.

    Only the section between the markers and the ``qkmonitor`` key change; every other byte is
    kept. ``text=None`` (no card yet) starts from a short template titled ``title``. When the
    card already records an audit at another commit with exactly these numbers (say, the commit
    before a commit that only changed the card), the card is returned unchanged: the numbers
    hold at both commits, and re-running stays a no-op.

    Raises:
        qkmonitor.errors.CardFormatError: the card's header is invalid YAML, or its
            qkmonitor markers are unmatched.
    """
    if text is None:
        return _edit(_template(title), result, training)
    recorded = _recorded_commit(text)
    if recorded and recorded != result.model.sha:
        earlier = dataclasses.replace(result, model=dataclasses.replace(result.model, sha=recorded))
        if _edit(text, earlier, training) == text:
            return text
    return _edit(text, result, training)


def decode_card(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise QKMonitorError(f"{where} is not UTF-8 text; qkmonitor cannot edit it") from None


def local_card_path(folder: str | os.PathLike) -> Path:
    """``folder/README.md``, checked before any work: refused when it is a symlink to a file
    outside the folder (editing it would change a file that is not this model's card) or
    when it is not a regular file."""
    path = Path(folder) / CARD_FILE
    if path.is_symlink():
        target = Path(os.path.realpath(path))
        if not target.is_relative_to(Path(os.path.realpath(folder))):
            raise CardFormatError(
                f"'{path}' is a symlink to '{target}', outside the folder; qkmonitor edits only "
                "a card inside the model folder: replace the link with a copy of the file"
            )
    if os.path.exists(path) and not path.is_file():
        raise CardFormatError(f"'{path}' is not a regular file; qkmonitor cannot edit it")
    return path


def details_text(result: AuditResult, training: TrainingTrajectory | None = None) -> str:
    """`DETAILS_FILE`'s text: `card_details` as JSON (the same inputs give the same bytes)."""
    return json.dumps(card_details(result, training), indent=1, allow_nan=False) + "\n"


def update_local_card(
    folder: str | os.PathLike,
    result: AuditResult,
    training: TrainingTrajectory | None = None,
) -> CardUpdate:
    """Set qkmonitor's section and key in ``folder/README.md`` (created if missing), and the
    per-layer numbers in ``folder/qkmonitor_audit.json``, atomically.

    A README.md that is a symlink is edited through the link (the file it points to is
    replaced, the link stays) only when it points inside the folder; see local_card_path.
    """
    path = local_card_path(folder)
    old = decode_card(path.read_bytes(), str(path)) if path.is_file() else None
    new = edit_card(old, result, training, title=Path(folder).resolve().name)
    details = Path(folder) / DETAILS_FILE
    numbers = details_text(result, training)
    same_details = details.is_file() and details.read_text(encoding="utf-8") == numbers
    if new == old and same_details:
        return CardUpdate(changed=False, text=new, path=path)
    if new != old:
        write_atomically(path, new)
    if not same_details:
        write_atomically(details, numbers)
    return CardUpdate(changed=True, text=new, path=path)
