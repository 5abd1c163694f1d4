"""Gated DeltaNet-2: the mixer contract against the delta-rule layers' per-token loop
(test_deltanet, its GDN-2 branch); the chunked core with channel-wise erase/write gates against
the naive recurrence (values and gradients); scalar gates give KDA's core."""

import pytest
import torch

from kvfree.mixers import build_mixer
from kvfree.mixers.delta_rule import delta_rule_chunked
from tests.contract import F64, MixerContract, assert_close
from tests.mixers.test_deltanet import compare_core, delta_layer_reference
from tests.mixers.test_kda import channel_inputs


class TestGDN2(MixerContract):
    name = "gdn2"
    configs = [
        dict(chunk_size=16),  # 2 heads of 8
        dict(chunk_size=64, num_heads=4, expand_v=2),
        dict(chunk_size=16, num_heads=1, head_dim=12, conv_size=3),
    ]

    def reference(self, m, x, state, mask):
        return delta_layer_reference(m, x, state, gated=True, gdn2=True)


def naive_gdn2_rule(q, k, v, b, S0, scale, g, w):
    """S_t = (I − k (b⊙k)ᵀ) Diag(e^{g_t}) S_{t−1} + k (w⊙v)ᵀ, o_t = scale·S_tᵀ q_t."""
    S, out = S0, []
    for t in range(q.shape[1]):
        S = g[:, t].exp()[..., None] * S
        kt, e = k[:, t], b[:, t] * k[:, t]
        S = S - kt[..., :, None] * torch.einsum("bhk,bhkv->bhv", e, S)[..., None, :]
        S = S + kt[..., :, None] * (w[:, t] * v[:, t])[..., None, :]
        out.append(scale * torch.einsum("bhkv,bhk->bhv", S, q[:, t]))
    return torch.stack(out, 1), S


def gdn2_inputs(T, g_scale):
    q, k, v, beta, S0, g = channel_inputs(T, g_scale)
    gen = torch.Generator().manual_seed(11)
    b = torch.rand(*k.shape, generator=gen, dtype=torch.float64)
    w = torch.rand(*v.shape, generator=gen, dtype=torch.float64)
    return q, k, v, b, S0, g, w


@pytest.mark.parametrize("chunk", [16, 64])
@pytest.mark.parametrize("decay", ["none", "head", "channel", "channel-strong"])
def test_gdn2_core_equals_recurrence(chunk, decay):
    """Values and gradients (of q, k, v, b, S0, g, w) of the chunked core with per-channel
    erase and write gates = the naive loop, on every decay branch of the core."""
    q, k, v, b, S0, g, w = gdn2_inputs(150, 8.0 if decay == "channel-strong" else 0.5)
    if decay == "none":
        g = None
    elif decay == "head":
        g = g[..., 0].contiguous()

    def naive(q, k, v, b, S0, scale, g, w):
        full = (
            torch.zeros_like(k) if g is None else (g if g.dim() == 4 else g[..., None].expand_as(k))
        )
        return naive_gdn2_rule(q, k, v, b, S0, scale, full, w)

    compare_core([q, k, v, b, S0] + ([] if g is None else [g]), naive, chunk, w=w)


def test_scalar_gates_are_kda():
    """b = w = β broadcast over the channels gives KDA's layer core exactly."""
    q, k, v, beta, S0, g = channel_inputs(100, 2.0)
    o_k, S_k = delta_rule_chunked(q, k, v, beta, S0, g=g, scale=0.4, chunk_size=16)
    b, w = beta[..., None].expand_as(k), beta[..., None].expand_as(v)
    o_2, S_2 = delta_rule_chunked(q, k, v, b, S0, g=g, w=w, scale=0.4, chunk_size=16)
    assert_close("output", o_k, o_2, **F64)
    assert_close("state", S_k, S_2, **F64)


def test_gates_are_per_channel():
    torch.manual_seed(0)
    m = build_mixer("gdn2", 16, chunk_size=16)
    x = torch.randn(1, 5, 16)
    _, _, _, b, w, g, _, _ = m._features(x, m.init_state(1).conv, step=False)
    assert b.shape == (1, 5, m.H, m.dk) and w.shape == (1, 5, m.H, m.dv)
    assert g.shape == (1, 5, m.H, m.dk) and (g <= 0).all()
