"""QKMonitorCallback end to end with the real Trainer on tiny models (CPU, offline).

What a user sees: qk/ keys in state.log_history and TensorBoard, numbers equal to the audit
engine's on that step's checkpoint, training unchanged by monitoring, clear errors on bad input,
alerts that name layer and head, state that survives resume_from_checkpoint.
"""

from __future__ import annotations

import copy
import logging
import math

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
)

from qkmonitor import QKMonitorCallback, audit
from qkmonitor.errors import QKMonitorError, UnsupportedModelError
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
                logged = entry[f"qk/{stat}/head_{head.head:02d}/{prefix}"]
                assert logged == pytest.approx(getattr(head, stat), rel=1e-9, abs=1e-15)
        for layer in result.layers:
            prefix = f"layer_{layer.layer:02d}"
            assert entry[f"qk/eig_var/mean/{prefix}"] == pytest.approx(layer.eig_var, rel=1e-9)
            assert entry[f"qk/eig_var/min/{prefix}"] == pytest.approx(layer.eig_var_min, rel=1e-9)


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
    assert "qk/eig_var/mean/layer_01" in qk and "qk/eig_var/mean/layer_00" not in qk
    assert {"qk/rank_collapse/layer_01", "qk/rank_collapse/mean"} <= qk
    assert 0 < entry["qk/rank_collapse/layer_01"] <= 1
    assert not any("/head_" in key for key in qk)


def test_gpt2_fused_qkv_is_monitored(tmp_path):
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=97, n_positions=16)
    config.bos_token_id = config.eos_token_id = 1
    torch.manual_seed(0)
    trainer = train(tmp_path, QKMonitorCallback(regularization=0.1), model=GPT2LMHeadModel(config))
    entry = qk_logs(trainer)[-1]
    assert math.isfinite(entry["qk/eig_var/mean/layer_01"]) and entry["qk/reg/R"] > 0


def test_tensorboard_event_file_has_the_qk_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(tmp_path, QKMonitorCallback(regularization=0.1), report_to=["tensorboard"])
    runs = list(tmp_path.rglob("events.out.tfevents.*"))
    assert runs
    accumulator = EventAccumulator(str(runs[0].parent))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert {"train/qk/eig_var/mean", "train/qk/eig_var/mean/layer_00", "train/qk/reg/R"} <= tags


def test_nan_weights_are_logged_as_nan_with_a_warning(tmp_path, caplog):
    model = tiny_bert()
    with torch.no_grad():
        model.bert.encoder.layer[1].attention.self.query.weight[16:32] = float("nan")
    with caplog.at_level(logging.WARNING, logger="qkmonitor"):
        trainer = train(tmp_path, QKMonitorCallback(detail="head"), model=model, max_steps=2)
    entry = qk_logs(trainer)[-1]
    assert math.isnan(entry["qk/eig_var/head_01/layer_01"])
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
        for variant in ("fsdp2", "fsdp1", "fsdp1_flat"):
            result = rank[variant]
            assert result["spectra"] < 1e-12, variant  # statistics of the unsharded weights
            assert result["gradient"] < 1e-5, variant  # exactly lambda * grad R, reduce-scattered
            assert result["max_summoned"] <= 1, variant  # FSDP1: one layer's unit at a time


def test_audit_of_sharded_ddp_and_accelerate_models_equals_the_plain_audit():
    """torchrun 2 x gloo: audit() on every rank of FSDP2/FSDP1 (gathered), DDP, accelerate."""
    ranks = torchrun("sharded.py", 2)
    for rank in ranks:
        assert set(rank) == {"fsdp2", "fsdp1", "fsdp1_flat", "ddp", "accelerate"}
        for variant, result in rank.items():
            assert result["audit"] < 1e-12, variant


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
            tag = f"head_{head:02d}/layer_{layer:02d}"
            assert entry[f"qk/attn_entropy/{tag}"] == pytest.approx(float(h.mean()), rel=1e-5)
            normalized = float((h / n.log()).mean())
            assert entry[f"qk/attn_entropy_norm/{tag}"] == pytest.approx(normalized, rel=1e-5)


