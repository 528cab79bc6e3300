"""qkmonitor.spectrum against full float64 eigendecompositions of W^h = s W_Q^T W_K."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from support.naive import naive_stats, naive_stats_from_heads, naive_stats_large, relative_errors

from qkmonitor.spectrum import (
    FactoredHeads,
    HeadSpectra,
    eig_var_gradient,
    head_moments,
    head_spectra,
    trace_statistics,
)

TOLERANCE = 1e-6
STATS = (
    "eig_mean",
    "eig_var",
    "eig_concentration",
    "eig_var_complex",
    "spectral_norm",
    "positive_fraction",
)


def _weights(heads, kv_heads, d_head, d_in, *, seed=0, batch=(), dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    wq = torch.randn(*batch, heads, d_head, d_in, generator=generator, dtype=torch.float64)
    wk = torch.randn(*batch, kv_heads, d_head, d_in, generator=generator, dtype=torch.float64)
    # correlate some key heads with their queries so that eig_mean is clearly non-zero
    group = heads // kv_heads
    wk = wk + 0.7 * wq[..., ::group, :, :]
    return (wq / d_in**0.5).to(dtype), (wk / d_in**0.5).to(dtype)


def _head(spectra: HeadSpectra, *index: int) -> SimpleNamespace:
    """One head of a HeadSpectra as an object with HeadResult's attributes."""
    values = {name: float(getattr(spectra, name)[index]) for name in STATS}
    eigvals = [(float(z.real), float(z.imag)) for z in spectra.eigvals[index]]
    return SimpleNamespace(**values, eigvals=eigvals)


