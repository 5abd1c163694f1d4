import pytest
import torch
import torch.nn.functional as F

from kvfree.mixers import build_mixer
from kvfree.mixers.delta_rule import delta_rule_chunked
from tests.contract import F64, MixerContract, assert_close, err_ratio
from tests.mixers.test_deltanet import (
    check_core_against_naive,
    core_inputs,
    delta_layer_reference,
    naive_delta_rule,
)


class TestGatedDeltaNet(MixerContract):
    name = "gated_deltanet"
    configs = [
        dict(chunk_size=16),  # 2 heads of 8
        dict(chunk_size=64, num_heads=4, expand_v=2),  # d_k 4, d_v 8
        dict(chunk_size=16, num_heads=1, head_dim=12, conv_size=3),
    ]

    def reference(self, m, x, state, mask):
        return delta_layer_reference(m, x, state, gated=True)


@pytest.mark.parametrize("chunk", [16, 64])
@pytest.mark.parametrize("g_scale", [0.5, 8.0])
def test_gated_core_equals_recurrence(chunk, g_scale):
    """Chunked gated WY core = the naive recurrence, mild and strong decays (α down to e^-8):
    outputs, final state and gradients of q, k, v, β, S0 and g."""
    check_core_against_naive(150, chunk, gated=True, g_scale=g_scale)


def test_alpha_one_core_equals_deltanet_core():
    """g ≡ 0 (α ≡ 1) through the gated path = the DeltaNet path (g=None), and both = naive."""
    q, k, v, beta, S0 = core_inputs(100)
    o_d, S_d = delta_rule_chunked(q, k, v, beta, S0, scale=0.4, chunk_size=16)
    o_g, S_g = delta_rule_chunked(
        q, k, v, beta, S0, g=torch.zeros_like(beta), scale=0.4, chunk_size=16
    )
    assert_close("output", o_d, o_g, **F64)
    assert_close("state", S_d, S_g, **F64)
    o_n, _ = naive_delta_rule(q, k, v, beta, S0, 0.4)
    assert_close("output vs naive", o_n, o_d, **F64)


def test_alpha_one_layer_equals_deltanet():
    """A Gated DeltaNet layer with A_log = −∞ (α ≡ 1) carries exactly DeltaNet's state when
    both share the q/k/v/β projection and conv weights."""
    torch.manual_seed(0)
    gdn = build_mixer("gated_deltanet", 16, chunk_size=16).double()
    dn = build_mixer("deltanet", 16, chunk_size=16).double()
    with torch.no_grad():
        gdn.A_log.fill_(float("-inf"))
        dn.in_proj.weight.copy_(gdn.in_proj.weight[: dn.in_proj.out_features])
        dn.conv.weight.copy_(gdn.conv.weight)
        x = torch.randn(2, 70, 16, dtype=torch.float64)
        _, s_g = gdn(x)
        _, s_d = dn(x)
    assert_close("S", s_d.S, s_g.S, **F64)
    assert_close("conv buffer", s_d.conv, s_g.conv, **F64)
    assert s_g.S.abs().max() > 0.1  # a real state, not zeros


def test_strong_decay_long_sequence_is_finite():
    """fp32 core at T = 4096 with log-decays down to −50 per step: ratios are exp of masked
    differences, so nothing overflows; output matches the fp64 core and gradients are finite."""
    ref = core_inputs(4096, b=1, H=2, dk=8, dv=4, gated=True, g_scale=50.0)
    o_ref, S_ref = delta_rule_chunked(*ref[:4], ref[4], g=ref[5], scale=0.5, chunk_size=64)
    ins = [t.float().requires_grad_(True) for t in ref]
    o, S = delta_rule_chunked(*ins[:4], ins[4], g=ins[5], scale=0.5, chunk_size=64)
    assert torch.isfinite(o).all() and torch.isfinite(S).all()
    assert err_ratio(o_ref, o) < 1e-5 and err_ratio(S_ref, S) < 1e-5
    (o.sum() + S.sum()).backward()
    assert all(torch.isfinite(t.grad).all() for t in ins)


def test_init_and_no_weight_decay():
    torch.manual_seed(0)
    m = build_mixer("gated_deltanet", 64, num_heads=64, head_dim=4)
    dt = F.softplus(m.dt_bias)
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 1e-1 * (1 + 1e-5)
    A = m.A_log.exp()
    assert A.min() >= 1 and A.max() <= 16
    flagged = {n for n, p in m.named_parameters() if getattr(p, "_no_weight_decay", False)}
    assert flagged == {"A_log", "dt_bias"}
    d = build_mixer("gated_deltanet", 64)
    assert (d.H, d.dk, d.dv) == (2, 32, 32)
    assert d.state_size(4096) == 2 * 32 * 32 + 3 * 2 * 96


def test_bad_options():
    with pytest.raises(ValueError, match="A_init_range"):
        build_mixer("gated_deltanet", 16, A_init_range=(0.0, 16.0))
    with pytest.raises(ValueError, match="dt_min"):
        build_mixer("gated_deltanet", 16, dt_min=0.2, dt_max=0.1)
