"""torch.compile: the measuring pass stays out of the compiled graph (dynamo-disabled hooks and
measuring function), so monitored steps add no recompiles beyond a small fixed number, with the
regularizer on too, and measure exactly what the same run measures eagerly."""

from __future__ import annotations

import math

import pytest
import torch
import torch._dynamo
from distributed.tiny import PaddedTokens, tiny_bert
from torch._dynamo.utils import counters

from qkmonitor import QKMonitor

pytestmark = pytest.mark.slow

STEPS, WARM = 8, 4  # steps 1-4 meet every variant: unmonitored, monitored, armed or not
SETTINGS = {"regularization": 0.5, "interval": 2, "rank_collapse": True}


def batch(step: int) -> dict[str, torch.Tensor]:
    data = PaddedTokens()
    return {k: torch.stack([data[4 * step + j][k] for j in range(4)]) for k in data[0]}


def run(compiled: bool) -> tuple[list[dict], list[int]]:
    torch._dynamo.reset()
    counters.clear()
    model = tiny_bert(dropout=0.0)
    model.train()
    forward = torch.compile(model, backend="eager") if compiled else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    monitor = QKMonitor(forward, **SETTINGS)
    logged, graphs = [], []
    try:
        for step in range(STEPS):
            with monitor.step():
                forward(**batch(step)).loss.backward()
                optimizer.step()
                optimizer.zero_grad()
            logged.append(monitor.metrics())
            graphs.append(counters["stats"]["unique_graphs"])
    finally:
        monitor.close()
        torch._dynamo.reset()
    return logged, graphs


def test_monitored_compiled_steps_add_no_recompiles_and_measure_as_eager():
    eager, _ = run(compiled=False)
    compiled, graphs = run(compiled=True)
    assert graphs[WARM - 1] <= 12  # a small fixed number of graphs for all variants
    assert graphs[-1] == graphs[WARM - 1]  # later steps, monitored or not, compile nothing
    assert [bool(m) for m in compiled] == [bool(m) for m in eager] == [False, True] * 4
    for got, want in zip(compiled, eager, strict=True):
        assert set(got) == set(want)
        for key, value in want.items():
            assert not math.isnan(got[key]), key
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-9), key
