import math

import pytest
import torch
import torch.nn.functional as F

from kvfree.mixers import build_mixer
from kvfree.mixers.mamba2 import ssd_chunked
from kvfree.mixers.mamba3 import Mamba3State, mamba3_scan
from tests.contract import F64, MixerContract, assert_close, run_steps


def _pieces(m, u):
    """in_proj output [b, d_proj] -> the reference's [z, x, B, C, dd_dt, dd_A, trap, angles]."""
    out, start = [], 0
    for n in (m.d_in, m.d_in, m.r * m.G * m.N, m.r * m.G * m.N, m.H, m.H, m.H, m.R):
        out.append(u[:, start : start + n])
        start += n
    return out


def _rms(v, w, eps):
    return v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + eps) * w


def _rot(v, theta):
    """Pairs (v_{2i}, v_{2i+1}), i < R, as complex numbers times e^{iθ_i}; the rest unchanged."""
    R = theta.shape[-1]
    c = torch.complex(v[..., 0 : 2 * R : 2], v[..., 1 : 2 * R : 2]) * torch.polar(
        torch.ones_like(theta), theta
    )
    return torch.cat([torch.stack([c.real, c.imag], -1).flatten(-2), v[..., 2 * R :]], -1)


def _gates(m, dd_dt, dd_A, trap, ang, theta):
    """Δ = softplus(dd_Δ + dt_bias), A = min(−f(dd_A), −A_floor), λ = σ(trap), and the angles
    advanced by Δ·π tanh(φ̃) mod 2π, as the reference writes them."""
    delta = F.softplus(dd_dt + m.dt_bias)
    if m.A_act == "softplus":
        pos = F.softplus(dd_A)
    else:
        pos = torch.where(dd_A >= 0, 1 + dd_A, 1 / (1 - dd_A.clamp(max=0)))
    A = torch.minimum(-pos, torch.full_like(pos, -m.A_floor))
    theta = theta + delta[:, :, None] * (math.pi * torch.tanh(ang))[:, None, :]
    theta = theta - 2 * math.pi * torch.floor(theta / (2 * math.pi))
    return delta, A, torch.sigmoid(trap), theta


def _rot_halves(v, theta):
    """Pairs (v_n, v_{n+N/2}), n < R, as complex numbers times e^{iθ_n}; the rest unchanged."""
    R, half = theta.shape[-1], v.shape[-1] // 2
    c = torch.complex(v[..., :R], v[..., half : half + R]) * torch.polar(
        torch.ones_like(theta), theta
    )
    return torch.cat([c.real, v[..., R:half], c.imag, v[..., half + R :]], -1)


