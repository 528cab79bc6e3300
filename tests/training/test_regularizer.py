"""The spectral regularizer: the optimizer sees exactly lambda * grad R per optimizer step.

Reference: d(lambda R)/dW by autograd on full d_in x d_in matrices in float64
(tests/distributed/tiny.py), R = mean eig_var / (mean eig_var of the initial weights).
Gradients are read at on_pre_optimizer_step (after all micro-batches and the all-reduce) with
clipping off; the difference between a run with lambda and one without, from the same seed,
is the regularizer's gradient. Two processes: tests/test_callback_distributed.py.
"""

from __future__ import annotations

import pytest
import torch
from distributed.launch import torchrun_results
from distributed.tiny import (
    PaddedTokens,
    attention_modules,
    mean_token_loss,
    naive_gradient,
    naive_reference,
    qk_grads,
    tiny_bert,
    training_args,
)
from transformers import Trainer, TrainerCallback

from qkmonitor import QKMonitorCallback
from qkmonitor.errors import QKMonitorError
from qkmonitor.training.regularizer import SpectralRegularizer
from qkmonitor.weights.live import plan_live

LAMBDA = 0.5


class GradProbe(TrainerCallback):
    """Copies the Q/K gradients the optimizer is about to use, at the first optimizer step."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] | None = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            self.grads = qk_grads(model)


def first_step_grads(tmp_path, strength: float, **overrides) -> dict[str, torch.Tensor]:
    probe = GradProbe()
    compute_loss_func = overrides.pop("compute_loss_func", None)
    args = training_args(str(tmp_path), max_steps=1, max_grad_norm=0.0, **overrides)
    trainer = Trainer(
        model=tiny_bert(),
        args=args,
        train_dataset=PaddedTokens(),
        callbacks=[QKMonitorCallback(strength), probe],
        compute_loss_func=compute_loss_func,
    )
    trainer.train()
    assert probe.grads is not None
    return probe.grads


def assert_injected(with_reg, without, expected) -> None:
    for name, grad in expected.items():
        diff = with_reg[name] - without[name]
        scale = without[name].abs().max() + grad.abs().max()
        torch.testing.assert_close(diff, grad, rtol=1e-4, atol=2e-6 * float(scale))
        assert grad.abs().max() > 100 * 2e-6 * scale  # the check is not vacuous


@pytest.mark.parametrize("accumulation", [1, 4])
def test_gradient_is_exactly_lambda_grad_r_per_optimizer_step(tmp_path, accumulation):
    batch = {"per_device_train_batch_size": 8 // accumulation}
    batch["gradient_accumulation_steps"] = accumulation
    without = first_step_grads(tmp_path / "a", 0.0, **batch)
    with_reg = first_step_grads(tmp_path / "b", LAMBDA, **batch)
    initial = tiny_bert()
    assert_injected(with_reg, without, naive_gradient(initial, LAMBDA, naive_reference(initial)))


def test_composes_with_compute_loss_func(tmp_path):
    batch = {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 4}
    batch["compute_loss_func"] = mean_token_loss
    without = first_step_grads(tmp_path / "a", 0.0, **dict(batch))
    with_reg = first_step_grads(tmp_path / "b", LAMBDA, **dict(batch))
    initial = tiny_bert()
    assert_injected(with_reg, without, naive_gradient(initial, LAMBDA, naive_reference(initial)))


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_injects_once(tmp_path, reentrant):
    """Reentrant: the no-grad forward is skipped, the recomputation injects; non-reentrant: the
    forward injects and the recomputation is skipped. Either way exactly once."""
    overrides = {
        "gradient_checkpointing": True,
        "gradient_checkpointing_kwargs": {"use_reentrant": reentrant},
        "gradient_accumulation_steps": 2,
        "per_device_train_batch_size": 4,
    }
    without = first_step_grads(tmp_path / "a", 0.0, **overrides)
    with_reg = first_step_grads(tmp_path / "b", LAMBDA, **overrides)
    initial = tiny_bert()
    assert_injected(with_reg, without, naive_gradient(initial, LAMBDA, naive_reference(initial)))


def test_bf16_autocast_keeps_r_in_float32(tmp_path):
    without = first_step_grads(tmp_path / "a", 0.0, bf16=True)
    with_reg = first_step_grads(tmp_path / "b", LAMBDA, bf16=True)
    initial = tiny_bert()
    assert_injected(with_reg, without, naive_gradient(initial, LAMBDA, naive_reference(initial)))


def test_loss_scale_multiplies_the_injected_gradient():
    """fp16 GradScaler: gradients are scaled by S until unscaled; the injection must match."""
    model = tiny_bert(dropout=0.0)
    layers, _ = plan_live(model)
    batch = PaddedTokens()[0]
    inputs = {k: v[None] for k, v in batch.items()}
    regularizer = SpectralRegularizer(layers, LAMBDA, naive_reference(model))
    regularizer.attach()
    grads = []
    for scale in (1.0, 1024.0):
        model.zero_grad()
        regularizer.arm(loss_scale=scale)
        (model(**inputs).loss * scale).backward()
        grads.append({k: v / scale for k, v in qk_grads(model).items()})
    regularizer.detach()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-9)


def test_injects_once_per_arm_and_not_without_grad():
    model = tiny_bert(dropout=0.0)
    layers, _ = plan_live(model)
    inputs = {k: v[None] for k, v in PaddedTokens()[3].items()}
    regularizer = SpectralRegularizer(layers, LAMBDA, naive_reference(model))
    regularizer.attach()
    regularizer.arm()
    with torch.no_grad():
        model(**inputs)  # no gradient: stays armed
    model(**inputs).loss.backward()
    once = qk_grads(model)
    model(**inputs).loss.backward()  # second micro-batch: no second injection
    twice = qk_grads(model)
    regularizer.detach()
    model.zero_grad()
    model(**inputs).loss.backward()
    data = qk_grads(model)
    expected = naive_gradient(model, LAMBDA, naive_reference(model))
    for name, grad in expected.items():
        torch.testing.assert_close(once[name] - data[name], grad, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(twice[name] - 2 * data[name], grad, rtol=1e-4, atol=1e-7)


def test_peft_lora_only_adapters_get_the_gradient():
    peft = pytest.importorskip("peft")
    model = tiny_bert(dropout=0.0)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "key"], lora_dropout=0.0)
    lora = peft.get_peft_model(model, config)
    with torch.no_grad():  # non-zero B so the effective weight differs from the base
        for name, parameter in lora.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)
    layers, _ = plan_live(lora)
    inputs = {k: v[None] for k, v in PaddedTokens()[5].items()}

    def adapter_grads(strength: float) -> dict[str, torch.Tensor]:
        lora.zero_grad()
        regularizer = SpectralRegularizer(layers, strength, 1.0)
        regularizer.attach()
        regularizer.arm()
        lora(**inputs).loss.backward()
        regularizer.detach()
        return {n: p.grad.clone() for n, p in lora.named_parameters() if p.grad is not None}

    with_reg, without = adapter_grads(LAMBDA), adapter_grads(0.0)
    assert set(with_reg) == set(without)
    assert all("lora_" in name or "classifier" in name for name in with_reg)

    # reference: autograd of lambda * R through the merged weights, by hand
    scale = 16**-0.5
    penalties = []
    for module in attention_modules(lora):
        merged = []
        for linear in (module.query, module.key):
            delta = linear.lora_B["default"].weight @ linear.lora_A["default"].weight
            merged.append(linear.base_layer.weight + delta * linear.scaling["default"])
        wq, wk = merged
        for head in range(4):
            rows = slice(16 * head, 16 * head + 16)
            w = scale * wq[rows].T @ wk[rows]
            sym = (w + w.T) / 2
            penalties.append(sym.square().sum() / 64 - (torch.trace(sym) / 64) ** 2)
    lora.zero_grad()
    (LAMBDA * torch.stack(penalties).mean()).backward()
    for name, parameter in lora.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(
                with_reg[name] - without[name], parameter.grad, rtol=1e-4, atol=1e-8
            )


def test_lambda_lowers_eig_var(tmp_path):
    def final_eig_var(strength: float) -> float:
        args = training_args(str(tmp_path / str(strength)), max_steps=12, logging_steps=12)
        trainer = Trainer(
            model=tiny_bert(),
            args=args,
            train_dataset=PaddedTokens(),
            callbacks=[QKMonitorCallback(strength, entropy=False)],
        )
        trainer.train()
        logs = [e for e in trainer.state.log_history if "qk/eig_var/mean" in e]
        return logs[-1]["qk/eig_var/mean"]

    assert final_eig_var(LAMBDA) < 0.9 * final_eig_var(0.0)


def test_regularizer_rejects_negative_strength():
    with pytest.raises(ValueError, match="must be >= 0"):
        SpectralRegularizer([], -1.0, 1.0)


@pytest.mark.parametrize("processes", [1, 2])
def test_gradient_is_exact_with_one_and_two_processes(processes):
    """torchrun (gloo), 2 accumulation steps: after DDP's all-reduce, exactly lambda * grad R."""
    for rank in torchrun_results()[processes]:
        for name, expected in rank["expected"].items():
            torch.testing.assert_close(rank["injected"][name], expected, rtol=1e-4, atol=1e-8)


