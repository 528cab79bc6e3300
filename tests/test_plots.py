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
    figure = heatmap(result, "spectral_norm")
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
    assert heatmap(result, "eig_var", "decoder").data[0].z[0][0] == 0.0


def test_unknown_statistic_is_refused():
    with pytest.raises(QKMonitorError, match="unknown statistic 'eig_varr'"):
        heatmap(_result(), "eig_varr")


def test_eigenvalue_plot_has_every_eigenvalue_and_the_mean():
    result = _result()
    figure = eigenvalue_plot(result, "self", 1, 2)
    assert list(figure.data[0].x) == [12.0, 12.0, -1.0]
    assert list(figure.data[0].y) == [1.0, -1.0, 0.0]
    assert figure.layout.shapes[0].x0 == pytest.approx(0.12)  # the eig_mean line
    with pytest.raises(QKMonitorError, match="no head 3 in layer 1"):
        eigenvalue_plot(result, "self", 1, 3)


def test_difference_heatmap_is_other_minus_base_with_both_on_hover():
    base, other = _result(), _result(offset=0.5)
    figure = difference_heatmap(base, other, "eig_var")
    trace = figure.data[0]
    assert [list(row) for row in trace.z] == [[0.5] * 3] * 2
    assert trace.zmid == 0.0
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
