import math

import pytest
import torch
import torch.nn.functional as F

from kvfree.linalg import FallbackCounter
from kvfree.mixers import build_mixer
from kvfree.mixers.mesanet import MesaNetState, mesa_core, mesa_step
from kvfree.train.optim import param_groups
from tests.contract import F64, MixerContract, assert_close


def mesa_reference(m, x, state):
    """Plain per-token loop: explicit conv history, L2 norm, gates, the two recurrences and a
    dense LU ``torch.linalg.solve`` per token (no Cholesky, no chunking)."""
    B, T, _ = x.shape
    H, dk, dv, K = m.H, m.dk, m.dv, m.conv_size
    if state is None:
        Hkk, Hkv = x.new_zeros(B, H, dk, dk), x.new_zeros(B, H, dk, dv)
        hq = [x.new_zeros(B, H * dk) for _ in range(K - 1)]
        hk = [x.new_zeros(B, H * dk) for _ in range(K - 1)]
    else:
        Hkk, Hkv = state.H_kk, state.H_kv
        hq = [state.q_conv[:, i] for i in range(K - 1)]
        hk = [state.k_conv[:, i] for i in range(K - 1)]
    lam = F.softplus(m.lambda_raw) + m.lambda_min  # [H, dk]

    def conv(conv_mod, hist):
        c = sum(conv_mod.weight[:, i] * hist[len(hist) - K + i] for i in range(K))
        return F.silu(c)

    def l2(u):
        return u / torch.sqrt((u * u).sum(-1, keepdim=True) + 1e-6)

    ys = []
    for t in range(T):
        hq.append(m.q_proj(x[:, t]))
        hk.append(m.k_proj(x[:, t]))
        q = l2(conv(m.q_conv, hq).view(B, H, dk))
        k = l2(conv(m.k_conv, hk).view(B, H, dk))
        v = m.v_proj(x[:, t]).view(B, H, dv)
        if m.use_gates:
            beta = torch.sigmoid(m.b_proj(x[:, t]))[..., None, None]
            gamma = torch.exp(F.logsigmoid(m.a_proj(x[:, t])))[..., None, None]
        else:
            beta = gamma = 1.0
        Hkk = gamma * Hkk + beta * torch.einsum("bhd,bhe->bhde", k, k)
        Hkv = gamma * Hkv + beta * torch.einsum("bhd,bhe->bhde", k, v)
        # the readout uses the symmetric part of H^kk (equal to H^kk for every valid state;
        # it fixes the gradient w.r.t. an initial H^kk to the symmetric one, as Cholesky does)
        Hs = 0.5 * (Hkk + Hkk.transpose(-1, -2))
        xs = torch.linalg.solve(Hs + torch.diag_embed(lam), q)
        o = torch.einsum("bhd,bhdv->bhv", xs, Hkv)
        o = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + m.o_norm.eps) * m.o_norm.weight
        ys.append(m.o_proj(o.reshape(B, H * dv)))
    buf = lambda h: torch.stack(h[len(h) - (K - 1) :], 1) if K > 1 else x.new_zeros(B, 0, H * dk)
    return torch.stack(ys, 1), MesaNetState(Hkk, Hkv, buf(hq), buf(hk))


class TestMesaNet(MixerContract):
    name = "mesanet"
    configs = [
        dict(chunk_size=16),
        dict(chunk_size=64, num_heads=1),
        dict(chunk_size=16, use_gates=False, lambda_init=0.5, lambda_min=0.1),
        dict(chunk_size=7, num_heads=4, conv_size=2),
        # conjugate-gradient solves (mesa_cg.py), converged to float64 round-off
        dict(chunk_size=16, solver="cg", cg_tol=1e-14, cg_iters=200),
    ]

    def reference(self, m, x, state, mask):
        return mesa_reference(m, x, state)


def randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def core_inputs(B=2, T=50, H=3, dk=4, dv=5, seed=0, strong=False):
    q = F.normalize(randn(B, T, H, dk, seed=seed), dim=-1)
    k = F.normalize(randn(B, T, H, dk, seed=seed + 1), dim=-1)
    v = randn(B, T, H, dv, seed=seed + 2)
    beta = torch.sigmoid(randn(B, T, H, seed=seed + 3))
    a = randn(B, T, H, seed=seed + 4) * (8.0 if strong else 1.0)
    log_gamma = F.logsigmoid(a - (20.0 if strong else 0.0) * (a < -2))  # some γ ≈ e^-25
    lam = 0.25 + torch.rand(
        H, dk, generator=torch.Generator().manual_seed(seed + 5), dtype=torch.float64
    )
    return q, k, v, beta, log_gamma, lam


def core_naive(q, k, v, beta, log_gamma, lam, state=None):
    B, T, H, dk = q.shape
    Hkk = q.new_zeros(B, H, dk, dk) if state is None else state[0]
    Hkv = q.new_zeros(B, H, dk, v.shape[-1]) if state is None else state[1]
    os = []
    for t in range(T):
        g = log_gamma[:, t].exp()[..., None, None] if log_gamma is not None else 1.0
        b = beta[:, t, :, None, None] if beta is not None else 1.0
        Hkk = g * Hkk + b * k[:, t, :, :, None] * k[:, t, :, None, :]
        Hkv = g * Hkv + b * k[:, t, :, :, None] * v[:, t, :, None, :]
        xs = torch.linalg.solve(Hkk + torch.diag_embed(lam.expand(H, dk)), q[:, t])
        os.append(torch.einsum("bhd,bhdv->bhv", xs, Hkv))
    return torch.stack(os, 1), (Hkk, Hkv)


@pytest.mark.parametrize("chunk", [1, 7, 16, 64])
@pytest.mark.parametrize("strong", [False, True])
def test_core_equals_naive_loop(chunk, strong):
    """mesa_core (chunked, log-space decays, batched Cholesky) = per-token dense solves, incl.
    decays as strong as γ ≈ e^-25 (no overflow, no NaN), from a non-zero initial state."""
    q, k, v, beta, lg, lam = core_inputs(strong=strong)
    _, st0 = core_naive(*core_inputs(T=9, seed=11))
    o_ref, (kk_ref, kv_ref) = core_naive(q, k, v, beta, lg, lam, st0)
    o, (kk, kv) = mesa_core(q, k, v, beta, None, lam, st0, log_gamma=lg, chunk_size=chunk)
    assert_close("core output", o_ref, o, **F64)
    assert_close("core H_kk", kk_ref, kk, **F64)
    assert_close("core H_kv", kv_ref, kv, **F64)
    # gamma given as values is the same as log_gamma
    o2, _ = mesa_core(q, k, v, beta, lg.exp(), lam, st0, chunk_size=chunk)
    assert_close("gamma vs log_gamma", o, o2, atol=1e-12, ratio=1e-9)


