"""Spearman's rank correlation, for reading how a weight statistic orders heads against their
measured attention entropy (the Space's scatter readout, examples/entropy_vs_spectrum.py).

Pure Python on lists: no I/O, no torch.
"""

from __future__ import annotations

import math

__all__ = ["rank_correlation"]


def _ranks(values: list[float]) -> list[float]:
    """Ranks from 1, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for index in order[start : end + 1]:
            ranks[index] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def rank_correlation(xs: list[float], ys: list[float]) -> tuple[float, int]:
    """Spearman's rank correlation of the finite pairs, and how many there are (NaN below 3
    pairs or when either side is constant)."""
    pairs = [(x, y) for x, y in zip(xs, ys, strict=True) if math.isfinite(x) and math.isfinite(y)]
    if len(pairs) < 3:
        return math.nan, len(pairs)
    rx, ry = _ranks([x for x, _ in pairs]), _ranks([y for _, y in pairs])
    mean = (len(pairs) + 1) / 2
    covariance = sum((a - mean) * (b - mean) for a, b in zip(rx, ry, strict=True))
    spread = math.sqrt(sum((a - mean) ** 2 for a in rx) * sum((b - mean) ** 2 for b in ry))
    return (covariance / spread if spread > 0 else math.nan), len(pairs)