# ---- max logit, eig_concentration -------------------------------------------------------------
class _SoftmaxInputs(torch.overrides.TorchFunctionMode):
    """Records the input of every softmax: eager attention's logits, one per layer."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.nn.functional.softmax, torch.softmax, torch.Tensor.softmax):
            self.inputs.append(args[0].detach().double().clone())
        return func(*args, **(kwargs or {}))


def first_batch(size: int = 8) -> dict[str, torch.Tensor]:
    """Step 1's batch under sequential sampling."""
    samples = [PaddedTokens()[i] for i in range(size)]
    return {k: torch.stack([s[k] for s in samples]) for k in ("input_ids", "attention_mask")}


def eager_max_logits(model: torch.nn.Module, batch: dict) -> list[torch.Tensor]:
    """Per layer (H,): the largest logit the eager model softmaxes over real query rows."""
    model = copy.deepcopy(model)
    model.set_attn_implementation("eager")
    with _SoftmaxInputs() as spy, torch.no_grad():
        model(**batch)
    real = batch["attention_mask"].bool()[:, None, :, None]
    result = []
    for logits in spy.inputs:  # BERT: bidirectional, masked keys at the float minimum
        allowed = (logits > torch.finfo(torch.float32).min / 2) & real
        result.append(logits.masked_fill(~allowed, -torch.inf).amax((0, 2, 3)))
    return result


@pytest.mark.parametrize("implementation", ["sdpa", "flash"])
def test_logged_max_logit_equals_the_eager_logits_of_that_batch(
    tmp_path, implementation, monkeypatch
):
    callback = QKMonitorCallback(detail="head", interval=1)
    trained = tiny_bert(dropout=0.0)
    want = eager_max_logits(trained, first_batch())  # step 1 runs on the initial weights
    if implementation == "flash":
        trained.set_attn_implementation(register_flash(monkeypatch))
    trainer = train(tmp_path, callback, model=trained, max_steps=1, per_device_train_batch_size=8)
    entry = qk_logs(trainer)[0]
    for layer, heads in enumerate(want):
        for head, value in enumerate(heads.tolist()):
            logged = entry[f"qk/attn_max_logit/head_{head:02d}/layer_{layer:02d}"]
            assert logged == pytest.approx(value, rel=1e-6)
        assert entry[f"qk/attn_max_logit/max/layer_{layer:02d}"] == pytest.approx(
            max(heads.tolist())
        )
    overall = max(float(heads.max()) for heads in want)
    assert entry["qk/attn_max_logit/max"] == pytest.approx(overall, rel=1e-6)
    assert "qk/attn_max_logit/mean" not in entry and "qk/attn_max_logit/min/layer_00" not in entry


def test_max_logit_can_be_turned_off_and_entropy_kept(tmp_path):
    entry = qk_logs(train(tmp_path, QKMonitorCallback(max_logit=False), max_steps=2))[-1]
    assert "qk/attn_entropy/mean" in entry
    assert not any(key.startswith("qk/attn_max_logit") for key in entry)


def test_eig_concentration_is_the_mean_over_the_rms_eigenvalue(tmp_path):
    callback = QKMonitorCallback(
        detail="head", statistics=["eig_var", "eig_concentration"], interval=1
    )
    trainer = train(tmp_path, callback, max_steps=1)
    entry = qk_logs(trainer)[0]
    head_dim = 64 // 4
    for layer, module in enumerate(attention_modules(trainer.model)):
        wq, wk = module.query.weight.detach().double(), module.key.weight.detach().double()
        for head in range(4):
            rows = slice(head * head_dim, (head + 1) * head_dim)
            w = head_dim**-0.5 * wq[rows].T @ wk[rows]  # the full d_in x d_in matrix
            eigenvalues = torch.linalg.eigvalsh((w + w.T) / 2)
            want = float(eigenvalues.mean() / eigenvalues.square().mean().sqrt())
            logged = entry[f"qk/eig_concentration/head_{head:02d}/layer_{layer:02d}"]
            assert logged == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_epoch_logging_warns_once_that_attention_needs_an_interval(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="qkmonitor"):
        train(tmp_path, QKMonitorCallback(), max_steps=2, logging_strategy="epoch")
    warned = [r.message for r in caplog.records if "interval" in r.message]
    assert len(warned) == 1 and "logging_strategy='epoch'" in warned[0]


