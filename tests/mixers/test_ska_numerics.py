"""SKA numerics (docs/ska.md §6–§9, §16 tests 5–7 and 9): ridge and closed-form oracles, the MesaNet
cross-check, gauge invariance, the fp32 island under bf16 autocast, Cholesky failures, a
rank-deficient 4096-token input, and state bytes in fp32."""

import pytest
import torch

import kvfree
from kvfree.linalg import power_iteration_sigma
from kvfree.mixers import build_mixer
from kvfree.mixers import ska_core as core
from tests.contract import err_ratio
from tests.mixers.ska_reference import closed_form, core_out, features, randomize

D = 16


def make(dtype=torch.float64, **kw):
    torch.manual_seed(0)
    kw = {"num_heads": 2, "rank": 4, **kw}
    return randomize(build_mixer("ska", D, **kw), gamma=1.3).to(dtype)


def inputs(T, B=2, seed=0, dtype=torch.float64):
    return torch.randn(B, T, D, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_k0_is_the_ridge_prediction():
    """K = 0: ŷ_t = η B_t q̂_t with B_t = argmin Σ_{s≤t} ‖v_s − B ẑ_s‖² + ε‖B‖², solved here as
    an augmented least-squares problem (no normal equations)."""
    m = make(mode="token", K=0, eta_init=1.7)
    x = inputs(12, B=1)
    with torch.no_grad():
        y = core_out(m, x)[0][0]  # [T, H, P]
        zh, qh, v = features(m, x)
        eps = m.cfg.eps
        for t in (0, 2, 5, 11):
            for h in range(m.H):
                Z = torch.cat([zh[0, : t + 1, h], eps**0.5 * torch.eye(m.r, dtype=x.dtype)])
                V = torch.cat([v[0, : t + 1, h], torch.zeros(m.r, m.P, dtype=x.dtype)])
                Bt = torch.linalg.lstsq(Z, V).solution.T  # [P, r]
                ref = 1.7 * Bt @ qh[0, t, h]
                assert torch.allclose(y[t, h], ref, atol=1e-9 * ref.abs().max().item())


def asym_stats(m, x):
    """Token-causal statistics with the asymmetric β gate (docs/ska.md §4): G = Σ β ẑẑᵀ,
    C = Σ β v ẑᵀ, M = Σ β_t ẑ_t ẑ_{t−1}ᵀ, by a loop over tokens."""
    zh, qh, v = features(m, x)
    beta = torch.sigmoid(m.beta_proj(x))[..., None, None]  # [B, T, H, 1, 1]
    G = M = C = 0
    out = []
    for t in range(x.shape[1]):
        G = G + beta[:, t] * zh[:, t, :, :, None] * zh[:, t, :, None, :]
        C = C + beta[:, t] * v[:, t, :, :, None] * zh[:, t, :, None, :]
        if t:
            M = M + beta[:, t] * zh[:, t, :, :, None] * zh[:, t - 1, :, None, :]
        out.append((G, M if t else torch.zeros_like(G), C))
    return out, qh


@pytest.mark.parametrize("spectral_norm", [True, False])
def test_k2_closed_form(spectral_norm):
    """η (γ/max(1,σ))^K C (G̃⁻¹M)^K G̃⁻¹ q̂ with γ = 1.3 and σ the power-iteration estimate of
    the whitened operator (what the module's σ̂ estimates). The asymmetric β gate makes the
    operator non-contractive, so the clamp max(1, σ) is exercised."""
    m = make(mode="token", K=2, spectral_norm=spectral_norm, beta_gate=True, beta_mode="asym")
    gamma = m.gamma_raw.detach().clone()  # 1.3 rounded to fp32 by ``randomize``
    assert abs(gamma.item() - 1.3) < 1e-7
    x = inputs(40)
    with torch.no_grad():
        y = core_out(m, x)[0]
        st, qh = asym_stats(m, x)
        for t, (G, M, C) in enumerate(st):
            sig = None
            if spectral_norm:
                L = torch.linalg.cholesky(G + m.cfg.eps * torch.eye(m.r, dtype=G.dtype))
                Aw = torch.linalg.solve_triangular(
                    L, torch.linalg.solve_triangular(L, M, upper=False).mT, upper=False
                ).mT
                sig = power_iteration_sigma(Aw, 6)
            ref = closed_form(G, M, C, qh[:, t], gamma=gamma, eta=1.5, eps=1e-3, K=2, sigma=sig)
            assert torch.allclose(y[:, t], ref, rtol=1e-9, atol=1e-12), t
    if spectral_norm:
        assert m.diagnostics["sigma_max"] > 1 and 0 < m.diagnostics["frac_clamped"] < 1


def test_sqrt_gate_operator_is_contractive():
    """With β ≡ 1 or the sqrt gate, ‖A_w‖ ≤ 1 − ε/λ_max(G̃) (docs/ska.md §4), so σ̂ ≤ 1."""
    for kw in ({}, {"beta_gate": True}):
        m = make(mode="token", **kw)
        with torch.no_grad():
            m(inputs(200))
        assert m.diagnostics["sigma_max"] < 1 and m.diagnostics["frac_clamped"] == 0


def test_mesanet_cross_check():
    """docs/ska.md §16 test 5: K = 0, β ≡ 1 equals MesaNet-exact with γ = 1 and λ = ε·𝟏 on the same
    features (token-causal mode): ŷ = η · o_mesa."""
    from kvfree.mixers.mesanet import mesa_core

    m = make(mode="token", K=0)
    x = inputs(70)
    with torch.no_grad():
        y = core_out(m, x)[0]
        zh, qh, v = features(m, x)
        o, (Hkk, Hkv) = mesa_core(qh, zh, v, None, None, m.cfg.eps, chunk_size=16)
        _, s = m(x)
    # early positions (t < r) solve with κ ≈ 1/ε, where the two summation orders differ ~1e-9
    assert (y - m.eta * o).abs().max() <= 1e-9 * y.abs().max()
    assert torch.allclose(s.G, Hkk, atol=1e-12) and torch.allclose(s.C, Hkv.mT, atol=1e-12)


def _eigen_factor(A, counter=None, jitters=(), eig_floor=1e-6):
    A = 0.5 * (A + A.mT)
    lam, Q = torch.linalg.eigh(A)
    return Q * lam.clamp_min(eig_floor).sqrt().unsqueeze(-2), False


@pytest.mark.parametrize("mode", ["token", "chunk", "prefix"])
def test_gauge_invariance(monkeypatch, mode):
    """docs/ska.md §16 test 6: the eigen-factor path equals the Cholesky path when σ is exact."""
    m = make(mode=mode, chunk_size=8, K=2)
    x = inputs(30)
    mask = (torch.arange(30) < 20).double().expand(2, 30) if mode == "prefix" else None
    exact = lambda A, iters=6: torch.linalg.matrix_norm(A, ord=2)
    monkeypatch.setattr(core, "power_iteration_sigma", exact)
    with torch.no_grad():
        y_chol = core_out(m, x, None, mask)
        monkeypatch.setattr(core, "robust_factor", _eigen_factor)
        y_eig = core_out(m, x, None, mask)
    assert torch.allclose(y_chol[0], y_eig[0], rtol=1e-9, atol=1e-11)
    assert y_chol[0].abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["token", "chunk", "prefix"])
