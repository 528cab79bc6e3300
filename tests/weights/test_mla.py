"""MLA heads against the query and key states a DeepSeek-V3 model itself hands to attention.

The reference does not read qkmonitor.weights.mla's algebra: it runs a tiny float64
DeepseekV3Model at position 0 (position_ids all zero, so RoPE is the identity), captures the
query and key states passed to the attention function (a registered AttentionInterface), and
fits each head's linear maps A_h, B_h from the attention module's input by least squares. The
latent RMSNorms are made linear by a huge epsilon (rsqrt(var + eps) ~ eps^-1/2, a constant the
test multiplies back), so their gains stay in while the per-token normalization drops out
(SPEC.md). W^h = s A_h^T B_h with the scale the model passed; statistics by full float64 eig.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from support.naive import naive_stats, relative_errors
from transformers import AttentionInterface, AttentionMaskInterface, DeepseekV3Config
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Model

from qkmonitor.errors import CorruptWeightsError, UnsupportedModelError
from qkmonitor.spectrum import head_spectra
from qkmonitor.weights.mla import MLADims, MLANames, mla_heads

STATS = ("eig_mean", "eig_var", "eig_var_complex", "spectral_norm", "positive_fraction")
EPS = 1e24  # latent norms: rsqrt(var + EPS) = EPS^-1/2 (1 - var / 2 EPS ...), var ~ 1
TOKENS = 96  # probes, more than d_in so that the least-squares fit is exact

_CAPTURED: dict[int, dict] = {}


def _capture(module, query, key, value, attention_mask, **kwargs):
    _CAPTURED[module.layer_idx] = {"q": query.detach(), "k": key.detach(), "s": kwargs["scaling"]}
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register("qkmonitor_mla_capture", _capture)
AttentionMaskInterface.register("qkmonitor_mla_capture", sdpa_mask)


def _model(q_lora_rank: int | None, interleave: bool, yarn: bool) -> DeepseekV3Model:
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if yarn:
        rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "mscale": 1.0,
                "mscale_all_dim": 1.0, "original_max_position_embeddings": 64, "beta_fast": 32,
                "beta_slow": 1}  # fmt: skip
    config = DeepseekV3Config(
        vocab_size=64, hidden_size=48, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
        n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1,
        first_k_dense_replace=2, q_lora_rank=q_lora_rank, kv_lora_rank=16, qk_nope_head_dim=8,
        qk_rope_head_dim=4, v_head_dim=6, rope_interleave=interleave, rope_parameters=rope,
        max_position_embeddings=2560, attn_implementation="qkmonitor_mla_capture",
    )  # fmt: skip
    torch.manual_seed(0)
    model = DeepseekV3Model(config).to(torch.float64).eval()  # dense MLPs: MoE needs float32
    with torch.no_grad():  # gains are initialized to ones: make them count
        for name, parameter in model.named_parameters():
            if name.endswith("layernorm.weight"):
                parameter.copy_(0.5 + torch.rand_like(parameter))
    return model


def _reference(model: DeepseekV3Model) -> dict[int, list]:
    """Per layer: the naive statistics of every head's W^h from the model's own q and k."""
    inputs: dict[int, torch.Tensor] = {}
    handles = []
    for index, layer in enumerate(model.layers):
        attention = layer.self_attn

        def keep(module, args, kwargs, index=index):
            inputs[index] = kwargs["hidden_states"][0].detach()

        handles.append(attention.register_forward_pre_hook(keep, with_kwargs=True))
        for norm in (attention.q_a_layernorm, attention.kv_a_layernorm):
            if norm is not None:
                norm.variance_epsilon = EPS
    generator = torch.Generator().manual_seed(1)
    embeds = torch.randn(1, TOKENS, model.config.hidden_size, generator=generator).double()
    _CAPTURED.clear()
    try:
        with torch.no_grad():
            model(inputs_embeds=embeds, position_ids=torch.zeros(1, TOKENS, dtype=torch.long))
    finally:
        for handle in handles:
            handle.remove()
    config, rescale = model.config, EPS**0.5
    nope, q_latent = config.qk_nope_head_dim, config.q_lora_rank is not None
    out = {}
    for index, x in inputs.items():
        captured = _CAPTURED[index]
        q = captured["q"][0] * (rescale if q_latent else 1.0)  # (H, T, d)
        k = captured["k"][0].clone()
        k[..., :nope] *= rescale  # the no-RoPE key passed kv_a_layernorm, the RoPE key did not
        heads = []
        for h in range(q.shape[0]):
            a = torch.linalg.lstsq(x, q[h]).solution.T  # (d, d_in): q_h = A x
            b = torch.linalg.lstsq(x, k[h]).solution.T
            assert torch.allclose(x @ a.T, q[h], rtol=0, atol=1e-6 * float(q[h].abs().max()))
            heads.append(naive_stats(captured["s"] * a.T @ b, a.shape[0]))
        out[index] = heads
    return out


CASES = {
    "q-lora-yarn-interleaved": (12, True, True),
    "no-q-lora": (None, False, False),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_mla_heads_match_the_model_at_position_zero(case):
    model = _model(*case)
    want = _reference(model)
    config, state = model.config, model.state_dict()
    dims = MLADims.from_config(config)
    for index, layer in enumerate(model.layers):
        names = MLANames.of_module(f"layers.{index}.self_attn", q_lora=case[0] is not None)
        heads = mla_heads(state, names, dims, layer.self_attn.scaling)
        assert heads.cheaper()  # the latent route pays here, with or without a q latent
        dense = head_spectra(*heads.dense(), heads.scale)  # and the dense route agrees
        for spectra in (head_spectra(heads), dense):
            for h, reference in enumerate(want[index]):
                values = {name: float(getattr(spectra, name)[h]) for name in STATS}
                eigvals = [(float(z.real), float(z.imag)) for z in spectra.eigvals[h]]
                head = SimpleNamespace(**values, eigvals=eigvals)
                errors = relative_errors(head, reference, "mla")
                assert max(errors.values()) <= 1e-6, (index, h, errors)
    if case[2]:  # YaRN's mscale^2 is in the scale the module passes (about 1.87x here)
        assert _CAPTURED[0]["s"] > 1.8 * dims.head_dim**-0.5


def test_mla_refuses_shapes_that_disagree_with_the_config():
    model = _model(12, True, False)
    dims = MLADims.from_config(model.config)
    names = MLANames.of_module("layers.0.self_attn", q_lora=True)
    wrong = MLADims(**{**vars(dims), "qk_nope_head_dim": 6})
    with pytest.raises(CorruptWeightsError, match="kv_b_proj has shape"):
        mla_heads(model.state_dict(), names, wrong, 0.3)
    with pytest.raises(UnsupportedModelError, match="kv_lora_rank"):
        MLADims.from_config(SimpleNamespace(num_attention_heads=4, qk_nope_head_dim=8,
                                            qk_rope_head_dim=4, v_head_dim=6))  # fmt: skip
