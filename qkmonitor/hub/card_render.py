"""Rendering a QK audit as a card section and a metadata value (no I/O): `render_section`
(Markdown between qkmonitor's markers), `card_metadata` (the ``qkmonitor`` YAML key), and the
training run's qk/ metrics summarized (`TrainingTrajectory`)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from qkmonitor.hub.card_edit import BEGIN_MARKER, END_MARKER
from qkmonitor.result import AuditResult, HeadResult, LayerSummary
from qkmonitor.training.keys import layer_key, parse_key

__all__ = [
    "DETAILS_FILE",
    "METADATA_KEY",
    "MetricSummary",
    "TrainingTrajectory",
    "card_details",
    "card_metadata",
    "render_section",
]

#: the top-level key of the card's YAML header that qkmonitor owns
METADATA_KEY = "qkmonitor"
#: heads listed as most and least concentrated
TOP_HEADS = 3
#: the JSON file next to the card that holds the per-layer numbers (card_details)
DETAILS_FILE = "qkmonitor_audit.json"

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
        """Summarize ``trainer.state.log_history``: every qk/ key except one head's values and
        the spread across heads (qkmonitor.training.keys).

        Per-layer summaries (``qk/eig_var/mean/layer_03``, ``qk/attn_max_logit/max/layer_03``)
        and model-wide values (``qk/eig_var/mean``, ``qk/reg/R``) are kept, in the order they
        were first logged; the minimum is over finite values (NaN if none).
        """
        series: dict[str, list[tuple[int, float]]] = {}
        for entry in log_history:
            step = int(entry.get("step", 0))
            for key, value in entry.items():
                name = parse_key(key)
                if (
                    name is not None
                    and not (name.per_head or name.spread)
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


def _number(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.4g}"


def _round(value: float | None) -> float | None:
    """6 significant digits for the YAML key: stable under last-bit differences; NaN -> None."""
    return None if value is None or not math.isfinite(value) else float(f"{value:.6g}")


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
    if training is None:
        return None
    return training.last(layer_key("attn_entropy", "mean", block, layer))


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
    """The value of the card's ``qkmonitor`` YAML key: a bounded summary for search, rounded to
    6 digits (its size does not grow with the number of layers).

    Keys: version, commit (audited; None for local folders and models in memory), model_type,
    heads, eig_mean, eig_var and eig_concentration (mean over layers), most_concentrated /
    least_concentrated (heads by |eig_concentration|), widest_logit_spread (heads by largest
    eig_var), details (the JSON file next to the card with the per-layer numbers) and, for
    training runs, training (logged steps and the first/last/min of every model-wide qk/
    metric). The per-layer numbers are in the card's body and in `card_details`.
    """
    most, least = _by_concentration(result)
    means = _model_means(result.layers)
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
        "details": DETAILS_FILE,
    }
    if training is not None and training.metrics:
        wide = [m for m in training.metrics if parse_key(m.key).layer is None]
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


def card_details(result: AuditResult, training: TrainingTrajectory | None = None) -> dict:
    """The contents of `DETAILS_FILE`, written next to the card: the summary of
    `card_metadata` plus ``layers`` (per layer: block, layer, eig_mean, eig_var, eig_var_min,
    eig_var_max, eig_concentration, and attn_entropy when logged) and, for training runs, every
    logged qk/ metric's first/last/min (``training_metrics``)."""
    value = card_metadata(result, training)
    del value["details"]
    value["layers"] = [_layer_metadata(s, training) for s in result.layers]
    if training is not None and training.metrics:
        value["training_metrics"] = {
            m.key: {
                "first": _round(m.first),
                "last": _round(m.last),
                "min": _round(m.minimum),
                "min_step": m.min_step,
            }
            for m in training.metrics
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
        *(
            ["", f"Partial audit: {result.model.not_audited_line()}."]
            if result.model.not_audited
            else []
        ),
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
    lines += [
        "",
        f"Per-layer numbers as JSON: `{DETAILS_FILE}` next to this card; the `{METADATA_KEY}` "
        "metadata key holds the summary.",
        "",
        _EXPLANATION,
        END_MARKER,
    ]
    return "\n".join(lines) + "\n"
