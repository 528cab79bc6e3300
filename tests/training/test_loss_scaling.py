"""fp16 loss scaling with torch's GradScaler: the regularizer's gradient carries the scaler's
scale (``QKMonitor(..., scaler=)``), so R falls as in the unscaled fp32 run; without it, a step
that a GradScaler unscales is refused in one line instead of weakening the regularizer by the
scale (65536x) silently."""

from __future__ import annotations

import pytest
import torch
from distributed.tiny import PaddedTokens, tiny_bert

from qkmonitor import QKMonitor, QKMonitorError

LAMBDA, LR, STEPS = 0.5, 0.5, 3


def batches() -> list[dict[str, torch.Tensor]]:
    data = PaddedTokens()
    return [
        {k: torch.stack([data[4 * i + j][k] for j in range(4)]) for k in data[0]}
        for i in range(STEPS)
    ]


def r_trajectory(fp16: bool, pass_scaler: bool = True) -> list[float]:
    model = tiny_bert(dropout=0.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, enabled=fp16)
    monitor = QKMonitor(
        model, LAMBDA, scaler=scaler if pass_scaler else None, entropy=False, max_logit=False
    )
    model.train()
    out = []
    try:
        for batch in batches():
            with monitor.step():
                with torch.autocast("cpu", dtype=torch.float16, enabled=fp16):
                    loss = model(**batch).loss
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad()
            out.append(monitor.metrics()["qk/reg/R"])
    finally:
        monitor.close()
    return out


def test_r_falls_under_grad_scaler_as_in_the_unscaled_run():
    unscaled, scaled = r_trajectory(fp16=False), r_trajectory(fp16=True)
    assert unscaled[-1] < 0.99  # the regularizer visibly works in this setting
    # fp16 autocast changes the task gradient slightly, not the regularizer's
    assert scaled == pytest.approx(unscaled, rel=1e-5)


def test_a_grad_scaler_the_monitor_was_not_given_is_refused_in_one_line():
    with pytest.raises(QKMonitorError, match=r"GradScaler \(scale 65536\).*scaler=scaler"):
        r_trajectory(fp16=True, pass_scaler=False)
