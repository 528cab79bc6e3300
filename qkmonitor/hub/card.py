"""Model cards: publish a QK audit (and a training run's qk/ metrics) in a model's README.md.

What qkmonitor owns in a card, and nothing else:

- a Markdown section between ``<!-- qkmonitor:begin -->`` and ``<!-- qkmonitor:end -->``: what
  was measured, a per-layer table, the most and least concentrated heads, the qkmonitor version
  and the commit audited, a short explanation of the metrics, and for training runs the first,
  last and minimum value of every logged qk/ metric;
- the ``qkmonitor`` key of the YAML header, the same numbers in a structured form
  (``ModelCard.load(repo).data.qkmonitor``).

Updates are surgical (qkmonitor.hub.card_edit): every other byte of the card is kept, and the same
inputs give the same card, so running again changes nothing. Hub updates read the card at one
commit and commit on top of exactly that commit (``parent_commit``): a concurrent edit makes the
Hub refuse ours (CardConflictError), never overwritten. Pull requests are the default; running
again while qkmonitor's pull request is still open finds it instead of opening the same one twice.

Usage::

    from qkmonitor.hub.card import update_card
    update_card("org/model")                    # audit, then open a PR with the card section
    update_card("org/model", create_pr=False)   # commit to the branch
    update_card("./checkpoint")                 # edit ./checkpoint/README.md

    QKMonitorCallback(model_card=True)           # trainer.push_to_hub() publishes the section

Modules: ``card_render`` (section and metadata from an audit), ``card_edit`` (surgical splices
of a card's text), ``card_local`` (a card's text and a local folder's README.md), ``card_push``
(the Hub), ``card_trainer`` (Trainer.push_to_hub); this module is the entry point.
"""

from __future__ import annotations

import os

from qkmonitor.errors import CardConflictError
from qkmonitor.hub.card_local import (
    CARD_FILE,
    CardUpdate,
    edit_card,
    local_card_path,
    update_local_card,
)
from qkmonitor.hub.card_push import card_token, push_card
from qkmonitor.hub.card_render import (
    DETAILS_FILE,
    METADATA_KEY,
    MetricSummary,
    TrainingTrajectory,
    card_details,
    card_metadata,
    render_section,
)
from qkmonitor.hub.card_trainer import attach_to_trainer
from qkmonitor.weights.targets import target_kind

__all__ = [
    "CARD_FILE",
    "DETAILS_FILE",
    "METADATA_KEY",
    "CardConflictError",
    "CardUpdate",
    "MetricSummary",
    "TrainingTrajectory",
    "attach_to_trainer",
    "card_details",
    "card_metadata",
    "edit_card",
    "local_card_path",
    "push_card",
    "render_section",
    "update_card",
    "update_local_card",
]


def update_card(
    target: str | os.PathLike,
    *,
    revision: str | None = None,
    create_pr: bool = True,
    token: str | bool | None = None,
    allow_pickle: bool = False,
    progress: bool = False,
) -> CardUpdate:
    """Audit a Hub repo or a local model folder and publish the result in its card.

    A folder: its README.md is updated in place. A Hub repo: the audited commit's card is
    updated in a pull request (default) or a direct commit (``create_pr=False``), see push_card;
    the token is checked before the audit starts.

    Args:
        target: a Hub repo id or a local model folder.
        revision: branch of a Hub repo to audit and commit to (default: main).
        create_pr: open a pull request instead of committing to the branch.
        token: a token with write access (default: HF_TOKEN / the saved login).
        allow_pickle: read .bin/.pt weights when no safetensors exist (see qkmonitor.audit).
        progress: show a progress bar while reading tensors.

    Raises:
        qkmonitor.errors.QKMonitorError: a one-line explanation (see audit and push_card).
    """
    from qkmonitor.audit import audit

    if target_kind(os.fspath(target)) == "folder":  # a missing folder is named before the token
        local_card_path(target)
        result = audit(target, revision=revision, allow_pickle=allow_pickle, progress=progress)
        return update_local_card(target, result)
    token = card_token(token)
    result = audit(
        target, revision=revision, token=token, allow_pickle=allow_pickle, progress=progress
    )
    return push_card(
        os.fspath(target),
        result,
        parent_commit=result.model.sha,
        revision=revision,
        create_pr=create_pr,
        token=token,
    )
