"""KIVI's cache (``kv_bits`` with ``kv_residual=R``): the mixer contract against a per-token loop
with its own quantiser (keys per channel over complete blocks of R tokens, values per token, the
unfinished block exact), the bytes at the stored precision, and what per-channel keys buy."""

import math

import pytest
import torch

import kvfree
from kvfree.mixers import build_mixer
from kvfree.mixers import kv_quant as kvq
from kvfree.mixers.kv_kivi import KIVICache
from tests.contract import MixerContract
from tests.mixers.test_attention import token_qkv
from tests.mixers.test_kv_quant import pack, quant_ref


def kivi_reference(m, x, state):
    """Per token: keep every exact k, v; after token t, code each complete block (keys: every
    channel over the block's R tokens; values: each token alone) and read the complete blocks
    coded, the rest exact."""
    B, T, _ = x.shape
    H, dh, g, b, R = m.H, m.dh, m.g, m.kv_bits, m.kv_residual
    sdt = m._scale_dtype(x.dtype)
    if state is not None:  # the prefix, as its cache holds it: coded blocks + exact residual
        n = state.v_codes.shape[2]
        kb = kvq.dequantize(state.k_codes, state.k_scale, state.k_min, b, x.dtype)
        ks = list(kb.transpose(-1, -2).flatten(2, 3).unbind(2)) + list(state.k_res.unbind(2))
        vb = kvq.dequantize(state.v_codes, state.v_scale, state.v_min, b, x.dtype)
        vs = list(vb.unbind(2)) + list(state.v_res.unbind(2))
        T0, coded = state.length, n // R
    else:
        ks, vs, T0, coded = [], [], 0, 0
    blocks = {}  # block index -> (k̂ [B, n_kv, R, d_h], v̂, stored codes)
    ys = []
    for t in range(T):
        q, k, v = token_qkv(m, x, t, T0 + t)
        ks.append(k)
        vs.append(v)
        n_tok = T0 + t + 1
        for blk in range(coded, n_tok // R):
            if blk not in blocks:
                kblk = torch.stack(ks[blk * R : (blk + 1) * R], 2)  # [B, n_kv, R, d_h]
                vblk = torch.stack(vs[blk * R : (blk + 1) * R], 2)
                kh, kc, ksc, kmn = quant_ref(kblk.transpose(-1, -2), b, R, sdt)
                vh, vc, vsc, vmn = quant_ref(vblk, b, m.kv_group, sdt)
                codes = (pack(kc, b), ksc, kmn, pack(vc, b), vsc, vmn)
                blocks[blk] = (kh.transpose(-1, -2), vh, codes)
        K, V = torch.stack(ks, 2), torch.stack(vs, 2)
        for blk, (kh, vh, _) in blocks.items():
            K[:, :, blk * R : (blk + 1) * R], V[:, :, blk * R : (blk + 1) * R] = kh, vh
        K, V = K.repeat_interleave(g, dim=1), V.repeat_interleave(g, dim=1)
        w = torch.softmax(torch.einsum("bhd,bhnd->bhn", q, K) / math.sqrt(dh), dim=-1)
        ys.append(m.o_proj(torch.einsum("bhn,bhnd->bhd", w, V).reshape(B, H * dh)))
    end = T0 + T
    n_blocks = end // R
    parts = []
    if state is not None:
        parts.append(
            (state.k_codes, state.k_scale, state.k_min, state.v_codes, state.v_scale, state.v_min)
        )
    for blk in sorted(blocks):
        kc, ksc, kmn, vc, vsc, vmn = blocks[blk][2]
        parts.append((kc[:, :, None], ksc[:, :, None], kmn[:, :, None], vc, vsc, vmn))
    init = m.init_state(B, dtype=x.dtype)
    empty = (init.k_codes, init.k_scale, init.k_min, init.v_codes, init.v_scale, init.v_min)
    coded_parts = [torch.cat(c, 2) for c in zip(empty, *parts)]
    res_k = torch.stack(ks[n_blocks * R :], 2) if end > n_blocks * R else init.k_res
    res_v = torch.stack(vs[n_blocks * R :], 2) if end > n_blocks * R else init.v_res
    return torch.stack(ys, 1), KIVICache(*coded_parts, res_k, res_v, end)


class TestKIVIAttention(MixerContract):
    name = "attention"
    configs = [
        dict(kv_bits=8, kv_residual=8, q_block=16),
        dict(kv_bits=4, kv_residual=4, kv_group=4, num_heads=4, num_kv_heads=2, q_block=32),
        dict(kv_bits=8, kv_residual=5, positions="none", num_heads=4, num_kv_heads=1),  # MQA
    ]
    fp32_ratio = 0.02  # fp16 scales in fp32, float64 scales in the float64 reference
    bf16_ratio = 0.1

    def reference(self, m, x, state, mask):
        return kivi_reference(m, x, state)


class TestKIVIAttentionTwoBit(TestKIVIAttention):
    """2-bit codes (KIVI-2): one level is a third of a group's range, so the fp16 rounding of a
    scale (fp32 model) or bf16 arithmetic that moves a code by a level moves the output by far
    more than at 4 or 8 bits; the float64 contract is as exact as for the others."""

    configs = [
        dict(kv_bits=2, kv_residual=8, kv_group=8, num_heads=2, q_block=8),  # KIVI-2
    ]
    fp32_ratio = 0.05
    bf16_ratio = 0.3


@pytest.mark.parametrize("bits", [4, 2])
def test_bytes_at_the_stored_precision(bits):
    m = build_mixer("attention", 64, num_heads=2, kv_bits=bits, kv_residual=32, kv_group=16)
    for T in (20, 64, 100):
        with torch.no_grad():
            _, s = m(torch.randn(1, T, 64))
        assert kvfree.state_bytes(s) == m.state_nbytes(T)
    n, r = divmod(100, 32)  # 2 KV heads of 32: codes 32·b/8 B/token, fp16 scales, fp32 residual
    c = 32 * bits // 8
    keys = n * 32 * c + n * 2 * 32 * 2
    values = n * 32 * (c + 2 * 2 * 2)
    assert m.state_nbytes(100) == 2 * (keys + values + 2 * r * 32 * 4)


def test_kivi_loses_less_than_per_token_codes_on_outlier_key_channels():
    """KIVI's reason: keys with a few large channels lose less to 4-bit codes per channel than
    per token, where each token's code range is set by its outliers (measured: relative output
    error 0.077 vs 0.146; part of it is the exact residual that the newest tokens are read
    from)."""
    torch.manual_seed(0)
    exact = build_mixer("attention", 32, num_heads=2, positions="none").double()
    with torch.no_grad():
        exact.k_proj.weight[:3] *= 25  # outlier key channels in head 0
    x = torch.randn(2, 64, 32, dtype=torch.float64)
    y, _ = exact(x)
    errs = {}
    for name, opts in (("token", {}), ("kivi", {"kv_residual": 16})):
        m = build_mixer("attention", 32, num_heads=2, positions="none", kv_bits=4, **opts)
        m = m.double()
        m.load_state_dict(exact.state_dict())
        errs[name] = ((m(x)[0] - y).norm() / y.norm()).item()
    assert errs["kivi"] < 0.7 * errs["token"], errs


def test_bad_options():
    with pytest.raises(ValueError, match="kv_residual"):
        build_mixer("attention", 16, kv_residual=8)  # no kv_bits
    with pytest.raises(ValueError, match="multiple of the codes per byte"):
        build_mixer("attention", 16, kv_bits=4, kv_residual=5)
    m = build_mixer("attention", 16, num_heads=2, kv_bits=8, kv_residual=4)
    with pytest.raises(TypeError, match="KIVICache"):
        m(torch.randn(1, 3, 16), build_mixer("attention", 16, num_heads=2).init_state(1))
    assert not m.supports_padding
