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
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qkmonitor import __version__
from qkmonitor.errors import (
    CardConflictError,
    CardFormatError,
    ConflictError,
    QKMonitorError,
)
from qkmonitor.hub import client
from qkmonitor.hub.card_edit import (
    BEGIN_MARKER,
    END_MARKER,
    get_metadata_key,
    set_metadata_key,
    set_section,
)
from qkmonitor.result import AuditResult, HeadResult, LayerSummary, write_atomically
from qkmonitor.weights.targets import target_kind

__all__ = [
    "METADATA_KEY",
    "CardConflictError",
    "CardUpdate",
    "MetricSummary",
    "TrainingTrajectory",
    "attach_to_trainer",
    "card_metadata",
    "edit_card",
    "local_card_path",
    "push_card",
    "render_section",
    "update_card",
    "update_local_card",
]

logger = logging.getLogger("qkmonitor")

#: the top-level key of the card's YAML header that qkmonitor owns
METADATA_KEY = "qkmonitor"
CARD_FILE = "README.md"
#: the largest card read from the Hub (real cards are well under 1 MB)
MAX_CARD_BYTES = 16 * 2**20
#: heads listed as most and least concentrated
TOP_HEADS = 3

_LAYER_KEY = re.compile(r"qk/(?P<stat>[a-z_]+)/(?:(?P<block>[a-z]+)_)?layer_(?P<layer>\d+)")
_EXPLANATION = """\
**What these numbers mean.** For every attention head, qkmonitor forms the matrix
`W = s · W_Q^T W_K` from the head's query and key weights (`s` is the softmax scale the model
applies), so that the content part of the attention logit between tokens `i` and `j` is
`x_i^T W x_j`. Biases and position terms (RoPE, ALiBi, relative buckets) are left out.

- `eig_mean`: the mean of the eigenvalues of `W` (its trace divided by the model width).
- `eig_var`: the variance of the eigenvalues of the symmetric part `(W + W^T) / 2`. It is the
  spread of a token's logit `x^T W x` over token directions `x` of fixed norm; it grows with
  the square of the weights' scale. A wider spread of logits makes the softmax sharper: on
  all-MiniLM-L6-v2, heads with a larger `eig_var` had lower attention entropy on real text
  (Spearman -0.44 across its 72 heads). Min and max are across a layer's heads.
- `eig_concentration`: `eig_mean` divided by the root-mean-square eigenvalue of the symmetric
  part, in [-1, 1]; its magnitude is at most `sqrt(head_dim / width)`, reached by a symmetric
  `W` whose non-zero eigenvalues are all equal. Near that bound the spectrum is concentrated
  on a non-zero mean, the regime in which Bao, Hataya & Karakida (ICML 2024) find that
  attention localizes (a query attends to few tokens) without rank collapse or entropy
  collapse; near 0 the eigenvalues spread around zero. It does not change when the weights are
  rescaled. It is not a measure of entropy: a head can put nearly all its attention on one
  token whatever the input (low entropy, even entropy collapse) without a concentrated
  spectrum.
- `attn_entropy`: the mean entropy, in nats, of a query's attention probabilities over the keys
  it may attend to, measured on training batches; low values mean peaked attention.

These are qkmonitor's own exact definitions following the paper's idea, not its formulas
(full definitions: docs/metrics.md in the qkmonitor source); they are computed from the
weights in float64, without forming any `d × d` matrix."""


@dataclass(frozen=True)
class MetricSummary:
    """First, last and minimum value of one logged metric over a training run."""

    key: str
    first: float
    last: float
    minimum: float
    first_step: int
    last_step: int
    min_step: int