@pytest.mark.parametrize("strong", [False, True])
def test_cg_solver_equals_exact_values_and_gradients(strong):
    """CG without per-token matrices, gradients by implicit differentiation, = the exact
    Cholesky form: to round-off in float64 at a tight tolerance, and to the training
    tolerance (1e-6 relative residual, fp32) within 1e-4 of the output scale."""
    q, k, v, beta, lg, lam = core_inputs(T=40, strong=strong)
    _, st0 = core_naive(*core_inputs(T=9, seed=11))
    w = randn(2, 40, 3, 5, seed=9)
    got = {}
    for dtype, solver, tol in (
        (torch.float64, "exact", None),
        (torch.float64, "cg", 1e-14),
        (torch.float32, "cg", 1e-6),
    ):
        leaves = [t.to(dtype).clone().requires_grad_() for t in (q, k, v, beta, lg, lam)]
        q_, k_, v_, b_, lg_, lam_ = leaves
        kw = dict(solver=solver, cg_iters=200, **({"cg_tol": tol} if tol else {}))
        st = tuple(t.to(dtype) for t in st0)
        o, _ = mesa_core(q_, k_, v_, b_, None, lam_, st, log_gamma=lg_, chunk_size=16, **kw)
        (o * w.to(dtype)).sum().backward()
        got[(dtype, solver)] = (o.detach().double(), [t.grad.double() for t in leaves])
    o_ref, g_ref = got[(torch.float64, "exact")]
    o64, g64 = got[(torch.float64, "cg")]
    o32, g32 = got[(torch.float32, "cg")]
    assert_close("cg output (f64)", o_ref, o64, **F64)
    scale = float(o_ref.abs().max())
    assert float((o32 - o_ref).abs().max()) < 1e-4 * scale
    for name, r, a, b in zip(("q", "k", "v", "beta", "log_gamma", "lambda"), g_ref, g64, g32):
        assert_close(f"cg gradient of {name} (f64)", r, a, **F64)
        assert float((b - r).abs().max()) < 1e-3 * float(r.abs().max()), name


def test_unknown_solver_is_refused():
    with pytest.raises(ValueError, match="solver must be 'exact' or 'cg'"):
        build_mixer("mesanet", 16, solver="lu")
    with pytest.raises(ValueError, match="needs use_gates=True"):
        build_mixer("mesanet", 16, use_gates=False, forget_bias_init=5.0)
    m = build_mixer("mesanet", 16, forget_bias_init=5.0)
    assert torch.all(m.a_proj.bias == 5.0)


def test_core_gradients_match_naive_with_strong_decay():
    q, k, v, beta, lg, lam = core_inputs(T=30, strong=True)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, beta, lg, lam)]
    w = randn(2, 30, 3, 5, seed=9)
    (core_naive(*leaves)[0] * w).sum().backward()
    ref = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    q_, k_, v_, b_, lg_, lam_ = leaves
    (mesa_core(q_, k_, v_, b_, None, lam_, log_gamma=lg_, chunk_size=8)[0] * w).sum().backward()
    for name, r, t in zip(("q", "k", "v", "beta", "log_gamma", "lambda"), ref, leaves):
        assert torch.isfinite(t.grad).all(), name
        assert_close(f"gradient of {name}", r, t.grad, **F64)


def test_core_is_weighted_ridge_regression():
    """o_t = W_t q_t with W_t the weighted ridge solution, computed independently by a QR
    least-squares solve of the stacked system [√w·K; √Λ] Z = [√w·V; 0]."""
    q, k, v, beta, lg, lam = core_inputs(B=1, T=12, H=2)
    o, _ = mesa_core(q, k, v, beta, None, lam, log_gamma=lg, chunk_size=5)
    for t in (0, 4, 11):
        for h in range(2):
            logw = lg[0, : t + 1, h].flip(0).cumsum(0).flip(0) - lg[0, : t + 1, h]  # Σ_{i<m≤t}
            w = (beta[0, : t + 1, h] * logw.exp()).sqrt().unsqueeze(-1)
            X = torch.cat([w * k[0, : t + 1, h], torch.diag(lam[h].sqrt())])
            Y = torch.cat([w * v[0, : t + 1, h], v.new_zeros(4, 5)])
            Z = torch.linalg.lstsq(X, Y).solution  # [d_k, d_v]
            assert_close(f"ridge t={t} h={h}", Z.T @ q[0, t, h], o[0, t, h], atol=1e-12, ratio=1e-9)


def test_step_core_equals_chunked_core():
    q, k, v, beta, lg, lam = core_inputs(T=20)
    o, st = mesa_core(q, k, v, beta, None, lam, log_gamma=lg, chunk_size=6)
    st2, outs = None, []
    for t in range(20):
        ot, st2 = mesa_step(
            q[:, t], k[:, t], v[:, t], beta[:, t], None, lam, st2, log_gamma=lg[:, t]
        )
        outs.append(ot)
    assert_close("step core output", o, torch.stack(outs, 1), **F64)
    assert_close("step core H_kk", st[0], st2[0], **F64)


