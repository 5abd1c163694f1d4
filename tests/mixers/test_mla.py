"""Multi-head latent attention: the mixer contract against a per-token loop that materialises
keys and values (the decode path uses the absorbed form), and the cache bytes."""

import math

import pytest
import torch

import kvfree
from kvfree.mixers import build_mixer
from kvfree.mixers.mla import LatentKVCache
from tests.contract import MixerContract
from tests.mixers.test_attention import rope_ref


def mla_reference(m, x, state):
    B, T, _ = x.shape
    H, dh, dr = m.H, m.dh, m.dr
    cs, krs, T0 = [], [], 0
    if state is not None and state.length:
        cs, krs, T0 = [state.c], [state.k_rope], state.length
    ys = []
    for t in range(T):
        p = T0 + t
        c = m.kv_down(x[:, t])  # [B, d_c]
        kr = m.k_rope(x[:, t]) if dr else x.new_zeros(B, 0)
        q = m.q_proj(x[:, t]).view(B, H, dh + dr)
        qc, qr = q[..., :dh], q[..., dh:]
        if dr:
            kr, qr = rope_ref(kr, p, m.rope_base), rope_ref(qr, p, m.rope_base)
        cs.append(c[:, None])
        krs.append(kr[:, None])
        C, KR = torch.cat(cs, 1), torch.cat(krs, 1)  # [B, n, d_c], [B, n, d_r]
        K = m.k_up(C).view(B, -1, H, dh)  # materialised keys and values
        V = m.v_up(C).view(B, -1, H, dh)
        s = torch.einsum("bhd,bnhd->bhn", qc, K) + torch.einsum("bhr,bnr->bhn", qr, KR)
        w = torch.softmax(s / math.sqrt(dh + dr), dim=-1)
        o = torch.einsum("bhn,bnhd->bhd", w, V)
        ys.append(m.o_proj(o.reshape(B, H * dh)))
    return torch.stack(ys, 1), LatentKVCache(torch.cat(cs, 1), torch.cat(krs, 1), T0 + T)


class TestMLA(MixerContract):
    name = "mla"
    configs = [
        dict(num_heads=2),
        dict(num_heads=4, latent_dim=6, rope_dim=4),
        dict(positions="none", latent_dim=24),
    ]

    def reference(self, m, x, state, mask):
        return mla_reference(m, x, state)


def test_cache_is_the_latent_and_shared_rope_key():
    m = build_mixer("mla", 64, num_heads=4, latent_dim=16, rope_dim=8)
    with torch.no_grad():
        _, s = m(torch.randn(3, 50, 64))
    assert s.c.shape == (3, 50, 16) and s.k_rope.shape == (3, 50, 8)
    assert kvfree.state_bytes(s) == 3 * 50 * (16 + 8) * 4 == 3 * m.state_nbytes(50)
    full = build_mixer("attention", 64, num_heads=4)
    assert full.state_nbytes(50) / m.state_nbytes(50) == pytest.approx(2 * 64 / 24)


def test_bad_options():
    with pytest.raises(ValueError, match="rope_dim"):
        build_mixer("mla", 16, rope_dim=3)
    with pytest.raises(ValueError, match="positions"):
        build_mixer("mla", 16, positions="alibi")