@dataclass(frozen=True)
class TrainingTrajectory:
    """The qk/ metrics a QKMonitorCallback logged, summarized per metric."""

    metrics: tuple[MetricSummary, ...]

    @classmethod
    def from_log_history(cls, log_history: Iterable[Mapping[str, Any]]) -> TrainingTrajectory:
        """Summarize ``trainer.state.log_history``: every qk/ key except per-head and min/max keys.

        Per-layer means (``qk/eig_var/layer_03``) and model-wide values (``qk/eig_var/mean``,
        ``qk/reg/R``) are kept, in the order they were first logged; the minimum is over finite
        values (NaN if none).
        """
        series: dict[str, list[tuple[int, float]]] = {}
        for entry in log_history:
            step = int(entry.get("step", 0))
            for key, value in entry.items():
                if (
                    key.startswith("qk/")
                    and not key.endswith(("/min", "/max"))
                    and "/head_" not in key
                    and isinstance(value, int | float)
                ):
                    series.setdefault(key, []).append((step, float(value)))
        metrics = []
        for key, points in series.items():
            finite = [point for point in points if math.isfinite(point[1])]
            low = min(finite, key=lambda point: point[1], default=(points[-1][0], math.nan))
            metrics.append(
                MetricSummary(
                    key=key,
                    first=points[0][1],
                    last=points[-1][1],
                    minimum=low[1],
                    first_step=points[0][0],
                    last_step=points[-1][0],
                    min_step=low[0],
                )
            )
        return cls(tuple(metrics))

    def last(self, key: str) -> float | None:
        """The last logged value of ``key``, None if it was never logged."""
        return next((m.last for m in self.metrics if m.key == key), None)


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


# ---- rendering ---------------------------------------------------------------------------


def _number(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.4g}"


def _round(value: float | None) -> float | None:
    """6 significant digits for the YAML key: stable under last-bit differences; NaN -> None."""
    return None if value is None or not math.isfinite(value) else float(f"{value:.6g}")


def _tag(block: str, layer: int) -> str:
    """The callback's log tag: ``layer_03``, or ``encoder_layer_03`` for other stacks."""
    return f"layer_{layer:02d}" if block == "self" else f"{block}_layer_{layer:02d}"


def _layer_name(block: str, layer: int) -> str:
    return str(layer) if block == "self" else f"{block} {layer}"


def _model_means(layers: list[LayerSummary]) -> dict[str, float]:
    """Whole model: the mean over layers of each per-layer mean (docs/metrics.md)."""
    means = {}
    for name in ("eig_mean", "eig_var", "eig_concentration"):
        values = [getattr(s, name) for s in layers if math.isfinite(getattr(s, name))]
        means[name] = sum(values) / len(values) if values else math.nan
    return means


def _entropy(training: TrainingTrajectory | None, block: str, layer: int) -> float | None:
    """The last logged attn_entropy of a layer (mean over its heads), when known."""
    return None if training is None else training.last(f"qk/attn_entropy/{_tag(block, layer)}")


def _head(h: HeadResult) -> dict[str, Any]:
    return {
        "block": h.block,
        "layer": h.layer,
        "head": h.head,
        "eig_concentration": _round(h.eig_concentration),
        "eig_var": _round(h.eig_var),
    }


def _by_concentration(result: AuditResult) -> tuple[list[HeadResult], list[HeadResult]]:
    """The TOP_HEADS most and least concentrated heads, by |eig_concentration|."""
    ranked = result.ranked("eig_concentration", magnitude=True)
    return ranked[::-1][:TOP_HEADS], ranked[:TOP_HEADS]


def _layer_metadata(s: LayerSummary, training: TrainingTrajectory | None) -> dict[str, Any]:
    value: dict[str, Any] = {"block": s.block, "layer": s.layer}
    for name in ("eig_mean", "eig_var", "eig_var_min", "eig_var_max", "eig_concentration"):
        value[name] = _round(getattr(s, name))
    entropy = _entropy(training, s.block, s.layer)
    if entropy is not None:
        value["attn_entropy"] = _round(entropy)
    return value


def card_metadata(result: AuditResult, training: TrainingTrajectory | None = None) -> dict:
    """The value of the card's ``qkmonitor`` YAML key: the summary numbers, rounded to 6 digits.

    Keys: version, commit (audited; None for local folders), model_type, heads, eig_mean,
    eig_var and eig_concentration (mean over layers), most_concentrated / least_concentrated
    (heads by |eig_concentration|), widest_logit_spread (heads by largest eig_var), layers
    (per-layer means, eig_var min/max, attn_entropy when logged) and, for training runs,
    training (logged steps and the first/last/min of every model-wide qk/ metric).
    """
    layers = result.layers
    most, least = _by_concentration(result)
    means = _model_means(layers)
    value: dict[str, Any] = {
        "version": result.model.qkmonitor_version,
        "commit": result.model.sha,
        "model_type": result.model.model_type,
        "heads": len(result.heads),
        "eig_mean": _round(means["eig_mean"]),
        "eig_var": _round(means["eig_var"]),
        "eig_concentration": _round(means["eig_concentration"]),
        "most_concentrated": [_head(h) for h in most],
        "least_concentrated": [_head(h) for h in least],
        "widest_logit_spread": [_head(h) for h in result.ranked("eig_var")[::-1][:TOP_HEADS]],
        "layers": [_layer_metadata(s, training) for s in layers],
    }
    if training is not None and training.metrics:
        wide = [m for m in training.metrics if not _LAYER_KEY.fullmatch(m.key)]
        value["training"] = {
            "steps": [
                min(m.first_step for m in training.metrics),
                max(m.last_step for m in training.metrics),
            ],
            "metrics": {
                m.key: {"first": _round(m.first), "last": _round(m.last), "min": _round(m.minimum)}
                for m in wide
            },
        }
    return value