def test_lambda_init_floor_and_no_weight_decay():
    m = build_mixer("mesanet", 16).to(torch.float64)
    assert torch.allclose(m.lam(), torch.ones(2, 8, dtype=torch.float64))
    assert m.lambda_raw._no_weight_decay is True
    groups = param_groups(m, 0.1)
    nodecay = {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert id(m.lambda_raw) in nodecay and id(m.q_proj.weight) not in nodecay
    with torch.no_grad():
        m.lambda_raw.fill_(-50.0)
    assert (m.lam() >= 0.25).all() and (m.lam() < 0.25 + 1e-12).all()
    with pytest.raises(ValueError, match="lambda_min"):
        build_mixer("mesanet", 16, lambda_init=0.2)


def test_gates_off_means_beta_gamma_one():
    m = build_mixer("mesanet", 16, use_gates=False).to(torch.float64)
    assert not hasattr(m, "a_proj") and not hasattr(m, "b_proj")
    x = randn(2, 30, 16)
    with torch.no_grad():
        st = m.init_state(2, dtype=torch.float64)
        q, k, v, beta, lg, _, _ = m._features(x, st, step=False)
        assert beta is None and lg is None
        o, _ = mesa_core(
            q,
            k,
            v,
            torch.ones(2, 30, 2, dtype=torch.float64),
            torch.ones(2, 30, 2, dtype=torch.float64),
            m.lam(),
            chunk_size=16,
        )
        y, _ = m(x)
    assert_close("gates off = explicit ones", m._out(o), y, **F64)


def test_bf16_autocast_keeps_statistics_in_fp32():
    m = build_mixer("mesanet", 16)
    x = randn(2, 40, 16, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, st = m(x)
        y2, st2 = m.step(x[:, 0], st)
    assert st.H_kk.dtype == torch.float32 and st2.H_kv.dtype == torch.float32
    assert st.q_conv.dtype == torch.float32 and st2.k_conv.dtype == torch.float32
    assert torch.isfinite(y.float()).all() and torch.isfinite(y2.float()).all()


def test_singular_system_is_repaired_and_counted():
    """λ = 0 with a rank-one Gram matrix: Cholesky fails, the jitter fallback repairs it, the
    repair is counted and the output stays finite."""
    q, k, v, beta, lg, _ = core_inputs(B=1, T=1, H=1)
    counter = FallbackCounter()
    o, _ = mesa_core(
        q, k, v, beta, None, torch.zeros(1, 4, dtype=torch.float64), log_gamma=lg, counter=counter
    )
    assert counter.total() >= 1 and torch.isfinite(o).all()
    m = build_mixer("mesanet", 16).to(torch.float64)
    with torch.no_grad():
        m(randn(2, 50, 16))
    assert m.fallbacks.total() == 0, "λ >= 0.25 keeps every system SPD"


def test_state_size_formula_matches_fla_count():
    m = build_mixer("mesanet", 64, num_heads=2)  # 2 heads of 32
    assert m.state_size(10) == 2 * (32 * 32 + 32 * 32) + 2 * 3 * 64
    assert math.isclose(m.state_size(10), m.state_size(10**6))


def test_bad_core_inputs():
    q, k, v, beta, lg, lam = core_inputs(T=4)
    with pytest.raises(ValueError, match="q, k"):
        mesa_core(q, k[:, :3], v, beta, None, lam)
    with pytest.raises(ValueError, match="beta"):
        mesa_core(q, k, v, beta[:, :2], None, lam)
    with pytest.raises(ValueError, match="lam"):
        mesa_core(q, k, v, beta, None, lam[:, :3])
