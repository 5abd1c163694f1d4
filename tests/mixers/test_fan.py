"""FanScan (FDM's wave, docs/fdm.md §2): the mixer contract against a plain complex-number loop,
plus the chunked scan against a naive recurrence and the position-term decisions (§4.1)."""

import math

import pytest
import torch
import torch.nn.functional as F

from kvfree.linalg import segsum
from kvfree.mixers import build_mixer
from kvfree.mixers.fan import FanState
from kvfree.mixers.fdm_scan import complex_scan
from tests.contract import MixerContract


def rot_pairs(a, phi):
    """Reference Givens rotation: pair (2k, 2k+1) of a rotated by phi_k, one plane at a time."""
    out = a.clone()
    for k in range(phi.shape[-1]):
        c, s = torch.cos(phi[..., k]), torch.sin(phi[..., k])
        x0, x1 = a[..., 2 * k], a[..., 2 * k + 1]
        out[..., 2 * k] = x0 * c - x1 * s
        out[..., 2 * k + 1] = x0 * s + x1 * c
    return out


def grouped_conv_ref(conv, window):
    """window [B, k, D] (oldest first) → c [B, D]: the grouped-conv sum written out
    (output channel o of group g reads input channels g·gs … (g+1)·gs − 1)."""
    w, bias = conv.conv.weight, conv.conv.bias  # [D, D/G, k]
    B, k, D = window.shape
    G = conv.groups
    gs = D // G
    out = torch.einsum("bkgc,gock->bgo", window.view(B, k, G, gs), w.view(G, gs, gs, k))
    return out.reshape(B, D) + bias


def fan_step_ref(m, x_score, x_scan, t, buf, h1, h2):
    """One token of docs/fdm.md §2 with complex numbers. Returns (y, s, buf, h1, h2)."""
    if m.score_mode == "fdm":
        window = torch.cat([buf, x_score[:, None]], 1)
        buf = window[:, 1:]
        c = grouped_conv_ref(m.causal_conv, window)
        beta = m.W_beta(torch.tanh(c))[:, 0]
        tt = torch.tensor(float(t), dtype=x_score.dtype)
        ang = math.pi * tt / (m.t_train - 1)
        s = beta * torch.log(tt + 2)
        if m.position_term:
            w = m.shared.W_pos
            s = s + w.weight[0, 0] * torch.sin(ang) + w.weight[0, 1] * torch.cos(ang) + w.bias[0]
        p = (0.5 * torch.sigmoid(s + m.shared.mu) + 1e-4)[:, None]
    else:
        g = torch.sigmoid(m.W_p(x_score)).clamp(max=1 - 1e-6)
        p = g.mean(-1, keepdim=True) if m.score_mode == "mean_p" else g
        s = g.mean(-1)
    a = m.W_theta(x_scan)
    theta = rot_pairs(a, m.givens_t.proj(x_scan)) if m.givens_t is not None else a
    u = torch.complex(m.W_r(x_scan), m.W_i(x_scan))
    A = (1 - p) * torch.exp(1j * theta)
    h1 = A * h1 + p * u
    y = h1.real
    if m.passes == 2:
        delta = rot_pairs(y, m.givens_h.proj(x_scan)) - y
        h2 = A * h2 + p * (u + torch.sigmoid(m.delta_gate) * delta)
        y = h2.real
    return y, s, buf, h1, h2


def cplx(h):
    return None if h is None else torch.complex(h[:, 0], h[:, 1])


def real(h):
    return None if h is None else torch.stack([h.real, h.imag], 1)


class TestFanScan(MixerContract):
    name = "fan"
    configs = [
        dict(chunk_size=8, init_std=0.3),
        dict(chunk_size=16, score="mean_p", init_std=0.3),
        dict(chunk_size=4, score="channel_p", passes=1, givens_planes=0, init_std=0.3),
        dict(chunk_size=64, t_train=64, conv_group_size=8, init_std=0.3),  # 2 conv groups
    ]

    def reference(self, m, x, state, mask):
        B, T, D = x.shape
        st = state if state is not None else m.init_state(B, dtype=x.dtype)
        h1, h2, buf = cplx(st.h1), cplx(st.h2), st.conv
        ys = []
        for i in range(T):
            y, _, buf, h1, h2 = fan_step_ref(m, x[:, i], x[:, i], st.pos + i, buf, h1, h2)
            ys.append(y)
        return torch.stack(ys, 1), FanState(real(h1), real(h2), buf, st.pos + T)


def naive_scan(b, la, theta, h0):
    h, out = h0, []
    for t in range(b.shape[1]):
        h = torch.exp(la[:, t]) * torch.exp(1j * theta[:, t]) * h + b[:, t]
        out.append(h)
    return torch.stack(out, 1)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("T,chunk", [(1, 8), (7, 8), (8, 8), (50, 8), (200, 32)])
def test_complex_scan_equals_naive_recurrence(per_channel, T, chunk):
    g = torch.Generator().manual_seed(T)
    B, D = 2, 6
    b = torch.randn(B, T, D, 2, generator=g, dtype=torch.float64)
    la = -torch.rand(B, T, D if per_channel else 1, generator=g, dtype=torch.float64)
    theta = 3 * torch.randn(B, T, D, generator=g, dtype=torch.float64)
    h0 = torch.randn(B, 2, D, generator=g, dtype=torch.float64)
    y, hT = complex_scan(b[..., 0], b[..., 1], la, theta, h0, chunk)
    ref = naive_scan(torch.complex(b[..., 0], b[..., 1]), la, theta, cplx(h0))
    assert (y - ref.real).abs().max() < 1e-12
    assert (hT - real(ref[:, -1])).abs().max() < 1e-12


