"""Kimi Delta Attention: the mixer contract against a per-token loop with a per-channel decay; the
chunked core with per-channel decays against the naive recurrence (values and gradients, mild and
strong decays, fp32 at T = 4096); equal channel decays give Gated DeltaNet's core."""

import pytest
import torch
import torch.nn.functional as F

from kvfree.mixers import build_mixer
from kvfree.mixers.delta_rule import delta_rule_chunked
from tests.contract import F64, MixerContract, assert_close, err_ratio
from tests.mixers.test_deltanet import compare_core, core_inputs, delta_layer_reference


class TestKDA(MixerContract):
    name = "kda"
    configs = [
        dict(chunk_size=16),  # 2 heads of 8
        dict(chunk_size=64, num_heads=4, expand_v=2),
        dict(chunk_size=16, num_heads=1, head_dim=12, conv_size=3),
    ]

    def reference(self, m, x, state, mask):
        return delta_layer_reference(m, x, state, gated=True, channel=True)


def naive_channel_rule(q, k, v, beta, S0, scale, g):
    """S_t = (I − β k kᵀ) Diag(e^{g_t}) S_{t−1} + β k vᵀ, o_t = scale·S_tᵀ q_t (per token)."""
    S, out = S0, []
    for t in range(q.shape[1]):
        S = g[:, t].exp()[..., None] * S
        kt, b = k[:, t], beta[:, t, :, None, None]
        S = S - b * kt[..., :, None] * torch.einsum("bhk,bhkv->bhv", kt, S)[..., None, :]
        S = S + b * kt[..., :, None] * v[:, t, :, None, :]
        out.append(scale * torch.einsum("bhkv,bhk->bhv", S, q[:, t]))
    return torch.stack(out, 1), S


def channel_inputs(T, g_scale, dtype=torch.float64):
    q, k, v, beta, S0 = core_inputs(T, dtype=dtype)
    gen = torch.Generator().manual_seed(3)
    g = -g_scale * torch.rand(*k.shape, generator=gen, dtype=torch.float64).to(dtype)
    return [q, k, v, beta, S0, g]


@pytest.mark.parametrize("chunk", [16, 64])
@pytest.mark.parametrize("g_scale", [0.5, 8.0])
def test_channel_core_equals_recurrence(chunk, g_scale):
    compare_core(channel_inputs(150, g_scale), naive_channel_rule, chunk)


def test_equal_channels_are_gated_deltanet():
    q, k, v, beta, S0, g = channel_inputs(100, 2.0)
    g_head = g[..., 0]
    o_h, S_h = delta_rule_chunked(q, k, v, beta, S0, g=g_head, scale=0.4, chunk_size=16)
    o_c, S_c = delta_rule_chunked(
        q, k, v, beta, S0, g=g_head.unsqueeze(-1).expand_as(k), scale=0.4, chunk_size=16
    )
    assert_close("output", o_h, o_c, **F64)
    assert_close("state", S_h, S_c, **F64)


def test_strong_channel_decay_fp32_long_sequence_is_finite():
    ref = channel_inputs(4096, 50.0)
    o_ref, S_ref = delta_rule_chunked(*ref[:5], g=ref[5], scale=0.5, chunk_size=64)
    ins = [t.float().requires_grad_(True) for t in ref]
    o, S = delta_rule_chunked(*ins[:5], g=ins[5], scale=0.5, chunk_size=64)
    assert torch.isfinite(o).all() and torch.isfinite(S).all()
    assert err_ratio(o_ref, o) < 1e-5 and err_ratio(S_ref, S) < 1e-5
    (o.sum() + S.sum()).backward()
    assert all(torch.isfinite(t.grad).all() for t in ins)


def test_decay_is_per_channel():
    torch.manual_seed(0)
    m = build_mixer("kda", 16, chunk_size=16)
    assert m.dt_bias.shape == (m.H * m.dk,) and m.dt_bias._no_weight_decay
    x = torch.randn(1, 5, 16)
    *_, g, _, _ = m._features(x, m.init_state(1).conv, step=False)
    assert g.shape == (1, 5, m.H, m.dk) and (g <= 0).all()
    assert F.mse_loss(g[..., 0], g[..., 1]) > 0  # channels decay differently
