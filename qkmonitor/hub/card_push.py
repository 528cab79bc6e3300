"""Publishing an audit in a Hub repo's card (`push_card`): read at one commit, edited, and
committed on top of exactly that commit, or proposed in a pull request (found again, not opened
twice); every request through `qkmonitor.hub.client`."""

from __future__ import annotations

from qkmonitor import __version__
from qkmonitor.errors import CardConflictError, CardFormatError, ConflictError
from qkmonitor.hub import client
from qkmonitor.hub.card_edit import BEGIN_MARKER, END_MARKER
from qkmonitor.hub.card_local import CARD_FILE, CardUpdate, decode_card, details_text, edit_card
from qkmonitor.hub.card_render import DETAILS_FILE, METADATA_KEY, TrainingTrajectory
from qkmonitor.result import AuditResult

__all__ = ["MAX_CARD_BYTES", "card_token", "push_card"]

#: the largest card read from the Hub (real cards are well under 1 MB)
MAX_CARD_BYTES = 16 * 2**20


_DESCRIPTION = (
    f"Written by qkmonitor {__version__}: only the section between `{BEGIN_MARKER}` and "
    f"`{END_MARKER}` and the `{METADATA_KEY}` metadata key change."
)
_IF_SENT = "run again, which finds the card or pull request if it landed and writes nothing twice"
_DOING = "updating a model card on the Hub"


def card_token(token: str | bool | None) -> str:
    """The token to push a card with (HF_TOKEN / the saved login when None); AccessDeniedError
    when there is none."""
    return client.write_token(token, _DOING)


def _decode_card(data: bytearray | None, repo_id: str) -> str | None:
    if data is not None and len(data) > MAX_CARD_BYTES:
        raise CardFormatError(
            f"{repo_id}/{CARD_FILE} is larger than {MAX_CARD_BYTES // 2**20} MB; qkmonitor "
            "edits cards up to that size"
        )
    return None if data is None else decode_card(bytes(data), f"{repo_id}/{CARD_FILE}")


def _open_pull_request(hub: client.Publisher, title: str, text: str) -> str | None:
    """The url of an open pull request titled ``title`` whose README.md is exactly ``text``."""
    for pull_request in hub.open_pull_requests():
        if pull_request.title != title:
            continue
        card = hub.read_file(CARD_FILE, pull_request.git_reference, MAX_CARD_BYTES)
        if _decode_card(card, hub.repo_id) == text:
            return pull_request.url
    return None


def push_card(
    repo_id: str,
    result: AuditResult,
    training: TrainingTrajectory | None = None,
    *,
    parent_commit: str | None = None,
    revision: str | None = None,
    create_pr: bool = True,
    token: str | bool | None = None,
    commit_message: str = "Update the qkmonitor section of the model card",
) -> CardUpdate:
    """Commit qkmonitor's card section and key (and qkmonitor_audit.json, the per-layer numbers, in
    the same commit) to a Hub repo, on top of one exact commit.

    The card is read at ``parent_commit`` and the commit is made with that parent, so an edit
    that lands in between is never overwritten: the Hub refuses ours and CardConflictError
    says so. Nothing is committed when the card is already up to date, nor, with
    ``create_pr=True``, when an open pull request titled ``commit_message`` already holds
    exactly this card (say, qkmonitor's own from an earlier run, not merged yet): the result
    then has ``changed=False`` and that pull request's ``pr_url``. An open pull request with
    another card (an audit of an older commit) does not stop a new one.

    Args:
        repo_id: the Hub repo (``"org/name"``).
        result: the audit to publish; pass the audited commit as ``parent_commit``.
        training: the training run's qk/ metrics, if any.
        parent_commit: the commit to edit the card of (default: the head of ``revision``).
        revision: the branch to commit to, or that the pull request targets (default: main).
        create_pr: open a pull request (default) instead of committing to the branch.
        token: a token with write access (default: HF_TOKEN / the saved login).
        commit_message: the commit's (or pull request's) title.

    Raises:
        CardConflictError: the branch moved past ``parent_commit`` (direct commits only; a pull
            request is based on ``parent_commit`` and never conflicts at creation).
        qkmonitor.errors.AccessDeniedError: no token, an invalid token, or no write access.
        qkmonitor.errors.MetadataRejectedError: the Hub refused the card's metadata (fields
            outside qkmonitor's key that no longer fit the Hub's schema); nothing was written.
        qkmonitor.errors.NetworkError: a Hub request stalled for longer than
            QKMONITOR_HUB_TIMEOUT (each wait), or the connection failed; named in one line.
        qkmonitor.errors.QKMonitorError: other Hub errors, explained in one line.
    """
    token = card_token(token)
    with client.publishing(
        repo_id,
        token=token,
        doing=f"updating the card of '{repo_id}'",
        if_sent=_IF_SENT,
        revision=revision,
        create_pr=create_pr,
    ) as hub:
        if parent_commit is None:
            parent_commit = hub.head()
        old = _decode_card(hub.read_file(CARD_FILE, parent_commit, MAX_CARD_BYTES), repo_id)
        new = edit_card(old, result, training, title=repo_id.split("/")[-1])
        if new == old:
            return CardUpdate(changed=False, text=new)
        if create_pr:
            pending = _open_pull_request(hub, commit_message, new)
            if pending is not None:
                return CardUpdate(changed=False, text=new, pr_url=pending)
        try:
            files = {
                CARD_FILE: new.encode("utf-8"),
                DETAILS_FILE: details_text(result, training).encode("utf-8"),
            }
            made = hub.commit(
                files,
                message=commit_message,
                description=_DESCRIPTION,
                parent_commit=parent_commit,
            )
        except ConflictError as error:
            raise CardConflictError(
                f"'{repo_id}' changed on the Hub while qkmonitor was updating its card; "
                "nothing was written",
                hint=error.hint,
                repo_id=error.repo_id,
                revision=error.revision,
            ) from None
        return CardUpdate(changed=True, text=new, commit_url=made.commit_url, pr_url=made.pr_url)