def test_segsum_is_stable_and_masked():
    la = -torch.rand(3, 10, dtype=torch.float64)
    S = segsum(la)
    for t in range(10):
        for s in range(10):
            want = la[:, s + 1 : t + 1].sum(-1) if s <= t else torch.full((3,), -math.inf)
            assert torch.equal(S[:, t, s], want) or (S[:, t, s] - want).abs().max() < 1e-15


def test_long_sequence_fp32_stays_finite_and_matches_steps():
    """30 000 tokens in fp32 with p at its floor (memory ≈ 1e4 tokens): no overflow, and the
    chunked form still equals the recurrence at the end."""
    torch.manual_seed(0)
    m = build_mixer("fan", 16, score="mean_p", init_std=0.3)
    with torch.no_grad():
        m.W_p.bias.fill_(-12.0)  # p ≈ 6e-6
        x = torch.randn(1, 30_000, 16)
        y, s = m(x)
        y64, s64 = m.double()(x.double())
    assert torch.isfinite(y).all() and torch.isfinite(s.h1).all()
    rel = ((y.double() - y64).norm() / y64.norm()).item()
    assert rel < 1e-4, rel


def test_position_term_uses_fixed_t_train():
    """π_t uses T_train − 1 in the denominator whatever the sequence length (docs/fdm.md §4.1): the
    output at t is unchanged when the sequence is extended, with W_pos ≠ 0."""
    torch.manual_seed(0)
    m = build_mixer("fan", 16, init_std=0.5, t_train=32).double()
    assert m.shared.W_pos.weight.abs().min() > 0
    x = torch.randn(2, 90, 16, dtype=torch.float64)
    with torch.no_grad():
        y_long, _ = m(x)
        y_short, _ = m(x[:, :24])
    assert (y_long[:, :24] - y_short).abs().max() < 1e-13
    # and p really follows sin/cos(π t / (T_train − 1)): W_β = 0 leaves only π_t
    with torch.no_grad():
        m.W_beta[-1].weight.zero_()
        m.W_beta[-1].bias.zero_()
        s, p, _ = m.score_parallel(x, m.init_state(2, dtype=x.dtype).conv, 0)
    t = torch.arange(90, dtype=torch.float64)
    w, b = m.shared.W_pos.weight[0].detach(), m.shared.W_pos.bias[0].detach()
    want = w[0] * torch.sin(math.pi * t / 31) + w[1] * torch.cos(math.pi * t / 31) + b
    assert (s[0] - want).abs().max() < 1e-14
    assert (
        p[0, :, 0] - (0.5 * torch.sigmoid(want + m.shared.mu.detach()) + 1e-4)
    ).abs().max() < 1e-14


def test_write_rate_range_and_init():
    """p ∈ (1e-4, 0.5001); at init (μ = −2) p ≈ ½σ(−2) ≈ 0.06 (docs/fdm.md §2.1.6)."""
    torch.manual_seed(0)
    m = build_mixer("fan", 64)
    x = torch.randn(2, 40, 64)
    with torch.no_grad():
        _, p, _ = m.score_parallel(x, m.init_state(2).conv, 0)
        assert 0.055 < p.mean().item() < 0.065
        m.shared.mu.fill_(50.0)
        _, p_hi, _ = m.score_parallel(x, m.init_state(2).conv, 0)
        m.shared.mu.fill_(-50.0)
        _, p_lo, _ = m.score_parallel(x, m.init_state(2).conv, 0)
    assert p_hi.max() <= 0.5001 + 1e-7 and p_lo.min() >= 1e-4 - 1e-9


def test_wave_core_parameter_count_at_d576():
    """docs/fdm.md §2.5: scan core = 1 243 306 per layer (W_θ, W_r, W_i, conv, MLP_β,
    2 Givens, g)."""
    with torch.device("meta"):
        m = build_mixer("fan", 576)
    core = sum(p.numel() for n, p in m.named_parameters() if not n.startswith("shared"))
    assert core == 1_243_306
    assert sum(p.numel() for p in m.shared.parameters()) == 4  # W_pos (3) + μ (1)


def test_bad_options_raise_clearly():
    with pytest.raises(ValueError, match="score"):
        build_mixer("fan", 16, score="max_p")
    with pytest.raises(ValueError, match="Givens planes"):
        build_mixer("fan", 6, givens_planes=4)
    with pytest.raises(ValueError, match="conv groups|conv_group_size"):
        build_mixer("fan", 200, conv_group_size=64)
    with pytest.raises(ValueError, match="passes"):
        build_mixer("fan", 16, passes=3)


def test_bf16_autocast_keeps_scan_state_fp32():
    torch.manual_seed(0)
    m = build_mixer("fan", 16)
    x = torch.randn(2, 20, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, s = m(x)
    assert s.h1.dtype == torch.float32 and s.h2.dtype == torch.float32
    assert torch.isfinite(y).all()
    assert F.mse_loss(y.float(), m(x)[0]).item() < 1e-3 * m(x)[0].pow(2).mean().item() + 1e-8
