"""accelerate's accumulation idiom, ``with accelerator.accumulate(model), monitor.step():``
around each micro-batch, gives exactly the numbers of the documented loop (one ``monitor.step()``
around all micro-batches of an optimizer step): the regularizer's gradient once per optimizer
step, ``interval`` counting optimizer steps, entropy / max logit over every micro-batch."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from distributed.tiny import PaddedTokens, tiny_bert

from qkmonitor import QKMonitor, QKMonitorError

ACCUMULATION, STEPS = 4, 3
SETTINGS = {"regularization": 0.5, "interval": 1, "detail": "head", "rank_collapse": True}


@pytest.fixture
def accelerator():
    """A CPU Accelerator accumulating 4 micro-batches; accelerate's shared state reset after."""
    yield Accelerator(cpu=True, gradient_accumulation_steps=ACCUMULATION)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def micro_batches() -> list[dict[str, torch.Tensor]]:
    data = PaddedTokens()
    return [
        {k: torch.stack([data[2 * i + j][k] for j in range(2)]) for k in data[0]}
        for i in range(ACCUMULATION * STEPS)
    ]


def run(accelerator: Accelerator, idiom: str) -> tuple[list[dict], QKMonitor, torch.nn.Module]:
    model = tiny_bert(dropout=0.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model, optimizer = accelerator.prepare(model, optimizer)
    monitor = QKMonitor(model, **SETTINGS)
    model.train()
    logged, batches = [], micro_batches()

    def micro(batch):
        with accelerator.accumulate(model):
            accelerator.backward(model(**batch).loss)
            optimizer.step()
            optimizer.zero_grad()

    if idiom == "documented":
        for step in range(STEPS):
            with monitor.step():
                for batch in batches[ACCUMULATION * step : ACCUMULATION * (step + 1)]:
                    micro(batch)
            logged.append(monitor.metrics())
    else:
        for batch in batches:
            with accelerator.accumulate(model), monitor.step():
                accelerator.backward(model(**batch).loss)
                optimizer.step()
                optimizer.zero_grad()
            if monitor.metrics():
                logged.append(monitor.metrics())
    monitor.close()
    return logged, monitor, model


def test_accumulate_idiom_equals_the_documented_loop(accelerator):
    want, documented, want_model = run(accelerator, "documented")
    got, idiom, got_model = run(accelerator, "accumulate")
    assert documented.step_count == idiom.step_count == STEPS  # optimizer steps, not batches
    assert len(got) == len(want) == STEPS
    for got_step, want_step in zip(got, want, strict=True):
        assert set(got_step) == set(want_step)
        assert "qk/attn_entropy/head_03/layer_01" in got_step and "qk/reg/R" in got_step
        for key, value in want_step.items():
            assert got_step[key] == pytest.approx(value, rel=1e-6, abs=1e-12), key
    for (name, a), b in zip(want_model.named_parameters(), got_model.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=name)


def test_entropy_covers_every_micro_batch_not_only_the_last(accelerator):
    """The step's entropy differs from the last micro-batch's alone."""
    got, _, _ = run(accelerator, "accumulate")
    model = tiny_bert(dropout=0.0)
    monitor = QKMonitor(model, entropy=True, statistics=("eig_var",))
    with monitor.step():
        model(**micro_batches()[ACCUMULATION - 1]).loss.backward()
    last_only = monitor.metrics()["qk/attn_entropy/mean"]
    monitor.close()
    assert got[0]["qk/attn_entropy/mean"] != pytest.approx(last_only, rel=1e-6)


def test_an_unprepared_optimizer_stepping_inside_a_micro_batch_is_refused(accelerator):
    model = tiny_bert(dropout=0.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)  # not through accelerator.prepare
    model = accelerator.prepare(model)
    monitor = QKMonitor(model, 0.5)
    batch = micro_batches()[0]
    with (
        pytest.raises(QKMonitorError, match=r"did not sync gradients.*yet an optimizer"),
        accelerator.accumulate(model),
        monitor.step(),
    ):
        model(**batch).loss.backward()
        optimizer.step()
    monitor.close()
