"""Attention with a quantised KV cache (``kv_bits=8|4|2``): the mixer contract against a per-token
loop with its own quantiser, the bytes at the stored precision, and the quantisation error."""

import math

import pytest
import torch

import kvfree
from kvfree.mixers import build_mixer
from kvfree.mixers.kv_quant import QuantKVCache, dequantize, quantize
from tests.contract import MixerContract
from tests.mixers.test_attention import token_qkv


def quant_ref(x, bits, group, scale_dtype):
    """Per-vector asymmetric min–max quantisation, written for the test: (x̂, codes 0..2^b−1
    unpacked, scale, min); the gradient flows through the scale and the min only."""
    g = x.reshape(*x.shape[:-1], -1, group)
    lo, hi = g.min(-1).values, g.max(-1).values
    scale = ((hi - lo) / (2**bits - 1)).to(scale_dtype)
    lo = lo.to(scale_dtype)
    s, m = scale.to(x.dtype)[..., None], lo.to(x.dtype)[..., None]
    codes = torch.where(s > 0, (g - m) / torch.where(s > 0, s, 1), 0).round().clamp(0, 2**bits - 1)
    codes = codes.detach()
    return (codes * s + m).reshape(x.shape), codes.reshape(x.shape), scale, lo


def pack(codes, bits):
    """8/bits codes per byte, the first channel of a byte in its low bits (written for the test)."""
    c, per = codes.to(torch.int64), 8 // bits
    return sum(c[..., j::per] * 2 ** (bits * j) for j in range(per)).to(torch.uint8)


def quant_attention_reference(m, x, state):
    """Per-token loop: quantise k_t, v_t on their own, attend over every x̂ so far."""
    B, T, _ = x.shape
    H, dh, g, b = m.H, m.dh, m.g, m.kv_bits
    args = (b, m.kv_group, m._scale_dtype(x.dtype))
    Ks, Vs, parts = [], [], []
    T0 = 0
    if state is not None and state.filled:
        T0 = state.length
        Ks, Vs = [state.keys(b, x.dtype)], [state.values(b, x.dtype)]
        parts = [(state.k_codes, state.k_scale, state.k_min, state.v_codes, state.v_scale,
                  state.v_min)]  # fmt: skip
    ys = []
    for t in range(T):
        q, k, v = token_qkv(m, x, t, T0 + t)
        kh, kc, ksc, kmn = quant_ref(k, *args)
        vh, vc, vsc, vmn = quant_ref(v, *args)
        Ks.append(kh[:, :, None])
        Vs.append(vh[:, :, None])
        parts.append(tuple(t[:, :, None] for t in (pack(kc, b), ksc, kmn, pack(vc, b), vsc, vmn)))
        K = torch.cat(Ks, 2).repeat_interleave(g, dim=1)
        V = torch.cat(Vs, 2).repeat_interleave(g, dim=1)
        w = torch.softmax(torch.einsum("bhd,bhnd->bhn", q, K) / math.sqrt(dh), dim=-1)
        ys.append(m.o_proj(torch.einsum("bhn,bhnd->bhd", w, V).reshape(B, H * dh)))
    cache = QuantKVCache(*(torch.cat(c, 2) for c in zip(*parts)), length=T0 + T)
    return torch.stack(ys, 1), cache


class TestQuantKVAttention(MixerContract):
    name = "attention"
    configs = [
        dict(kv_bits=8, q_block=16),
        dict(kv_bits=4, kv_group=4, num_heads=4, num_kv_heads=2, q_block=32),
        dict(kv_bits=8, kv_group=2, positions="none", num_heads=4, num_kv_heads=1),  # MQA
    ]
    # The fp32 model stores its scales in fp16 ("auto"), the float64 reference in float64: the
    # fp16 rounding of a scale moves codes by a level, an error of the order of 2^-b, by design.
    fp32_ratio = 0.02
    bf16_ratio = 0.1

    def reference(self, m, x, state, mask):
        return quant_attention_reference(m, x, state)


class TestQuantKVAttentionTwoBit(TestQuantKVAttention):
    """2-bit codes (KIVI-2): one level is a third of a group's range, so the fp16 rounding of a
    scale (fp32 model) or bf16 arithmetic that moves a code by a level moves the output by far
    more than at 4 or 8 bits; the float64 contract is as exact as for the others."""

    configs = [
        dict(kv_bits=2, kv_group=8, num_heads=2, q_block=8),
    ]
    fp32_ratio = 0.05
    bf16_ratio = 0.3


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_codes_round_trip_and_error_bound(bits):
    x = torch.randn(3, 5, 32, dtype=torch.float64)
    codes, scale, lo = quantize(x, bits, 8, torch.float32)
    assert codes.dtype == torch.uint8 and codes.shape[-1] == 32 * bits // 8
    xq = dequantize(codes, scale, lo, bits, torch.float64)
    step = scale.double().repeat_interleave(8, -1)
    assert ((xq - x).abs() <= step / 2 + 1e-6).all()  # within half a quantisation step
    _, ref_codes, _, _ = quant_ref(x, bits, 8, torch.float32)
    assert torch.equal(codes, pack(ref_codes, bits))


def test_bytes_at_the_stored_precision():
    for bits, codes in ((8, 32), (2, 8), (4, 16)):
        per_token = 2 * 2 * (codes + 2 * 2 * 2)
        m = build_mixer("attention", 64, num_heads=2, kv_bits=bits, kv_group=16)
        with torch.no_grad():
            _, s = m(torch.randn(1, 100, 64))
        # 2 (K, V) · n_kv 2 · (codes d_h·b/8 + (scale, min) × 2 groups of 16 × fp16)
        assert kvfree.state_bytes(s) == 100 * per_token == m.state_nbytes(100)
    full = build_mixer("attention", 64, num_heads=2)
    assert full.state_nbytes(100) / m.state_nbytes(100) == pytest.approx(512 / 96)  # 4-bit


def test_quantised_cache_is_close_to_the_exact_one():
    torch.manual_seed(0)
    exact = build_mixer("attention", 64, num_heads=2).double()
    x = torch.randn(2, 50, 64, dtype=torch.float64)
    y, _ = exact(x)
    errs = {}
    for bits, bound in ((8, 0.02), (4, 0.3), (2, 1.0)):
        m = build_mixer("attention", 64, num_heads=2, kv_bits=bits).double()
        m.load_state_dict(exact.state_dict())
        yq, _ = m(x)
        errs[bits] = err = ((yq - y).norm() / y.norm()).item()
        assert 0 < err < bound, (bits, err)
    assert errs[8] < errs[4] < errs[2], errs


def test_bad_options():
    with pytest.raises(ValueError, match="kv_bits"):
        build_mixer("attention", 16, kv_bits=3)
    with pytest.raises(ValueError, match="window"):
        build_mixer("attention", 16, kv_bits=8, window=4)
    with pytest.raises(ValueError, match="divide"):
        build_mixer("attention", 16, num_heads=2, kv_bits=8, kv_group=3)
    with pytest.raises(ValueError, match="4 codes per byte"):
        build_mixer("attention", 12, num_heads=2, kv_bits=2)  # d_h = 6
    with pytest.raises(ValueError, match="multiple of the codes per byte"):
        build_mixer("attention", 16, kv_bits=2, kv_residual=6)
    m = build_mixer("attention", 16, num_heads=2, kv_bits=8)
    with pytest.raises(TypeError, match="QuantKVCache"):
        m(torch.randn(1, 3, 16), build_mixer("attention", 16, num_heads=2).init_state(1))
