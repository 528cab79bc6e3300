"""The behavioural reference's dummy inputs (support/behaviour.py `_inputs`, `_run`): types
whose model it once could not run ("the model does not run on dummy inputs") are run, and every
audited head equals what the model computes (verify(): "exact").

Its probe of modules that compute their logits themselves (``probe_logits``), against
W^h = s * W_Q^h^T W_K^h of toy modules whose weights are known: layouts, relative position
terms, cross attention, SDPA called directly, cosine attention, blocked local attention,
sequence- and channels-first states, a leading stream of the tokens; and its refusals of
pooled tokens and of logits that are not bilinear (a per-token norm)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from support.behaviour import F64, _run, build, probe_logits, shrink, shrunken_dict
from support.verify import verify

#: model_type -> the input rule that makes it run
_NOW_RUN = {
    "kimi_k25_vision": "flattened patches with their grid, for a pixel_values tower",
    "muse_spark_vision": "two frames per patch, which its tower config does not state",
    "gemma4_vision": "patches with their (x, y) positions",
    "time_series_transformer": "past values over the context and lags, time features, mask",
    "qwen3_omni_moe_talker_text": "embeddings where input_ids must be None",
    "siglip_text_model": "no more tokens than its learned positions",
    "swin": "a failed small image leaves neither window sizes nor captured calls behind",
    "lightglue": "image pairs; its keypoint rotation made the identity",
    "vjepa2": "a short clip; its in-module 3D RoPE at index 0",
    "xmod": "a language per sequence",
    "mimi_decoder": "a codec decoder's latents",
    "xclip_vision_model": "a clip's frames as the batch",
}


def test_a_failed_candidate_leaves_no_calls():
    """Swin's first candidate (a small image) fails after its first attention calls ran: those
    calls are dropped, so each module's calls are those of the image that ran."""
    model = build(shrink("swin"))
    calls = _run(model, 72)
    assert len(calls) == len({id(call[0]) for call in calls}) > 0


HEADS, HEAD_DIM = 2, 4


class _Toy(nn.Module):
    """Attention over (batch, *tokens, n) states (2-D layouts flattened), with a query- and
    slot-dependent position term (DeBERTa's content-to-position, SAM's relative positions) and
    an additive bias per slot pair; keys from ``encoder_hidden_states`` when given."""

    def __init__(self, n: int, m: int, tokens: int, kind: str = "softmax") -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(3)
        width = HEADS * HEAD_DIM
        self.q, self.k = nn.Linear(n, width).to(F64), nn.Linear(m, width).to(F64)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=generator, dtype=F64))
        self.position = torch.randn(tokens, HEADS, HEAD_DIM, generator=generator, dtype=F64)
        self.pair_bias = torch.randn(tokens, tokens, generator=generator, dtype=F64)
        self.kind = kind

    def heads(self, x: torch.Tensor, projection: nn.Linear) -> torch.Tensor:
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        return projection(x).view(x.shape[0], x.shape[1], HEADS, HEAD_DIM).transpose(1, 2)

    def forward(self, hidden_states, encoder_hidden_states=None):
        q = self.heads(hidden_states, self.q)
        states = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        k = self.heads(states, self.k)
        if self.kind == "sdpa":
            return nn.functional.scaled_dot_product_attention(q, k, k, scale=0.3)
        if self.kind == "cosine":
            q, k = nn.functional.normalize(q, dim=-1), nn.functional.normalize(k, dim=-1)
        logits = q @ k.transpose(-1, -2) / math.sqrt(HEAD_DIM)
        t_q, t_k = logits.shape[-2:]
        content = torch.einsum("bhid,ihd->bhi", q, self.position[:t_q])[..., None]
        logits = logits + content + self.pair_bias[:t_q, :t_k]
        return logits.softmax(-1)


def _expected(toy: _Toy, scale: float) -> torch.Tensor:
    wq = toy.q.weight.view(HEADS, HEAD_DIM, -1)
    wk = toy.k.weight.view(HEADS, HEAD_DIM, -1)
    return scale * wq.transpose(1, 2) @ wk


