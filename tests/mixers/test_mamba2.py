import math

import pytest
import torch
import torch.nn.functional as F

from kvfree.linalg import segsum
from kvfree.mixers import build_mixer
from kvfree.mixers.mamba2 import Mamba2State, ssd_chunked
from tests.contract import F64, MixerContract, assert_close, err_ratio


class TestMamba2(MixerContract):
    name = "mamba2"
    configs = [
        dict(chunk_size=16, head_dim=8, d_state=8),  # d_in 32, H 4, G 1
        dict(chunk_size=64, head_dim=16, d_state=4, ngroups=2),  # H 2, one head per group
        dict(chunk_size=16, head_dim=4, d_state=6, ngroups=2, d_conv=3),  # H 8, 4 heads/group
    ]

    def reference(self, m, x, state, mask):
        """Plain per-token Mamba-2: conv window, softplus Δ, h = a h + Δ x Bᵀ, y = h C + D x,
        gated RMSNorm per group, out_proj."""
        Bsz, T, _ = x.shape
        H, P, N, G, K, d_in = m.H, m.P, m.N, m.G, m.d_conv, m.d_in
        GN = G * N
        h = state.ssm if state is not None else x.new_zeros(Bsz, H, P, N)
        hist = (
            list(state.conv.unbind(1))
            if state is not None
            else [x.new_zeros(Bsz, m.conv_dim) for _ in range(K - 1)]
        )
        group = torch.tensor([hd // (H // G) for hd in range(H)])
        ys = []
        for t in range(T):
            u = m.in_proj(x[:, t])
            z, xbc, dt = u[:, :d_in], u[:, d_in : d_in + m.conv_dim], u[:, -H:]
            hist.append(xbc)
            win = hist[len(hist) - K :]
            c = F.silu(m.conv.bias + sum(m.conv.weight[:, i] * win[i] for i in range(K)))
            xs = c[:, :d_in].reshape(Bsz, H, P)
            Bh = c[:, d_in : d_in + GN].reshape(Bsz, G, N)[:, group]
            Ch = c[:, d_in + GN :].reshape(Bsz, G, N)[:, group]
            delta = F.softplus(dt + m.dt_bias)
            a = torch.exp(-torch.exp(m.A_log) * delta)
            h = a[:, :, None, None] * h + torch.einsum("bh,bhp,bhn->bhpn", delta, xs, Bh)
            y = torch.einsum("bhpn,bhn->bhp", h, Ch) + m.D[:, None] * xs
            y = (y.reshape(Bsz, d_in) * F.silu(z)).reshape(Bsz, G, d_in // G)
            y = y / torch.sqrt(y.pow(2).mean(-1, keepdim=True) + m.eps)
            ys.append(m.out_proj(y.reshape(Bsz, d_in) * m.norm_weight))
        return torch.stack(ys, 1), Mamba2State(h, torch.stack(hist[len(hist) - (K - 1) :], 1))


def naive_ssd(X, dA, B, C, h0):
    """Per-token scan: h_t = exp(dA_t) h_{t−1} + X_t B_tᵀ, y_t = h_t C_t."""
    h, ys = h0, []
    for t in range(X.shape[1]):
        h = dA[:, t, :, None, None].exp() * h + X[:, t, :, :, None] * B[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", h, C[:, t]))
    return torch.stack(ys, 1), h


def ssd_inputs(T, dtype, *, A=1.0, b=1, H=2, P=4, N=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    delta = F.softplus(r(b, T, H) - 2.0)
    X, B, C, h0 = r(b, T, H, P) * delta[..., None], r(b, T, H, N), r(b, T, H, N), r(b, H, P, N)
    return [t.to(dtype) for t in (X, -A * delta, B, C, h0)]


def test_segsum_equals_explicit_sums():
    x = torch.randn(2, 9, dtype=torch.float64)
    s = segsum(x)
    for i in range(9):
        for j in range(9):
            if i >= j:
                assert torch.allclose(s[:, i, j], x[:, j + 1 : i + 1].sum(-1), atol=1e-14)
            else:
                assert torch.isneginf(s[:, i, j]).all()


def test_segsum_is_stable_on_strong_decays():
    """Large log-decays over a long chunk (fp32): each entry sums only its own terms, so a
    one-step segment is exactly x_i (a difference of two ~1e6 cumsums would be off by ~0.1),
    and exp(segsum) and its gradient are finite."""
    x = (-1e4 * torch.rand(256)).requires_grad_(True)
    s = segsum(x)
    idx = torch.arange(1, 256)
    assert torch.equal(s[idx, idx - 1], x[idx])  # bit-exact
    assert torch.equal(s.diagonal(), torch.zeros(256))
    L = s.exp()
    assert torch.isfinite(L).all()
    L.sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("chunk", [16, 64])
def test_ssd_chunked_equals_scan(chunk):
    """The chunked SSD core = the per-token scan (outputs, final state, all input gradients)."""
    T = 150
    ins = [t.requires_grad_(True) for t in ssd_inputs(T, torch.float64, b=2)]
    y, h = ssd_chunked(*ins[:4], ins[4], chunk)
    y_ref, h_ref = naive_ssd(*ins)
    assert_close("SSD output", y_ref, y, **F64)
    assert_close("SSD state", h_ref, h, **F64)
    w1, w2 = torch.randn_like(y), torch.randn_like(h)
    g = torch.autograd.grad((y * w1).sum() + (h * w2).sum(), ins)
    g_ref = torch.autograd.grad((y_ref * w1).sum() + (h_ref * w2).sum(), ins)
    for name, a, b in zip(("X", "dA", "B", "C", "h0"), g_ref, g):
        assert_close(f"SSD gradient of {name}", a, b, **F64)


def test_ssd_strong_decay_long_sequence():
    """A = 1e3 (per-step log-decays ~−130 on average, chunk totals ~−3e4) at T = 4096, chunk
    256: fp32 chunked SSD stays finite, matches the fp64 scan, and its gradients are finite."""
    T = 4096
    ref = ssd_inputs(T, torch.float64, A=1e3)
    with torch.no_grad():
        y_ref, h_ref = naive_ssd(*ref)
    ins = [t.float().requires_grad_(True) for t in ref]
    y, h = ssd_chunked(*ins[:4], ins[4], 256)
    assert torch.isfinite(y).all() and torch.isfinite(h).all()
    assert err_ratio(y_ref, y) < 1e-5 and err_ratio(h_ref, h) < 1e-5
    (y.sum() + h.sum()).backward()
    assert all(torch.isfinite(t.grad).all() for t in ins)


def test_module_with_large_A_is_finite():
    """The whole layer in fp32 with A = 1e4 at T = 4096 (chunk 256): forward and backward
    produce no inf/nan."""
    torch.manual_seed(0)
    m = build_mixer("mamba2", 16, head_dim=8, d_state=4, chunk_size=256)
    with torch.no_grad():
        m.A_log.fill_(math.log(1e4))
        m.dt_bias.fill_(2.0)  # Δ ≈ 2 on average: log-decays of order −1e4 per step
    x = torch.randn(1, 4096, 16, requires_grad=True)
    y, s = m(x)
    assert torch.isfinite(y).all() and torch.isfinite(s.ssm).all()
    y.square().mean().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())


def test_init_and_no_weight_decay():
    torch.manual_seed(0)
    m = build_mixer("mamba2", 64)
    assert (m.d_in, m.H, m.P, m.N, m.G, m.d_conv, m.chunk_size) == (128, 4, 32, 16, 1, 4, 64)
    assert m.state_size(4096) == 4 * 32 * 16 + (128 + 2 * 16) * 3
    big = build_mixer("mamba2", 64, head_dim=1)  # 128 heads: a decent sample of the inits
    dt = F.softplus(big.dt_bias)
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 1e-1 * (1 + 1e-5)
    assert dt.log().std() > 0.5  # log-uniform over two decades, not a constant
    A = big.A_log.exp()
    assert A.min() >= 1 and A.max() <= 16
    assert torch.equal(big.D, torch.ones(128))
    flagged = {n for n, p in big.named_parameters() if getattr(p, "_no_weight_decay", False)}
    assert flagged == {"A_log", "dt_bias", "D"}


def test_bad_options():
    with pytest.raises(ValueError, match="head_dim"):
        build_mixer("mamba2", 16, head_dim=5)
    with pytest.raises(ValueError, match="ngroups"):
        build_mixer("mamba2", 16, head_dim=8, ngroups=3)
    with pytest.raises(ValueError, match="d_state"):
        build_mixer("mamba2", 16, head_dim=8, d_state=0)
