"""qkmonitor's card section in every card the Trainer writes (`attach_to_trainer`).

transformers' Trainer writes ``output_dir/README.md`` from scratch in ``create_model_card``
(``push_to_hub`` calls it, then uploads the folder); checkpoint pushes (``hub_strategy``) upload
whatever README.md the folder holds; TRL's trainers call ``create_model_card`` at every save. So
the section is added where the card is written: the instance's ``create_model_card`` is wrapped
(an instance attribute shadows the method for every subclass, TRL's included), and a checkpoint
push that finds no card first has one written. The section then goes up in the Trainer's own
commit, with ``qkmonitor_audit.json`` (the per-layer numbers) beside it; there is no second
commit.
"""

from __future__ import annotations

import functools
import logging
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from qkmonitor.errors import QKMonitorError
from qkmonitor.hub import client
from qkmonitor.hub.card_edit import get_metadata_key, set_metadata_key
from qkmonitor.hub.card_local import CARD_FILE, decode_card, details_text, edit_card
from qkmonitor.hub.card_render import DETAILS_FILE, TrainingTrajectory
from qkmonitor.result import AuditResult, write_atomically

__all__ = ["TAG", "attach_to_trainer"]

logger = logging.getLogger("qkmonitor")

#: the tag qkmonitor adds to the cards it audits, so that audited models can be found
TAG = "qkmonitor"
_REFUSED_HINT = (
    "nothing was pushed: fix those fields (the Trainer takes license, tags, language and "
    "datasets from push_to_hub's arguments and the base model's card), then push again"
)


def attach_to_trainer(trainer: Any) -> None:
    """Make every card ``trainer`` writes carry qkmonitor's section, key and tag.

    - ``trainer.create_model_card`` (called by ``push_to_hub``, by TRL's trainers at every save,
      or by hand before an ``upload_folder``) writes the Trainer's card, then qkmonitor adds its
      section and ``qkmonitor`` metadata key (the audit of the model in memory at this step, LoRA
      merged, and the trajectory of the qk/ metrics in ``trainer.state.log_history``), the
      ``qkmonitor`` tag, and ``qkmonitor_audit.json`` beside it;
    - a checkpoint push (``hub_strategy``) whose folder has no card yet gets the Trainer's card
      written first, so it carries the section too;
    - ``model.add_model_tags(["qkmonitor"])``, so the Trainer passes the tag on as well;
    - ``push_to_hub`` refusing the card's metadata (the Hub validates README.md before the
      upload, so nothing is pushed) raises one line, `MetadataRejectedError` (also a
      ValueError, as huggingface_hub's own is), instead of a multi-line ValueError; with
      ``blocking=False`` the returned future completes with it.

    A failure of qkmonitor's part (say, an architecture it cannot read) is a one-line warning
    and leaves the Trainer's card as it wrote it. Attaching twice is harmless.
    """
    original = trainer.create_model_card
    if getattr(original, "_qkmonitor_card", False):
        return
    audits = _StepAudits(trainer)

    @functools.wraps(original)
    def create_model_card(*args: Any, **kwargs: Any) -> Any:
        written = original(*args, **kwargs)
        if trainer.is_world_process_zero():
            _add_section(trainer, audits)
        return written

    create_model_card._qkmonitor_card = True  # type: ignore[attr-defined]
    trainer.create_model_card = create_model_card
    trainer.push_to_hub = _one_line_refusals(trainer, trainer.push_to_hub)
    add_tags = getattr(trainer.model, "add_model_tags", None)
    if callable(add_tags):
        add_tags([TAG])
    trainer.add_callback(_card_before_push(trainer, audits))


class _StepAudits:
    """The audit of the trainer's model, computed once per training step (every card written at
    one step, the checkpoint's and the final one, shows the same numbers)."""

    def __init__(self, trainer: Any) -> None:
        self._trainer = trainer
        self._step: int | None = None
        self._result: AuditResult | None = None

    def current(self) -> AuditResult:
        from qkmonitor.audit import audit

        step = self._trainer.state.global_step
        if self._result is None or step != self._step:
            self._result, self._step = audit(self._trainer.model), step
        return self._result


def _add_section(trainer: Any, audits: _StepAudits) -> None:
    """Add the section, key and tag to ``output_dir/README.md`` and write the JSON beside it."""
    folder = Path(trainer.args.output_dir)
    path = folder / CARD_FILE
    if not path.is_file():  # the Trainer wrote nothing (another process, or no output folder)
        return
    try:
        result = audits.current()
        training = _trajectory(trainer)
        text = edit_card(decode_card(path.read_bytes(), str(path)), result, training)
        tags = get_metadata_key(text, "tags")
        if tags is None or (isinstance(tags, list) and TAG not in tags):
            listed = [*(tags or []), TAG]
            text = set_metadata_key(text, "tags", listed, where=str(path))
        write_atomically(path, text)
        write_atomically(folder / DETAILS_FILE, details_text(result, training))
    except (QKMonitorError, OSError) as error:
        logger.warning("qkmonitor: the model card has no qkmonitor section: %s", error)


def _trajectory(trainer: Any) -> TrainingTrajectory:
    """The qk/ metrics the trainer logged so far."""
    return TrainingTrajectory.from_log_history(trainer.state.log_history)


def _card_before_push(trainer: Any, audits: _StepAudits) -> Any:
    """A callback that, when a push begins, makes sure the folder's card carries the section:
    a checkpoint push uploads whatever README.md is there (often none for the plain Trainer)."""
    from transformers import TrainerCallback

    class QKMonitorCardBeforePush(TrainerCallback):
        def on_push_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if not state.is_world_process_zero:
                return
            if (Path(args.output_dir) / CARD_FILE).is_file():
                _add_section(trainer, audits)
                return
            name = (args.hub_model_id or Path(args.output_dir).name).split("/")[-1]
            trainer.create_model_card(model_name=name)  # the wrapper adds the section

    return QKMonitorCardBeforePush()


def _one_line_refusals(trainer: Any, push_to_hub: Any) -> Any:
    """``push_to_hub`` with the Hub's refusal of the card's metadata raised as one line."""

    def one_line(error: BaseException) -> BaseException:
        refused = client.metadata_refusal(error, trainer.hub_model_id)
        return error if refused is None else refused.with_hint(_REFUSED_HINT)

    @functools.wraps(push_to_hub)
    def push(*args: Any, **kwargs: Any) -> Any:
        try:
            pushed = push_to_hub(*args, **kwargs)
        except ValueError as error:
            refused = one_line(error)
            if refused is error:
                raise
            raise refused from None
        if not isinstance(pushed, Future):
            return pushed
        followed: Future = Future()  # blocking=False: the same outcome, the refusal in one line

        def done(future: Future) -> None:
            try:
                error = future.exception()
                if error is None:
                    followed.set_result(future.result())
                else:
                    followed.set_exception(one_line(error))
            except BaseException as problem:  # never leave the returned future pending
                if not followed.done():
                    followed.set_exception(problem)

        pushed.add_done_callback(done)
        return followed

    return push