def _what(result: AuditResult) -> str:
    info = result.model
    shape = ", ".join(
        f"{info.n_layers[b]} {'' if b == 'self' else b + ' '}layers × {info.n_heads[b]} heads"
        for b in info.n_layers
    )
    where = {
        "hub": f"at commit `{info.sha}`",
        "model": "of the trained model in memory"
        + (f", pushed as commit `{info.sha}`" if info.sha else ""),
        "local": "from a local folder",
    }.get(info.kind, "")
    stored = info.storage or info.dtype  # the format (fp8-block-128x128, ...), else the dtype
    dtype = f", stored as {stored}" if stored else ""
    return (
        f"qkmonitor {info.qkmonitor_version} read the query and key weights {where} "
        f"({info.model_type}, {shape}, width {_widths(info)}{dtype}) and computed the "
        "QK-eigenspectrum of every attention head."
    )


def _widths(info) -> str:
    """The input width d_in: one number when every block has it, else per block."""
    widths = set(info.d_in.values())
    if len(widths) == 1:
        return str(next(iter(widths)))
    return ", ".join(f"{block} {width}" for block, width in info.d_in.items())


def _bound(result: AuditResult) -> str:
    """`` (at most sqrt(head_dim / width) = 0.2887 here)`` when one head_dim and one width
    hold throughout."""
    head_dims = set(result.model.head_dim.values())
    widths = set(result.model.d_in.values())
    if len(head_dims) != 1 or len(widths) != 1:
        return ""
    (head_dim,), (width,) = head_dims, widths
    if not width:
        return ""
    bound = math.sqrt(min(head_dim, width) / width)
    return f" (at most sqrt({head_dim} / {width}) = {_number(bound)} here)"


def _heads_line(label: str, heads: list[HeadResult], statistic: str) -> str:
    listed = "; ".join(
        f"layer {_layer_name(h.block, h.layer)} head {h.head} ({_number(getattr(h, statistic))})"
        for h in heads
    )
    return f"- {label}: {listed or 'none with finite statistics'}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    align = ["---" if i == 0 else "---:" for i in range(len(header))]
    return [f"| {' | '.join(cells)} |" for cells in (header, align, *rows)]


def render_section(result: AuditResult, training: TrainingTrajectory | None = None) -> str:
    """The card section, markers included, as Markdown (no links, no HTML besides markers).

    Args:
        result: the audit to publish.
        training: the qk/ metrics of a training run (TrainingTrajectory.from_log_history),
            which add attn_entropy to the layer table and a training table.
    """
    layers = result.layers
    entropy = any(_entropy(training, s.block, s.layer) is not None for s in layers)
    header = ["layer", "heads", "eig_mean", "eig_var", "eig_var min", "eig_var max"]
    header += ["eig_concentration", *(["attn_entropy"] if entropy else [])]
    rows = []
    for s in layers:
        row = [_layer_name(s.block, s.layer), str(s.n_heads), _number(s.eig_mean)]
        row += [_number(s.eig_var), _number(s.eig_var_min), _number(s.eig_var_max)]
        row.append(_number(s.eig_concentration))
        if entropy:
            row.append(_number(_entropy(training, s.block, s.layer)))
        rows.append(row)
    means = _model_means(layers)
    mean_row = ["mean", str(len(result.heads)), _number(means["eig_mean"])]
    mean_row += [_number(means["eig_var"]), "", "", _number(means["eig_concentration"])]
    if entropy:
        mean_row.append(_number(training.last("qk/attn_entropy/mean")))
    rows.append(mean_row)
    most, least = _by_concentration(result)
    lines = [
        BEGIN_MARKER,
        "## QK-eigenspectrum audit (qkmonitor)",
        "",
        _what(result),
        "",
        *_table(header, rows),
        "",
        f"Heads by the magnitude of `eig_concentration`{_bound(result)} and by `eig_var`:",
        "",
        _heads_line("most concentrated spectrum", most, "eig_concentration"),
        _heads_line("least concentrated spectrum", least, "eig_concentration"),
        _heads_line(
            "widest logit spread (largest `eig_var`)",
            result.ranked("eig_var")[::-1][:TOP_HEADS],
            "eig_var",
        ),
    ]
    if entropy:
        lines += ["", "`attn_entropy`: the last value logged during training."]
    if training is not None and training.metrics:
        first = min(m.first_step for m in training.metrics)
        last = max(m.last_step for m in training.metrics)
        lines += [
            "",
            "### During training",
            "",
            f"Metrics logged by QKMonitorCallback from step {first} to step {last}: first, last "
            "and minimum value (with its step). Per-layer keys hold the mean over the layer's "
            "heads; `mean` keys the mean over layers.",
            "",
        ]
        lines += _table(
            ["metric", "first", "last", "min", "min at step"],
            [
                [f"`{m.key}`", *map(_number, (m.first, m.last, m.minimum)), str(m.min_step)]
                for m in training.metrics
            ],
        )
    lines += ["", _EXPLANATION, END_MARKER]
    return "\n".join(lines) + "\n"


