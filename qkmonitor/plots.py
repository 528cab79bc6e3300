"""Plotly figures of audit results and attention measurements (pure functions, no I/O).

Every figure takes plain values (an `AuditResult`, nested lists) and returns a
``plotly.graph_objects.Figure`` whose hover text shows the exact numbers. Used by the Space
(``spaces/qk-audit``); any notebook can use them too. Needs plotly (the ``space`` extra).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import plotly.graph_objects as go

from qkmonitor.errors import QKMonitorError
from qkmonitor.result import STATISTICS, AuditResult, HeadResult
from qkmonitor.statistics import HEAD_STATISTICS

__all__ = [
    "LABELS",
    "LOG_SCALE",
    "SIGNED",
    "UNITS",
    "aligned_heads",
    "attention_map",
    "difference_heatmap",
    "eigenvalue_plot",
    "entropy_scatter",
    "grid_heatmap",
    "heatmap",
]

#: axis and title text of each statistic
LABELS = {
    **{statistic.name: statistic.label for statistic in HEAD_STATISTICS},
    "attn_entropy": "attention entropy (nats)",
    "attn_entropy_norm": "normalized attention entropy",
}

#: what each value is measured in (docs/metrics.md): W's eigenvalues are content logits
#: x_i^T W x_j of unit-norm tokens, so eig_mean and the spectral norm are logits, eig_var logit²
UNITS = {
    **{statistic.name: statistic.unit for statistic in HEAD_STATISTICS},
    "attn_entropy": "nats",
    "attn_entropy_norm": "0 = one token, 1 = uniform",
}

#: statistics whose heatmaps default to a log colour scale: non-negative magnitudes where one
#: outlier head would otherwise paint every other head the same colour
LOG_SCALE = frozenset(statistic.name for statistic in HEAD_STATISTICS if statistic.log_scale)

#: signed statistics: a diverging colour scale centred on 0 (the sign is the reading)
SIGNED = frozenset({"eig_mean", "eig_concentration"})
#: the diverging scale of signed values and differences: red above 0, blue below, white at 0
DIVERGING = "RdBu_r"

_MARGIN = {"l": 60, "r": 20, "t": 50, "b": 50}


def _plain(value: float) -> float | None:
    """NaN and Inf become gaps (None) in plotly."""
    return value if math.isfinite(value) else None


def _integer_ticks(count: int) -> dict:
    """Axis ticks on whole layer/head numbers: every one up to 16, then plotly's choice."""
    return {"dtick": 1} if count <= 16 else {"tickformat": "d"}


def _check_statistic(statistic: str) -> None:
    if statistic not in STATISTICS:
        raise QKMonitorError(f"unknown statistic '{statistic}'; choose one of {STATISTICS}")


def _log10(value: float) -> float | None:
    return math.log10(value) if math.isfinite(value) and value > 0 else None


def _log_colorbar(z: list[list[float | None]]) -> dict:
    """Colour bar ticks of log10 values, labelled with the values themselves."""
    present = [v for row in z for v in row if v is not None]
    if not present:
        return {}
    low, high = min(present), max(present)
    ticks = [low + (high - low) * i / 4 for i in range(5)] if high > low else [low]
    return {"tickvals": ticks, "ticktext": [f"{10**t:.3g}" for t in ticks]}


def _end(value: float, name: str) -> str:
    """A colour bar's end tick: the value, and what it is (e.g. "+0.289 = +√(d_head/d_in)")."""
    sign = "+" if value > 0 else "−"
    return f"{sign}{abs(value):.3g}" + (f" = {sign}{name}" if name else "")


