"""qkmonitor.plots: the figures carry exactly the result's numbers."""

from __future__ import annotations

import math

import pytest

from qkmonitor.errors import QKMonitorError
from qkmonitor.plots import (
    aligned_heads,
    attention_map,
    difference_heatmap,
    eigenvalue_plot,
    entropy_scatter,
    grid_heatmap,
    heatmap,
)
from qkmonitor.result import AuditResult, HeadResult, ModelInfo


def _result(layers: int = 2, heads: int = 3, offset: float = 0.0, blocks=("self",)) -> AuditResult:
    rows = []
    for block in blocks:
        for layer in range(layers):
            for head in range(heads):
                value = offset + layer * 10 + head
                rows.append(
                    HeadResult(
                        block=block, layer=layer, head=head, kv_head=head, eig_mean=value / 100,
                        eig_var=value, eig_concentration=0.1, eig_var_complex=value,
                        spectral_norm=2 * value,
                        positive_fraction=0.5, finite=True,
                        eigvals=[(value, 1.0), (value, -1.0), (-1.0, 0.0)],
                    )
                )  # fmt: skip
    info = ModelInfo(
        source="org/model", kind="hub", model_type="llama",
        n_layers=dict.fromkeys(blocks, layers), n_heads=dict.fromkeys(blocks, heads),
    )  # fmt: skip
    return AuditResult(model=info, heads=rows)


def test_heatmap_shows_the_grid_with_values_on_hover():
    result = _result()
    figure = heatmap(result, "spectral_norm", log=False)
    trace = figure.data[0]
    assert [list(row) for row in trace.z] == result.grid("spectral_norm")
    assert list(trace.x) == [0, 1, 2] and list(trace.y) == [0, 1]
    assert "spectral_norm = %{z" in trace.hovertemplate and "layer %{y}, head %{x}" in (
        trace.hovertemplate
    )
    assert figure.layout.yaxis.autorange == "reversed"  # layer 0 at the top


def test_heatmap_names_the_block_of_multi_block_models_and_leaves_nan_as_gaps():
    result = _result(blocks=("encoder", "decoder"))
    broken = result.heads[0]
    result.heads[0] = HeadResult(**{**broken.__dict__, "eig_var": math.nan, "finite": False})
    figure = heatmap(result, "eig_var", "encoder")
    assert "encoder attention" in figure.layout.title.text
    assert figure.data[0].z[0][0] is None
    assert heatmap(result, "eig_var", "decoder", log=False).data[0].z[0][0] == 0.0


def test_log_colour_scale_is_the_default_for_magnitudes_and_hover_keeps_the_values():
    result = _result()
    figure = heatmap(result, "eig_var")  # the default for eig_var: log
    trace = figure.data[0]
    grid = result.grid("eig_var")
    assert trace.z[0][0] is None  # eig_var 0 has no logarithm: a gap
    assert trace.z[1][2] == pytest.approx(math.log10(12.0))
    assert [[c[0] for c in row] for row in trace.customdata] == grid  # hover: the value itself
    assert "eig_var = %{customdata[0]" in trace.hovertemplate
    bar = trace.colorbar
    assert bar.title.text == "eig_var<br>(logit², log scale)"
    assert float(bar.ticktext[-1]) == 12.0 and float(bar.ticktext[0]) == 1.0  # labels: values
    assert bar.tickvals[-1] == pytest.approx(math.log10(12.0)) and bar.tickvals[0] == 0.0
    linear = heatmap(result, "eig_mean").data[0]  # signed: linear by default
    assert [list(row) for row in linear.z] == result.grid("eig_mean")
    assert linear.colorbar.title.text == "eig_mean<br>(logit)"


def test_unknown_statistic_is_refused():
    with pytest.raises(QKMonitorError, match="unknown statistic 'eig_varr'"):
        heatmap(_result(), "eig_varr")


def test_eigenvalue_plot_has_every_eigenvalue_and_the_mean():
    result = _result()
    figure = eigenvalue_plot(result, "self", 1, 2)
    assert list(figure.data[0].x) == [12.0, 12.0, -1.0]
    assert list(figure.data[0].y) == [1.0, -1.0, 0.0]
    assert figure.layout.shapes[0].x0 == pytest.approx(0.12)  # the eig_mean line
    assert figure.layout.shapes[1].x0 == pytest.approx((12 + 12 - 1) / 3)  # mean of the plotted
    labels = [a.text for a in figure.layout.annotations]
    assert "(all 0 eigenvalues)" not in labels[0] and "eig_mean 0.12" in labels[0]
    assert labels[1] == "mean of the 3 plotted 7.67"
    with pytest.raises(QKMonitorError, match="no head 3 in layer 1"):
        eigenvalue_plot(result, "self", 1, 3)


