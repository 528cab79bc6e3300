"""QK Audit: a Gradio Space that audits the attention heads of any Hub model from its weights.

    python spaces/qk-audit/app.py      # http://127.0.0.1:7860 (GRADIO_SERVER_PORT to change)

The web front end of ``audit_service.Space``, which composes qkmonitor:
``qkmonitor.weights.sources`` reads the Q/K tensors of a Hub repo by byte range,
``qkmonitor.audit`` computes every head's statistics, ``qkmonitor.plots`` draws them,
``qkmonitor.training.capture`` measures attention entropy on the user's text and
``qkmonitor.hub.card`` pushes the results to the model card.

Public API (gradio_client): ``/audit``, ``/compare``, ``/attention`` and ``/push_card``
(docstrings of `audit_api`, `compare_api`, `attention_api`, `push_api` inside `_api`).
Limits come from QK_AUDIT_* environment variables (``audit_service.Settings``). On the page, an
error goes to its tab's red panel and stays there, over the previous result, until the next run;
the API endpoints raise it (gr.Error) to the client.

Safety: only Hub repo ids are accepted, except the bundled all-MiniLM-L6-v2, chosen by its fixed
name ``bundled:all-MiniLM-L6-v2``; remote code is never run and pickle files are never read; a
request uses the Hugging Face token of the user who makes it (OAuth in the Space,
``oauth_token`` in gradio_client), never the server's own, and the token is neither logged nor
cached.
"""

from __future__ import annotations

import html
import logging
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import zerogpu  # first: ZeroGPU's `spaces` must be imported before torch and gradio

# isort: split
import gradio as gr
import plotly.graph_objects as go
from audit_service import (
    BUNDLED,
    DEFAULT_TEXT,
    HEATMAPS,
    HUB_DEFAULT,
    LAYER_COLUMNS,
    OFFLINE,
    Settings,
    Space,
    attention_summary,
    compare_summary,
    difference_rows,
    explain,
    layer_table,
    nulls,
    push_summary,
    share_cpus,
    summary,
    text_points,
)

from qkmonitor import plots
from qkmonitor.errors import QKMonitorError
from qkmonitor.result import STATISTICS, AuditResult

__all__ = ["build_demo", "main"]

logger = logging.getLogger("qk-audit")

_Result = TypeVar("_Result")


def _token(oauth_token: gr.OAuthToken | None) -> str | bool:
    """The requesting user's token, or False: never the server's own credentials."""
    return oauth_token.token if oauth_token is not None else False


def _message(error: Exception) -> str:
    """The one line a user sees for an error: the engine's for bad input, else a generic one."""
    if isinstance(error, QKMonitorError):
        return explain(error)
    if type(error).__module__.partition(".")[0] in ("httpx", "httpx2", "httpcore"):
        return f"cannot reach the Hub ({type(error).__name__}); try again later. {OFFLINE}"
    logger.exception("unexpected error", exc_info=error)
    return f"unexpected error ({type(error).__name__}); please try again or report it"


def _shown(call: Callable[[], _Result]) -> _Result:
    """Run an API request; an error becomes a one-line gr.Error for the client."""
    try:
        return call()
    except Exception as error:
        raise gr.Error(_message(error), print_exception=False) from None


def _error_panel(message: str) -> dict:
    """The error box of a tab, shown with the message (escaped: the page renders HTML)."""
    text = html.escape(message)
    return gr.update(
        value=f'<div class="qk-error" role="alert" style="border: 1px solid #d93025; '
        f'background: #fce8e6; color: #a50e0e; border-radius: 6px; padding: 8px 12px;">'
        f"<strong>Error:</strong> {text}</div>",
        visible=True,
    )


def _page(call: Callable[[], tuple], outputs: int) -> tuple:
    """Run a page request: (no error, *its outputs), or (the error panel, then every other
    output left as it was), so that the previous result stays on the page under the message."""
    try:
        return (gr.update(value="", visible=False), *call())
    except Exception as error:
        return (_error_panel(_message(error)), *(gr.skip(),) * outputs)