def _assert_head(spectra, index, wq, wk, scale):
    want = naive_stats_from_heads(wq, wk, scale)
    errors = relative_errors(_head(spectra, *index), want)
    assert max(errors.values()) <= TOLERANCE, (index, errors)


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (8, 2), (8, 1)], ids=["mha", "gqa", "mqa"])
def test_heads_match_naive(heads, kv_heads):
    d_head, d_in, scale = 8, 40, 0.37
    wq, wk = _weights(heads, kv_heads, d_head, d_in)
    spectra = head_spectra(wq, wk, scale)
    assert spectra.eig_mean.shape == (heads,)
    assert spectra.eigvals.shape == (heads, d_head)
    assert spectra.finite.all()
    group = heads // kv_heads
    for h in range(heads):
        _assert_head(spectra, (h,), wq[h], wk[h // group], scale)


def test_grouped_query_heads_use_key_head_h_div_group():
    """Swapping two key heads changes exactly the query heads of those groups."""
    wq, wk = _weights(8, 4, 4, 16)
    base = head_spectra(wq, wk, 1.0).eig_var
    swapped = head_spectra(wq, wk[[1, 0, 2, 3]], 1.0).eig_var
    changed = (base - swapped).abs() > 1e-12
    assert changed.tolist() == [True] * 4 + [False] * 4


def test_per_head_scale_tensor():
    wq, wk = _weights(4, 2, 8, 24)
    scale = torch.tensor([0.5, -1.0, 2.0, 0.125], dtype=torch.float64)
    spectra = head_spectra(wq, wk, scale)
    for h in range(4):
        _assert_head(spectra, (h,), wq[h], wk[h // 2], float(scale[h]))


def test_head_dim_larger_than_d_in():
    """rank(W) <= d_in < d_head: the small matrix carries extra zero eigenvalues."""
    wq, wk = _weights(2, 2, 12, 6)
    spectra = head_spectra(wq, wk, 0.3)
    for h in range(2):
        w = 0.3 * wq[h].T @ wk[h]
        want = naive_stats(w, 6)
        got = _head(spectra, h)
        for name in STATS:
            assert abs(getattr(got, name) - getattr(want, name)) <= TOLERANCE * max(
                want.scale, want.spectral_norm
            ), name
        eig = torch.tensor([complex(*z) for z in got.eigvals])
        assert (eig.abs() < 1e-10).sum() == 6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_inputs_are_upcast(dtype):
    wq, wk = _weights(4, 2, 8, 32, dtype=dtype)
    spectra = head_spectra(wq, wk, 0.25)
    assert spectra.eig_var.dtype == torch.float64
    for h in range(4):
        # the reference sees exactly the stored low-precision values
        _assert_head(spectra, (h,), wq[h].double(), wk[h // 2].double(), 0.25)


def test_leading_layer_dimension():
    layers, heads, kv = 3, 4, 2
    wq, wk = _weights(heads, kv, 8, 24, batch=(layers,))
    scale = torch.tensor([[1.0], [0.5], [1 / 3]], dtype=torch.float64)  # per layer
    spectra = head_spectra(wq, wk, scale)
    assert spectra.eig_var.shape == (layers, heads)
    assert spectra.eigvals.shape == (layers, heads, 8)
    for layer in range(layers):
        alone = head_spectra(wq[layer], wk[layer], float(scale[layer, 0]))
        for name in (*STATS, "eigvals"):
            torch.testing.assert_close(getattr(spectra, name)[layer], getattr(alone, name))
        for h in range(heads):
            _assert_head(spectra, (layer, h), wq[layer, h], wk[layer, h // 2], float(scale[layer]))
    mean, var = trace_statistics(wq, wk, scale)
    torch.testing.assert_close(mean, spectra.eig_mean)
    torch.testing.assert_close(var, spectra.eig_var)


def test_nan_and_inf_heads_are_flagged_and_isolated():
    wq, wk = _weights(8, 4, 4, 16)
    clean = head_spectra(wq, wk, 0.5)
    wq, wk = wq.clone(), wk.clone()
    wq[1, 2, 3] = float("nan")  # query head 1 only
    wk[3, 0, 0] = float("inf")  # key head 3: query heads 6 and 7
    spectra = head_spectra(wq, wk, 0.5)
    bad = [1, 6, 7]
    assert spectra.finite.tolist() == [h not in bad for h in range(8)]
    for name in (*STATS, "eigvals"):
        got, want = getattr(spectra, name), getattr(clean, name)
        assert got[bad].isnan().all(), name
        if got.is_complex():  # both parts, so that JSON says [null, null]
            assert got[bad].real.isnan().all() and got[bad].imag.isnan().all()
        good = [h for h in range(8) if h not in bad]
        torch.testing.assert_close(got[good], want[good], rtol=0, atol=0)


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (8, 2)], ids=["mha", "gqa"])
def test_head_moments_match_naive_and_flag_nan(heads, kv_heads):
    d_head, d_in, scale = 8, 40, 0.37
    wq, wk = _weights(heads, kv_heads, d_head, d_in)
    moments = head_moments(wq, wk, scale)
    group = heads // kv_heads
    for h in range(heads):
        want = naive_stats_from_heads(wq[h], wk[h // group], scale)
        scale_sq = want.scale**2  # errors relative to the spectrum's size, as relative_errors
        assert abs(float(moments.eig_mean[h]) - want.eig_mean) <= TOLERANCE * want.scale
        assert abs(float(moments.eig_var[h]) - want.eig_var) <= TOLERANCE * scale_sq
        assert abs(float(moments.eig_concentration[h]) - want.eig_concentration) <= TOLERANCE
    wq = wq.clone()
    wq[1, 0, 0] = float("nan")
    flagged = head_moments(wq, wk, scale)
    assert flagged.finite.tolist() == [h != 1 for h in range(heads)]
    assert flagged.eig_var[1].isnan() and flagged.eig_mean[1].isnan()
    assert flagged.eig_concentration[1].isnan()
    torch.testing.assert_close(flagged.eig_var[2:], moments.eig_var[2:], rtol=0, atol=0)


def test_zero_head():
    wq, wk = _weights(2, 2, 4, 16)
    wq = wq.clone()
    wq[0] = 0
    spectra = head_spectra(wq, wk, 1.0)
    assert spectra.finite.all()
    for name in STATS:
        if name == "eig_concentration":  # 0 / 0: no spectrum to be concentrated
            assert spectra.eig_concentration[0].isnan()
            assert head_moments(wq, wk, 1.0).eig_concentration[0].isnan()
        else:
            assert float(getattr(spectra, name)[0]) == 0.0, name
    assert (spectra.eigvals[0] == 0).all()
    assert float(spectra.eig_var[1]) > 0


def test_float32_computation_is_within_tolerance():
    wq, wk = _weights(4, 2, 16, 256, dtype=torch.float32)
    spectra = head_spectra(wq, wk, 0.25, dtype=torch.float32)
    assert spectra.eig_var.dtype == torch.float32
    for h in range(4):
        want = naive_stats_from_heads(wq[h].double(), wk[h // 2].double(), 0.25)
        errors = relative_errors(_head(spectra, h), want, "float32")
        assert max(errors.values()) < 1e-5, errors


def test_trace_statistics_equal_head_spectra():
    wq, wk = _weights(8, 2, 8, 32)
    spectra = head_spectra(wq, wk, 0.3)
    mean, var = trace_statistics(wq, wk, 0.3)
    assert mean.dtype == var.dtype == torch.float64
    torch.testing.assert_close(mean, spectra.eig_mean, rtol=1e-12, atol=0)
    torch.testing.assert_close(var, spectra.eig_var, rtol=1e-12, atol=0)


def test_trace_statistics_keep_float32_under_bf16_autocast():
    wq, wk = _weights(4, 2, 8, 32, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mean, var = trace_statistics(wq, wk, 0.3)
    assert mean.dtype == var.dtype == torch.float32
    want = head_spectra(wq, wk, 0.3)
    torch.testing.assert_close(var.double(), want.eig_var, rtol=1e-5, atol=0)


def _naive_eig_var(wq: torch.Tensor, wk: torch.Tensor, scale: float, group: int) -> torch.Tensor:
    """Per query head: population variance of eigvalsh of the full symmetric part."""
    out = []
    for h in range(wq.shape[0]):
        w = scale * wq[h].T @ wk[h // group]
        out.append(torch.linalg.eigvalsh((w + w.T) / 2).var(unbiased=False))
    return torch.stack(out)


def test_trace_statistics_gradient():
    wq, wk = _weights(4, 2, 3, 6)
    wq.requires_grad_(True)
    wk.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda q, k: trace_statistics(q, k, 0.7), (wq, wk))

    weights = torch.linspace(0.5, 2.0, 4, dtype=torch.float64)
    (trace_statistics(wq, wk, 0.7)[1] * weights).sum().backward()
    got = wq.grad.clone(), wk.grad.clone()
    wq.grad = wk.grad = None
    (_naive_eig_var(wq, wk, 0.7, 2) * weights).sum().backward()
    torch.testing.assert_close(got[0], wq.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got[1], wk.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (8, 2), (8, 1)], ids=["mha", "gqa", "mqa"])
def test_closed_form_gradient_equals_autograd(heads, kv_heads):
    """eig_var_gradient against autograd through trace_statistics (itself checked against a
    full eigendecomposition above), with per-head weights (some zero), per-head scales and a
    leading layer dimension."""
    wq, wk = _weights(heads, kv_heads, 6, 20, batch=(2,))
    weights = torch.linspace(-1.0, 2.0, heads, dtype=torch.float64)
    weights[1] = 0.0
    scale = torch.linspace(0.3, 0.9, heads, dtype=torch.float64)
    got_q, got_k = eig_var_gradient(wq, wk, scale, weights)
    wq.requires_grad_(True)
    wk.requires_grad_(True)
    (trace_statistics(wq, wk, scale)[1] * weights).sum().backward()
    torch.testing.assert_close(got_q, wq.grad, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(got_k, wk.grad, rtol=1e-10, atol=1e-13)


def test_closed_form_gradient_is_float32_under_bf16_autocast():
    wq, wk = _weights(4, 2, 8, 32, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_q, got_k = eig_var_gradient(wq, wk, 0.3)
    assert got_q.dtype == got_k.dtype == torch.float32
    want_q, want_k = eig_var_gradient(wq.double(), wk.double(), 0.3)
    torch.testing.assert_close(got_q.double(), want_q, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(got_k.double(), want_k, rtol=1e-4, atol=1e-7)


def test_uneven_groups_are_refused():
    wq, wk = _weights(6, 6, 4, 8)
    with pytest.raises(ValueError, match="cannot share"):
        head_spectra(wq, wk[:4], 1.0)


def test_llama_8b_shaped_head():
    """One d_in=4096, d_head=128 head (Llama-3-8B's shape) against the full 4096 x 4096 W.

    float64 (the default) to 1e-6; float32 to 1e-5 (SPEC.md saw ~6e-7 on real heads).
    """
    d_in, d_head = 4096, 128
    generator = torch.Generator().manual_seed(8)
    wq = torch.randn(1, d_head, d_in, generator=generator) * 0.02
    wk = 0.6 * wq + torch.randn(1, d_head, d_in, generator=generator) * 0.02
    wq, wk = wq.bfloat16(), wk.bfloat16()  # as stored in the checkpoint
    scale = d_head**-0.5
    want = naive_stats_large(wq[0], wk[0], scale)
    errors = relative_errors(_head(head_spectra(wq, wk, scale), 0), want, "float64 8B-head")
    assert max(errors.values()) <= TOLERANCE, errors
    spectra32 = head_spectra(wq, wk, scale, dtype=torch.float32)
    errors32 = relative_errors(_head(spectra32, 0), want, "float32 8B-head")
    assert max(errors32.values()) <= 1e-5, errors32


def test_large_reference_agrees_with_full_eig():
    """naive_stats_large (used above) equals the plain full-eig reference on a mid-size head."""
    generator = torch.Generator().manual_seed(3)
    wq = torch.randn(16, 300, generator=generator, dtype=torch.float64)
    wk = 0.5 * wq + torch.randn(16, 300, generator=generator, dtype=torch.float64)
    full, large = naive_stats_from_heads(wq, wk, 0.1), naive_stats_large(wq, wk, 0.1)
    for name in STATS:
        assert abs(getattr(full, name) - getattr(large, name)) <= 1e-10 * full.scale, name
    eig = [(float(z.real), float(z.imag)) for z in large.eigvals]
    as_head = SimpleNamespace(**{n: getattr(large, n) for n in STATS}, eigvals=eig)
    assert max(relative_errors(as_head, full, "reference").values()) <= 1e-10


def _orthonormal_rows(rows: int, n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, rows, generator=generator, dtype=torch.float64))
    return q.T  # (rows, n), orthonormal rows


@pytest.mark.parametrize(("rank", "sign"), [(1, 1.0), (4, 1.0), (8, -1.0)])
def test_concentration_of_equal_eigenvalues_is_sqrt_rank_over_n(rank, sign):
    """W = c P_r (a rank-r projection): r eigenvalues c, n - r zeros -> sign(c) sqrt(r / n)."""
    d_in = 24
    p = _orthonormal_rows(rank, d_in, seed=rank)
    spectra = head_spectra(p[None], sign * 2.5 * p[None], 0.5)
    want = sign * (rank / d_in) ** 0.5
    assert abs(float(spectra.eig_concentration[0]) - want) <= 1e-12
    assert abs(naive_stats(sign * 1.25 * p.T @ p, rank).eig_concentration - want) <= 1e-12


def test_concentration_is_one_for_a_full_rank_multiple_of_identity():
    """d_head = d_in and W = c I: every eigenvalue equal, the fully concentrated spectrum."""
    eye = torch.eye(6, dtype=torch.float64)[None]
    assert float(head_spectra(eye, 3 * eye, 0.2).eig_concentration[0]) == pytest.approx(1.0)
    assert float(head_spectra(eye, -eye, 0.2).eig_concentration[0]) == pytest.approx(-1.0)


def test_concentration_of_a_zero_mean_spread_is_zero():
    """A traceless W (diag(1, -1, 0, ...)): mean 0, spread > 0 -> 0."""
    d_in = 10
    wq = torch.zeros(1, 2, d_in, dtype=torch.float64)
    wq[0, 0, 0] = wq[0, 1, 1] = 1.0
    wk = wq.clone()
    wk[0, 1, 1] = -1.0
    spectra = head_spectra(wq, wk, 1.0)
    assert float(spectra.eig_var[0]) > 0
    assert float(spectra.eig_concentration[0]) == pytest.approx(0.0, abs=1e-15)


def test_concentration_is_scale_free_and_bounded():
    """W -> cW: eig_var scales by c^2, eig_concentration is unchanged (its sign flips for c < 0);
    on many random heads it stays within [-1, 1] and equals the naive full-eig value."""
    wq, wk = _weights(8, 2, 8, 40)
    base = head_spectra(wq, wk, 0.37)
    for factor in (1e-4, 3.0, 1e3):
        scaled = head_spectra(wq, wk * factor, 0.37)
        torch.testing.assert_close(scaled.eig_var, base.eig_var * factor**2, rtol=1e-10, atol=0)
        torch.testing.assert_close(
            scaled.eig_concentration, base.eig_concentration, rtol=1e-10, atol=1e-14
        )
    flipped = head_spectra(wq, -wk, 0.37)
    torch.testing.assert_close(flipped.eig_concentration, -base.eig_concentration)
    assert (base.eig_concentration.abs() <= 1).all()
    # the rank bound sqrt(rank / d_in), and it is reached by a symmetric rank-d projection
    assert (base.eig_concentration.abs() <= (8 / 40) ** 0.5).all()
    assert (base.eig_concentration[::4] > 0.2).all()  # heads whose key correlates with the query
    for h in range(8):
        want = naive_stats_from_heads(wq[h], wk[h // 4], 0.37).eig_concentration
        assert abs(float(base.eig_concentration[h]) - want) <= TOLERANCE


# ---------------------------------------------------------------------------------------------
# Factored heads: W^h = s (U_h L_q)^T (V_g L_k) through shared down-projections (MLA)


def _factored(heads, kv_heads, d_head, r_q, r_k, d_in, *, seed=0, batch=(), q_latent=True):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*batch, *shape, generator=generator, dtype=torch.float64)

    q_up = randn(heads, d_head, r_q if q_latent else d_in) / d_in**0.5
    k_up = randn(kv_heads, d_head, r_k) / r_k**0.5
    q_down = randn(r_q, d_in) if q_latent else None
    k_down = randn(r_k, d_in)
    if q_latent and r_k <= r_q:  # keys correlated with queries: a clearly non-zero eig_mean
        k_down = k_down + 0.8 * q_down[..., :r_k, :]
    return FactoredHeads(q_up, k_up, q_down, k_down, 0.29)


FACTORED_CASES = {
    "latent": (4, 4, 6, 10, 8, 48, True),  # both sides through latents (MLA with q_lora_rank)
    "shared-keys": (8, 2, 6, 10, 8, 48, True),  # query heads sharing key latents (GQA-like)
    "no-q-latent": (4, 4, 6, None, 8, 48, False),  # q_proj directly, keys through a latent
    "wide-latent": (4, 2, 5, 40, 30, 24, True),  # latents wider than d_in: the dense route
}


@pytest.mark.parametrize("case", FACTORED_CASES.values(), ids=FACTORED_CASES.keys())
def test_factored_heads_match_dense_and_naive(case):
    heads, kv_heads, d_head, r_q, r_k, d_in, q_latent = case
    factored = _factored(heads, kv_heads, d_head, r_q or d_in, r_k, d_in, q_latent=q_latent)
    assert factored.cheaper() == (case is not FACTORED_CASES["wide-latent"])
    wq, wk = factored.dense()
    assert wq.shape == (heads, d_head, d_in) and wk.shape == (kv_heads, d_head, d_in)
    got, dense = head_spectra(factored), head_spectra(wq, wk, 0.29)
    group = heads // kv_heads
    for h in range(heads):
        want = naive_stats_from_heads(wq[h], wk[h // group], 0.29)
        errors = relative_errors(_head(got, h), want, "factored")
        assert max(errors.values()) <= 1e-9, (h, errors)
        assert max(relative_errors(_head(dense, h), want, "factored").values()) <= 1e-9
    moments = head_moments(factored)
    torch.testing.assert_close(moments.eig_mean, got.eig_mean, rtol=1e-12, atol=0)
    torch.testing.assert_close(moments.eig_var, got.eig_var, rtol=1e-12, atol=0)
    mean, var = trace_statistics(factored)
    torch.testing.assert_close(mean, got.eig_mean, rtol=1e-12, atol=0)
    torch.testing.assert_close(var, got.eig_var, rtol=1e-12, atol=0)
    assert abs(float(got.eig_mean.abs().max())) > 1e-3  # the test sees a non-trivial mean


def test_factored_heads_leading_dimension_and_scale_per_head():
    factored = _factored(4, 2, 5, 9, 7, 30, batch=(3,))
    scale = torch.linspace(0.1, 0.4, 4, dtype=torch.float64)
    factored = FactoredHeads(factored.q_up, factored.k_up, factored.q_down, factored.k_down, scale)
    spectra = head_spectra(factored)
    assert spectra.eig_var.shape == (3, 4)
    wq, wk = factored.dense()
    for layer in range(3):
        for h in range(4):
            want = naive_stats_from_heads(wq[layer, h], wk[layer, h // 2], float(scale[h]))
            errors = relative_errors(_head(spectra, layer, h), want, "factored")
            assert max(errors.values()) <= 1e-9, (layer, h, errors)


def test_factored_trace_statistics_are_differentiable():
    small = _factored(2, 1, 3, 4, 3, 6)
    parts = [t.clone().requires_grad_(True) for t in (small.q_up, small.k_up, small.q_down)]
    parts.append(small.k_down.clone().requires_grad_(True))

    def variance(q_up, k_up, q_down, k_down):
        return trace_statistics(FactoredHeads(q_up, k_up, q_down, k_down, 0.5))[1]

    assert torch.autograd.gradcheck(variance, tuple(parts))


def test_factored_non_finite_latent_flags_every_head():
    factored = _factored(4, 2, 5, 9, 7, 30)
    q_up = factored.q_up.clone()
    q_up[1, 0, 0] = float("nan")
    one = head_spectra(FactoredHeads(q_up, factored.k_up, factored.q_down, factored.k_down))
    assert one.finite.tolist() == [True, False, True, True]
    k_down = factored.k_down.clone()
    k_down[0, 3] = float("inf")  # the shared key latent: every head
    every = head_spectra(FactoredHeads(factored.q_up, factored.k_up, factored.q_down, k_down))
    assert not every.finite.any() and every.eig_var.isnan().all()


def test_factored_heads_refuse_mixed_or_unchained_arguments():
    factored = _factored(2, 2, 3, 4, 3, 6)
    with pytest.raises(TypeError, match="carry their own"):
        head_spectra(factored, factored.k_up, 1.0)
    with pytest.raises(TypeError, match="need wq, wk and scale"):
        head_moments(factored.q_up)
    with pytest.raises(ValueError, match="do not chain"):
        FactoredHeads(factored.q_up, factored.k_up, factored.q_down[:3], factored.k_down)


def test_result_classes_follow_the_declared_statistics():
    """HeadSpectra has a field per declared statistic (in order), HeadMoments those needing no
    eigendecomposition; head_moments gives them bit for bit as head_spectra does, unsigned ones
    never below 0 and every one NaN for a non-finite head."""
    from dataclasses import fields

    from qkmonitor.spectrum import HeadMoments, HeadSpectra, head_moments
    from qkmonitor.statistics import HEAD_STATISTICS

    names = [s.name for s in HEAD_STATISTICS]
    assert [f.name for f in fields(HeadSpectra)] == [*names, "eigvals", "finite"]
    cheap = [s.name for s in HEAD_STATISTICS if not s.eigen]
    assert [f.name for f in fields(HeadMoments)] == [*cheap, "finite"]
    torch.manual_seed(0)
    wq, wk = torch.randn(2, 6, 4, 16), torch.randn(2, 3, 4, 16)
    wq[1, 2, 0, 0] = float("nan")
    full, moments = head_spectra(wq, wk, 0.5), head_moments(wq, wk, 0.5)
    for name in cheap:
        assert torch.allclose(getattr(full, name), getattr(moments, name), 0, 0, equal_nan=True)
    for s in HEAD_STATISTICS:
        value = getattr(full, s.name)
        assert value[1, 2].isnan() and value[0].isfinite().all()
        if not s.signed:
            assert (value[value.isfinite()] >= 0).all()


@pytest.mark.parametrize("latents", [False, True])
def test_multiply_adds_are_the_products_head_spectra_makes(latents):
    """FactoredHeads.multiply_adds equals what torch's flop counter sees (flops = 2 madds)."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    if latents:
        heads = FactoredHeads(torch.randn(4, 12, 16), torch.randn(4, 12, 10),
                              torch.randn(16, 300), torch.randn(10, 300), 0.3)  # fmt: skip
    else:
        heads = FactoredHeads(torch.randn(6, 8, 40), torch.randn(3, 8, 40), None, None, 0.3)
    assert heads.cheaper() == latents
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # the counter sees its own thread only: no thread parts
    try:
        with FlopCounterMode(display=False) as counter:
            head_spectra(heads)
    finally:
        torch.set_num_threads(previous)
    assert counter.get_total_flops() == 2 * heads.multiply_adds()


def test_singular_query_grams_take_the_eigh_route_and_match_naive():
    """The spectral norm uses a Cholesky factor of G_Q; a head whose G_Q is singular (a zero
    head, repeated query rows, d_head > d_in) fails it and takes the eigendecomposition's
    root instead: every statistic still equals the naive one, the other heads unaffected."""
    wq, wk = _weights(6, 3, 8, 24)
    wq = wq.clone()
    wq[0] = 0  # zero head
    wq[3, 5] = wq[3, 2]  # two equal rows: rank 7 of 8
    wq[4, 1:] = wq[4, :1] * torch.arange(2.0, 9.0, dtype=torch.float64)[:, None]  # rank 1
    g_q = wq @ wq.transpose(-1, -2)
    failed = torch.linalg.cholesky_ex(g_q).info != 0
    assert failed[0] and failed[3] and failed[4] and not failed[[1, 2, 5]].any()
    spectra = head_spectra(wq, wk, 0.4)
    for h in range(1, 6):
        _assert_head(spectra, (h,), wq[h], wk[h // 2], 0.4)
    assert float(spectra.spectral_norm[0]) == 0.0
    regular = head_spectra(*_weights(6, 3, 8, 24), 0.4)  # the same heads, none singular
    for h in (1, 2, 5):
        torch.testing.assert_close(spectra.spectral_norm[h], regular.spectral_norm[h],
                                   rtol=1e-14, atol=0)  # fmt: skip
    wide = _weights(2, 1, 12, 6)  # d_head > d_in: every G_Q singular
    assert (torch.linalg.cholesky_ex(wide[0] @ wide[0].mT).info != 0).all()
    wide_spectra = head_spectra(*wide, 0.3)
    for h in range(2):
        want = naive_stats(0.3 * wide[0][h].T @ wide[1][0], 6)
        assert abs(float(wide_spectra.spectral_norm[h]) - want.spectral_norm) <= (
            TOLERANCE * want.spectral_norm
        )


def test_rank_deficient_latents_take_the_eigh_route_and_match_naive():
    """A latent whose Gram is singular (a zero gain in its RMSNorm: a zero row of L) fails the
    Cholesky factor that G_Q = (U R)(U R)^T needs; the triangular factor then comes from the
    Gram's eigendecomposition (and a QR), and every head still equals the naive numbers."""
    factored = _factored(4, 2, 6, 10, 8, 48)
    q_down, k_down = factored.q_down.clone(), factored.k_down.clone()
    q_down[3] = 0
    k_down[[1, 5]] = 0
    for down in (q_down, k_down):
        assert torch.linalg.cholesky_ex(down @ down.mT).info != 0
    singular = FactoredHeads(factored.q_up, factored.k_up, q_down, k_down, 0.29)
    assert singular.cheaper()
    got = head_spectra(singular)
    wq, wk = singular.dense()
    for h in range(4):
        want = naive_stats_from_heads(wq[h], wk[h // 2], 0.29)
        errors = relative_errors(_head(got, h), want, "factored")
        assert max(errors.values()) <= 1e-9, (h, errors)


@pytest.mark.parametrize("k", [1, 5, 128, 192, 200, 1536])
def test_blocked_triangular_products_equal_full_ones(k):
    """_gram and _times_lower skip the zero/mirrored triangle in blocks: equal to the full
    products, and their multiply-add counts are what the flop counter sees."""
    from torch.utils.flop_counter import FlopCounterMode

    from qkmonitor.spectrum import (
        _gram,
        _times_lower,
        gram_multiply_adds,
        lower_multiply_adds,
    )

    generator = torch.Generator().manual_seed(k)
    x = torch.randn(2, k, 7, generator=generator, dtype=torch.float64)
    lower = torch.randn(k, k, generator=generator, dtype=torch.float64).tril()
    y = torch.randn(3, k, generator=generator, dtype=torch.float64)
    with FlopCounterMode(display=False) as gram_count:
        gram = _gram(x)
    with FlopCounterMode(display=False) as lower_count:
        product = _times_lower(y, lower)
    torch.testing.assert_close(gram, x @ x.mT, rtol=1e-13, atol=1e-13)
    assert torch.equal(gram, gram.mT) or k > 1  # mirrored blocks; diagonal blocks from a GEMM
    torch.testing.assert_close(product, y @ lower, rtol=1e-13, atol=1e-13)
    assert gram_count.get_total_flops() == 2 * 2 * gram_multiply_adds(k, 7)
    assert lower_count.get_total_flops() == 2 * lower_multiply_adds(3, k)
    if k >= 128:  # about half of the full products
        assert gram_multiply_adds(k, 7) <= 0.75 * k * k * 7
        assert lower_multiply_adds(3, k) <= 0.75 * 3 * k * k


@pytest.mark.parametrize(
    ("scale", "shape"),
    [
        ("scalar", (2, 12, 3, 16, 96)),
        ("per_head", (2, 12, 3, 16, 96)),
        ("scalar", (8, 16, 2, 16, 64)),
    ],
)
def test_cpu_threads_change_no_bit(scale, shape):
    """One level of CPU parallelism: key-head parts on Python threads, one OpenMP thread each,
    so head_spectra gives the single-threaded bits whatever torch's thread count (the last
    shape's strided parts and two-dimensional sums rounded by part size before)."""
    torch.manual_seed(0)
    batch, n_heads, n_kv, d_head, d_in = shape
    wq = torch.randn(batch, n_heads, d_head, d_in).bfloat16()
    wk = torch.randn(batch, n_kv, d_head, d_in).bfloat16()
    s = 0.25 if scale == "scalar" else torch.rand(batch, n_heads)
    previous = torch.get_num_threads()
    try:
        runs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            runs.append(head_spectra(wq, wk, s))
            assert torch.get_num_threads() == threads  # restored after the parts
    finally:
        torch.set_num_threads(previous)
    for run in runs[1:]:
        for f in ("eig_mean", "eig_var", "eig_var_complex", "spectral_norm", "eigvals"):
            assert torch.equal(getattr(run, f), getattr(runs[0], f)), f
    _assert_head(runs[1], (1, 5), wq[1, 5].double(), wk[1, 5 // (n_heads // n_kv)].double(),
                 s if scale == "scalar" else float(s[1, 5]))  # fmt: skip


def test_concurrent_calls_keep_the_bits_and_the_thread_count():
    """The Space runs two audits at once: a call beside others gives a lone call's bits, and
    threads that start meanwhile keep the process's thread count."""
    from concurrent.futures import ThreadPoolExecutor

    torch.manual_seed(1)
    wq = torch.randn(8, 16, 16, 64)
    keys = [torch.randn(8, 4, 16, 64), torch.randn(8, 2, 16, 64)]  # 4 and 2 key heads: parts
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        alone = [head_spectra(wq, wk, 0.25) for wk in keys]

        def beside_others(i: int) -> tuple[HeadSpectra, int]:
            return head_spectra(wq, keys[i % 2], 0.25), torch.get_num_threads()

        with ThreadPoolExecutor(4) as pool:  # its threads start while others compute
            runs = list(pool.map(beside_others, range(16)))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)
    for i, (run, threads) in enumerate(runs):
        assert threads == 2, i
        for f in ("eig_mean", "eig_var", "eig_var_complex", "spectral_norm", "eigvals"):
            assert torch.equal(getattr(run, f), getattr(alone[i % 2], f)), (i, f)


def test_threads_started_during_a_computation_keep_the_thread_count():
    """Threads that first use torch while head_spectra computes (the Space's request threads)
    get the process's thread count, not the workers' one (they kept 1 for good before)."""
    import threading

    torch.manual_seed(2)
    wq, wk = torch.randn(6, 32, 32, 256), torch.randn(6, 8, 32, 256)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    seen: list[int] = []

    def first_use() -> None:
        torch.ones(1 << 16).add_(1)  # a first parallel operation sets this thread's count
        seen.append(torch.get_num_threads())

    try:
        head_spectra(wq[:1], wk[:1], 0.1)  # the workers exist (they start once per process)
        computing = threading.Thread(target=lambda: [head_spectra(wq, wk, 0.1) for _ in range(3)])
        computing.start()
        while computing.is_alive():
            newcomer = threading.Thread(target=first_use)
            newcomer.start()
            newcomer.join()
        computing.join()
    finally:
        torch.set_num_threads(previous)
    assert len(seen) > 3 and set(seen) == {2}, seen