# ---- editing -----------------------------------------------------------------------------


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


def _decode(data: bytes, where: str) -> str:
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


def update_local_card(
    folder: str | os.PathLike,
    result: AuditResult,
    training: TrainingTrajectory | None = None,
) -> CardUpdate:
    """Set qkmonitor's section and key in ``folder/README.md`` (created if missing), atomically.

    A README.md that is a symlink is edited through the link (the file it points to is
    replaced, the link stays) only when it points inside the folder; see local_card_path.
    """
    path = local_card_path(folder)
    old = _decode(path.read_bytes(), str(path)) if path.is_file() else None
    new = edit_card(old, result, training, title=Path(folder).resolve().name)
    if new == old:
        return CardUpdate(changed=False, text=new, path=path)
    write_atomically(path, new)
    return CardUpdate(changed=True, text=new, path=path)


# ---- the Hub -----------------------------------------------------------------------------


_DESCRIPTION = (
    f"Written by qkmonitor {__version__}: only the section between `{BEGIN_MARKER}` and "
    f"`{END_MARKER}` and the `{METADATA_KEY}` metadata key change."
)
_IF_SENT = "run again, which finds the card or pull request if it landed and writes nothing twice"
_DOING = "updating a model card on the Hub"


def _decode_card(data: bytearray | None, repo_id: str) -> str | None:
    if data is not None and len(data) > MAX_CARD_BYTES:
        raise CardFormatError(
            f"{repo_id}/{CARD_FILE} is larger than {MAX_CARD_BYTES // 2**20} MB; qkmonitor "
            "edits cards up to that size"
        )
    return None if data is None else _decode(bytes(data), f"{repo_id}/{CARD_FILE}")


def _open_pull_request(hub: client.Publisher, title: str, text: str) -> str | None:
    """The url of an open pull request titled ``title`` whose README.md is exactly ``text``."""
    for pull_request in hub.open_pull_requests():
        if pull_request.title != title:
            continue
        card = hub.read_text(CARD_FILE, pull_request.git_reference, MAX_CARD_BYTES)
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
    """Commit qkmonitor's card section and key to a Hub repo, on top of one exact commit.

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
        qkmonitor.errors.NetworkError: a Hub request stalled for longer than
            QKMONITOR_HUB_TIMEOUT (each wait), or the connection failed; named in one line.
        qkmonitor.errors.QKMonitorError: other Hub errors, explained in one line.
    """
    token = client.write_token(token, _DOING)
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
        old = _decode_card(hub.read_text(CARD_FILE, parent_commit, MAX_CARD_BYTES), repo_id)
        new = edit_card(old, result, training, title=repo_id.split("/")[-1])
        if new == old:
            return CardUpdate(changed=False, text=new)
        if create_pr:
            pending = _open_pull_request(hub, commit_message, new)
            if pending is not None:
                return CardUpdate(changed=False, text=new, pr_url=pending)
        try:
            made = hub.commit(
                {CARD_FILE: new.encode("utf-8")},
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
    token = client.write_token(token, _DOING)
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


# ---- Trainer.push_to_hub -----------------------------------------------------------------


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
