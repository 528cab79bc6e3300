"""Time to plan an audit: the model skeleton built on the meta device, its attention modules read,
checkpoint names mapped (``qkmonitor.weights.discovery.plan``), for the largest configs.

    .venv/bin/python benchmarks/planning.py [--threads 2]

Configs: DeepSeek-V3 (transformers' defaults: 61 layers, 256 experts, MLA), a Qwen3-235B-A22B-
shaped MoE (94 layers, 128 experts), a Llama-3-70B-shaped dense model (80 layers), Llama 4 Scout
(transformers' defaults: a text and a vision tower), and a 2-layer Llama, whose whole audit from a
saved folder is timed beside its planning. Per config: the one-time import of its modeling module
(once per process), the first plan, and the plan of the same config again (the skeleton cached).
The checkpoint's tensor names and shapes are those of the skeleton itself (no weights exist).
"""

from __future__ import annotations

import argparse
import importlib
import tempfile
import time

import torch
from transformers import (
    DeepseekV3Config,
    Llama4Config,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen3MoeConfig,
)

from qkmonitor import audit
from qkmonitor.errors import UnsupportedModelError
from qkmonitor.weights import discovery
from qkmonitor.weights.discovery import plan


def configs() -> dict[str, object]:
    return {
        "DeepSeek-V3 (61 layers, 256 experts, MLA)": DeepseekV3Config(
            architectures=["DeepseekV3ForCausalLM"]
        ),
        "Qwen3-235B-A22B-shaped (94 layers, 128 experts)": Qwen3MoeConfig(
            hidden_size=4096,
            num_hidden_layers=94,
            num_attention_heads=64,
            num_key_value_heads=4,
            head_dim=128,
            moe_intermediate_size=1536,
            num_experts=128,
            num_experts_per_tok=8,
            vocab_size=151936,
            architectures=["Qwen3MoeForCausalLM"],
        ),
        "Llama-3-70B-shaped (80 layers)": LlamaConfig(
            hidden_size=8192,
            intermediate_size=28672,
            num_hidden_layers=80,
            num_attention_heads=64,
            num_key_value_heads=8,
            vocab_size=128256,
            architectures=["LlamaForCausalLM"],
        ),
        "Llama 4 Scout (text + vision towers)": Llama4Config(
            architectures=["Llama4ForConditionalGeneration"]
        ),
        "2-layer Llama": small_llama(),
    }


def small_llama() -> LlamaConfig:
    return LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, architectures=["LlamaForCausalLM"],
    )  # fmt: skip


def shapes_of(config) -> dict[str, tuple[int, ...]]:
    """The checkpoint a config implies: its skeleton's parameter names and shapes."""
    model = discovery.skeleton(config)
    shapes = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    discovery.clear_caches()  # the plans below build their own
    return shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{'config':50s} {'import':>8s} {'first plan':>11s} {'again':>9s} {'layers':>7s}")
    for name, config in configs().items():
        start = time.perf_counter()
        importlib.import_module(type(config).__module__.replace(".configuration_", ".modeling_"))
        imported = time.perf_counter() - start
        shapes = shapes_of(config)
        discovery.clear_caches()
        start = time.perf_counter()
        try:
            layers, _ = plan(config, shapes)
        except UnsupportedModelError as error:
            print(f"{name:50s} {imported:7.2f}s refused: {error}")
            continue
        first = time.perf_counter() - start
        start = time.perf_counter()
        plan(config, shapes)
        again = time.perf_counter() - start
        print(f"{name:50s} {imported:7.2f}s {first:10.2f}s {again * 1e3:7.1f}ms {len(layers):7d}")
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        LlamaForCausalLM(small_llama()).save_pretrained(folder)
        audit(folder)  # warm: the modeling module and the skeleton of this config
        discovery.clear_caches()
        start = time.perf_counter()
        audit(folder)
        whole = time.perf_counter() - start
    print(f"whole audit of the saved 2-layer Llama, planning included: {whole:.2f} s")


if __name__ == "__main__":
    main()
