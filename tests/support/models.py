"""Tiny random transformers models of the architectures qkmonitor supported first.

Each case builds a 2-layer model of width 64 from a config (4 query heads, 2 key heads where the
architecture has grouped-query attention), with every floating parameter redrawn from a seeded
normal distribution so that norms, gains and projections are all non-trivial. Some cases bend
the usual shapes on purpose (head_dim != hidden / heads, a decoder with fewer heads than its
encoder) because that is where head-splitting bugs hide.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

HIDDEN, LAYERS, HEADS, KV_HEADS, VOCAB = 64, 2, 4, 2, 99
_TOKENS = {"vocab_size": VOCAB, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}
_ENCODER = {
    **_TOKENS,
    "hidden_size": HIDDEN,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS,
    "intermediate_size": 128,
    "max_position_embeddings": 64,
}
_DECODER = {
    **_TOKENS,
    "hidden_size": HIDDEN,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS,
    "intermediate_size": 128,
    "max_position_embeddings": 64,
}


@dataclass(frozen=True)
class Case:
    """One tiny model: its model_type, config values and the Auto class that builds it."""

    id: str
    model_type: str
    config: dict[str, Any] = field(default_factory=dict)
    auto: str = "AutoModel"  # transformers Auto class
    rope: bool = False  # positions enter through RoPE (position_ids=0 makes it the identity)


CASES = [
    *(Case(t, t, _ENCODER) for t in ("bert", "roberta", "xlm-roberta", "camembert")),
    Case("electra", "electra", {**_ENCODER, "embedding_size": 32}),
    Case(
        "distilbert",
        "distilbert",
        {**_TOKENS, "dim": HIDDEN, "n_layers": LAYERS, "n_heads": HEADS, "hidden_dim": 128},
    ),
    Case(
        "vit",
        "vit",
        {
            "hidden_size": HIDDEN,
            "num_hidden_layers": LAYERS,
            "num_attention_heads": HEADS,
            "intermediate_size": 128,
            "image_size": 8,
            "patch_size": 4,
        },
    ),
    *(
        Case(
            name,
            "gpt2",
            {**_TOKENS, "n_embd": HIDDEN, "n_layer": LAYERS, "n_head": HEADS, "n_positions": 64}
            | extra,
            "AutoModelForCausalLM",
        )
        for name, extra in (
            ("gpt2", {}),
            ("gpt2-inverse-layer", {"scale_attn_by_inverse_layer_idx": True}),
        )
    ),
    Case(
        "gpt_neox",
        "gpt_neox",
        {**_ENCODER, "rotary_pct": 0.5, "attention_bias": True},
        "AutoModelForCausalLM",
        rope=True,
    ),
    Case(
        "gptj",
        "gptj",
        {
            **_TOKENS,
            "n_embd": HIDDEN,
            "n_layer": LAYERS,
            "n_head": HEADS,
            "rotary_dim": 8,
            "n_positions": 64,
        },
        "AutoModelForCausalLM",
        rope=True,
    ),
    Case(
        "opt",
        "opt",
        {**_ENCODER, "ffn_dim": 128, "word_embed_proj_dim": HIDDEN},
        "AutoModelForCausalLM",
    ),
    Case("bloom", "bloom", {**_TOKENS, "hidden_size": HIDDEN, "n_layer": LAYERS, "n_head": HEADS}),
    *(
        Case(
            name,
            "falcon",
            {
                **_TOKENS,
                "hidden_size": HIDDEN,
                "num_hidden_layers": LAYERS,
                "num_attention_heads": HEADS,
                "bias": True,
            }
            | extra,
            "AutoModelForCausalLM",
            rope=True,
        )
        for name, extra in (
            ("falcon-multi-query", {"multi_query": True}),
            ("falcon-new-decoder", {"new_decoder_architecture": True, "num_kv_heads": KV_HEADS}),
            ("falcon-per-head", {"multi_query": False}),
        )
    ),
    Case("llama", "llama", {**_DECODER, "head_dim": 8}, "AutoModelForCausalLM", rope=True),
    Case("mistral", "mistral", _DECODER, "AutoModelForCausalLM", rope=True),
    Case(
        "mixtral",
        "mixtral",
        {**_DECODER, "num_local_experts": 2, "num_experts_per_tok": 1},
        "AutoModelForCausalLM",
        rope=True,
    ),
    Case("qwen2", "qwen2", _DECODER, "AutoModel", rope=True),
    Case(
        "qwen2_moe",
        "qwen2_moe",
        {
            **_DECODER,
            "num_experts": 2,
            "num_experts_per_tok": 1,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 32,
        },
        "AutoModelForCausalLM",
        rope=True,
    ),
    Case("qwen3", "qwen3", {**_DECODER, "head_dim": 32}, "AutoModelForCausalLM", rope=True),
    Case(
        "qwen3_moe",
        "qwen3_moe",
        {
            **_DECODER,
            "head_dim": 16,
            "num_experts": 2,
            "num_experts_per_tok": 1,
            "moe_intermediate_size": 32,
        },
        "AutoModelForCausalLM",
        rope=True,
    ),
    Case("olmo2", "olmo2", _DECODER, "AutoModelForCausalLM", rope=True),
    Case("gemma", "gemma", {**_DECODER, "head_dim": 32}, "AutoModelForCausalLM", rope=True),
    Case(
        "gemma2",
        "gemma2",
        {**_DECODER, "head_dim": 16, "query_pre_attn_scalar": 24, "attn_logit_softcapping": None},
        "AutoModelForCausalLM",
        rope=True,
    ),
    Case(
        "gemma3_text",
        "gemma3_text",
        {**_DECODER, "head_dim": 16, "query_pre_attn_scalar": 24},
        "AutoModelForCausalLM",
        rope=True,
    ),
    Case(
        "starcoder2",
        "starcoder2",
        {**_DECODER, "use_bias": True},
        "AutoModelForCausalLM",
        rope=True,
    ),
    *(
        Case(
            name,
            "phi",
            {**_DECODER, "partial_rotary_factor": 0.5} | extra,
            "AutoModelForCausalLM",
            rope=True,
        )
        for name, extra in (("phi", {}), ("phi-qk-layernorm", {"qk_layernorm": True}))
    ),
    Case("phi3", "phi3", {**_DECODER, "pad_token_id": 1}, "AutoModelForCausalLM", rope=True),
    Case(
        "t5",
        "t5",
        {
            **_TOKENS,
            "d_model": HIDDEN,
            "d_kv": 8,
            "d_ff": 128,
            "num_layers": LAYERS,
            "num_decoder_layers": 3,
            "num_heads": HEADS,
            "decoder_start_token_id": 0,
        },
    ),
    Case(
        "bart",
        "bart",
        {
            **_TOKENS,
            "d_model": HIDDEN,
            "encoder_layers": LAYERS,
            "decoder_layers": LAYERS,
            "encoder_attention_heads": HEADS,
            "decoder_attention_heads": 2,
            "encoder_ffn_dim": 128,
            "decoder_ffn_dim": 128,
            "max_position_embeddings": 64,
            "decoder_start_token_id": 2,
        },
    ),
]
#: more layouts and scale rules of the same model_types (not in CASES, which other tests share)
VARIANTS = [
    Case(
        "gpt2-unscaled",
        "gpt2",
        {**_TOKENS, "n_embd": HIDDEN, "n_layer": LAYERS, "n_head": HEADS, "n_positions": 64}
        | {"scale_attn_weights": False},
        "AutoModelForCausalLM",
    ),
    Case(
        "falcon-alibi",
        "falcon",
        {
            **_TOKENS,
            "hidden_size": HIDDEN,
            "num_hidden_layers": LAYERS,
            "num_attention_heads": HEADS,
        }
        | {"bias": True, "multi_query": False, "alibi": True},
        "AutoModelForCausalLM",
    ),
]
CASES_BY_ID = {case.id: case for case in CASES + VARIANTS}


def build(case: Case, *, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """The case's model in eager attention and eval mode, every float parameter redrawn."""
    import transformers

    config = transformers.AutoConfig.for_model(case.model_type, **case.config)
    auto = getattr(transformers, case.auto)
    model = auto.from_config(config, attn_implementation="eager")
    randomize(model, seed=seed, std=std)
    return model.eval()


def randomize(model: torch.nn.Module, *, seed: int = 0, std: float = 0.2) -> None:
    """Redraw every floating parameter ~ N(0, std^2), norm gains ~ N(1, std^2), seeded."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if not parameter.is_floating_point():
                continue
            noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float64) * std
            is_gain = parameter.ndim == 1 and "norm" in name.lower() and name.endswith("weight")
            parameter.copy_(noise + (1.0 if is_gain else 0.0))


def deepseek_v3_config():
    """A 2-layer DeepSeek-V3 (MLA) config: 4 heads, latents of 32, value rows 8 of each head's 16
    kv_b_proj rows (so reading them or not shows in the bytes)."""
    from transformers import DeepseekV3Config

    return DeepseekV3Config(
        vocab_size=64, hidden_size=64, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
        n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1,
        first_k_dense_replace=2, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=8,
        qk_rope_head_dim=8, v_head_dim=8, max_position_embeddings=256,
    )  # fmt: skip
