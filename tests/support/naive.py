"""An independent, naive reference for qkmonitor's numbers, written from SPEC.md.

Nothing here imports qkmonitor. Per-head W_Q^h / W_K^h are cut out of instantiated transformers
modules by this file's own reading of each architecture's modeling code (the module attributes
and the views/splits its forward applies), the scale is read off the instantiated attention
module, and every statistic comes from the full d_in x d_in matrix

    W^h = s * (W_Q^h)^T W_K^h

in float64 with a full eigendecomposition. ``logit_check`` closes the loop without trusting that
reading either: it runs the model in eager mode, captures the pre-softmax logits inside every
attention module, and compares them with x_i^T W^h y_j.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

F64 = torch.float64


@dataclass
class NaiveLayer:
    """One attention module: its per-query-head Q rows and the K rows each head uses."""

    block: str
    layer: int
    module: nn.Module
    wq: list[Tensor]  # per query head, (d_head, d_in), gains folded in, float64
    wk: list[Tensor]  # per query head (already mapped to its key head), (d_head, d_in)
    scale: float
    causal: bool
    q_norm: nn.Module | None = None  # per-token norms whose data-dependent factor the
    k_norm: nn.Module | None = None  # logit check divides out
    cross: bool = False

    def matrix(self, head: int) -> Tensor:
        """The full d_in x d_in W^h, float64."""
        return self.scale * self.wq[head].T @ self.wk[head]


def _rows(weight: Tensor, start: int, size: int) -> Tensor:
    return weight.detach().to(F64)[start : start + size]


def _separate(q: Tensor, k: Tensor, n_heads: int, n_kv: int, d: int) -> tuple[list, list]:
    """q (H d, n) and k (Hkv d, n) Linear weights; head h uses key head h // (H / Hkv)."""
    group = n_heads // n_kv
    wq = [_rows(q, h * d, d) for h in range(n_heads)]
    wk = [_rows(k, (h // group) * d, d) for h in range(n_heads)]
    return wq, wk


def _gain(norm: nn.Module | None, offset: float = 0.0) -> Tensor | None:
    return None if norm is None else norm.weight.detach().to(F64) + offset


def _fold(rows: list[Tensor], gain: Tensor | None, heads_of_row: list[int] | None = None) -> list:
    """diag(gain) on each head's rows; a gain of size H*d (OLMo 2) is cut per head."""
    if gain is None:
        return rows
    d = rows[0].shape[0]
    out = []
    for index, w in enumerate(rows):
        g = (
            gain
            if gain.numel() == d
            else gain[heads_of_row[index] * d : (heads_of_row[index] + 1) * d]
        )
        out.append(g[:, None] * w)
    return out


def _decoder_layers(base: nn.Module) -> list[nn.Module]:
    return list(base.layers)


def naive_layers(model: nn.Module) -> list[NaiveLayer]:
    """Every attention module of a transformers model, by model_type."""
    config = model.config
    kind = config.model_type
    base = model.base_model
    layers: list[NaiveLayer] = []

    def add(block, index, module, wq, wk, scale, causal, **kw):
        layers.append(NaiveLayer(block, index, module, wq, wk, float(scale), causal, **kw))

    if kind in ("bert", "roberta", "xlm-roberta", "electra", "camembert"):
        for i, layer in enumerate(base.encoder.layer):
            m = layer.attention.self
            h, d = m.num_attention_heads, m.attention_head_size
            add("self", i, m, *_separate(m.query.weight, m.key.weight, h, h, d), m.scaling, False)
    elif kind == "distilbert":
        for i, layer in enumerate(base.transformer.layer):
            m = layer.attention
            h = m.n_heads
            d = m.q_lin.weight.shape[0] // h
            add("self", i, m, *_separate(m.q_lin.weight, m.k_lin.weight, h, h, d), m.scaling, False)
    elif kind == "vit":
        for i, layer in enumerate(base.layers):
            m = layer.attention
            h, d = m.num_attention_heads, m.head_dim
            add(
                "self",
                i,
                m,
                *_separate(m.q_proj.weight, m.k_proj.weight, h, h, d),
                m.scaling,
                False,
            )
    elif kind == "gpt2":
        for i, block in enumerate(base.h):
            m = block.attn
            # Conv1D: y = x @ W + b with W (d_in, 3E); outputs split [Q | K | V]; as nn.Linear
            # rows that is W.T, Q rows 0..E, K rows E..2E; heads are consecutive d-row slices.
            rows = m.c_attn.weight.detach().T
            e, h, d = m.embed_dim, m.num_heads, m.head_dim
            add("self", i, m, *_separate(rows[:e], rows[e : 2 * e], h, h, d), m.scaling, True)
    elif kind in ("gpt_neox", "bloom"):
        modules = (
            [layer.attention for layer in base.layers]
            if kind == "gpt_neox"
            else [block.self_attention for block in base.h]
        )
        for i, m in enumerate(modules):
            # view(..., H, 3 d) / view(..., H, 3, d): per head rows [q_h; k_h; v_h]
            w = m.query_key_value.weight
            h = config.num_attention_heads
            d = w.shape[0] // (3 * h)
            wq = [_rows(w, 3 * d * j, d) for j in range(h)]
            wk = [_rows(w, 3 * d * j + d, d) for j in range(h)]
            scale = m.scaling if kind == "gpt_neox" else m.inv_norm_factor
            add("self", i, m, wq, wk, scale, True)
    elif kind == "falcon":
        for i, block in enumerate(base.h):
            m = block.self_attention
            w, h, d = m.query_key_value.weight, m.num_heads, m.head_dim
            if m.new_decoder_architecture:
                # view(..., Hkv, H/Hkv + 2, d): per group [q .. q, k, v]; q flattened (g, j)
                group = h // m.num_kv_heads
                wq = [_rows(w, ((j // group) * (group + 2) + j % group) * d, d) for j in range(h)]
                wk = [_rows(w, ((j // group) * (group + 2) + group) * d, d) for j in range(h)]
            elif not m.multi_query:
                wq = [_rows(w, 3 * d * j, d) for j in range(h)]  # view(..., H, 3, d)
                wk = [_rows(w, 3 * d * j + d, d) for j in range(h)]
            else:
                wq = [_rows(w, d * j, d) for j in range(h)]  # view(..., H + 2, d)
                wk = [_rows(w, d * h, d) for _ in range(h)]
            add("self", i, m, wq, wk, m.inv_norm_factor, True)
    elif kind in ("gptj", "opt"):
        modules = (
            [block.attn for block in base.h]
            if kind == "gptj"
            else [layer.self_attn for layer in base.decoder.layers]
        )
        for i, m in enumerate(modules):
            h = getattr(m, "num_attention_heads", None) or m.num_heads
            d = m.head_dim
            add(
                "self", i, m, *_separate(m.q_proj.weight, m.k_proj.weight, h, h, d), m.scaling, True
            )
    elif kind in (
        "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "olmo2",
        "gemma", "gemma2", "gemma3_text", "starcoder2", "phi", "phi3",
    ):  # fmt: skip
        h, kv = config.num_attention_heads, config.num_key_value_heads
        for i, layer in enumerate(_decoder_layers(base)):
            m = layer.self_attn
            d = m.head_dim
            if kind == "phi3":  # rows [Q (H d); K (Hkv d); V]
                w = m.qkv_proj.weight
                wq, wk = _separate(w[: h * d], w[h * d : (h + kv) * d], h, kv, d)
            else:
                wq, wk = _separate(m.q_proj.weight, m.k_proj.weight, h, kv, d)
            q_norm = getattr(m, "q_norm", None) or getattr(m, "q_layernorm", None)
            k_norm = getattr(m, "k_norm", None) or getattr(m, "k_layernorm", None)
            offset = 1.0 if kind == "gemma3_text" else 0.0  # Gemma3RMSNorm: x * (1 + w)
            group = h // kv
            wq = _fold(wq, _gain(q_norm, offset), list(range(h)))
            wk = _fold(wk, _gain(k_norm, offset), [j // group for j in range(h)])
            add("self", i, m, wq, wk, m.scaling, True, q_norm=q_norm, k_norm=k_norm)
    elif kind == "t5":
        stacks = [("encoder", base.encoder, 0, False, False)]
        stacks += [
            ("decoder", base.decoder, 0, True, False),
            ("cross", base.decoder, 1, False, True),
        ]
        for block, stack, sub, causal, cross in stacks:
            for i, b in enumerate(stack.block):
                m = b.layer[sub].EncDecAttention if cross else b.layer[sub].SelfAttention
                h, d = m.n_heads, m.key_value_proj_dim
                wq, wk = _separate(m.q.weight, m.k.weight, h, h, d)
                add(block, i, m, wq, wk, m.scaling, causal, cross=cross)
    elif kind == "bart":
        stacks = [("encoder", base.encoder, "self_attn", False)]
        stacks += [("decoder", base.decoder, "self_attn", True)]
        stacks += [("cross", base.decoder, "encoder_attn", False)]
        for block, stack, attribute, causal in stacks:
            for i, layer in enumerate(stack.layers):
                m = getattr(layer, attribute)
                h, d = m.num_heads, m.head_dim
                wq, wk = _separate(m.q_proj.weight, m.k_proj.weight, h, h, d)
                add(block, i, m, wq, wk, m.scaling, causal, cross=attribute == "encoder_attn")
    else:
        raise KeyError(f"naive reference has no reading of model_type {kind!r}")
    return layers


# ---------------------------------------------------------------------------------------------
# Statistics of one full matrix


@dataclass
class NaiveStats:
    eig_mean: float
    eig_var: float
    eig_var_complex: float
    spectral_norm: float
    positive_fraction: float
    eigvals: Tensor  # the d_head eigenvalues of largest modulus, complex128
    scale: float = field(default=0.0)  # sqrt of the eigenvalues' second moment, for tolerances
    #: mean / RMS of the full eigvalsh of the symmetric part (NaN if all are 0)
    eig_concentration: float = field(default=math.nan)


def _concentration(sym: Tensor) -> float:
    """mean / RMS of the n eigenvalues of S = (W + W^T) / 2, from their full list."""
    rms = float(sym.square().mean().sqrt())
    return float(sym.mean()) / rms if rms > 0 else math.nan


@contextmanager
def _one_thread() -> Iterator[None]:
    """Small LAPACK calls on one thread: with two OpenMP threads on a busy 2-core machine each
    eig waited on a descheduled thread and ran 10-30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def naive_stats(w: Tensor, d_head: int) -> NaiveStats:
    """SPEC.md's statistics of one d_in x d_in matrix by full eigendecompositions (float64)."""
    with _one_thread():
        return _naive_stats(w.to(F64), d_head)


def _naive_stats(w: Tensor, d_head: int) -> NaiveStats:
    lam = torch.linalg.eigvals(w)
    mean = lam.mean()
    sym = torch.linalg.eigvalsh((w + w.T) / 2)
    magnitude = lam.abs()
    top = lam[magnitude.argsort(descending=True)[:d_head]]
    eig_var = float(sym.var(unbiased=False))
    return NaiveStats(
        eig_mean=float(mean.real),
        eig_var=eig_var,
        eig_var_complex=float((lam - mean).abs().square().mean()),
        spectral_norm=_spectral_norm(w),
        positive_fraction=float(magnitude[lam.real > 0].sum() / magnitude.sum())
        if magnitude.sum() > 0
        else 0.0,
        eigvals=top,
        scale=math.sqrt(eig_var + float(mean.real) ** 2),
        eig_concentration=_concentration(sym),
    )


def _spectral_norm(w: Tensor) -> float:
    """The matrix 2-norm, sqrt of the top eigenvalue of W^T W (an n x n SVD is ~5x slower)."""
    return float(torch.linalg.eigvalsh(w.T @ w)[-1].clamp_min(0).sqrt())


def naive_stats_large(wq: Tensor, wk: Tensor, scale: float) -> NaiveStats:
    """Like naive_stats for d_in in the thousands, where a general n x n eig takes minutes here.

    Still from the full n x n W in float64: eig_mean is tr(W) / n and eig_var the variance of
    the full eigvalsh of the symmetric part. The non-symmetric spectrum comes from W restricted
    to range(W_Q^T) = range(Q) (W_Q^T = Q R): W = Q Q^T W, so that subspace is invariant, holds
    every non-zero eigenvalue (those of Q^T W Q) and the other n - d are 0; ||W|| = ||Q^T W||.
    """
    wq, wk = wq.to(F64), wk.to(F64)
    w = scale * wq.T @ wk
    n, d = w.shape[0], wq.shape[0]
    mean = float(torch.trace(w)) / n
    sym = torch.linalg.eigvalsh((w + w.T) / 2)
    eig_var = float(sym.var(unbiased=False))
    q, _ = torch.linalg.qr(wq.T)
    top = torch.linalg.eigvals(q.T @ w @ q)
    lam = torch.cat([top, torch.zeros(n - d, dtype=top.dtype)])
    magnitude = lam.abs()
    return NaiveStats(
        eig_mean=mean,
        eig_var=eig_var,
        eig_var_complex=float((lam - mean).abs().square().mean()),
        spectral_norm=float(torch.linalg.svdvals(q.T @ w)[0]),
        positive_fraction=float(magnitude[lam.real > 0].sum() / magnitude.sum()),
        eigvals=top,
        scale=math.sqrt(eig_var + mean**2),
        eig_concentration=_concentration(sym),
    )


def naive_stats_from_heads(wq: Tensor, wk: Tensor, scale: float) -> NaiveStats:
    """Statistics of W = scale * wq^T wk for one head's (d_head, d_in) slices."""
    wq, wk = wq.to(F64), wk.to(F64)
    return naive_stats(scale * wq.T @ wk, wq.shape[0])


# ---------------------------------------------------------------------------------------------
# Comparison with a qkmonitor result, recording the worst relative error per statistic

MAX_ERRORS: dict[str, float] = {}


def _record(name: str, error: float) -> float:
    MAX_ERRORS[name] = max(MAX_ERRORS.get(name, 0.0), error)
    return error


def match_eigvals(got: Tensor, want: Tensor) -> float:
    """Largest distance between two eigenvalue multisets under the best pairing."""
    from scipy.optimize import linear_sum_assignment

    cost = (got[:, None] - want[None, :]).abs().numpy()
    rows, cols = linear_sum_assignment(cost)
    return float(cost[rows, cols].max()) if len(rows) else 0.0


def relative_errors(head, want: NaiveStats, label: str = "float64") -> dict[str, float]:
    """Relative errors of one qkmonitor HeadResult (or similar) against the naive numbers.

    eig_mean is measured against the spectrum's RMS (it can be ~0), eig_var and
    eig_var_complex against the second moment, spectral_norm against itself, eigvals against
    the spectral radius, positive_fraction and eig_concentration absolutely (both are bounded
    by 1; a head without eig_concentration, e.g. a plain namespace, is not compared). The
    worst error per (label, statistic) is kept in MAX_ERRORS.
    """
    second = want.scale**2 or 1.0
    radius = float(want.eigvals.abs().max()) or 1.0
    got_eig = torch.tensor([complex(re, im) for re, im in head.eigvals], dtype=torch.complex128)
    errors = {
        "eig_mean": abs(head.eig_mean - want.eig_mean) / (want.scale or 1.0),
        "eig_var": abs(head.eig_var - want.eig_var) / second,
        "eig_var_complex": abs(head.eig_var_complex - want.eig_var_complex) / second,
        "spectral_norm": abs(head.spectral_norm - want.spectral_norm) / (want.spectral_norm or 1),
        "positive_fraction": abs(head.positive_fraction - want.positive_fraction),
        "eigvals": match_eigvals(got_eig, want.eigvals) / radius,
    }
    if hasattr(head, "eig_concentration"):
        got_c, want_c = head.eig_concentration, want.eig_concentration
        if math.isnan(got_c) or math.isnan(want_c):  # NaN only where both are NaN
            same = math.isnan(got_c) == math.isnan(want_c)
            errors["eig_concentration"] = 0.0 if same else math.inf
        else:
            errors["eig_concentration"] = abs(got_c - want_c)
    for name, error in errors.items():
        _record(f"{label} {name}", error)
    return errors


def kv_index(layer: NaiveLayer) -> list[int]:
    """Which distinct key slice each query head uses, numbered in order of appearance."""
    distinct: list[Tensor] = []
    out = []
    for wk in layer.wk:
        match = next((i for i, seen in enumerate(distinct) if torch.equal(seen, wk)), None)
        if match is None:
            distinct.append(wk)
            match = len(distinct) - 1
        out.append(match)
    return out


class NaiveReference:
    """Every head's naive statistics for a model, computed once and reusable."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = naive_layers(model)
        self.heads: dict[tuple[str, int, int], tuple[NaiveStats, int]] = {}
        for layer in self.layers:
            kv = kv_index(layer)
            for h in range(len(layer.wq)):
                stats = naive_stats(layer.matrix(h), layer.wq[h].shape[0])
                self.heads[(layer.block, layer.layer, h)] = (stats, kv[h])

    def assert_matches(self, result, tolerance: float = 1e-6) -> None:
        """Every head of a qkmonitor AuditResult equals this reference to ``tolerance``."""
        heads = {(h.block, h.layer, h.head): h for h in result.heads}
        assert set(heads) == set(self.heads)
        info = result.model
        for layer in self.layers:
            assert info.n_heads[layer.block] == len(layer.wq)
            assert info.n_kv_heads[layer.block] == len(set(kv_index(layer)))
            assert info.head_dim[layer.block] == layer.wq[0].shape[0]
            assert info.d_in[layer.block] == layer.wq[0].shape[1]
        blocks = {layer.block for layer in self.layers}
        counts = {b: sum(1 for layer in self.layers if layer.block == b) for b in blocks}
        assert info.n_layers == counts
        for key, (want, kv) in self.heads.items():
            head = heads[key]
            assert head.finite, key
            assert head.kv_head == kv, key
            assert len(head.eigvals) == len(want.eigvals), key
            errors = relative_errors(head, want)
            bad = {name: error for name, error in errors.items() if not error <= tolerance}
            assert not bad, f"{key}: {bad}"


# ---------------------------------------------------------------------------------------------
# The model's own pre-softmax logits


_SOFTMAX = {torch.nn.functional.softmax, torch.softmax, torch.Tensor.softmax}


class _Capture(TorchFunctionMode):
    """Records the input of every softmax called while an attention module is running."""

    def __init__(self) -> None:
        super().__init__()
        self.current: NaiveLayer | None = None
        self.logits: dict[int, list[Tensor]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _SOFTMAX and self.current is not None:
            self.logits.setdefault(id(self.current), []).append(args[0].detach().clone())
        return func(*args, **(kwargs or {}))


@contextmanager
def captured_logits(layers: list[NaiveLayer]) -> Iterator[dict]:
    """Inside: run the model once. Yields {id(layer): {"x", "y", "z", "rq", "rk"}} filled after."""
    capture = _Capture()
    records: dict[int, dict] = {id(layer): {} for layer in layers}
    handles = []

    def pre(layer):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            y = kwargs.get("key_value_states") if layer.cross else None
            records[id(layer)].update(
                x=x.detach().clone(), y=None if y is None else y.detach().clone()
            )
            capture.current = layer

        return hook

    def post(module, args, output):
        capture.current = None

    def norm_hook(layer, key):
        def hook(module, args):
            u = args[0].detach().to(F64)
            eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
            records[id(layer)][key] = torch.sqrt(u.square().mean(-1) + eps)

        return hook

    for layer in layers:
        handles.append(layer.module.register_forward_pre_hook(pre(layer), with_kwargs=True))
        handles.append(layer.module.register_forward_hook(post))
        for key, norm in (("rq", layer.q_norm), ("rk", layer.k_norm)):
            if norm is not None:
                handles.append(norm.register_forward_pre_hook(norm_hook(layer, key)))
    try:
        with capture:
            yield records
    finally:
        for handle in handles:
            handle.remove()
    for layer in layers:
        (z,) = capture.logits[id(layer)]
        records[id(layer)]["z"] = z


def expected_logits(layer: NaiveLayer, record: dict) -> tuple[Tensor, Tensor]:
    """(model logits, x_i^T W^h y_j) per head, for batch 0, as (H, Tq, Tk) float64 each.

    QK-norm layers divide by the per-token RMS of q and k (SPEC: the data-dependent factor is
    not part of W^h); the model's logits are multiplied back by it here.
    """
    x = record["x"][0].to(F64)
    y = x if record.get("y") is None else record["y"][0].to(F64)
    n_heads = len(layer.wq)
    z = record["z"].to(F64)
    z = z.reshape(-1, n_heads, x.shape[0], y.shape[0])[0]
    want = torch.stack([x @ layer.matrix(h) @ y.T for h in range(n_heads)])
    if "rq" in record:
        z = z * _per_query_head(record["rq"][0], x.shape[0], n_heads).T[:, :, None]
        z = z * _per_query_head(record["rk"][0], y.shape[0], n_heads).T[:, None, :]
    if layer.causal:
        mask = torch.ones(x.shape[0], y.shape[0], dtype=torch.bool).tril()
        z, want = z[:, mask], want[:, mask]
    return z, want


def _per_query_head(r: Tensor, tokens: int, n_heads: int) -> Tensor:
    """A norm's per-token RMS, (T,), (T, Hx) or (Hx, T), as (T, n_heads) (Hx = 1, Hkv or H)."""
    r = r[:, None] if r.ndim == 1 else (r if r.shape[0] == tokens else r.T)
    return r.repeat_interleave(n_heads // r.shape[1], dim=1)


@contextmanager
def _no_falcon_alibi() -> Iterator[None]:
    """Falcon builds ALiBi with a module-level function: make it all zeros."""
    from transformers.models.falcon import modeling_falcon

    original = modeling_falcon.build_alibi_tensor

    def zeros(mask: Tensor, num_heads: int, dtype: torch.dtype) -> Tensor:
        return torch.zeros(mask.shape[0] * num_heads, 1, mask.shape[-1], dtype=dtype)

    modeling_falcon.build_alibi_tensor = zeros
    try:
        yield
    finally:
        modeling_falcon.build_alibi_tensor = original


def _position_zero(module: nn.Module, args, output: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return tuple(t[:, :1].expand_as(t) for t in output)


def content_logit_errors(model: nn.Module, *, rope: bool, tokens: int = 7) -> dict[str, float]:
    """Max |model logit - x^T W^h y| / max |logit| per attention block, on a copy of the model.

    Biases, T5's relative position bias and BLOOM's ALiBi are zeroed and RoPE rotates every
    position by zero, so the model's pre-softmax logit is the content term alone.
    """
    import copy

    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(".bias") or "relative_attention_bias" in name:
                parameter.zero_()
    base = model.base_model
    if model.config.model_type == "bloom":
        base.build_alibi_tensor = lambda mask, heads, dtype: torch.zeros(
            mask.shape[0] * heads, 1, mask.shape[-1], dtype=dtype
        )
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(
        3, getattr(model.config, "vocab_size", 99), (1, tokens), generator=generator
    )
    kwargs: dict = {"use_cache": False} if model.config.model_type != "vit" else {}
    if model.config.model_type == "vit":
        size = model.config.image_size
        kwargs["pixel_values"] = torch.randn(1, 3, size, size, generator=generator)
    else:
        kwargs["input_ids"] = ids
    if model.config.is_encoder_decoder:
        kwargs["decoder_input_ids"] = ids[:, : tokens - 2]
    if model.config.model_type == "bloom":  # ALiBi is built from the mask when one is given
        kwargs["attention_mask"] = torch.ones_like(ids)
    rotaries = [m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")]
    assert rotaries or not rope, "no RoPE module found"
    # every position's (cos, sin) replaced by position 0's: RoPE becomes the identity, while the
    # causal mask, built from the real positions, is untouched
    handles = [m.register_forward_hook(_position_zero) for m in rotaries]
    layers = naive_layers(model)
    try:
        with torch.no_grad(), captured_logits(layers) as records, _no_falcon_alibi():
            model(**kwargs)
    finally:
        for handle in handles:
            handle.remove()
    errors: dict[str, float] = {}
    for layer in layers:
        z, want = expected_logits(layer, records[id(layer)])
        error = float((z - want).abs().max() / want.abs().max())
        errors[layer.block] = max(errors.get(layer.block, 0.0), error)
    return errors