def test_difference_heatmap_is_other_minus_base_with_both_on_hover():
    base, other = _result(), _result(offset=0.5)
    figure = difference_heatmap(base, other, "eig_var")
    trace = figure.data[0]
    assert [list(row) for row in trace.z] == [[0.5] * 3] * 2
    assert trace.zmid == 0.0 and trace.colorbar.title.text == "Δ eig_var<br>(logit²)"
    assert list(trace.customdata[1][2]) == [12.0, 12.5]  # base, other of layer 1 head 2
    assert "customdata[0]" in trace.hovertemplate and "customdata[1]" in trace.hovertemplate


def test_different_layouts_cannot_be_compared():
    with pytest.raises(QKMonitorError, match=r"cannot compare .*self 2x3.*self 2x4"):
        difference_heatmap(_result(), _result(heads=4))
    pairs = aligned_heads(_result(), _result(offset=1))
    assert all((a.layer, a.head) == (b.layer, b.head) for a, b in pairs) and len(pairs) == 6


def test_grid_heatmap_and_attention_map():
    figure = grid_heatmap([[0.1, 0.2]], title="t", value_name="v", extra={"raw": [[1.0, 2.0]]})
    assert list(figure.data[0].customdata[0][1]) == [2.0]
    tokens = ["[CLS]", "a", "a", "[SEP]"]
    probabilities = [[0.25] * 4] * 4
    figure = attention_map(probabilities, tokens, title="map")
    assert list(figure.data[0].x) == ["0: [CLS]", "1: a", "2: a", "3: [SEP]"]  # repeats stay apart
    assert [list(row) for row in figure.data[0].z] == probabilities


def test_eigenvalue_plot_says_how_many_of_the_d_in_eigenvalues_are_zero():
    result = _result()
    result.model = ModelInfo(**{**result.model.__dict__, "d_in": {"self": 64}})
    (label, _) = [a.text for a in eigenvalue_plot(result, "self", 0, 1).layout.annotations]
    assert label == "eig_mean 0.01 (all 64 eigenvalues, 61 of them 0)"


def test_entropy_scatter_plots_each_heads_entropy_against_its_statistics():
    points = [
        {"layer": 0, "head": 0, "attn_entropy": 1.5, "attn_entropy_norm": 0.6,
         "eig_var": 0.2, "eig_concentration": 0.1},
        {"layer": 1, "head": 3, "attn_entropy": 0.5, "attn_entropy_norm": 0.2,
         "eig_var": 2.0, "eig_concentration": -0.4},
        {"layer": 1, "head": 4, "attn_entropy": 0.5, "attn_entropy_norm": 0.3,
         "eig_var": 1.0, "eig_concentration": math.nan},
    ]  # fmt: skip
    figure = entropy_scatter(points, title="t")
    by_var, by_concentration = figure.data
    assert list(by_var.x) == [0.2, 2.0, 1.0] and list(by_var.y) == [0.6, 0.2, 0.3]
    assert [list(c) for c in by_var.customdata] == [[0, 0, 1.5], [1, 3, 0.5], [1, 4, 0.5]]
    assert list(by_concentration.x) == [0.1, -0.4] and list(by_concentration.y) == [0.6, 0.2]
    assert figure.layout.xaxis.type == "log" and figure.layout.xaxis2.type == "linear"


def test_signed_statistics_diverge_around_zero_and_concentration_spans_its_bound():
    from dataclasses import replace

    result = _result()
    result = AuditResult(
        model=replace(result.model, head_dim={"self": 16}, d_in={"self": 64}), heads=result.heads
    )
    mean = heatmap(result, "eig_mean").data[0]
    assert mean.zmid == 0.0 and mean.colorscale == heatmap(result, "eig_mean").data[0].colorscale
    white = [color for position, color in mean.colorscale if position == 0.5]
    assert white and white[0] in ("rgb(247,247,247)", "#f7f7f7")  # RdBu's middle: 0 is neutral
    concentration = heatmap(result, "eig_concentration").data[0]
    bound = math.sqrt(16 / 64)  # a head of rank d_head: |eig_concentration| <= sqrt(d_head/d_in)
    assert (concentration.zmin, concentration.zmax) == (-bound, bound)
    assert list(concentration.colorbar.tickvals) == [-bound, -bound / 2, 0.0, bound / 2, bound]
    assert concentration.colorbar.ticktext[-1] == "+0.5 = +√(d_head/d_in)"
    assert concentration.colorbar.ticktext[0] == "−0.5 = −√(d_head/d_in)"
    magnitude = heatmap(result, "eig_var").data[0]  # unsigned: sequential, no midpoint
    assert magnitude.zmid is None and magnitude.zmin is None
    assert magnitude.colorscale != mean.colorscale
    for trace in (mean, concentration, magnitude):
        assert trace.colorbar.title.side == "right"  # along the bar, clear of its top tick
    no_width = heatmap(_result(), "eig_concentration").data[0]  # d_in unknown: no bound
    assert no_width.zmin is None and no_width.zmid == 0.0