def _check(probed: list[torch.Tensor], want: torch.Tensor) -> None:
    assert len(probed) == HEADS
    for got, expected in zip(probed, want, strict=True):
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("shape", [(1, 2), (3, 9), (2, 3, 4)], ids=["pair", "windows", "2d"])
def test_own_logits_are_probed_in_the_captured_layout(shape):
    """Any token count, several sequences (windows) and 2-D layouts: W^h exactly, with the
    content-position and pair terms cancelled."""
    n = 6
    toy = _Toy(n, n, math.prod(shape[1:]))
    hidden = torch.zeros(*shape, n, dtype=F64)
    _check(probe_logits(toy, (hidden,), {}), _expected(toy, HEAD_DIM**-0.5))


def test_cross_attention_keys_come_from_the_key_states():
    """Keys from encoder_hidden_states of another width and length: W^h is n x m."""
    n, m = 6, 5
    toy = _Toy(n, m, 7)
    kwargs = {"encoder_hidden_states": torch.zeros(1, 3, m, dtype=F64)}
    _check(probe_logits(toy, (torch.zeros(1, 7, n, dtype=F64),), kwargs), _expected(toy, 0.5))


def test_sdpa_called_directly_is_read_with_its_scale():
    toy = _Toy(6, 6, 5, kind="sdpa")
    _check(probe_logits(toy, (torch.zeros(1, 5, 6, dtype=F64),), {}), _expected(toy, 0.3))


def test_cosine_attention_is_read_with_the_rms_left_out():
    """x / |x| read as QK-norm: (x / rms(x)) / sqrt(d), the RMS left out: scale 1 / d more."""
    toy = _Toy(6, 6, 4, kind="cosine")
    want = _expected(toy, HEAD_DIM**-0.5 / HEAD_DIM)
    _check(probe_logits(toy, (torch.zeros(1, 4, 6, dtype=F64),), {}), want)


def test_one_token_sequences_are_widened_to_a_pair():
    toy = _Toy(6, 6, 2)
    _check(probe_logits(toy, (torch.zeros(3, 1, 6, dtype=F64),), {}), _expected(toy, 0.5))


class _QueryKeyApart(_Toy):
    """SAM-style attention: queries and keys from separate inputs (its layer adds positions to
    both), values from a third."""

    def forward(self, query, key, value):
        return super().forward(query, None if key is query else key)


def test_queries_and_keys_taken_apart_are_probed_by_name():
    """forward(query, key, value): a key that is the query tensor is self-attention; another,
    of its own width and length, cross attention (W^h n x m)."""
    n, m = 6, 5
    toy = _QueryKeyApart(n, n, 7)
    query = torch.zeros(1, 7, n, dtype=F64)
    kwargs = {"query": query, "key": query, "value": query}
    _check(probe_logits(toy, (), kwargs), _expected(toy, 0.5))
    toy = _QueryKeyApart(n, m, 7)
    keys = torch.zeros(1, 3, m, dtype=F64)
    kwargs = {"query": query, "key": keys, "value": keys.clone()}
    _check(probe_logits(toy, (), kwargs), _expected(toy, 0.5))


class _TimeFirstToy(_Toy):
    """Attention over (tokens, batch, n) states, which it permutes itself, with an additive
    position term of the same layout (Mask2Former's decoder)."""

    def forward(self, hidden_states, position_embeddings=None):
        return super().forward((hidden_states + position_embeddings).permute(1, 0, 2))


def test_time_first_inputs_are_probed_batch_first():
    """A captured (tokens, 1, n) call, which read batch-first is one token per sequence: probed
    with its inputs transposed (and transposed back for the module), W^h exactly."""
    toy = _TimeFirstToy(6, 6, 5)
    hidden = torch.zeros(5, 1, 6, dtype=F64)
    kwargs = {"position_embeddings": torch.randn(5, 1, 6, dtype=F64)}
    _check(probe_logits(toy, (hidden,), kwargs), _expected(toy, 0.5))