def _definitions() -> str:
    """docs/metrics.md (next to app.py in a deployed Space, two folders up in a checkout) as
    the Definitions tab shows it: its contents links aim at Gradio's heading anchors (which
    Gradio prefixes with "h-"), and the files of a qkmonitor checkout it names, which a
    deployed Space does not have, are called qkmonitor's."""
    here = Path(__file__).resolve().parent
    for path in (here / "docs" / "metrics.md", here.parents[1] / "docs" / "metrics.md"):
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            break
    else:
        return "The definitions are in qkmonitor's docs/metrics.md."
    text = re.sub(r"\]\(#(?!h-)", "](#h-", text)
    text = re.sub(r"\b[Tt]he README\b", "qkmonitor's README", text)

    def link(match: re.Match) -> str:  # to the other docs: the Space has docs/metrics.md only
        words, target = match.groups()
        named = f"qkmonitor's `docs/{target}`"
        return named if words.strip("`") == target else f"{words} ({named})"

    text = re.sub(r"\[([^\]]+)\]\((?!#|https?:)([^)]+)\)", link, text)
    path = r"(?:\.venv/bin/python )?((?:[\w-]+/)*[\w.-]+\.(?:py|md))"
    text = re.sub(rf"(?<!qkmonitor's )`{path}`", r"qkmonitor's `\1`", text)
    return re.sub(rf"(?<![`\w/.-]){path}(?![`\w])", r"qkmonitor's `\1`", text)


def _index(value: float | None) -> int | None:
    """A layer or head number from a form field or the API (empty: None)."""
    return None if value is None else int(value)


def _field(text: str | None, name: str) -> int | None:
    """A layer or head number typed on the page (empty: None)."""
    text = (text or "").strip()
    if not text:
        return None
    if not text.isdigit():
        raise QKMonitorError(f"the {name} is a whole number from 0, or empty for the most focused")
    return int(text)


def _warm_up(space: Space) -> None:
    """Warm the engine and measure this hardware for admission (`Space.warm_up`); a failed
    warm-up is logged and leaves audits bounded by the time limit only."""
    start = time.perf_counter()
    try:
        throughput = space.warm_up()
    except Exception as error:  # the Space still serves, without admission
        logger.exception("warm-up audit failed; admission is off", exc_info=error)
        return
    logger.info(
        "warm-up audit in %.1f s: %.3g multiply-adds/s, %.3g s per head; admission assumes "
        "%.0f MB/s of Hub reads",
        time.perf_counter() - start,
        throughput.multiply_adds_per_second,
        throughput.seconds_per_head,
        throughput.bytes_per_second / 1e6,
    )


def _default_model() -> str:
    """HUB_DEFAULT when the Hub serves it (within 3 s), else the bundled model."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return BUNDLED
    from huggingface_hub import HfApi

    try:
        HfApi(token=False).model_info(HUB_DEFAULT, timeout=3)
    except Exception:  # offline, blocked, or a Hub without this repo
        return BUNDLED
    return HUB_DEFAULT


def _placeholder(text: str) -> go.Figure:
    """An empty figure with a note; a plot on the first page makes the browser load plotly.js
    while the user types, not after the first click (which was 4 s slower)."""
    figure = go.Figure()
    figure.add_annotation(text=text, showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5)
    figure.update_layout(xaxis={"visible": False}, yaxis={"visible": False}, height=300)
    return figure


def _head_view(result: AuditResult, block: str) -> tuple[dict, dict, go.Figure]:
    """Layer and head slider updates for a block, set to its most concentrated head (largest
    |eig_concentration|), and that head's eigenvalue plot."""
    ranked = [h for h in result.ranked("eig_concentration", magnitude=True) if h.block == block]
    first = ranked[-1] if ranked else next(h for h in result.heads if h.block == block)
    return (
        gr.update(maximum=result.model.n_layers[block] - 1, value=first.layer),
        gr.update(maximum=result.model.n_heads[block] - 1, value=first.head),
        plots.eigenvalue_plot(result, block, first.layer, first.head),
    )