def test_no_trainable_qk_weight_is_a_clear_error_after_the_first_step(tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(
        r=4, target_modules=["query", "key"], lora_dropout=0.0, use_dora=True
    )  # DoRA's merged weight carries no gradient to the regularizer
    dora = peft.get_peft_model(tiny_bert(), config)
    trainer = Trainer(
        model=dora,
        args=training_args(str(tmp_path), max_steps=3),
        train_dataset=PaddedTokens(),
        callbacks=[QKMonitorCallback(LAMBDA, entropy=False)],
    )
    with pytest.raises(QKMonitorError, match="regularization has no effect") as raised:
        trainer.train()
    assert "\n" not in str(raised.value)
    assert trainer.state.global_step == 1


def test_partly_frozen_qk_warns_once_with_the_count(tmp_path, caplog):
    model = tiny_bert()
    frozen = attention_modules(model)[0]
    for linear in (frozen.query, frozen.key):
        linear.weight.requires_grad_(False)
    trainer = Trainer(
        model=model,
        args=training_args(str(tmp_path), max_steps=2),
        train_dataset=PaddedTokens(),
        callbacks=[QKMonitorCallback(LAMBDA, entropy=False)],
    )
    with caplog.at_level("WARNING", logger="qkmonitor"):
        trainer.train()
    warned = [r.getMessage() for r in caplog.records if "no trainable Q/K" in r.getMessage()]
    assert len(warned) == 1 and "1 regularized layers" in warned[0]


# ---- LoRA + gradient checkpointing, TRL's SFTTrainer -----------------------------------------
def _tiny_llama_lora(peft):
    """A 2-layer GQA Llama (4 query, 2 key heads) with LoRA on q/k/v, B non-zero."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                parameter.normal_(0, 0.15)
    lora_config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"], lora_dropout=0.0
    )
    lora = peft.get_peft_model(model, lora_config)
    with torch.no_grad():  # non-zero B: the effective weight differs from the base
        for name, parameter in lora.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)
    return lora


def _tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(97)}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t3")),
        bos_token="t0",
        pad_token="t1",
        eos_token="t2",
        unk_token="t3",
    )


def _llama_penalty(lora) -> torch.Tensor:
    """lambda * R by hand from SPEC.md: merged LoRA weights, full d_in x d_in W^h, float64,
    R normalized by its value on these (initial) weights as the callback does."""
    penalties = []
    for module in lora.modules():
        if type(module).__name__ != "LlamaAttention":
            continue
        merged = []
        for linear in (module.q_proj, module.k_proj):
            delta = linear.lora_B["default"].weight @ linear.lora_A["default"].weight
            merged.append((linear.base_layer.weight + delta * linear.scaling["default"]).double())
        wq, wk = merged
        for head in range(4):
            q = wq[16 * head : 16 * head + 16]
            k = wk[16 * (head // 2) : 16 * (head // 2) + 16]  # GQA: key head h // 2
            w = 16**-0.5 * q.T @ k
            sym = (w + w.T) / 2
            penalties.append(sym.square().sum() / 64 - (torch.trace(sym) / 64) ** 2)
    mean = torch.stack(penalties).mean()
    return LAMBDA * mean / float(mean.detach())


class AdapterGradProbe(TrainerCallback):
    """The adapters' gradients at the first optimizer step (after all micro-batches)."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] | None = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            self.grads = {
                n: p.grad.detach().double().clone()
                for n, p in model.named_parameters()
                if p.grad is not None
            }