# ---- QK-Clip ------------------------------------------------------------------------------------
def one_layer_bert(dropout: float = 0.0) -> torch.nn.Module:
    """tiny_bert with a single layer: clipping it cannot change the inputs of a later layer."""
    model = tiny_bert(dropout=dropout)
    model.bert.encoder.layer = model.bert.encoder.layer[:1]
    model.config.num_hidden_layers = 1
    return model


def test_qk_clip_caps_the_same_batch_at_tau_and_leaves_other_heads_alone(tmp_path):
    """learning_rate 0: the step changes nothing but the clip, so the same batch measures it."""
    model = one_layer_bert()
    batch = first_batch()
    (before,) = eager_max_logits(model, batch)
    tau = float(before.median())
    over = before > tau
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    callback = QKMonitorCallback(qk_clip=tau, interval=1, detail="head")
    trainer = train(
        tmp_path, callback, model=model, max_steps=1, per_device_train_batch_size=8, learning_rate=0
    )
    (after,) = eager_max_logits(trainer.model, batch)
    assert (after[over] <= tau * (1 + 1e-6)).all()
    torch.testing.assert_close(after[over], torch.full_like(after[over], tau), rtol=1e-6, atol=0)
    assert torch.equal(after[~over], before[~over])
    entry = qk_logs(trainer)[0]
    assert entry["qk/clip/heads"] == int(over.sum())
    assert entry["qk/clip/min_factor"] == pytest.approx(tau / float(before.max()), rel=1e-6)
    assert entry["qk/attn_max_logit/max/layer_00"] == pytest.approx(float(before.max()), rel=1e-6)
    head_dim = 64 // 4
    attention = attention_modules(trainer.model)[0]
    for name, linear in (("query", attention.query), ("key", attention.key)):
        prefix = f"bert.encoder.layer.0.attention.self.{name}"
        for head in range(4):
            rows = slice(head * head_dim, (head + 1) * head_dim)
            for part in ("weight", "bias"):
                was, now = initial[f"{prefix}.{part}"][rows], getattr(linear, part)[rows]
                if over[head]:  # MHA: sqrt(gamma) on q and k, biases included
                    factor = math.sqrt(tau / float(before[head]))
                    torch.testing.assert_close(now, was * factor, rtol=1e-6, atol=1e-7)
                else:
                    assert torch.equal(now, was), (name, head, part)
    for name, parameter in trainer.model.named_parameters():
        if ".query." not in name and ".key." not in name:
            assert torch.equal(parameter, initial[name]), name


def test_qk_clip_is_neutral_when_no_head_exceeds_tau(tmp_path):
    """Measured on every step (max only), never clipping: training is bit-identical."""
    plain = train(tmp_path / "plain", max_steps=4)
    clipped = train(tmp_path / "clip", QKMonitorCallback(qk_clip=1e6), max_steps=4)
    expected = dict(plain.model.named_parameters())
    for name, parameter in clipped.model.named_parameters():
        assert torch.equal(parameter, expected[name]), name
    entries = qk_logs(clipped)
    assert [e["qk/clip/heads"] for e in entries] == [0, 0]
    assert all(e["qk/clip/min_factor"] == 1.0 for e in entries)


def test_qk_clip_counts_every_step_between_logs(tmp_path, monkeypatch):
    """Clipping runs on each optimizer step; the log sums the clipped heads since the last."""
    import qkmonitor.training.qk_clip as clipping

    factors: list[torch.Tensor] = []
    original = clipping.clip_factors

    def spy(*args, **kwargs):
        factors.append(original(*args, **kwargs))
        return factors[-1]

    monkeypatch.setattr(clipping, "clip_factors", spy)
    trainer = train(tmp_path, QKMonitorCallback(qk_clip=1.5), max_steps=4, logging_steps=2)
    entries = qk_logs(trainer)
    assert [e["step"] for e in entries] == [2, 4]
    per_step = [torch.cat(factors[i : i + 2]) for i in range(0, 8, 2)]  # 2 layers per step
    assert len(factors) == 8 and int((per_step[0] < 1).sum()) == 8  # every head at step 1
    for entry, steps in zip(entries, (per_step[:2], per_step[2:]), strict=True):
        assert entry["qk/clip/heads"] == sum(int((g < 1).sum()) for g in steps)
        assert entry["qk/clip/min_factor"] == pytest.approx(float(torch.cat(steps).min()))