HEADER = """# QK Audit: the query-key eigenspectrum of every attention head
From the weights alone (only the Q/K tensors are fetched), each head's W = s·W_Qᵀ W_K, whose
quadratic form xᵢᵀ W xⱼ is the content part of the attention logit between two tokens.
- **eig_var** (logit² for unit-norm tokens) is the spread of those content logits for isotropic
  tokens: a larger value means larger logit differences, so sharper, lower-entropy attention.
  It grows with the weights' scale (×c on W gives ×c²).
- **eig_concentration** = eig_mean / RMS eigenvalue, unchanged by that scale: ±1 when every
  eigenvalue is equal, 0 for a spread around a zero mean; a head of rank d_head reaches at most
  √(d_head / d_in).
- Bao, Hataya & Karakida (ICML 2024) call attention *localized* when queries attend to few
  tokens, and find it when the spectrum *concentrates*: a non-zero mean with a small variance
  relative to it, i.e. |eig_concentration| near that bound. Low entropy is another thing: a wide
  logit spread (large eig_var) alone can make attention peaked, so the two need not agree (on
  all-MiniLM-L6-v2 the most focused head has the largest eig_var, not the most concentrated
  spectrum). *Attention on your text* plots both against entropy on your model and your text.

The definitions are qkmonitor's own, following the paper's idea: tab *Definitions*."""


@dataclass(frozen=True)
class _Shared:
    """What every tab uses: the model row above the tabs, its error panel and headline, the
    block selector and colour-scale switch, and the results kept between events."""

    space: Space
    settings: Settings
    default_model: str
    model_id: gr.Textbox
    revision: gr.Textbox
    audit_button: gr.Button
    audit_error: gr.HTML
    headline: gr.Markdown
    block: gr.Dropdown
    log_scale: gr.Checkbox
    result: gr.State  # the AuditResult shown
    compared: gr.State  # (base, other, statistic) of the last comparison


# Space.audit limits the audits computing at once (settings.concurrency) after its cache lookup:
# in Gradio's queue, a cached result would wait behind running or stalled audits
_HEAVY = {"concurrency_limit": None}
#: forward passes: one at a time, for the page and the API together
_FORWARD = {"concurrency_id": "forward", "concurrency_limit": 1}


def _error_box(elem_id: str) -> gr.HTML:
    return gr.HTML(visible=False, elem_id=elem_id)


def _maps(result: AuditResult, block: str, log: bool) -> list[go.Figure]:
    return [plots.heatmap(result, s, block, log=log and s in plots.LOG_SCALE) for s in HEATMAPS]


def _model_row(space: Space, settings: Settings, default_model: str, on_space: bool) -> _Shared:
    """The header, sign-in, model id / revision / Audit row, and the block and scale controls."""
    gr.Markdown(HEADER)
    if on_space:
        gr.LoginButton()
    with gr.Row(equal_height=True):
        model_id = gr.Textbox(
            value=default_model,
            label="Model id",
            info=f"a Hub repo (org/name), or {BUNDLED} for the model shipped with the Space",
            scale=4,
            elem_id="model-id",
        )
        revision = gr.Textbox(
            label="Revision",
            placeholder="main",
            info="branch, tag or sha",
            scale=1,
            elem_id="revision",
        )
        audit_button = gr.Button("Audit", variant="primary", scale=1, elem_id="audit-button")
    audit_error = _error_box("audit-error")
    headline = gr.Markdown(elem_id="headline")
    with gr.Row(equal_height=True):
        block = gr.Dropdown(
            label="Attention block",
            info="composite models have several (encoder, decoder, cross, vision, text, "
            "...): every plot and table shows the chosen one",
            choices=[],
            visible=False,
            elem_id="block",
        )
        log_scale = gr.Checkbox(
            value=True,
            label="Log colour scale for eig_var and the spectral norm",
            info="one outlier head otherwise paints every other head the same colour",
            elem_id="log-scale",
        )
    return _Shared(
        space, settings, default_model, model_id, revision, audit_button, audit_error, headline,
        block, log_scale, gr.State(None), gr.State(None),
    )  # fmt: skip


@dataclass(frozen=True)
class _AuditTab:
    """The Audit tab's outputs that a change of block redraws."""

    maps: list[gr.Plot]
    table: gr.Dataframe
    layer: gr.Slider
    head: gr.Slider
    eigen_plot: gr.Plot


