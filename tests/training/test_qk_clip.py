"""QK-Clip: factors, the weight rescale in every packing, and the callback's refusals.

The reference for "capped" is the model itself: after rescaling one layer, the same batch runs
again and that layer's largest logit per clipped head must equal tau (its inputs are unchanged,
since only layers before it could change them), every other head's logits and Q/K rows must be
bit-identical.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from support.models import _DECODER, CASES_BY_ID, Case, build

from qkmonitor.entropy import softcapped
from qkmonitor.training.capture import EntropyCapture
from qkmonitor.training.qk_clip import apply_factors, clip_factors, head_factors, unsupported
from qkmonitor.weights.layout import output_dim, qk_rows
from qkmonitor.weights.live import plan_live

SOFTCAP = Case(
    "gemma2-softcap",
    "gemma2",
    {**_DECODER, "head_dim": 16, "query_pre_attn_scalar": 24, "attn_logit_softcapping": 20.0},
    "AutoModelForCausalLM",
    rope=True,
)


def test_factors_cap_exactly_the_heads_above_tau():
    scores = torch.tensor([50.0, 100.0, 200.0, -5.0, math.nan, -math.inf], dtype=torch.float64)
    gamma = clip_factors(scores, 100.0)
    assert gamma.tolist()[:2] == [1.0, 1.0] and gamma[2] == 0.5
    assert gamma[3:].tolist() == [1.0, 1.0, 1.0]  # below, unmeasured (NaN), never seen
    scores = torch.tensor([1.0, 4.0, 40.0], dtype=torch.float64)  # softcap(40) rounds to 3
    capped = clip_factors(scores, 2.0, softcap=3.0)
    after = softcapped(capped * scores, 3.0)
    torch.testing.assert_close(after[1:], torch.tensor([2.0, 2.0], dtype=torch.float64))
    assert capped[0] == 1.0  # softcap(1) < 2
    assert torch.equal(clip_factors(torch.tensor([1e6]), 3.0, softcap=3.0), torch.ones(1))

    gamma = torch.tensor([0.25, 1.0, 0.5, 1.0], dtype=torch.float64)
    q, k = head_factors(gamma, 4)  # MHA: sqrt on both
    torch.testing.assert_close(q * k, gamma, rtol=1e-15, atol=0)
    assert torch.equal(q, k)
    q, k = head_factors(gamma, 2)  # GQA: the shared key head is left alone
    assert torch.equal(q, gamma) and torch.equal(k, torch.ones(2, dtype=torch.float64))


def batch_for(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 90, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def max_logits(model: torch.nn.Module, layers, batch) -> dict:
    """(block, layer) -> the largest logit per head the model computes on the batch."""
    capture = EntropyCapture(model, layers=layers)
    with capture.recording(entropy=False), torch.no_grad():
        model(**batch)
    got = capture.collect()
    return {key: softcapped(sums.max_score, capture.softcaps[key]) for key, sums in got.items()}


def rows(layer, name: str, index: torch.Tensor) -> torch.Tensor:
    """The stored rows (outputs) of one tensor of a layer, and its bias's, as one tensor."""
    owner = layer.owner(name)
    weight = owner.weight.detach().movedim(output_dim(layer.plan.packing), 0)
    parts = [weight[index]]
    if isinstance(getattr(owner, "bias", None), torch.Tensor):
        parts.append(owner.bias.detach()[index][..., None])
    return torch.cat(parts, -1).clone()


@pytest.mark.parametrize(
    "case_id",
    ["bert", "gpt2", "gpt_neox", "llama", "qwen2", "phi3", "falcon-new-decoder", "bloom"],
)
def test_one_layer_rescaled_peaks_at_tau_and_leaves_other_heads_bit_identical(case_id):
    """MHA (bert, gpt2 fused Conv1D, gpt_neox per-head qkv, bloom), GQA (llama, qwen2 with
    biases, phi3 stacked qkv, falcon grouped qkv), biases scaled with their weights."""
    model = build(CASES_BY_ID[case_id])
    layers, _ = plan_live(model)
    batch = batch_for(model)
    before = max_logits(model, layers, batch)
    for target, layer in enumerate(layers):
        clipped_model = copy.deepcopy(model)
        clipped_layers, _ = plan_live(clipped_model)
        clipped = clipped_layers[target]
        tau = float(before[layer.key].median())  # some heads above, some below
        gamma = clip_factors(before[layer.key], tau)
        assert (gamma < 1).any() and (gamma == 1).any()
        q_rows, k_rows = qk_rows(clipped.plan)
        plan = clipped.plan
        q_before = rows(clipped, plan.q, q_rows)
        k_before = rows(clipped, plan.k, k_rows)
        apply_factors(clipped, gamma)
        after = max_logits(clipped_model, clipped_layers, batch)
        over = gamma < 1
        torch.testing.assert_close(
            after[layer.key][over], torch.full_like(after[layer.key][over], tau), rtol=2e-6, atol=0
        )
        assert torch.equal(after[layer.key][~over], before[layer.key][~over])
        for earlier in layers[:target]:
            assert torch.equal(after[earlier.key], before[earlier.key])
        q_after, k_after = rows(clipped, plan.q, q_rows), rows(clipped, plan.k, k_rows)
        assert torch.equal(q_after[~over], q_before[~over])
        kv_touched = torch.zeros(plan.n_kv_heads, dtype=torch.bool)
        if plan.n_kv_heads == plan.n_heads:
            kv_touched = over
        assert torch.equal(k_after[~kv_touched], k_before[~kv_touched])
        state, reference = clipped_model.state_dict(), model.state_dict()
        changed = [n for n in state if not torch.equal(state[n], reference[n])]
        owners = {n.removesuffix(".weight") for n in plan.tensors}
        assert changed and all(n.rpartition(".")[0] in owners for n in changed), changed