@pytest.mark.parametrize(
    ("case_id", "match"), [("qwen3", "QK-norm"), ("gpt2", None)], ids=["qk-norm", "gpt2"]
)
def test_qk_clip_refuses_before_the_first_step(tmp_path, case_id, match):
    from support.models import CASES_BY_ID, build

    if match is None:  # a frozen Q/K projection
        model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=97))
        model.transformer.h[0].attn.c_attn.weight.requires_grad_(False)
        match = "frozen"
    else:
        model = build(CASES_BY_ID[case_id]).train()
    with pytest.raises(QKMonitorError, match=match) as raised:
        train(tmp_path, QKMonitorCallback(qk_clip=10.0), model=model)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("tau", [0, -1.0, float("nan"), float("inf"), True])
def test_qk_clip_needs_a_positive_tau(tau):
    with pytest.raises(ValueError, match="qk_clip"):
        QKMonitorCallback(qk_clip=tau)


def test_max_logit_and_qk_clip_with_two_processes():
    """torchrun 2 x gloo vs 1 process: the MAX all-reduce gives every rank the global batch's
    max logits, so every rank clips the same heads by the same factors."""
    (single,), (rank0, rank1) = torchrun("clip.py", 1), torchrun("clip.py", 2)
    assert rank0["logs"] == rank1["logs"] and len(rank0["logs"]) == 3
    for name, weight in rank0["weights"].items():
        assert torch.equal(weight, rank1["weights"][name]), name  # replicas stay identical
        torch.testing.assert_close(weight, single["weights"][name], rtol=1e-4, atol=1e-6)
    assert rank0["logs"][0]["qk/clip/heads"] > 0
    for two, one in zip(rank0["logs"], single["logs"], strict=True):
        assert two.keys() == one.keys()
        assert two["qk/clip/heads"] == one["qk/clip/heads"]
        for key, value in one.items():
            assert two[key] == pytest.approx(value, rel=1e-5), key


def test_an_alert_can_watch_the_max_logit(tmp_path, caplog):
    callback = QKMonitorCallback(alerts=[AlertRule("attn_max_logit", above=5.0)])
    with caplog.at_level(logging.WARNING, logger="qkmonitor"):
        train(tmp_path, callback, max_steps=2, per_device_train_batch_size=8)
    messages = [r.message for r in caplog.records if "alert" in r.message]
    # the heads' max logits start at 3.2 to 5.1: at step 2 some head is above 5
    assert messages and all("attn_max_logit" in m and "above 5" in m for m in messages)


def test_a_layer_this_rank_did_not_see_enters_the_max_as_minus_infinity():
    """Every rank sends every layer to the MAX all-reduce; a layer without tokens is -inf and,
    seen nowhere, logged as NaN (and left out of the model's max)."""
    from qkmonitor import QKMonitor

    model = tiny_bert(dropout=0.0)
    monitor = QKMonitor(model, detail="head", statistics=[])  # what the callback runs
    with monitor._capture.recording(entropy=False), torch.no_grad():
        model(**first_batch())
    seen = monitor._capture.collect()
    monitor._capture.collect = lambda: {("self", 0): seen[("self", 0)]}  # layer 1: no tokens
    monitor.steps.recorded = monitor.steps.monitored = 1
    scores = monitor._reduce_recordings(1)
    assert torch.isneginf(scores[("self", 1)][0]).all() and scores[("self", 1)][1] is None
    assert torch.equal(scores[("self", 0)][0], seen[("self", 0)].max_score)
    _, per_head, _ = monitor._readings
    metrics = monitor._aggregate(per_head, {})
    assert math.isnan(metrics["qk/attn_max_logit/max/layer_01"])
    assert metrics["qk/attn_max_logit/max"] == metrics["qk/attn_max_logit/max/layer_00"] > 0