def grid_heatmap(
    grid: Sequence[Sequence[float]],
    *,
    title: str,
    value_name: str,
    units: str = "",
    log: bool = False,
    colorscale: str = "Viridis",
    midpoint: float | None = None,
    bound: float | None = None,
    bound_name: str = "",
    extra: dict[str, Sequence[Sequence[float]]] | None = None,
) -> go.Figure:
    """A layer x head heatmap of any per-head quantity.

    grid: rows are layers, columns heads (NaN = no value). value_name (and units) label the
    value in the hover text and on the colour bar; extra adds more same-shaped grids to the hover
    text (name -> grid). log colours by log10 of the value (values <= 0 become gaps) while the
    hover text and the colour bar's labels show the values themselves. midpoint centres a
    diverging colour scale (signed values, differences). bound: the colour range is
    [-bound, bound], its ends labelled ±bound and ±bound_name (a limit no value passes).
    The colour bar's title runs along its right side, clear of the ticks.
    """
    hovered = {value_name: grid, **(extra or {})} if log else dict(extra or {})
    names = list(hovered)
    custom = [
        [[_plain(float(hovered[name][row][col])) for name in names] for col in range(len(values))]
        for row, values in enumerate(grid)
    ]
    shown = "%{customdata[0]:.6g}" if log else "%{z:.6g}"
    hover = "layer %{y}, head %{x}<br>" + f"{value_name} = {shown}"
    for index, name in enumerate(names[1:] if log else names, start=int(log)):
        hover += f"<br>{name} = %{{customdata[{index}]:.6g}}"
    convert = _log10 if log else _plain
    z = [[convert(float(v)) for v in row] for row in grid]
    label = value_name + (f"<br>({units}{', log scale' if log else ''})" if units else "")
    if log and not units:
        label += "<br>(log scale)"
    ticks = _log_colorbar(z) if log else {}
    limits = {}
    if bound is not None:
        limits = {"zmin": -bound, "zmax": bound}
        ticks = {
            "tickvals": [-bound, -bound / 2, 0.0, bound / 2, bound],
            "ticktext": [_end(-bound, bound_name), f"−{bound / 2:.3g}", "0",
                         f"{bound / 2:.3g}", _end(bound, bound_name)],
        }  # fmt: skip
    trace = go.Heatmap(
        z=z,
        x=list(range(max((len(row) for row in grid), default=0))),
        y=list(range(len(grid))),
        colorscale=colorscale,
        zmid=midpoint,
        **limits,
        customdata=custom if names else None,
        hovertemplate=hover + "<extra></extra>",
        hoverongaps=False,
        colorbar={"title": {"text": label, "side": "right"}, **ticks},
    )
    figure = go.Figure(trace)
    figure.update_layout(
        title={"text": title},
        xaxis={"title": {"text": "head"}, **_integer_ticks(len(trace.x))},
        yaxis={"title": {"text": "layer"}, "autorange": "reversed", **_integer_ticks(len(trace.y))},
        margin=_MARGIN,
    )
    return figure


def heatmap(
    result: AuditResult,
    statistic: str = "eig_var",
    block: str | None = None,
    *,
    log: bool | None = None,
) -> go.Figure:
    """Layer x head heatmap of one statistic of an audit (one attention block); log colour
    scale when asked, by default for the statistics in `LOG_SCALE`; the `SIGNED` ones on a
    diverging scale centred on 0, eig_concentration's spanning its bound ±√(d_head/d_in)."""
    _check_statistic(statistic)
    block = block or result.blocks[0]
    suffix = f", {block} attention" if len(result.blocks) > 1 else ""
    signed: dict = {}
    if statistic in SIGNED:
        signed = {"colorscale": DIVERGING, "midpoint": 0.0}
        d_head, d_in = result.model.head_dim.get(block), result.model.d_in.get(block)
        if statistic == "eig_concentration" and d_head and d_in:
            signed |= {"bound": math.sqrt(d_head / d_in), "bound_name": "√(d_head/d_in)"}
    return grid_heatmap(
        result.grid(statistic, block),
        title=f"{LABELS[statistic]}{suffix}",
        value_name=statistic,
        units=UNITS[statistic],
        log=statistic in LOG_SCALE if log is None else log,
        **signed,
    )


def _head(result: AuditResult, block: str, layer: int, head: int) -> HeadResult:
    for row in result.heads:
        if (row.block, row.layer, row.head) == (block, layer, head):
            return row
    raise QKMonitorError(
        f"{result.model.source} has no head {head} in layer {layer} of its {block} attention"
    )


def eigenvalue_plot(result: AuditResult, block: str, layer: int, head: int) -> go.Figure:
    """The non-zero eigenvalues of one head's W_QK in the complex plane, with two means marked:
    eig_mean, over all d_in eigenvalues (d_in - d_head of them are zero), and the mean of the
    plotted ones (tr W / d_head)."""
    row = _head(result, block, layer, head)
    points = [(re, im) for re, im in row.eigvals if math.isfinite(re) and math.isfinite(im)]
    figure = go.Figure(
        go.Scatter(
            x=[re for re, _ in points],
            y=[im for _, im in points],
            mode="markers",
            name="eigenvalues",
            marker={"size": 7, "opacity": 0.8},
            hovertemplate="%{x:.6g} %{y:+.6g}i<extra></extra>",
        )
    )
    n = result.model.d_in.get(row.block, 0)
    if math.isfinite(row.eig_mean):
        every = f"all {n} eigenvalues" if n else "all d_in eigenvalues"
        zeros = f", {n - len(points)} of them 0" if n > len(points) else ""
        figure.add_vline(
            x=row.eig_mean,
            line_dash="dash",
            annotation_text=f"eig_mean {row.eig_mean:.3g} ({every}{zeros})",
            annotation_position="top left",
        )
    if points:
        plotted = sum(re for re, _ in points) / len(points)
        figure.add_vline(
            x=plotted,
            line_dash="dot",
            line_color="firebrick",
            annotation_text=f"mean of the {len(points)} plotted {plotted:.3g}",
            annotation_position="bottom right",
        )
    figure.update_layout(
        title={
            "text": f"layer {layer}, head {head} ({block}): {len(points)} non-zero eigenvalues, "
            f"eig_var {row.eig_var:.3g}"
        },
        xaxis={"title": {"text": "real part"}, "zeroline": True},
        yaxis={"title": {"text": "imaginary part"}, "zeroline": True, "scaleanchor": "x"},
        margin=_MARGIN,
        showlegend=False,
    )
    return figure


