"""qkmonitor.cost: an audit's bytes and multiply-adds from its plan, against counts made
independently from the checkpoint's own tensors and the config's sizes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import qkmonitor
from qkmonitor import cost
from qkmonitor.cost import EIGEN_FACTOR, AuditCost, Throughput, audit_cost
from qkmonitor.weights.discovery import plan
from qkmonitor.weights.sources import open_source


def _save(model: torch.nn.Module, folder: Path) -> Path:
    model.save_pretrained(folder)
    return folder


def _nbytes(folder: Path, names: dict[str, int | None]) -> int:
    """Bytes of these tensors in model.safetensors (a row count: only that many rows)."""
    total = 0
    with safe_open(folder / "model.safetensors", "pt") as handle:
        for name, rows in names.items():
            tensor = handle.get_tensor(name)
            per_row = tensor.nbytes // tensor.shape[0]
            total += per_row * (tensor.shape[0] if rows is None else rows)
    return total


def _cost(folder: Path) -> AuditCost:
    source = open_source(folder)
    layers, _ = plan(source.config, source.shapes())
    return audit_cost(source, layers)


def _counted_multiply_adds(folder: Path) -> float:
    """The multiply-adds torch's flop counter sees in an audit of folder (one thread: the
    counter sees its own thread only)."""
    from torch.utils.flop_counter import FlopCounterMode

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with FlopCounterMode(display=False) as counter:
            qkmonitor.audit(folder)
    finally:
        torch.set_num_threads(previous)
    return counter.get_total_flops() / 2


def test_a_dense_gqa_model_costs_its_qk_bytes_and_the_head_products(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=96, num_hidden_layers=3, num_attention_heads=6,
        num_key_value_heads=2, intermediate_size=64, bos_token_id=0, eos_token_id=1,
    )  # fmt: skip
    folder = _save(LlamaForCausalLM(config), tmp_path / "llama")
    found = _cost(folder)
    names = {
        f"model.layers.{i}.self_attn.{p}_proj.weight": None for i in range(3) for p in ("q", "k")
    }
    assert found.bytes == _nbytes(folder, names)
    n, d, h, kv = 96, 16, 6, 2
    # M per query head and G_K per key head (d x d over d_in), G_Q per query head in two
    # blocks (rows [0, d/2) against all d, the rest against themselves), the spectral norm's
    # two d x d products per head, and the eigensolvers' estimate
    gram = n * (d // 2 * d + (d // 2) ** 2)
    per_layer = (h + kv) * n * d * d + h * gram + 2 * h * d**3 + h * EIGEN_FACTOR * d**3
    assert found.multiply_adds == pytest.approx(3 * per_layer, rel=1e-12)
    assert (found.layers, found.heads) == (3, 18)


def test_mla_costs_its_latent_reads_and_gram_products(tmp_path):
    from support.models import deepseek_v3_config, randomize
    from transformers import DeepseekV3ForCausalLM

    config = deepseek_v3_config()
    model = DeepseekV3ForCausalLM(config)
    randomize(model)
    folder = _save(model, tmp_path / "mla")
    found = _cost(folder)
    h, nope, rope, v = 4, 8, 8, 8
    names: dict[str, int | None] = {}
    for i in range(2):
        attention = f"model.layers.{i}.self_attn."
        for part in ("q_a_proj", "q_a_layernorm", "q_b_proj", "kv_a_proj_with_mqa",
                     "kv_a_layernorm"):  # fmt: skip
            names[attention + part + ".weight"] = None
        names[attention + "kv_b_proj.weight"] = h * nope  # the key rows, not the value rows
    assert found.bytes == _nbytes(folder, names)
    assert v == config.v_head_dim
    # the products: what torch's flop counter sees in the audit itself; the eigensolvers: the
    # documented estimate per head
    d = nope + rope
    eigen = 2 * h * EIGEN_FACTOR * d**3
    assert found.multiply_adds == pytest.approx(_counted_multiply_adds(folder) + eigen, rel=1e-12)


def test_aria_costs_its_pre_projection_products(tmp_path):
    """Aria's projector heads are W_in_q W_q_proj: the planned multiply-adds count that product,
    equal to what torch's flop counter sees in the audit itself (plus the eigensolvers)."""
    from support.behaviour import build, shrink

    build(shrink("aria")).save_pretrained(tmp_path)
    found = _cost(tmp_path)
    source = open_source(tmp_path)
    layers, _ = plan(source.config, source.shapes())
    assert any(layer.q_pre for layer in layers)
    eigen = sum(layer.n_heads * EIGEN_FACTOR * layer.head_dim**3 for layer in layers)
    assert found.multiply_adds == pytest.approx(_counted_multiply_adds(tmp_path) + eigen, rel=1e-12)


def test_deepseek_v4_costs_its_query_latent_product(tmp_path):
    """DeepSeek-V4's query heads are W_q_b diag(g) W_q_a (q_pre of q_pre_rank rows, keys
    without one): the planned multiply-adds count that product, equal to what torch's flop
    counter sees in the audit itself (plus the eigensolvers)."""
    from support.behaviour import build, shrink

    build(shrink("deepseek_v4")).save_pretrained(tmp_path)
    found = _cost(tmp_path)
    source = open_source(tmp_path)
    layers, _ = plan(source.config, source.shapes())
    assert all(layer.q_pre and not layer.k_pre and layer.q_pre_rank for layer in layers)
    eigen = sum(layer.n_heads * EIGEN_FACTOR * layer.head_dim**3 for layer in layers)
    assert found.multiply_adds == pytest.approx(_counted_multiply_adds(tmp_path) + eigen, rel=1e-12)


def test_throughput_adds_reads_compute_and_per_head_time():
    rates = Throughput(bytes_per_second=2e6, multiply_adds_per_second=1e9, seconds_per_head=0.01)
    audit = AuditCost(bytes=4_000_000, multiply_adds=3e9, layers=2, heads=50)
    assert rates.seconds(audit) == pytest.approx(2 + 3 + 0.5)


def test_measured_rates_split_a_small_audit_into_compute_and_per_head_time(monkeypatch):
    monkeypatch.setattr(cost, "probe_rate", lambda: 1e8)
    small = AuditCost(bytes=10, multiply_adds=2e7, layers=1, heads=10)
    rates = Throughput.measured(small, compute_seconds=0.5, bytes_per_second=5e7)
    assert rates.multiply_adds_per_second == 1e8 and rates.bytes_per_second == 5e7
    assert rates.seconds_per_head == pytest.approx((0.5 - 0.2) / 10)
    with pytest.raises(ValueError, match="positive"):
        Throughput.measured(small, compute_seconds=0.0, bytes_per_second=5e7)


def test_the_probe_measures_a_finite_positive_rate():
    rate = cost.probe_rate(heads=2, head_dim=16, d_in=64)
    assert math.isfinite(rate) and rate > 0