class _BiDirectional(_Toy):
    """Grounding DINO's fusion: one q.k of vision queries and text keys, less the call's largest
    logit, softmaxed transposed (text to vision, less each row's maximum) first, then as is."""

    def forward(self, vision_features, text_features):
        q, k = self.heads(vision_features, self.q), self.heads(text_features, self.k)
        logits = q @ k.transpose(-1, -2) / math.sqrt(HEAD_DIM)
        logits = logits - logits.max()
        text = logits.transpose(-1, -2)
        text = (text - text.max(dim=-1, keepdim=True)[0]).softmax(-1)
        return logits.softmax(-1), text


def test_bi_directional_attention_is_read_in_its_query_direction():
    """The vision-to-text logits (the second softmax's), with the constant each call subtracts
    undone across the probe's calls: W^h of the vision queries, n x m."""
    n, m = 6, 5
    toy = _BiDirectional(n, m, 7)
    args = (torch.zeros(1, 7, n, dtype=F64), torch.zeros(1, 3, m, dtype=F64))
    _check(probe_logits(toy, args, {}), _expected(toy, 0.5))


def test_a_bilinear_form_that_mixes_slots_is_not_read_as_one():
    """A module whose logit of a pair depends on another token fails the probe's premise: the
    result differs from W^h (the check this reference feeds then reports it)."""

    class Mixing(_Toy):
        def forward(self, hidden_states, encoder_hidden_states=None):
            rolled = hidden_states + hidden_states.roll(1, dims=1)  # token-mixing before q/k
            return super().forward(rolled)

    toy = Mixing(6, 6, 4)
    probed = probe_logits(toy, (torch.zeros(1, 4, 6, dtype=F64),), {})
    assert not torch.allclose(torch.stack(probed), _expected(toy, 0.5))


@pytest.mark.parametrize("swap", [(0, 1), (1, 2)], ids=["sequence-first", "channels-first"])
def test_logits_are_probed_in_the_module_own_layout(swap):
    """FSMT's and XLNet's (tokens, batch, d), SqueezeBERT's (batch, d, tokens): W^h exactly."""

    class Swapped(_Toy):
        def forward(self, hidden_states, encoder_hidden_states=None):
            return super().forward(hidden_states.transpose(*swap))

    toy = Swapped(6, 6, 8)  # more tokens than width: a channels-first layout is plausible
    hidden = torch.zeros(1, 8, 6, dtype=F64).transpose(*swap)
    _check(probe_logits(toy, (hidden,), {}), _expected(toy, 0.5))