def test_softcapped_heads_are_capped_on_the_logit_the_model_softmaxes():
    model = build(SOFTCAP)  # scores s q.k of 18 to 30 against a softcap of 20
    layers, _ = plan_live(model)
    batch = batch_for(model)
    before = max_logits(model, layers, batch)
    last = layers[-1]
    tau = float(before[last.key].median())
    assert 10.0 < tau < 20.0
    capture = EntropyCapture(model, layers=layers)
    with capture.recording(entropy=False), torch.no_grad():
        model(**batch)
    scores = capture.collect()[last.key].max_score
    assert capture.softcaps[last.key] == 20.0 and float(scores.max()) > 20.0
    gamma = clip_factors(scores, tau, capture.softcaps[last.key])
    assert not torch.equal(gamma, clip_factors(scores, tau))  # tau / score would not cap it
    apply_factors(last, gamma)
    after = max_logits(model, layers, batch)[last.key]
    over = gamma < 1
    torch.testing.assert_close(after[over], torch.full_like(after[over], tau), rtol=2e-6, atol=0)


@pytest.mark.parametrize("case_id", ["qwen3", "olmo2", "gemma3_text"])
def test_qk_norm_is_refused(case_id):
    model = build(CASES_BY_ID[case_id])
    layers, _ = plan_live(model)
    reason = unsupported(layers[0])
    assert reason is not None and "QK-norm" in reason and "\n" not in reason


def test_other_norm_modules_are_refused_as_such():
    """XLNet's attention holds its output LayerNorm: QK-Clip refuses the layer, naming the norm
    module, not calling it a QK-norm (its q and k are not normalized)."""
    from support.behaviour import build as build_tiny
    from support.behaviour import shrink

    layers, _ = plan_live(build_tiny(shrink("xlnet")))
    reason = unsupported(layers[0])
    assert reason is not None and "\n" not in reason
    assert "norm modules (layer_norm)" in reason and "QK-norm" not in reason


def test_cosine_attention_is_refused():
    """Swin v2 normalizes q and k in its forward (F.normalize, no norm module): rescaling its
    weights changes nothing, so QK-Clip refuses it."""
    from support.behaviour import build as build_tiny
    from support.behaviour import shrink

    layers, _ = plan_live(build_tiny(shrink("swinv2")))
    reason = unsupported(layers[0])
    assert reason is not None and "cosine attention" in reason and "\n" not in reason


def test_adapters_frozen_and_sharded_layers_are_refused():
    peft = pytest.importorskip("peft")
    model = build(CASES_BY_ID["llama"])
    layers, _ = plan_live(model)
    assert unsupported(layers[0]) is None
    sharded = dataclasses.replace(layers[0], fsdp_unit=torch.nn.Linear(1, 1))
    assert "sharded" in unsupported(sharded)
    layers[0].module.q_proj.weight.requires_grad_(False)
    assert "frozen" in unsupported(layers[0])
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "k_proj"])
    adapted = peft.get_peft_model(build(CASES_BY_ID["llama"]), config)
    adapted_layers, _ = plan_live(adapted)
    assert "PEFT adapters" in unsupported(adapted_layers[0])


def test_per_dimension_query_scaling_is_clipped_through_the_query_rows():
    """TimesFM multiplies each query dimension by softplus(scaling): rescaling the Q/K rows of a
    head still scales its W^h (what the model computes, tests/weights/test_discovery.py) by
    exactly gamma_h, and the scale itself is left as it is."""
    from support.behaviour import build as build_tiny
    from support.behaviour import shrink

    from qkmonitor.weights.layout import layer_weights

    (layer, *_), _ = plan_live(build_tiny(shrink("timesfm")))
    assert layer.plan.q_dim_scale and unsupported(layer) is None

    def heads() -> torch.Tensor:
        with torch.no_grad():
            wq, wk = layer_weights(layer.plan, {n: get() for n, get in layer.getters.items()})
        return wq.transpose(1, 2) @ wk  # (H, d_in, d_in), the scale left out

    scaling = layer.module.scaling.detach().clone()
    before = heads()
    gamma = torch.tensor([0.5, 1.0, 0.25, 1.0], dtype=torch.float64)
    apply_factors(layer, gamma)
    torch.testing.assert_close(heads(), before * gamma[:, None, None], rtol=1e-12, atol=0)
    assert torch.equal(layer.module.scaling, scaling)
