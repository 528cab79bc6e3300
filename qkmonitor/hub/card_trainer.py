"""The Trainer's push_to_hub with qkmonitor's card section (`attach_to_trainer`)."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from qkmonitor.errors import QKMonitorError
from qkmonitor.hub.card_local import CARD_FILE, CardUpdate
from qkmonitor.hub.card_push import push_card
from qkmonitor.hub.card_render import TrainingTrajectory
from qkmonitor.result import AuditResult, write_atomically

__all__ = ["attach_to_trainer"]

logger = logging.getLogger("qkmonitor")


def attach_to_trainer(trainer: Any) -> None:
    """Make ``trainer.push_to_hub()`` publish qkmonitor's card section after its own upload.

    The Trainer regenerates README.md from its log history on every push_to_hub (after
    ``on_push_begin``, so nothing a callback writes before survives) and uploads it with the
    model. No callback event follows the upload, so this wraps the instance's ``push_to_hub``:
    after the Trainer's commit C, the card of C (the Trainer's README, whatever it holds) gets
    qkmonitor's section and key in one more commit whose parent is C, to the same branch with
    the same token. Nothing the Trainer wrote is lost, and a commit by anyone else in between
    makes the Hub refuse ours (reported, never overwritten). The section holds the audit of the
    model the Trainer just saved (in memory, LoRA merged), recorded as commit C, and the
    trajectory of the qk/ metrics in ``trainer.state.log_history``. The same text is written to
    the output folder's README.md, so later uploads of that folder keep the section.

    With ``blocking=False`` the returned future completes after the card commit too. A failure
    after the model is pushed is logged as a warning and does not fail push_to_hub.
    Wrapping the public ``push_to_hub`` (not ``create_model_card``, which subclasses such as
    TRL's trainers replace) keeps the Trainer's own card logic and commit untouched. Attaching
    twice is harmless.
    """
    original = trainer.push_to_hub
    if getattr(original, "_qkmonitor_card", False):
        return
    signature = inspect.signature(original)

    @functools.wraps(original)
    def push_to_hub(*args: Any, **kwargs: Any) -> Any:
        pushed = original(*args, **kwargs)
        if pushed is None:  # not the main process: the Trainer pushes from one process only
            return pushed
        from qkmonitor.audit import audit

        call = signature.bind(*args, **kwargs).arguments
        publish = functools.partial(
            _publish_training_card,
            trainer,
            audit(trainer.model),  # now: training may go on while a non-blocking push runs
            TrainingTrajectory.from_log_history(trainer.state.log_history),
            revision=call.get("revision") or trainer.args.hub_revision,
            token=call.get("token") or trainer.args.hub_token,
        )
        if isinstance(pushed, Future):  # blocking=False: follow the upload when it finishes
            return _then(pushed, lambda info: _warn_on_failure(publish, info))
        _warn_on_failure(publish, pushed)
        return pushed

    push_to_hub._qkmonitor_card = True  # type: ignore[attr-defined]
    trainer.push_to_hub = push_to_hub


def _then(pushed: Future, follow: Callable[[Any], None]) -> Future:
    """A future with ``pushed``'s outcome that completes once ``follow`` ran on its result."""
    chained: Future = Future()

    def done(future: Future) -> None:
        if future.exception() is not None:
            chained.set_exception(future.exception())
            return
        follow(future.result())
        chained.set_result(future.result())

    pushed.add_done_callback(done)
    return chained


def _warn_on_failure(publish: Callable[[Any], CardUpdate], pushed: Any) -> None:
    try:
        publish(pushed)
    except QKMonitorError as error:
        logger.warning("qkmonitor: the model was pushed but its card section was not: %s", error)


def _publish_training_card(
    trainer: Any,
    result: AuditResult,
    training: TrainingTrajectory,
    pushed: Any,
    *,
    revision: str | None,
    token: str | None,
) -> CardUpdate:
    """Commit the card section on top of the Trainer's commit ``pushed`` (a CommitInfo)."""
    result = dataclasses.replace(result, model=dataclasses.replace(result.model, sha=pushed.oid))
    update = push_card(
        trainer.hub_model_id,
        result,
        training,
        parent_commit=pushed.oid,
        revision=revision,
        create_pr=False,
        token=token,
        commit_message="Add the qkmonitor section to the model card",
    )
    local = Path(trainer.args.output_dir) / CARD_FILE
    if local.is_file():
        write_atomically(local, update.text)
    return update