def _audit_tab(shared: _Shared) -> _AuditTab:
    """Heatmaps, the per-layer table, one head's eigenvalues and the downloads; wires the
    Audit button (and Enter in the model row), the colour-scale switch and the sliders."""
    space = shared.space
    with gr.Tab("Audit"):
        with gr.Row():
            maps = [
                gr.Plot(label=statistic, elem_id=f"heatmap-{statistic}", min_width=320)
                for statistic in HEATMAPS
            ]
        table = gr.Dataframe(
            value=layer_table(None),
            headers=list(LAYER_COLUMNS),
            label="Per layer: means over heads",
            interactive=False,
            elem_id="layer-table",
        )
        with gr.Row():
            with gr.Column(scale=1):
                layer = gr.Slider(0, 1, value=0, step=1, label="Layer")
                head = gr.Slider(0, 1, value=0, step=1, label="Head")
                json_file = gr.File(label="Full result (JSON)")
                csv_file = gr.File(label="Per head (CSV)")
            eigen_plot = gr.Plot(
                _placeholder("the chosen head's eigenvalues appear here"),
                label="Eigenvalues of the chosen head",
                scale=2,
                elem_id="eigenvalues",
            )
    outputs = [
        shared.audit_error, shared.headline, *maps, table, json_file, csv_file, shared.result,
        shared.block, layer, head, eigen_plot,
    ]  # fmt: skip

    def audit_view(
        model_id: str,
        revision: str,
        log: bool,
        oauth_token: gr.OAuthToken | None = None,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 (Gradio's way to ask for it)
    ) -> tuple:
        def run() -> tuple:
            audited = space.audit(
                model_id, revision, _token(oauth_token), lambda f, text: progress(f, desc=text)
            )
            result = audited.result
            block = result.blocks[0]
            return (
                summary(audited),
                *_maps(result, block, log),
                layer_table(result, block),
                str(audited.json_path),
                str(audited.csv_path),
                result,
                gr.update(choices=result.blocks, value=block, visible=len(result.blocks) > 1),
                *_head_view(result, block),
            )

        return _page(run, len(outputs) - 1)

    def scale_view(result: AuditResult | None, block: str | None, log: bool) -> tuple:
        if result is None:
            return (gr.skip(),) * len(maps)
        return tuple(_maps(result, block if block in result.blocks else result.blocks[0], log))

    def eigen_view(
        result: AuditResult | None, block: str | None, layer: float, head: float
    ) -> tuple:
        def run() -> tuple:
            if result is None:
                raise QKMonitorError("run an audit first")
            shown = block or result.blocks[0]
            return (plots.eigenvalue_plot(result, shown, int(layer), int(head)),)

        return _page(run, 1)

    inputs = [shared.model_id, shared.revision, shared.log_scale]
    for trigger in (shared.audit_button.click, shared.model_id.submit, shared.revision.submit):
        trigger(audit_view, inputs, outputs, api_visibility="private", **_HEAVY)
    shared.log_scale.input(
        scale_view,
        [shared.result, shared.block, shared.log_scale],
        maps,
        api_visibility="private",
    )
    for slider in (layer, head):
        slider.change(
            eigen_view,
            [shared.result, shared.block, layer, head],
            [shared.audit_error, eigen_plot],
            api_visibility="private",
            concurrency_limit=None,
        )
    return _AuditTab(maps, table, layer, head, eigen_plot)


def _compare_tab(shared: _Shared) -> gr.Plot:
    """A second model or revision, and the difference heatmap (returned: the block selector
    redraws it)."""
    space = shared.space
    with gr.Tab("Compare"):
        gr.Markdown(
            "Compare the model above with a second model or revision (e.g. base vs "
            "fine-tuned): the heatmap shows other minus base."
            + (
                f"\n\n**Offline, this Space has one model only** ({BUNDLED}, in one "
                "version): comparing needs the Hub."
                if shared.default_model == BUNDLED
                else ""
            )
        )
        with gr.Row(equal_height=True):
            other_id = gr.Textbox(
                label="Other model id", placeholder="empty: the same model", scale=3
            )
            other_revision = gr.Textbox(label="Other revision", scale=1, elem_id="other-revision")
            statistic = gr.Dropdown(
                choices=list(STATISTICS), value="eig_var", label="Statistic", scale=1
            )
            compare_button = gr.Button(
                "Compare", variant="primary", scale=1, elem_id="compare-button"
            )
        compare_error = _error_box("compare-error")
        compare_text = gr.Markdown()
        difference_plot = gr.Plot(label="Difference", elem_id="difference")

    def compare_view(
        model_id: str,
        revision: str,
        other_id: str,
        other_revision: str,
        statistic: str,
        block: str | None,
        oauth_token: gr.OAuthToken | None = None,
    ) -> tuple:
        def run() -> tuple:
            base, other = space.compare(
                model_id, revision, other_id, other_revision, statistic, _token(oauth_token)
            )
            shown = block if block in base.blocks else base.blocks[0]
            return (
                compare_summary(base, other, statistic),
                plots.difference_heatmap(base, other, statistic, shown),
                (base, other, statistic),
            )

        return _page(run, 3)

    compare_button.click(
        compare_view,
        [shared.model_id, shared.revision, other_id, other_revision, statistic, shared.block],
        [compare_error, compare_text, difference_plot, shared.compared],
        api_visibility="private",
        **_HEAVY,
    )
    return difference_plot


def _attention_tab(shared: _Shared) -> None:
    """Entropy of every head on the user's text, against its spectrum, and one head's map."""
    space, settings = shared.space, shared.settings
    with gr.Tab("Attention on your text"):
        gr.Markdown(
            f"Runs the model (up to {settings.max_forward_params / 1e6:,.0f}M parameters, "
            f"{settings.max_tokens} tokens) on your text: the normalized attention "
            "entropy of every head, each head's entropy against its eig_var and "
            "eig_concentration (with their rank correlation), and the attention map of "
            "one head (by default the most focused)."
        )
        text = gr.Textbox(value=DEFAULT_TEXT, label="Your text", lines=3)
        with gr.Row(equal_height=True):
            text_layer = gr.Textbox(
                label="Layer", placeholder="most focused", elem_id="text-layer",
                info="empty (both): the most focused head on your text",
            )  # fmt: skip
            text_head = gr.Textbox(label="Head", placeholder="most focused", elem_id="text-head")
            text_button = gr.Button("Run on text", variant="primary", elem_id="text-button")
        text_error = _error_box("attention-error")
        text_summary = gr.Markdown(elem_id="attention-summary")
        with gr.Row():
            entropy_plot = gr.Plot(
                label="Attention entropy", min_width=400, elem_id="attention-entropy"
            )
            map_plot = gr.Plot(label="Attention map", min_width=400, elem_id="attention-map")
        scatter_plot = gr.Plot(label="Entropy against eigenspectrum", elem_id="entropy-scatter")

    def attention_view(
        model_id: str,
        revision: str,
        text: str,
        layer: str,
        head: str,
        oauth_token: gr.OAuthToken | None = None,
    ) -> tuple:
        def run() -> tuple:
            found = space.attention(
                model_id, revision, text, _field(layer, "layer"), _field(head, "head"),
                _token(oauth_token),
            )  # fmt: skip
            suffix = f", {found.block} attention" if len(found.weights.blocks) > 1 else ""
            entropy = plots.grid_heatmap(
                found.entropy_norm,
                title=f"normalized attention entropy on your text{suffix}",
                value_name="attn_entropy_norm",
                units=plots.UNITS["attn_entropy_norm"],
                extra={"attn_entropy (nats)": found.entropy},
            )
            scatter = plots.entropy_scatter(
                text_points(found),
                title=f"each head: entropy on your text against its eigenspectrum{suffix}",
            )
            chosen = " (the most focused)" if not (layer or "").strip() else ""
            attention = plots.attention_map(
                found.attention,
                found.tokens,
                title=f"attention of layer {found.layer}, head {found.head}{chosen}",
            )
            return attention_summary(found), entropy, scatter, attention

        return _page(run, 4)

    text_button.click(
        attention_view,
        [shared.model_id, shared.revision, text, text_layer, text_head],
        [text_error, text_summary, entropy_plot, scatter_plot, map_plot],
        api_visibility="private",
        **_FORWARD,
    )


def _push_tab(shared: _Shared) -> None:
    """Publish the audit to the repo's model card, as a pull request by default."""
    space, direct = shared.space, shared.settings.direct_push
    with gr.Tab("Push to model card"):
        gr.Markdown(
            "Adds the audit to the model card of the repo above: by default as a pull "
            "request, which the repo's owners review. Needs a Hugging Face sign-in with "
            "write access (pull requests: any signed-in user)."
            if direct
            else "Adds the audit to the model card of the repo above as a pull request, which "
            "the repo's owners review; any signed-in Hugging Face user can open one (this Space "
            "asks for no write access to your repos)."
        )
        pull_request = gr.Checkbox(value=True, label="Open a pull request", visible=direct)
        push_button = gr.Button("Push to model card")
        push_error = _error_box("push-error")
        push_status = gr.Markdown()

    def push_view(
        model_id: str,
        revision: str,
        pull_request: bool,
        oauth_token: gr.OAuthToken | None = None,
    ) -> tuple:
        def run() -> tuple:
            update = space.push_card(model_id, revision, pull_request, _token(oauth_token))
            return (push_summary(update, model_id.strip()),)

        return _page(run, 1)

    push_button.click(
        push_view,
        [shared.model_id, shared.revision, pull_request],
        [push_error, push_status],
        api_visibility="private",
        **_HEAVY,
    )


def _definitions_tab() -> None:
    with gr.Tab("Definitions"):
        gr.Markdown(_definitions(), elem_id="definitions", header_links=True)


def _wire_block(shared: _Shared, audit_tab: _AuditTab, difference_plot: gr.Plot) -> None:
    """A change of block redraws the Audit tab and the last comparison."""

    def block_view(
        result: AuditResult | None, compared: tuple | None, block: str | None, log: bool
    ) -> tuple:
        def run() -> tuple:
            if result is None or block not in result.blocks:
                return (gr.skip(),) * (len(outputs) - 1)
            difference = gr.skip()
            if compared is not None and block in compared[0].blocks:
                difference = plots.difference_heatmap(*compared, block)
            return (
                *_maps(result, block, log),
                layer_table(result, block),
                *_head_view(result, block),
                difference,
            )

        return _page(run, len(outputs) - 1)

    outputs = [
        shared.audit_error, *audit_tab.maps, audit_tab.table, audit_tab.layer, audit_tab.head,
        audit_tab.eigen_plot, difference_plot,
    ]  # fmt: skip
    shared.block.input(
        block_view,
        [shared.result, shared.compared, shared.block, shared.log_scale],
        outputs,
        api_visibility="private",
    )


def _api(space: Space) -> None:
    """The gradio_client endpoints /audit, /compare, /attention and /push_card."""

    def audit_api(
        model_id: str, revision: str = "", oauth_token: gr.OAuthToken | None = None
    ) -> tuple[str, dict]:
        """Audit every attention head of a Hub model from its Q/K weights.

        Args:
            model_id: Hub repo id (org/name), or bundled:all-MiniLM-L6-v2.
            revision: branch, tag or commit sha; empty for the default branch.

        Returns:
            The headline as markdown, and the full result (qkmonitor's JSON schema).
        """
        audited = _shown(lambda: space.audit(model_id, revision, _token(oauth_token)))
        return summary(audited), audited.result.to_dict()

    def compare_api(
        model_id: str,
        revision: str = "",
        other_id: str = "",
        other_revision: str = "",
        statistic: str = "eig_var",
        oauth_token: gr.OAuthToken | None = None,
    ) -> tuple[str, dict]:
        """Compare two models or revisions head by head (other minus base).

        Args:
            model_id: the base model's Hub repo id.
            revision: the base model's revision; empty for the default branch.
            other_id: the other model; empty for the base model (then give other_revision).
            other_revision: the other model's revision.
            statistic: the statistic that the summary ranks heads by.

        Returns:
            A markdown summary, and {"base": model, "other": model, "heads": [per-head
            differences of every statistic]}.
        """
        base, other = _shown(
            lambda: space.compare(
                model_id, revision, other_id, other_revision, statistic, _token(oauth_token)
            )
        )
        return compare_summary(base, other, statistic), {
            "base": base.to_dict()["model"],
            "other": other.to_dict()["model"],
            "heads": difference_rows(base, other),
        }

    def attention_api(
        model_id: str,
        revision: str = "",
        text: str = DEFAULT_TEXT,
        layer: int | None = None,
        head: int | None = None,
        oauth_token: gr.OAuthToken | None = None,
    ) -> tuple[str, dict]:
        """Attention entropy of every head on your text, against its eigenspectrum, and one
        head's attention map.

        Args:
            model_id: Hub repo id (models up to the Space's parameter limit).
            revision: branch, tag or commit sha; empty for the default branch.
            text: the text to run the model on (truncated to the token limit).
            layer: layer of the head whose attention map is returned; None (with head None):
                the most focused head, the lowest normalized entropy.
            head: that head.

        Returns:
            A markdown summary, and {"tokens", "block", "attn_entropy" and "attn_entropy_norm"
            (layer x head), "layer", "head", "attention" (query x key probabilities),
            "points" (per head: layer, head, attn_entropy, attn_entropy_norm, eig_var,
            eig_concentration)}.
        """
        found = _shown(
            lambda: space.attention(
                model_id, revision, text, _index(layer), _index(head), _token(oauth_token)
            )
        )
        return attention_summary(found), {
            "tokens": found.tokens,
            "truncated": found.truncated,
            "block": found.block,
            "attn_entropy": nulls(found.entropy),
            "attn_entropy_norm": nulls(found.entropy_norm),
            "layer": found.layer,
            "head": found.head,
            "attention": found.attention,
            "points": [
                {k: (v if math.isfinite(v) else None) for k, v in point.items()}
                for point in text_points(found)
            ],
        }

    def push_api(
        model_id: str,
        revision: str = "",
        pull_request: bool = True,
        oauth_token: gr.OAuthToken | None = None,
    ) -> tuple[str, dict]:
        """Add the audit to the model card of a Hub repo, as the signed-in user.

        Args:
            model_id: the Hub repo whose README.md gets qkmonitor's section and metadata key.
            revision: the branch to audit and to propose (or commit) the card to.
            pull_request: open a pull request (default) instead of committing to the branch.

        Returns:
            A markdown line, and {"changed", "pr_url", "commit_url"}.
        """
        update = _shown(
            lambda: space.push_card(model_id, revision, pull_request, _token(oauth_token))
        )
        return push_summary(update, model_id), {
            "changed": update.changed,
            "pr_url": update.pr_url,
            "commit_url": update.commit_url,
        }

    gr.api(audit_api, api_name="audit", **_HEAVY)
    gr.api(compare_api, api_name="compare", **_HEAVY)
    gr.api(attention_api, api_name="attention", **_FORWARD)
    gr.api(push_api, api_name="push_card", **_HEAVY)


def build_demo(
    settings: Settings | None = None,
    *,
    default_model: str | None = None,
    space: Space | None = None,
) -> gr.Blocks:
    """The Space's Blocks, queued with the settings' limits (launch it yourself): the model row,
    then one builder per tab (each wires its own events), then the API endpoints. space: the
    `Space` it serves (default: a new one of these settings)."""
    settings = settings or Settings.from_env()
    space = space or Space(settings)
    default_model = default_model or _default_model()
    with gr.Blocks(title="QK Audit", delete_cache=(3600, 3600)) as demo:
        shared = _model_row(space, settings, default_model, bool(os.environ.get("SPACE_ID")))
        with gr.Tabs():
            audit_tab = _audit_tab(shared)
            difference_plot = _compare_tab(shared)
            _attention_tab(shared)
            _push_tab(shared)
            _definitions_tab()
        _wire_block(shared, audit_tab, difference_plot)
        _api(space)
    demo.queue(max_size=settings.queue_size, default_concurrency_limit=settings.concurrency)
    return demo


def main() -> None:
    """Serve the Space: 127.0.0.1 and GRADIO_SERVER_PORT (7860) unless the environment says."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    settings = Settings.from_env()
    share_cpus(settings.concurrency)
    logger.info(zerogpu.compute_mode())
    space = Space(settings)
    # before serving: the first audit is not the engine's cold one (about 10x slower), and no
    # request imports transformers' modules while the warm-up does (a race: ImportError)
    _warm_up(space)
    demo = build_demo(settings, space=space)
    demo.launch(
        server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        server_port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
        run_history=False,
        theme=gr.themes.Soft(),
    )


if __name__ == "__main__":
    main()
