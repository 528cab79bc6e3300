"""QKMonitorCallback end to end with the real Trainer on tiny models (CPU, offline).

What a user sees: qk/ keys in state.log_history and TensorBoard, numbers equal to the audit
engine's on that step's checkpoint, training unchanged by monitoring, clear errors on bad input,
alerts that name layer and head, state that survives resume_from_checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import types

import pytest
import torch
from distributed.launch import torchrun, torchrun_results
from distributed.tiny import PaddedTokens, attention_modules, tiny_bert, training_args
from support.flash import register_flash
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    PretrainedConfig,
    PreTrainedModel,
    Trainer,
    TrainerCallback,
)

from qkmonitor import QKMonitorCallback, audit
from qkmonitor.errors import UnsupportedModelError
from qkmonitor.training.alerts import AlertRule


def train(tmp_path, callback=None, model=None, **overrides) -> Trainer:
    callbacks = [] if callback is None else [callback]
    args = training_args(str(tmp_path), **overrides)
    trainer = Trainer(
        model=model if model is not None else tiny_bert(),
        args=args,
        train_dataset=PaddedTokens(),
        callbacks=callbacks,
    )
    trainer.train()
    return trainer


def qk_logs(trainer: Trainer) -> list[dict]:
    return [entry for entry in trainer.state.log_history if "qk/eig_var/mean" in entry]


# ---- construction --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"regularization": -0.1}, "must be >= 0"),
        ({"regularization": float("nan")}, "must be >= 0"),
        ({"interval": 0}, "interval"),
        ({"interval": -3}, "interval"),
        ({"detail": "neuron"}, "detail"),
        ({"statistics": ["eig_median"]}, "unknown statistics"),
        ({"heads": []}, "heads"),
        ({"alerts": [{"statistic": "eig_var"}]}, "no threshold"),
    ],
)
def test_bad_arguments_raise_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QKMonitorCallback(**kwargs)


# ---- bad models: one clear error before any step ----------------------------------------------
class _MLPConfig(PretrainedConfig):
    model_type = "qk_test_mlp"


class _MLP(PreTrainedModel):
    config_class = _MLPConfig

    def __init__(self, config):
        super().__init__(config)
        self.body = torch.nn.Sequential(torch.nn.Embedding(97, 8), torch.nn.Linear(8, 97))
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, labels=None):
        logits = self.body(input_ids)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        return {"loss": loss, "logits": logits}


class _OddAttentionConfig(PretrainedConfig):
    model_type = "qk_test_odd_attention"


class _OddAttention(_MLP):
    config_class = _OddAttentionConfig

    def __init__(self, config):
        super().__init__(config)
        self.attention = torch.nn.MultiheadAttention(8, 2)  # attention the table cannot read


@pytest.mark.parametrize(
    ("model_class", "match"),
    # model_types the installed transformers does not know are refused, never guessed
    [(_MLP, "has no model class"), (_OddAttention, "has no model class")],
)
def test_unsupported_model_fails_at_train_begin(tmp_path, model_class, match):
    model = model_class(model_class.config_class())
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(UnsupportedModelError, match=match):
        train(tmp_path, QKMonitorCallback(), model=model)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # no step ran


def test_missing_layer_or_head_is_a_clear_error(tmp_path):
    with pytest.raises(Exception, match=r"layers \[7\] do not exist"):
        train(tmp_path / "a", QKMonitorCallback(layers=[0, 7]))
    with pytest.raises(Exception, match="head 9 does not exist"):
        train(tmp_path / "b", QKMonitorCallback(heads=[9]))


# ---- what is logged -------------------------------------------------------------------------
def test_logged_statistics_equal_the_audit_of_that_steps_checkpoint(tmp_path):
    callback = QKMonitorCallback(detail="head", statistics=["eig_mean", "eig_var", "spectral_norm"])
    trainer = train(tmp_path, callback, max_steps=4, save_strategy="steps", save_steps=2)
    logs = {entry["step"]: entry for entry in qk_logs(trainer)}
    assert sorted(logs) == [2, 4]
    for step, entry in logs.items():
        result = audit(tmp_path / f"checkpoint-{step}")
        for head in result.heads:
            prefix = f"layer_{head.layer:02d}"
            for stat in ("eig_mean", "eig_var", "spectral_norm"):
                logged = entry[f"qk/{stat}/{prefix}/head_{head.head:02d}"]
                assert logged == pytest.approx(getattr(head, stat), rel=1e-9, abs=1e-15)
        for layer in result.layers():
            prefix = f"layer_{layer.layer:02d}"
            assert entry[f"qk/eig_var/{prefix}"] == pytest.approx(layer.eig_var, rel=1e-9)
            assert entry[f"qk/eig_var/{prefix}/min"] == pytest.approx(layer.eig_var_min, rel=1e-9)


def test_monitoring_does_not_change_training(tmp_path):
    """Same seed with and without the callback (dropout on): bit-identical weights."""
    plain = train(tmp_path / "plain", max_steps=6)
    callback = QKMonitorCallback(detail="head", rank_collapse=True, interval=1)
    monitored = train(tmp_path / "monitored", callback, max_steps=6)
    assert len(qk_logs(monitored)) == 6  # it did measure, at every step
    expected = dict(plain.model.named_parameters())
    for name, parameter in monitored.model.named_parameters():
        assert torch.equal(parameter, expected[name]), name


def test_interval_asks_the_trainer_to_log(tmp_path):
    trainer = train(tmp_path, QKMonitorCallback(interval=3), max_steps=6, logging_steps=100)
    assert [entry["step"] for entry in qk_logs(trainer)] == [3, 6]
    assert all("loss" in entry for entry in qk_logs(trainer))


def test_layers_heads_and_keys(tmp_path):
    callback = QKMonitorCallback(layers=[1], heads=[0, 2], rank_collapse=True)
    entry = qk_logs(train(tmp_path, callback, max_steps=2))[-1]
    qk = {key for key in entry if key.startswith("qk/")}
    assert "qk/eig_var/layer_01" in qk and "qk/eig_var/layer_00" not in qk
    assert {"qk/rank_collapse/layer_01", "qk/rank_collapse/mean"} <= qk
    assert 0 < entry["qk/rank_collapse/layer_01"] <= 1
    assert not any("/head_" in key for key in qk)


def test_gpt2_fused_qkv_is_monitored(tmp_path):
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=97, n_positions=16)
    config.bos_token_id = config.eos_token_id = 1
    torch.manual_seed(0)
    trainer = train(tmp_path, QKMonitorCallback(regularization=0.1), model=GPT2LMHeadModel(config))
    entry = qk_logs(trainer)[-1]
    assert math.isfinite(entry["qk/eig_var/layer_01"]) and entry["qk/reg/R"] > 0


def test_tensorboard_event_file_has_the_qk_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(tmp_path, QKMonitorCallback(regularization=0.1), report_to=["tensorboard"])
    runs = list(tmp_path.rglob("events.out.tfevents.*"))
    assert runs
    accumulator = EventAccumulator(str(runs[0].parent))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert {"train/qk/eig_var/mean", "train/qk/eig_var/layer_00", "train/qk/reg/R"} <= tags


def test_nan_weights_are_logged_as_nan_with_a_warning(tmp_path, caplog):
    model = tiny_bert()
    with torch.no_grad():
        model.bert.encoder.layer[1].attention.self.query.weight[16:32] = float("nan")
    with caplog.at_level(logging.WARNING, logger="qkmonitor"):
        trainer = train(tmp_path, QKMonitorCallback(detail="head"), model=model, max_steps=2)
    entry = qk_logs(trainer)[-1]
    assert math.isnan(entry["qk/eig_var/layer_01/head_01"])
    assert any("NaN" in r.message and "layer_01 head 1" in r.message for r in caplog.records)
    assert trainer.state.global_step == 2  # training went on


# ---- alerts ---------------------------------------------------------------------------------
def test_alert_names_layer_and_head_and_can_stop_training(tmp_path, caplog):
    rule = AlertRule("eig_var", above=0.0)  # every head fires at the first monitored step
    callback = QKMonitorCallback(alerts=[rule], stop_on_alert=True)
    with caplog.at_level(logging.WARNING, logger="qkmonitor"):
        trainer = train(tmp_path, callback, max_steps=8, logging_steps=2)
    assert trainer.state.global_step == 2
    messages = [r.message for r in caplog.records if "alert" in r.message]
    assert any("step 2" in m and "layer 1 head 3" in m and "eig_var" in m for m in messages)


# ---- checkpoints ------------------------------------------------------------------------------
@pytest.mark.parametrize("restore_flag", [False, True])
def test_resume_keeps_history_and_reference(tmp_path, restore_flag):
    overrides = {"save_strategy": "steps", "save_steps": 2, "max_steps": 4}
    overrides["restore_callback_states_from_checkpoint"] = restore_flag
    first = QKMonitorCallback(regularization=0.1)
    train(tmp_path, first, **overrides)
    saved = first.checkpoint_state

    resumed = QKMonitorCallback(regularization=0.1)
    args = training_args(str(tmp_path), **{**overrides, "max_steps": 6})
    trainer = Trainer(
        model=tiny_bert(seed=1), args=args, train_dataset=PaddedTokens(), callbacks=[resumed]
    )
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    live = next(
        cb for cb in trainer.callback_handler.callbacks if isinstance(cb, QKMonitorCallback)
    )
    state = live.checkpoint_state
    assert state["reference"] == saved["reference"]  # not recomputed on the resumed weights
    assert state["monitored_steps"] == saved["monitored_steps"] + 1  # steps 2, 4 then 6
    history = state["alerts"]["history"]["eig_var"]["self/0/0"]
    assert history[:2] == saved["alerts"]["history"]["eig_var"]["self/0/0"]
    assert len(history) == 3


# ---- several processes ------------------------------------------------------------------------
def test_two_processes_agree_with_each_other_and_with_one():
    """torchrun 2 x gloo vs 1 process, same global batch: no hang, rank-consistent metrics."""
    results = torchrun_results()
    (single,), (rank0, rank1) = results[1], results[2]
    assert len(rank0["logs"]) == 3
    assert rank0["logs"] == rank1["logs"]  # bit-identical on every rank
    for two, one in zip(rank0["logs"], single["logs"], strict=True):
        assert two.keys() == one.keys()
        for key, value in one.items():
            if key.startswith("qk/"):
                assert two[key] == pytest.approx(value, rel=1e-4, abs=1e-8), key


def test_sharded_fsdp1_and_fsdp2_gather_one_layer_and_regularize_exactly():
    """torchrun 2 x gloo: FSDP2, FSDP1 (orig params) and FSDP1 (flat params) on CPU."""
    for rank in torchrun("sharded.py", 2):
        for variant, result in rank.items():
            assert result["spectra"] < 1e-12, variant  # statistics of the unsharded weights
            assert result["gradient"] < 1e-5, variant  # exactly lambda * grad R, reduce-scattered
            assert result["max_summoned"] <= 1, variant  # FSDP1: one layer's unit at a time


def test_zero3_parameters_are_gathered_one_layer_at_a_time(tmp_path, monkeypatch):
    """DeepSpeed is not installable here: a stand-in records the GatheredParameters calls."""
    events: list[tuple[str, frozenset[int]]] = []

    @contextlib.contextmanager
    def gathered_parameters(params, modifier_rank=None):
        ids = frozenset(id(p) for p in params)
        events.append(("enter", ids))
        yield
        events.append(("exit", ids))

    stand_in = types.ModuleType("deepspeed")
    stand_in.zero = types.SimpleNamespace(GatheredParameters=gathered_parameters)
    model = tiny_bert()
    layers = []
    for index, module in enumerate(attention_modules(model)):
        params = [*module.query.parameters(), *module.key.parameters()]
        for parameter in params:
            parameter.ds_id = index  # what ZeRO-3 partitioning leaves on every parameter
        layers.append(frozenset(id(p) for p in params))

    class InstallStandIn(TrainerCallback):  # after accelerate's set-up, which looks for it
        def on_train_begin(self, *args, **kwargs):
            monkeypatch.setitem(sys.modules, "deepspeed", stand_in)

    trainer = Trainer(
        model=model,
        args=training_args(str(tmp_path), max_steps=2),
        train_dataset=PaddedTokens(),
        callbacks=[InstallStandIn(), QKMonitorCallback(regularization=0.1, entropy=False)],
    )
    trainer.train()
    kinds = [kind for kind, _ in events]
    assert kinds == ["enter", "exit"] * (len(events) // 2)  # never two layers at once
    gathered = [ids for kind, ids in events if kind == "enter"]
    assert all(ids in layers for ids in gathered)
    # reference at train begin, the regularizer in each step's forward, the log at step 2
    assert len(gathered) == len(layers) + 2 * len(layers) + len(layers)


@pytest.mark.parametrize("implementation", ["sdpa", "flash"])
def test_logged_entropy_equals_eager_probabilities_of_that_batch(
    tmp_path, implementation, monkeypatch
):
    """Step 1's forward uses the initial weights on samples 0..7: replay it eagerly."""
    callback = QKMonitorCallback(detail="head", interval=1)
    trained = tiny_bert(dropout=0.0)
    if implementation == "flash":  # transformers' flash path, a CPU stand-in kernel
        trained.set_attn_implementation(register_flash(monkeypatch))
    trainer = train(tmp_path, callback, model=trained, max_steps=1, per_device_train_batch_size=8)
    entry = qk_logs(trainer)[0]
    model = tiny_bert(dropout=0.0)
    model.set_attn_implementation("eager")
    batch = {k: torch.stack([PaddedTokens()[i][k] for i in range(8)]) for k in ("input_ids",)}
    mask = torch.stack([PaddedTokens()[i]["attention_mask"] for i in range(8)]).bool()
    with torch.no_grad():
        probabilities = model(
            **batch, attention_mask=mask.long(), output_attentions=True
        ).attentions
    allowed = mask.sum(1).double()  # keys each valid query may attend to (no causal mask)
    for layer, p in enumerate(probabilities):  # (B, H, T, T)
        p = p.double()
        rows = -(p * p.clamp_min(1e-300).log()).sum(-1)  # (B, H, T)
        valid = mask[:, None, :].expand_as(rows)
        for head in range(p.shape[1]):
            h = rows[:, head][valid[:, head]]
            n = allowed[:, None].expand(-1, mask.shape[1])[mask]
            tag = f"layer_{layer:02d}/head_{head:02d}"
            assert entry[f"qk/attn_entropy/{tag}"] == pytest.approx(float(h.mean()), rel=1e-5)
            normalized = float((h / n.log()).mean())
            assert entry[f"qk/attn_entropy_norm/{tag}"] == pytest.approx(normalized, rel=1e-5)
