"""qkmonitor.correlation against scipy's Spearman correlation."""

from __future__ import annotations

import math

import pytest

from qkmonitor.correlation import rank_correlation


def test_rank_correlation_is_spearmans_with_ties_and_gaps():
    from scipy.stats import spearmanr

    xs = [0.3, 0.1, 0.1, 0.9, math.nan, 0.5, 0.5, 0.2]
    ys = [1.0, 2.0, 2.0, 0.5, 3.0, 0.7, 0.1, math.inf]
    rho, n = rank_correlation(xs, ys)
    kept = [(x, y) for x, y in zip(xs, ys, strict=True) if math.isfinite(x) and math.isfinite(y)]
    assert n == len(kept) == 6
    assert rho == pytest.approx(spearmanr(*zip(*kept, strict=True)).statistic, rel=1e-12)
    assert math.isnan(rank_correlation([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])[0])
    assert math.isnan(rank_correlation([1.0, 2.0], [1.0, 2.0])[0])