@pytest.mark.parametrize(
    "reentrant", [None, False, True], ids=["sft-default", "nonreentrant", "reentrant"]
)
def test_lora_with_gradient_checkpointing_under_trl_sft_is_exact(tmp_path, reentrant):
    """TRL's SFTTrainer (gradient checkpointing on by default), LoRA on q/k/v, 2 accumulation
    steps: the adapters get exactly d(lambda R)/d(adapter), once, whatever the variant."""
    peft = pytest.importorskip("peft")
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    rows = [PaddedTokens(length=12)[i]["input_ids"] for i in range(8)]
    data = Dataset.from_dict({"input_ids": [[t for t in r.tolist() if t] for r in rows]})

    def adapter_grads(strength: float) -> dict[str, torch.Tensor]:
        overrides = {}
        if reentrant is not None:
            overrides["gradient_checkpointing_kwargs"] = {"use_reentrant": reentrant}
        args = trl.SFTConfig(
            str(tmp_path / str(strength)),
            max_steps=1,
            per_device_train_batch_size=4,
            gradient_accumulation_steps=2,
            max_grad_norm=0.0,
            report_to=[],
            use_cpu=True,
            save_strategy="no",
            disable_tqdm=True,
            bf16=False,
            **overrides,
        )
        assert args.gradient_checkpointing  # TRL's default, kept
        probe = AdapterGradProbe()
        trainer = trl.SFTTrainer(
            model=_tiny_llama_lora(peft),
            args=args,
            train_dataset=data,
            processing_class=_tokenizer(),
            callbacks=[QKMonitorCallback(strength, entropy=False), probe],
        )
        trainer.train()
        assert probe.grads is not None
        return probe.grads

    with_reg, without = adapter_grads(LAMBDA), adapter_grads(0.0)
    lora = _tiny_llama_lora(peft)
    _llama_penalty(lora).backward()
    checked = 0
    for name, parameter in lora.named_parameters():
        if "lora_" not in name:
            continue
        expected = parameter.grad.double() if parameter.grad is not None else None
        injected = with_reg[name] - without[name]
        if expected is None:  # v_proj's adapters: R does not depend on them
            assert injected.abs().max() == 0, name
            continue
        scale = float(without[name].abs().max() + expected.abs().max())
        torch.testing.assert_close(injected, expected, rtol=1e-4, atol=2e-6 * scale)
        checked += expected.abs().max() > 1e-3 * scale
    assert checked == 8  # lora_A and lora_B of q and k in both layers