class TestMamba3(MixerContract):
    name = "mamba3"
    configs = [
        dict(chunk_size=16, head_dim=8, d_state=8),  # H 4, G 1, R 2 (half of N rotated)
        # H 2, one head per group, all of N rotated (R 4), the later heavy-tail A
        dict(
            chunk_size=64, head_dim=16, d_state=8, ngroups=2, rope_fraction=1.0, A_act="heavy_tail"
        ),
        dict(chunk_size=16, head_dim=4, d_state=6, ngroups=2, outproj_norm=True),  # H 8, R 1
        dict(chunk_size=16, head_dim=8, d_state=4, rope_fraction=1.0, A_floor=0.5),  # R 2 = N/2
    ]

    def reference(self, m, x, state, mask):
        """Plain per-token Mamba-3 SISO (the step reference of state-spaces/mamba
        tests/ops/triton/test_mamba3_siso.py, from the equations): θ += Δ·π tanh(φ̃) mod 2π,
        k, q = rotated (RMSNorm + bias) B, C, h = α h + (1−λ)Δα x_prev k_prevᵀ + λΔ x kᵀ,
        y = h q + D x, gate SiLU(z), out_proj."""
        Bsz, T, _ = x.shape
        H, P, N, G = m.H, m.P, m.N, m.G
        if state is None:
            state = m.init_state(Bsz, dtype=x.dtype)
        theta, h, k_prev, x_prev = state.angle, state.ssm, state.k, state.x
        group = torch.tensor([hd // (H // G) for hd in range(H)])
        ys = []
        for t in range(T):
            z, xs, Bt, Ct, dd_dt, dd_A, trap, ang = _pieces(m, m.in_proj(x[:, t]))
            xs = xs.reshape(Bsz, H, P)
            Bh = _rms(Bt.reshape(Bsz, G, N), m.B_norm_weight, m.eps)[:, group] + m.B_bias
            Ch = _rms(Ct.reshape(Bsz, G, N), m.C_norm_weight, m.eps)[:, group] + m.C_bias
            delta, A, lam, theta = _gates(m, dd_dt, dd_A, trap, ang, theta)
            k, q = _rot(Bh, theta), _rot(Ch, theta)
            alpha = torch.exp(delta * A)
            h = (
                alpha[:, :, None, None] * h
                + torch.einsum("bh,bhp,bhn->bhpn", (1 - lam) * delta * alpha, x_prev, k_prev)
                + torch.einsum("bh,bhp,bhn->bhpn", lam * delta, xs, k)
            )
            y = torch.einsum("bhpn,bhn->bhp", h, q) + m.D[:, None] * xs
            if m.outproj_norm:
                y = _rms(y, m.norm_weight.reshape(H, P), m.eps)
            ys.append(m.out_proj(y.reshape(Bsz, H * P) * F.silu(z)))
            k_prev, x_prev = k, xs
        return torch.stack(ys, 1), Mamba3State(theta, h, k_prev, x_prev)


def _scan_inputs(T, *, b=2, H=3, P=4, N=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    delta = F.softplus(r(b, T, H) - 1.0)
    a = -delta * F.softplus(r(b, T, H))
    lam = torch.sigmoid(r(b, T, H))
    return dict(
        x=r(b, T, H, P), k=r(b, T, H, N), q=r(b, T, H, N), a=a, delta=delta, lam=lam,
        h0=r(b, H, P, N), x_prev=r(b, H, P), k_prev=r(b, H, N),
    )  # fmt: skip


def _trapezoid_loop(x, k, q, a, delta, lam, h0, x_prev, k_prev):
    h, ys = h0, []
    for t in range(x.shape[1]):
        alpha = a[:, t].exp()
        h = (
            alpha[..., None, None] * h
            + ((1 - lam[:, t]) * delta[:, t] * alpha)[..., None, None]
            * x_prev[..., None]
            * k_prev[..., None, :]
            + (lam[:, t] * delta[:, t])[..., None, None]
            * x[:, t, ..., None]
            * k[:, t, ..., None, :]
        )
        ys.append(torch.einsum("bhpn,bhn->bhp", h, q[:, t]))
        x_prev, k_prev = x[:, t], k[:, t]
    return torch.stack(ys, 1), h


@pytest.mark.parametrize("chunk", [7, 16, 64])
def test_scan_equals_trapezoid_loop(chunk):
    """The chunked core (SSD with shifted weights and the diagonal correction) = the per-token
    trapezoid recurrence, outputs, final state and every input's gradient, across chunks."""
    _assert_scan_matches(_scan_inputs(50), _trapezoid_loop, chunk)


def _assert_scan_matches(ins, loop, chunk):
    """mamba3_scan = ``loop`` in outputs, final state and every input's gradient (float64)."""
    ins = {n: t.requires_grad_(True) for n, t in ins.items()}
    y, h = mamba3_scan(**ins, chunk_size=chunk)
    y_ref, h_ref = loop(**ins)
    assert_close("output", y_ref, y, **F64)
    assert_close("state", h_ref, h, **F64)
    w1, w2 = torch.randn_like(y), torch.randn_like(h)
    g = torch.autograd.grad((y * w1).sum() + (h * w2).sum(), list(ins.values()))
    g_ref = torch.autograd.grad((y_ref * w1).sum() + (h_ref * w2).sum(), list(ins.values()))
    for name, a, b in zip(ins, g_ref, g):
        assert_close(f"gradient of {name}", a, b, **F64)


def test_scan_gate_ends():
    """λ = 1 (the Euler end) is Mamba-2's selective SSM h = e^{a} h + Δ x kᵀ, the previous
    token ignored; λ = 0 writes only the previous token, h = e^{a}(h + Δ x_{t−1} k_{t−1}ᵀ)."""
    ins = _scan_inputs(40)
    X = ins["x"] * ins["delta"][..., None]
    y, h = mamba3_scan(**{**ins, "lam": torch.ones_like(ins["lam"])}, chunk_size=16)
    y2, h2 = ssd_chunked(X, ins["a"], ins["k"], ins["q"], ins["h0"], 16)
    assert_close("Euler output", y2, y, **F64)
    assert_close("Euler state", h2, h, **F64)
    hs, ys, xp, kp = ins["h0"], [], ins["x_prev"], ins["k_prev"]
    for t in range(40):
        dt = ins["delta"][:, t, :, None, None]
        hs = ins["a"][:, t, :, None, None].exp() * (hs + dt * xp[..., None] * kp[..., None, :])
        ys.append(torch.einsum("bhpn,bhn->bhp", hs, ins["q"][:, t]))
        xp, kp = ins["x"][:, t], ins["k"][:, t]
    y, h = mamba3_scan(**{**ins, "lam": torch.zeros_like(ins["lam"])}, chunk_size=16)
    assert_close("λ = 0 output", torch.stack(ys, 1), y, **F64)
    assert_close("λ = 0 state", hs, h, **F64)


def test_module_euler_without_rotation_is_a_selective_ssm():
    """The whole layer with the trapezoid gate forced to the Euler end (trap logits +60, so
    σ = 1 exactly in float64) and the angle projection zeroed (θ stays 0, no rotation) is a
    Mamba-2-like selective SSM without conv: h = exp(ΔA) h + Δ x B̂ᵀ, y = h Ĉ + D x, gated."""
    torch.manual_seed(0)
    m = build_mixer("mamba3", 16, head_dim=8, d_state=8, chunk_size=16).double()
    x = torch.randn(2, 40, 16, dtype=torch.float64)
    x[..., 0] = 1.0  # a constant input feature drives the trap logits
    H, P, N = m.H, m.P, m.N
    lo = 2 * m.d_in + 2 * m.G * N + 2 * H  # the trap rows, then the angle rows
    with torch.no_grad():
        m.in_proj.weight[lo : lo + H] = 0.0
        m.in_proj.weight[lo : lo + H, 0] = 60.0
        m.in_proj.weight[lo + H :] = 0.0
    y, s = m(x)
    assert torch.equal(s.angle, torch.zeros_like(s.angle))
    h, ys = torch.zeros(2, H, P, N, dtype=torch.float64), []
    with torch.no_grad():
        for t in range(40):
            z, xs, Bt, Ct, dd_dt, dd_A, _, _ = _pieces(m, m.in_proj(x[:, t]))
            xs = xs.reshape(2, H, P)
            Bh = _rms(Bt.reshape(2, 1, N), m.B_norm_weight, m.eps) + m.B_bias
            Ch = _rms(Ct.reshape(2, 1, N), m.C_norm_weight, m.eps) + m.C_bias
            delta = F.softplus(dd_dt + m.dt_bias)
            A = (-F.softplus(dd_A)).clamp(max=-m.A_floor)
            h = (delta * A).exp()[..., None, None] * h + torch.einsum(
                "bh,bhp,bhn->bhpn", delta, xs, Bh
            )
            yt = torch.einsum("bhpn,bhn->bhp", h, Ch) + m.D[:, None] * xs
            ys.append(m.out_proj(yt.reshape(2, -1) * F.silu(z)))
    assert_close("Euler, no rotation", torch.stack(ys, 1), y, **F64)


def test_rotary_angles_are_data_dependent():
    """θ advances by Δ_t·π tanh(φ̃_t) per token: the increments differ from token to token and
    between inputs, they rotate only the first 2R channels of k, and they change the output."""
    torch.manual_seed(0)
    m = build_mixer("mamba3", 16, head_dim=8, d_state=8, chunk_size=16).double()
    x = torch.randn(2, 30, 16, dtype=torch.float64)
    with torch.no_grad():
        thetas, s = [], m.init_state(2, dtype=torch.float64)
        for t in range(30):
            _, s = m.step(x[:, t], s)
            thetas.append(s.angle)
        theta = torch.stack(thetas, 1)  # [b, T, H, R]
        inc = torch.remainder(theta.diff(dim=1), 2 * math.pi)
        _, _, B, _, delta, _, _, phi = m._inputs(m.in_proj(x), torch.float64)
        want = torch.remainder(delta[:, 1:, :, None] * phi[:, 1:, None, :], 2 * math.pi)
        assert_close("angle increments", want, inc, atol=1e-10, ratio=1e-10)
        assert inc.std(1).min() > 1e-4, "the increments do not vary over tokens"
        assert (theta[0] - theta[1]).abs().max() > 1e-2, "the angles do not depend on the input"
        k_last, B_last = s.k, B[:, -1, :, 0]  # B̂ [b, T, H, r = 1, N]
        R2 = 2 * m.R
        assert_close("unrotated channels", B_last[..., R2:], k_last[..., R2:], **F64)
        assert (k_last[..., :R2] - B_last[..., :R2]).abs().max() > 1e-3
        y, _ = m(x)
        m.in_proj.weight[-m.R :] = 0.0
        y0, s0 = m(x)
        assert torch.equal(s0.angle, torch.zeros_like(s0.angle))
        assert (y - y0).abs().max() > 1e-4, "the rotation does not reach the output"


def test_only_relative_angles_matter():
    """From h = 0 and no previous token, a common initial angle offset changes nothing in the
    outputs (q_t·k_s sees θ_t − θ_s only: the complex-diagonal-SSM reading of the RoPE)."""
    torch.manual_seed(0)
    m = build_mixer("mamba3", 16, head_dim=8, d_state=8, chunk_size=16).double()
    x = torch.randn(2, 40, 16, dtype=torch.float64)
    s = m.init_state(2, dtype=torch.float64)
    s.angle = torch.rand(s.angle.shape, dtype=torch.float64) * 2 * math.pi
    with torch.no_grad():
        y, _ = m(x)
        y2, s2 = m(x, s)
        y3, _ = run_steps(m, x, m.init_state(2, dtype=torch.float64))
    assert_close("offset angles", y, y2, **F64)
    assert_close("steps", y, y3, **F64)
    assert (s2.angle - m(x)[1].angle).abs().max() > 1e-3  # the carried angle did move


def test_init_and_state_numbers():
    torch.manual_seed(0)
    m = build_mixer("mamba3", 64)
    assert (m.d_in, m.H, m.P, m.N, m.G, m.R, m.chunk_size) == (128, 4, 32, 16, 1, 4, 64)
    assert m.in_proj.out_features == 2 * 128 + 2 * 16 + 3 * 4 + 4
    assert m.state_size(4096) == 4 * 32 * 16 + 4 * 4 + 4 * 16 + 4 * 32 == 2256
    assert m.state_nbytes(10, torch.bfloat16) == 2256 * 4  # carried in fp32
    assert build_mixer("mamba3", 64, rope_fraction=1.0).R == 8
    assert build_mixer("mamba3", 64, d_state=6, rope_fraction=0.5).R == 1
    for p in (m.B_bias, m.C_bias, m.B_norm_weight, m.C_norm_weight, m.D):
        assert torch.equal(p, torch.ones_like(p))
    big = build_mixer("mamba3", 64, head_dim=1)
    dt = F.softplus(big.dt_bias)
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 1e-1 * (1 + 1e-5)
    flagged = {n for n, p in big.named_parameters() if getattr(p, "_no_weight_decay", False)}
    assert flagged == {"dt_bias", "D"}
    assert not hasattr(m, "norm_weight")


def test_bad_options():
    with pytest.raises(ValueError, match="head_dim"):
        build_mixer("mamba3", 16, head_dim=5)
    with pytest.raises(ValueError, match="ngroups"):
        build_mixer("mamba3", 16, head_dim=8, ngroups=3)
    with pytest.raises(ValueError, match="rope_fraction"):
        build_mixer("mamba3", 16, head_dim=8, rope_fraction=0.25)
    with pytest.raises(ValueError, match="rotary pair"):
        build_mixer("mamba3", 16, head_dim=8, d_state=2, rope_fraction=0.5)
    with pytest.raises(ValueError, match="A_act"):
        build_mixer("mamba3", 16, head_dim=8, A_act="exp")


class TestMamba3MIMO(MixerContract):
    name = "mamba3"
    configs = [
        dict(chunk_size=16, head_dim=8, d_state=8, mimo_rank=2),  # H 4, R 2: pairs (0,4), (1,5)
        dict(  # H 2, one head per group, all of N rotated, rank 4, chunks of 8 tokens (32 rows)
            chunk_size=8, head_dim=16, d_state=8, ngroups=2, rope_fraction=1.0,
            A_act="heavy_tail", mimo_rank=4,
        ),
        dict(chunk_size=16, head_dim=4, d_state=6, ngroups=2, outproj_norm=True, mimo_rank=3),
    ]  # fmt: skip

    def make(self, cfg, dtype=torch.float64):
        """Random rank weights and biases (the init sets every rank alike, which would hide a
        rank mix-up)."""
        m = super().make(cfg, dtype)
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for p in (m.mimo_x, m.mimo_z, m.mimo_o, m.B_bias, m.C_bias):
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
        return m

    def reference(self, m, x, state, mask):
        """Plain per-token Mamba-3 MIMO (the step reference of state-spaces/mamba
        tests/ops/tilelang/test_mamba3_mimo.py, from the equations, with the kernels' halved
        pairing): x̃_ρ = x ⊙ W_x[ρ], h = α h + β Σ_ρ x̃_prev,ρ k_prev,ρᵀ + γ Σ_ρ x̃_ρ k_ρᵀ,
        y_ρ = h q_ρ + D x̃_ρ, out = out_proj Σ_ρ W_o[ρ] ⊙ y_ρ ⊙ SiLU(z ⊙ W_z[ρ])."""
        Bsz, T, _ = x.shape
        H, P, N, G, r = m.H, m.P, m.N, m.G, m.mimo_rank
        if state is None:
            state = m.init_state(Bsz, dtype=x.dtype)
        theta, h, k_prev, x_prev = state.angle, state.ssm, state.k, state.x
        group = torch.tensor([hd // (H // G) for hd in range(H)])
        ys = []
        for t in range(T):
            z, xs, Bt, Ct, dd_dt, dd_A, trap, ang = _pieces(m, m.in_proj(x[:, t]))
            xs, z = xs.reshape(Bsz, H, P), z.reshape(Bsz, H, P)
            Bh = _rms(Bt.reshape(Bsz, r, G, N), m.B_norm_weight, m.eps)[:, :, group]
            Ch = _rms(Ct.reshape(Bsz, r, G, N), m.C_norm_weight, m.eps)[:, :, group]
            Bh, Ch = Bh.transpose(1, 2) + m.B_bias, Ch.transpose(1, 2) + m.C_bias  # [b, H, r, N]
            delta, A, lam, theta = _gates(m, dd_dt, dd_A, trap, ang, theta)
            k, q = _rot_halves(Bh, theta[:, :, None]), _rot_halves(Ch, theta[:, :, None])
            alpha = torch.exp(delta * A)
            xr, xr_prev = xs[:, :, None] * m.mimo_x, x_prev[:, :, None] * m.mimo_x
            h = (
                alpha[:, :, None, None] * h
                + torch.einsum("bh,bhrp,bhrn->bhpn", (1 - lam) * delta * alpha, xr_prev, k_prev)
                + torch.einsum("bh,bhrp,bhrn->bhpn", lam * delta, xr, k)
            )
            y = torch.einsum("bhpn,bhrn->bhrp", h, q) + m.D[:, None, None] * xr
            if m.outproj_norm:
                y = _rms(y, m.norm_weight.reshape(H, 1, P), m.eps)
            y = (m.mimo_o * y * F.silu(z[:, :, None] * m.mimo_z)).sum(2)
            ys.append(m.out_proj(y.reshape(Bsz, H * P)))
            k_prev, x_prev = k, xs
        return torch.stack(ys, 1), Mamba3State(theta, h, k_prev, x_prev)


def _mimo_loop(x, k, q, a, delta, lam, h0, x_prev, k_prev):
    """h_t = α h + (1−λ)Δα Σ_ρ x_{t−1,ρ} k_{t−1,ρ}ᵀ + λΔ Σ_ρ x_{t,ρ} k_{t,ρ}ᵀ, y_ρ = h q_ρ."""
    h, ys = h0, []
    for t in range(x.shape[1]):
        alpha = a[:, t].exp()
        h = (
            alpha[..., None, None] * h
            + torch.einsum("bh,bhrp,bhrn->bhpn", (1 - lam[:, t]) * delta[:, t] * alpha, x_prev,
                           k_prev)
            + torch.einsum("bh,bhrp,bhrn->bhpn", lam[:, t] * delta[:, t], x[:, t], k[:, t])
        )  # fmt: skip
        ys.append(torch.einsum("bhpn,bhrn->bhrp", h, q[:, t]))
        x_prev, k_prev = x[:, t], k[:, t]
    return torch.stack(ys, 1), h


@pytest.mark.parametrize("rank,chunk", [(3, 5), (3, 16), (4, 64)])
def test_mimo_scan_equals_rank_r_loop(rank, chunk):
    """The SSD with a rank axis plus the same-token correction = the per-token rank-r
    trapezoid recurrence: outputs, final state and every input's gradient, across chunks."""
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    b, T, H, P, N = 2, 41, 3, 4, 6
    delta = F.softplus(r(b, T, H) - 1.0)
    ins = dict(
        x=r(b, T, H, rank, P), k=r(b, T, H, rank, N), q=r(b, T, H, rank, N),
        a=-delta * F.softplus(r(b, T, H)), delta=delta, lam=torch.sigmoid(r(b, T, H)),
        h0=r(b, H, P, N), x_prev=r(b, H, rank, P), k_prev=r(b, H, rank, N),
    )  # fmt: skip
    _assert_scan_matches(ins, _mimo_loop, chunk)


def test_mimo_ranks_are_used_and_numbers():
    """Every rank reaches the output (zeroing one rank's output weights changes it), the state
    keeps r rotated keys per head, and the sizes follow the formula."""
    torch.manual_seed(0)
    m = build_mixer("mamba3", 64, mimo_rank=4)
    assert (m.H, m.P, m.N, m.R, m.r) == (4, 32, 16, 4, 4)
    assert m.in_proj.out_features == 2 * 128 + 2 * 4 * 16 + 3 * 4 + 4
    assert m.state_size(4096) == 4 * 32 * 16 + 4 * 4 + 4 * 4 * 16 + 4 * 32 == 2448
    assert m.state_nbytes(10, torch.bfloat16) == 2448 * 4
    assert m.init_state(2).k.shape == (2, 4, 4, 16)
    assert torch.allclose(m.mimo_x, torch.full_like(m.mimo_x, 0.25)) and m.mimo_z.eq(1).all()
    assert m.B_bias.shape == (4, 4, 16)
    flagged = {n for n, p in m.named_parameters() if getattr(p, "_no_weight_decay", False)}
    assert flagged == {"dt_bias", "D", "mimo_x", "mimo_z", "mimo_o"}
    m = m.double()
    x = torch.randn(2, 20, 64, dtype=torch.float64)
    with torch.no_grad():
        y, s = m(x)
        assert s.k.shape == (2, 4, 4, 16)
        for rho in range(4):
            saved = m.mimo_o[:, rho].clone()
            m.mimo_o[:, rho] = 0.0
            assert (m(x)[0] - y).abs().max() > 1e-6, f"rank {rho} does not reach the output"
            m.mimo_o[:, rho] = saved
    assert "mimo_rank=4" in repr(build_mixer("mamba3", 16, head_dim=8, d_state=8, mimo_rank=4))


def test_mimo_bad_options():
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="mimo_rank must be a positive integer"):
            build_mixer("mamba3", 16, head_dim=8, d_state=8, mimo_rank=bad)
    with pytest.raises(ValueError, match="even d_state"):
        build_mixer("mamba3", 16, head_dim=8, d_state=7, mimo_rank=2)