def aligned_heads(base: AuditResult, other: AuditResult) -> list[tuple[HeadResult, HeadResult]]:
    """Pairs of the same (block, layer, head) in two audits; raises if the layouts differ."""

    def layout(result: AuditResult) -> dict[str, tuple[int, int]]:
        return {
            block: (result.model.n_layers.get(block, 0), result.model.n_heads.get(block, 0))
            for block in result.blocks
        }

    if layout(base) != layout(other):
        shapes = [
            ", ".join(f"{block} {n}x{h}" for block, (n, h) in layout(result).items())
            for result in (base, other)
        ]
        raise QKMonitorError(
            f"cannot compare {base.model.source} ({shapes[0]} layers x heads) with "
            f"{other.model.source} ({shapes[1]}): pick two models of the same architecture, "
            "e.g. a base model and its fine-tune"
        )
    others = {(h.block, h.layer, h.head): h for h in other.heads}
    return [(h, others[(h.block, h.layer, h.head)]) for h in base.heads]


def difference_heatmap(
    base: AuditResult, other: AuditResult, statistic: str = "eig_var", block: str | None = None
) -> go.Figure:
    """Layer x head heatmap of other - base for one statistic, both values in the hover text."""
    _check_statistic(statistic)
    aligned_heads(base, other)
    block = block or base.blocks[0]
    before, after = base.grid(statistic, block), other.grid(statistic, block)
    difference = [
        [b - a for a, b in zip(row_a, row_b, strict=True)]
        for row_a, row_b in zip(before, after, strict=True)
    ]
    suffix = f", {block} attention" if len(base.blocks) > 1 else ""
    return grid_heatmap(
        difference,
        title=f"{statistic}: {_short(other)} minus {_short(base)}{suffix}",
        value_name=f"Δ {statistic}",
        units=UNITS[statistic],
        colorscale=DIVERGING,
        midpoint=0.0,
        extra={"base": before, "other": after},
    )


def _short(result: AuditResult) -> str:
    """The source name, with the revision when one was asked for."""
    model = result.model
    return f"{model.source}@{model.revision}" if model.revision else model.source


def attention_map(
    probabilities: Sequence[Sequence[float]], tokens: Sequence[str], *, title: str
) -> go.Figure:
    """One head's attention probabilities (query rows x key columns) over the given tokens."""
    labels = [f"{i}: {token}" for i, token in enumerate(tokens)]
    figure = go.Figure(
        go.Heatmap(
            z=[[float(p) for p in row] for row in probabilities],
            x=labels,
            y=labels,
            colorscale="Blues",
            zmin=0.0,
            zmax=1.0,
            hovertemplate="query %{y}<br>key %{x}<br>p = %{z:.4f}<extra></extra>",
            colorbar={"title": {"text": "p"}},
        )
    )
    figure.update_layout(
        title={"text": title},
        xaxis={"title": {"text": "key"}, "tickangle": -60},
        yaxis={"title": {"text": "query"}, "autorange": "reversed"},
        margin=_MARGIN,
    )
    return figure


#: the eigenspectrum statistics the entropy scatter plots against (x axes, left to right)
SCATTER_X = ("eig_var", "eig_concentration")


def entropy_scatter(points: Sequence[Mapping[str, float]], *, title: str) -> go.Figure:
    """Every head's normalized attention entropy (y) against its eig_var (left, log x axis)
    and its eig_concentration (right). points: one mapping per head with layer, head,
    attn_entropy_norm, attn_entropy and the `SCATTER_X` statistics."""
    from plotly.subplots import make_subplots

    figure = make_subplots(
        rows=1, cols=2, shared_yaxes=True, horizontal_spacing=0.06,
        subplot_titles=[f"{LABELS[x]} ({UNITS[x]})" for x in SCATTER_X],
    )  # fmt: skip
    for column, statistic in enumerate(SCATTER_X, start=1):
        shown = [p for p in points if math.isfinite(p[statistic]) and math.isfinite(
            p["attn_entropy_norm"])]  # fmt: skip
        figure.add_trace(
            go.Scatter(
                x=[p[statistic] for p in shown],
                y=[p["attn_entropy_norm"] for p in shown],
                customdata=[[p["layer"], p["head"], p["attn_entropy"]] for p in shown],
                mode="markers",
                name=statistic,
                marker={"size": 8, "opacity": 0.75},
                hovertemplate="layer %{customdata[0]}, head %{customdata[1]}<br>"
                f"{statistic} = " + "%{x:.6g}<br>normalized entropy = %{y:.4g}<br>"
                "entropy = %{customdata[2]:.4g} nats<extra></extra>",
            ),
            row=1,
            col=column,
        )
        figure.update_xaxes(
            title_text=statistic, type="log" if statistic in LOG_SCALE else "linear",
            row=1, col=column,
        )  # fmt: skip
    figure.update_yaxes(title_text="normalized attention entropy on your text", row=1, col=1)
    figure.update_layout(title={"text": title}, margin=_MARGIN, showlegend=False)
    return figure