def test_fp32_island_under_bf16_autocast(mode):
    """docs/ska.md §16 test 7: identical z, q, v fed to the core in fp32 and under bf16 autocast:
    relative RMSE ≤ 1e-4 against fp64 at T = 512; statistics stay fp32."""
    torch.manual_seed(0)
    m = make(torch.float32, mode=mode, chunk_size=64, num_heads=2, rank=8)
    B, T = 2, 512
    g = torch.Generator().manual_seed(1)
    z, q, v = (torch.randn(B, T, 2, n, generator=g) for n in (8, 8, 8))
    mask = torch.ones(B, T) if mode == "prefix" else None

    def run(model, dtype, autocast):
        model._project = lambda x, conv, pad=None: (
            z.to(dtype),
            q.to(dtype),
            v.to(dtype),
            None,
            conv,
        )
        xx = torch.zeros(B, T, D, dtype=dtype)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return core_out(model, xx, None, None if mask is None else mask.to(dtype))

    m64 = make(torch.float64, mode=mode, chunk_size=64, num_heads=2, rank=8)
    y64, _ = run(m64, torch.float64, False)
    for autocast in (False, True):
        y, s = run(m, torch.float32, autocast)
        assert y.dtype == torch.float32 and s.G.dtype == torch.float32
        r = err_ratio(y64, y)
        assert r <= 1e-4, f"autocast={autocast}: relative RMSE {r:.2e}"


def test_forced_cholesky_failure_is_repaired_and_counted():
    """docs/ska.md §16 test 9: ε = 0 and a repeated token make G̃ singular."""
    m = make(mode="token", eps=0.0)
    x = inputs(1, B=1).expand(1, 6, D).contiguous()  # rank-1 Gram at every position
    with torch.no_grad():
        y, _ = m(x)
    assert torch.isfinite(y).all() and m.fallbacks.jitter > 0 and m.fallbacks.eigen == 0
    m2 = make(mode="token", eps=0.0)
    m2.cfg.jitters = ()  # jitter disabled: the eigen path
    with torch.no_grad():
        y2, _ = m2(x)
    assert torch.isfinite(y2).all() and m2.fallbacks.eigen > 0 and m2.fallbacks.jitter == 0


@pytest.mark.parametrize("mode", ["token", "chunk"])
def test_rank_deficient_4096_repeats_finite_outputs_and_gradients(mode):
    m = make(torch.float32, mode=mode, chunk_size=64, num_heads=2, rank=8)
    x = torch.randn(1, 1, D).expand(1, 4096, D).clone().requires_grad_(True)
    y, _ = m(x)
    y.square().mean().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    for n, p in m.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), n
    assert y.abs().max() > 0


@pytest.mark.parametrize("mode", ["token", "chunk", "prefix"])
def test_state_bytes_fp32(mode):
    """H·(2r²+Pr+r+1)·4 bytes per layer (chunk mode: + the pending H·(2r²+Pr)), unchanged
    between 16 and 16384 tokens."""
    m = make(torch.float32, mode=mode, chunk_size=64, num_heads=3, rank=5, head_dim=6)
    H, r, P = 3, 5, 6
    per = 2 * r * r + P * r
    want = H * ((2 * per if mode == "chunk" else per) + r + 1) * 4
    for T in (16, 16384):
        x = torch.randn(1, T, D)
        with torch.no_grad():
            _, s = m(x, None, torch.ones(1, T) if mode == "prefix" else None)
        assert kvfree.state_bytes(s) == want == m.state_size(T) * 4, T