def test_a_softmax_over_a_leading_stream_is_read_there():
    """ProphetNet's main stream: the first softmax covers the first third of the tokens."""

    class Streams(_Toy):
        def forward(self, hidden_states, encoder_hidden_states=None):
            return super().forward(hidden_states[:, : hidden_states.shape[1] // 3])

    toy = Streams(6, 6, 4)
    _check(probe_logits(toy, (torch.zeros(1, 12, 6, dtype=F64),), {}), _expected(toy, 0.5))


def test_pooled_tokens_are_not_read_as_a_leading_stream():
    """Square logits over half the tokens from pooling them in pairs (Funnel-like): every
    token moves them, so they are no leading stream; the probe refuses."""

    class Pooled(_Toy):
        def forward(self, hidden_states, encoder_hidden_states=None):
            b, t, n = hidden_states.shape
            return super().forward(hidden_states.view(b, t // 2, 2, n).mean(2))

    toy = Pooled(6, 6, 4)
    with pytest.raises(RuntimeError):
        probe_logits(toy, (torch.zeros(1, 8, 6, dtype=F64),), {})


def test_a_per_token_key_norm_is_not_read_as_bilinear():
    """Reformer's LSH keys, k / rms(k) with a fixed epsilon: its logits are not bilinear in
    the inputs (doubling a key probe does not double its logit): the probe refuses."""

    class KeyNorm(_Toy):
        def heads(self, x, projection):
            out = super().heads(x, projection)
            if projection is self.k:
                out = out * torch.rsqrt(out.square().mean(-1, keepdim=True) + 1e-6)
            return out

    toy = KeyNorm(6, 6, 4)
    with pytest.raises(RuntimeError, match="not bilinear"):
        probe_logits(toy, (torch.zeros(1, 4, 6, dtype=F64),), {})


def test_blocked_local_attention_is_read_per_block():
    """LongT5's local attention ((batch, blocks, H, L, 3L) logits, no scaling): W^h equals
    q_h^T k_h of its own weights."""

    model = build(shrink("longt5"))
    module = model.encoder.block[0].layer[0].LocalSelfAttention
    hidden = torch.zeros(1, 6, model.config.d_model, dtype=F64)
    heads, d = module.n_heads, module.key_value_proj_dim
    wq = module.q.weight.view(heads, d, -1)
    wk = module.k.weight.view(heads, d, -1)
    probed = probe_logits(module, (hidden,), {"mask": None, "position_bias": None})
    assert len(probed) == heads
    for got, h in zip(probed, range(heads), strict=True):
        torch.testing.assert_close(got, wq[h].T @ wk[h], rtol=1e-9, atol=1e-9)


def test_blocks_attended_alone_are_read_per_block_after_the_input_norm():
    """Granite Speech's conformer attention: sdpa logits (batch * blocks, H, L, L) of blocks
    of L frames, the last right-padded, Shaw's relative term as the mask, and its input
    LayerNorm (pre_norm) inside the module: W^h = s * W_Q^h^T W_K^h of to_q and to_kv's key
    half, on what they take."""

    model = build(shrink("granite_speech_encoder"))
    module = model.layers[0].attn
    tokens, size = 40, module.context_size  # 3 blocks of 16, the last half padding
    hidden = torch.zeros(1, tokens, module.to_q.in_features, dtype=F64)
    heads, d = module.num_heads, module.dim_head
    wq = module.to_q.weight.view(heads, d, -1)
    wk = module.to_kv.weight[: heads * d].view(heads, d, -1)
    probed = probe_logits(module, (hidden, model.attention_dists), {})
    assert len(probed) == heads and tokens % size
    for got, h in zip(probed, range(heads), strict=True):
        torch.testing.assert_close(got, module.scale * wq[h].T @ wk[h], rtol=1e-9, atol=1e-9)


# --- tiny configs (support/behaviour.py `shrunken_dict`): fields the model derives from others
# kept consistent with the shrunken sizes

#: model_type -> the shrinking rule that makes its tiny model run (each was "the model does not
#: run on dummy inputs")
_SHRUNK_CONSISTENT = {
    "glm4v_moe_text": "M-RoPE sections of the model code's default, rescaled to the rotary width",
    "deepseek_ocr2_text": "a top-k the default leaves None",
    "kimi_linear": "top-k within the shrunken experts",
    "bros": "widths its __post_init__ computes from hidden / heads, recomputed",
    "zamba2": "hybrid_layer_ids recomputed from the kept layers",
    "mistral4": "MLA's partial rotary factor of the shrunken rope and nope parts",
    "eomt": "its query blocks within the kept layers",
    # its pixel-shuffle width; its complex rotary buffer kept complex and held at position 0;
    # its attention's own eager function found under the forward's decorators
    "llama4_vision_model": "intermediate_size = hidden / pixel_shuffle_ratio^2",
}


#: model_type -> the probing rule that reaches its modules (each was "cannot probe")
_PROBED_NOW = {
    "chameleon_vqgan": "1x1 Conv2d q/k on a channel-first map, probed after its input GroupNorm",
    "minicpm_ocr_vision": "insert_layer_id within the kept layers: its vit_merger runs",
    "hiera": "a mask unit's (batch, H, 1, L, L) logits, one window",
    "florence_vision": "one square window of (1, side, side, d) states, called on its own",
    "mllama_vision_model": "4 x 4 patches per tile, its attention_heads shrunk (was over 120 s)",
    "idefics2": "the Perceiver's keys of [context; latents], two equal copies counted once",
    "t5gemma2": "merged [self; cross] keys, the probes as both",
    "xclip": "forward(queries, keys, values) called on its own, values from the key states",
    "aria": "an MHA behind its owner's q/k projections, read off the owner's logits",
    "levit": "queries of a subset of the tokens; BatchNorm in inference, its statistics drawn",
}


def test_queries_pooled_from_several_tokens_are_not_read_as_a_subset():
    """LeViT's subsampling attention: each query row reads one token (probed as a subset of the
    tokens); made to average two tokens per query, a pooling, no bilinear form: refused."""
    from support.behaviour import _capture_inputs, _query_subset

    model = build(shrink("levit"))
    module = model.encoder.stages[0].layers[2]
    args, kwargs = _capture_inputs(model, [module], 2)[id(module)]
    assert _query_subset(module, args, kwargs)
    subsample = module.queries_subsample.forward
    module.queries_subsample.forward = lambda h: (subsample(h) + subsample(h.roll(1, 1))) / 2
    assert not _query_subset(module, args, kwargs)


#: the rule that makes each type run (Beam's, one expert group: EXPECTED in test_discovery)
_NOW_EXACT = {**_NOW_RUN, **_SHRUNK_CONSISTENT, **_PROBED_NOW}


@pytest.mark.parametrize("model_type", sorted(_NOW_EXACT))
def test_types_the_reference_now_runs_are_exact(model_type, tmp_path):
    outcome = verify(shrink(model_type), tmp_path)
    assert outcome.status == "exact", (_NOW_EXACT[model_type], outcome.detail)
    assert outcome.heads > 0


def _half_rotary(config) -> int:
    head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return int(head * config.rope_parameters.get("partial_rotary_factor", 1.0)) // 2


@pytest.mark.parametrize("model_type", ["glm4v_moe_text", "paddleocr_vl_text", "qwen2_5_omni_text"])
def test_code_default_mrope_sections_fill_half_the_shrunken_rotary_width(model_type):
    config = shrink(model_type)
    sections = config.rope_parameters["mrope_section"]
    assert len(sections) == 3 and min(sections) > 0
    assert sum(sections) == _half_rotary(config)


@pytest.mark.parametrize(
    ("model_type", "top_k", "experts"),
    [
        ("kimi_linear", "num_experts_per_token", "num_experts"),
        ("longcat_flash", "moe_topk", "n_routed_experts"),
        ("deepseek_ocr2_text", "num_experts_per_tok", "n_routed_experts"),
        ("axk1", "num_experts_per_tok", "n_routed_experts"),
    ],
)
def test_routers_pick_at_most_the_shrunken_experts(model_type, top_k, experts):
    values = shrunken_dict(model_type)
    assert isinstance(values[top_k], int) and 1 <= values[top_k] <= values[experts]
    for group in ("n_group", "num_expert_group"):
        if isinstance(values.get(group), int):
            assert values[experts] % values[group] == 0
            assert values["topk_group"] <= values[group]


def test_attributes_post_init_derives_are_recomputed():
    bros = shrink("bros")
    assert bros.dim_bbox_projection == bros.hidden_size // bros.num_attention_heads
    assert bros.dim_bbox_sinusoid_emb_1d == bros.hidden_size // 4 // bros.dim_bbox
    zamba2 = shrink("zamba2")
    kinds = zamba2.layers_block_type
    assert zamba2.hybrid_layer_ids == [i for i, kind in enumerate(kinds) if kind == "hybrid"]
    mla = shrink("axk1")
    assert mla.qk_head_dim == mla.qk_nope_head_dim + mla.qk_rope_head_dim


def test_hiera_patch_width_is_its_first_stage_width():
    config = shrink("sam2_hiera_det_model")
    assert config.hidden_size == config.embed_dim_per_stage[0] < 96


@pytest.mark.parametrize("model_type", ["fsmt", "mra"])
def test_float64_models_casting_to_float32_inside_run(model_type):
    """FSMT fills its float32-cast mask with float64's minimum, MRA multiplies float32 q, k, v
    into float64 layers: run last with those casts keeping float64."""
    _run(build(shrink(model_type)), 72)
