import math

import pytest
import torch
import torch.nn.functional as F

import kvfree
from kvfree.mixers import build_mixer
from kvfree.mixers.attention import KVCache
from kvfree.state import clone_state
from tests.contract import F64, MixerContract, assert_close, assert_states_close, run_steps


def rope_ref(x, p, base):
    """RoPE written independently of rope.py: pairs (x_i, x_{i+d/2}) as complex numbers."""
    half = x.shape[-1] // 2
    theta = base ** (-2.0 * torch.arange(half, dtype=torch.float64) / x.shape[-1])
    z = torch.complex(x[..., :half], x[..., half:]) * torch.polar(torch.ones_like(theta), p * theta)
    return torch.cat([z.real, z.imag], dim=-1).to(x.dtype)


def token_qkv(m, x, t, p):
    """q [B, H, d_h], k, v [B, n_kv, d_h] of token t of x, rotated at position p (RoPE)."""
    B = x.shape[0]
    q = m.q_proj(x[:, t]).view(B, m.H, m.dh)
    k = m.k_proj(x[:, t]).view(B, m.n_kv, m.dh)
    v = m.v_proj(x[:, t]).view(B, m.n_kv, m.dh)
    if m.positions == "rope":
        q, k = rope_ref(q, p, m.rope_base), rope_ref(k, p, m.rope_base)
    return q, k, v


def attention_reference(m, x, state):
    """Plain per-token loop: a Python list of (position, k, v), evicted by the visibility rule,
    and an explicit softmax per step. Returns (y, final compact KVCache)."""
    B, T, _ = x.shape
    H, n_kv, dh, g = m.H, m.n_kv, m.dh, m.g
    s, W = m.sinks, m.window
    rope = m.positions == "rope"
    entries = []
    T0 = 0
    if state is not None:
        K0, V0 = state.canonical()
        T0 = state.length
        ns = min(state.filled, s)
        poss = list(range(ns)) + list(range(T0 - (state.filled - ns), T0))
        entries = [(p, K0[:, :, i], V0[:, :, i]) for i, p in enumerate(poss)]
    ys = []
    for t in range(T):
        p = T0 + t
        q = m.q_proj(x[:, t]).view(B, H, dh)
        k = m.k_proj(x[:, t]).view(B, n_kv, dh)
        v = m.v_proj(x[:, t]).view(B, n_kv, dh)
        if rope and not m.rolling:
            q, k = rope_ref(q, p, m.rope_base), rope_ref(k, p, m.rope_base)
        entries.append((p, k, v))
        if W is not None:
            entries = [e for e in entries if e[0] < s or e[0] > p - W]
        K = torch.stack([e[1] for e in entries], 2)  # [B, n_kv, n, dh]
        V = torch.stack([e[2] for e in entries], 2)
        if m.rolling:  # positions = cache slots, query at the last slot
            K = torch.stack([rope_ref(K[:, :, i], i, m.rope_base) for i in range(K.shape[2])], 2)
            q = rope_ref(q, K.shape[2] - 1, m.rope_base)
        K, V = K.repeat_interleave(g, dim=1), V.repeat_interleave(g, dim=1)  # [B, H, n, dh]
        w = torch.softmax(torch.einsum("bhd,bhnd->bhn", q, K) / math.sqrt(dh), dim=-1)
        o = torch.einsum("bhn,bhnd->bhd", w, V)
        ys.append(m.o_proj(o.reshape(B, H * dh)))
    K = torch.stack([e[1] for e in entries], 2)
    V = torch.stack([e[2] for e in entries], 2)
    return torch.stack(ys, 1), KVCache(K, V, T0 + T, len(entries), 0, s, W or 0)


class TestAttention(MixerContract):
    name = "attention"
    configs = [
        dict(q_block=16),
        dict(num_heads=4, num_kv_heads=2, q_block=32),  # GQA
        dict(window=7, q_block=16),
        dict(window=6, sinks=3, q_block=16),  # StreamingLLM mask, absolute positions
        dict(window=5, sinks=2, sink_positions="rolling", q_block=16),
        dict(positions="none", num_heads=4, num_kv_heads=1, q_block=1000),  # MQA, no RoPE
    ]

    def reference(self, m, x, state, mask):
        return attention_reference(m, x, state)


def make(dtype=torch.float64, d=16, **cfg):
    torch.manual_seed(0)
    return build_mixer("attention", d, **cfg).to(dtype)


def randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize(
    "cfg", [dict(), dict(num_heads=4, num_kv_heads=2), dict(window=8, sinks=4), dict(window=5)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_bytes_exact(cfg, dtype):
    """state_bytes = 2·T·n_kv·d_h·b per batch row (2·min(T, s+W)·… for windows), after
    prefill and after decode steps (spare capacity is not counted)."""
    m = make(dtype, d=32, **cfg)
    b, B = torch.tensor([], dtype=dtype).element_size(), 3
    slots = m.slots or 10**9
    for T in (1, 5, 12, 37, 64):
        with torch.no_grad():
            _, st = m(randn(B, T, 32, dtype=dtype))
            assert kvfree.state_bytes(st) == 2 * min(T, slots) * m.n_kv * m.dh * b * B
            assert st.k.dtype == dtype
            for i in range(1, 20):
                _, st = m.step(randn(B, 32, seed=i, dtype=dtype), st)
                n = min(T + i, slots)
                assert kvfree.state_bytes(st) == 2 * n * m.n_kv * m.dh * b * B
                assert st.allocated_bytes() >= kvfree.state_bytes(st)
    assert m.fixed_memory == (m.window is not None)


def test_decode_append_is_amortised_o1():
    """Full attention grows its buffer geometrically: O(log T) reallocations over T steps and
    at most 2x (+16 slots) spare capacity; a window never reallocates once full."""
    for cfg, max_reallocs in ((dict(), 6), (dict(window=6, sinks=2), 1)):
        m = make(torch.float32, **cfg)
        st = m.init_state(1, dtype=torch.float32)
        ptrs = set()
        with torch.no_grad():
            for t in range(300):
                _, st = m.step(randn(1, 16, seed=t, dtype=torch.float32), st)
                ptrs.add(st.k.data_ptr())
                assert st.k.shape[2] <= max(16, 2 * st.filled)
        assert len(ptrs) <= max_reallocs + 1, f"{cfg}: {len(ptrs)} buffers for 300 appends"


def test_max_len_preallocates_and_prefill_writes_in_place():
    m = make(torch.float32, max_len=64)
    st = m.init_state(2, dtype=torch.float32)
    assert st.k.shape == (2, m.n_kv, 64, m.dh) and kvfree.state_bytes(st) == 0
    ptr = st.k.data_ptr()
    x = randn(2, 40, 16, dtype=torch.float32)
    with torch.no_grad():
        y, st = m(x[:, :30], st)
        for t in range(30, 40):
            _, st = m.step(x[:, t], st)
        y_ref, st_ref = make(torch.float32)(x[:, :30])
    assert st.k.data_ptr() == ptr, "prefill/decode reallocated a preallocated cache"
    assert_close("max_len output", y_ref, y, atol=1e-6, ratio=1e-6)
    assert st.filled == 40 and st.allocated_bytes() == 2 * 2 * 64 * m.n_kv * m.dh * 4


def test_segmented_window_prefill_rewrites_the_full_ring_in_place():
    """Segments after the first overwrite the full ring (old and new cache never both alive)
    and give what one pass gives; a cache made under inference_mode is copied outside it."""
    m = make(torch.float32, window=8, sinks=2)
    x = randn(2, 40, 16, dtype=torch.float32)
    with torch.no_grad():
        y_ref, s_ref = m(x)
        y1, st = m(x[:, :12])
        ptr = st.k.data_ptr()
        y2, st = m(x[:, 12:30], st)
        y3, st = m(x[:, 30:], st)
    assert st.k.data_ptr() == ptr and st.k.shape[2] == 10, "the ring was reallocated"
    assert_close("segments", y_ref, torch.cat([y1, y2, y3], 1), atol=1e-6, ratio=1e-6)
    assert_states_close("ring", s_ref, st, atol=1e-6, ratio=1e-6)
    with torch.inference_mode():
        _, st_inf = m(x[:, :12])
    with torch.no_grad():
        y, st2 = m(x[:, 12:30], st_inf)  # no "inplace update to inference tensor" error
    assert st2.k.data_ptr() != st_inf.k.data_ptr()
    assert_close("after inference_mode", y2, y, atol=1e-6, ratio=1e-6)


@pytest.mark.parametrize(
    "cfg", [dict(), dict(window=4, sinks=2), dict(window=4, sinks=2, sink_positions="rolling")]
)
def test_grad_state_is_not_written_in_place(cfg):
    """A state whose tensors are leaves requiring grad is left untouched by forward/step and
    receives gradients through both."""
    m = make(**cfg)
    with torch.no_grad():
        _, st = m(randn(2, 9, 16))
    st = KVCache(
        st.k.clone().requires_grad_(),
        st.v.clone().requires_grad_(),
        st.length,
        st.filled,
        st.start,
        st.sinks,
        st.window,
    )
    before = (st.k.detach().clone(), st.v.detach().clone())
    y1, s1 = m.step(randn(2, 16, seed=1), st)
    y2, s2 = m(randn(2, 3, 16, seed=2), st)
    (y1.sum() + y2.sum() + s1.k.sum() + s2.v.sum()).backward()
    assert torch.equal(st.k.detach(), before[0]) and torch.equal(st.v.detach(), before[1])
    assert st.k.grad is not None and st.k.grad.abs().sum() > 0
    assert st.v.grad is not None and st.v.grad.abs().sum() > 0


def _decode(m, x):
    with torch.no_grad():
        return run_steps(m, x)


def test_rolling_equals_absolute_within_context_and_differs_after():
    """Rolling positions = absolute positions while T <= s+W (identical outputs); after that
    only the sink scores change, so outputs differ."""
    s, W, T = 3, 6, 30
    x = randn(2, T, 16)
    y_abs, _ = _decode(make(window=W, sinks=s), x)
    y_rol, st = _decode(make(window=W, sinks=s, sink_positions="rolling"), x)
    n = s + W
    assert_close("rolling = absolute while T <= s+W", y_abs[:, :n], y_rol[:, :n], **F64)
    gap = (y_abs[:, n:] - y_rol[:, n:]).abs().amax(dim=(0, 2))
    assert (gap > 1e-6).all(), f"rolling should differ from absolute after s+W tokens: {gap}"
    # the cache holds raw (pre-RoPE) keys: they equal the un-rotated key projections
    k_raw = make(window=W, sinks=s).k_proj(x).view(2, T, -1, 8).transpose(1, 2)
    K, _ = st.canonical()
    keep = list(range(s)) + list(range(T - W, T))
    assert_close("rolling cache stores raw keys", k_raw[:, :, keep].detach(), K, **F64)


def test_rolling_without_sinks_equals_absolute():
    """With s = 0 the slot positions are the text positions shifted by a constant, and RoPE
    scores depend on differences only: rolling decode == absolute decode at every T."""
    x = randn(2, 40, 16)
    y_abs, _ = _decode(make(window=5), x)
    y_rol, _ = _decode(make(window=5, sink_positions="rolling"), x)
    assert_close("rolling (s=0) vs absolute", y_abs, y_rol, atol=1e-12, ratio=1e-10)


def test_positions_none_is_order_invariant_within_window():
    """Without RoPE, full attention at the last token is invariant to permuting the earlier
    tokens (a real check that no positional signal leaks in); with RoPE it is not."""
    x = randn(1, 12, 16)
    perm = torch.cat(
        [torch.randperm(11, generator=torch.Generator().manual_seed(3)), torch.tensor([11])]
    )
    for positions, invariant in (("none", True), ("rope", False)):
        m = make(positions=positions)
        with torch.no_grad():
            a, b = m(x)[0][:, -1], m(x[:, perm])[0][:, -1]
        assert torch.allclose(a, b, atol=1e-12) == invariant, positions


def test_long_parallel_forward_is_block_bounded(monkeypatch):
    """T = 8192: every SDPA call sees at most q_block·g query rows and only the keys the
    block can see, so no T×T score matrix is built."""
    calls = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        calls.append(
            (q.shape[-2], k.shape[-2], None if attn_mask is None else tuple(attn_mask.shape))
        )
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    T, qb = 8192, 512
    x = randn(1, T, 8, dtype=torch.float32)
    for cfg, key_bound in ((dict(), T), (dict(window=100, sinks=4), 4 + 100 + qb)):
        m = make(torch.float32, d=8, num_heads=2, num_kv_heads=1, q_block=qb, **cfg)
        calls.clear()
        with torch.no_grad():
            y, st = m(x)
        assert len(calls) == T // qb and torch.isfinite(y).all()
        assert max(c[0] for c in calls) == qb * m.g
        assert max(c[1] for c in calls) <= key_bound
        assert all(c[2] == (c[0], c[1]) for c in calls), "mask must be block-sized"
        assert kvfree.state_bytes(st) == m.state_size(T) * 4


def test_window_limits_context():
    """A token further back than W (and not a sink) has no influence on the output."""
    m = make(window=4, sinks=1)
    x = randn(1, 12, 16)
    x2 = x.clone()
    x2[:, 3] += 5.0  # position 3: not a sink, out of every window from t = 7 on
    with torch.no_grad():
        y, y2 = m(x)[0], m(x2)[0]
    assert torch.equal(y[:, 7:], y2[:, 7:]) and not torch.allclose(y[:, 3:7], y2[:, 3:7])
    x3 = x.clone()
    x3[:, 0] += 5.0  # the sink stays visible forever
    with torch.no_grad():
        assert not torch.allclose(m(x3)[0][:, -1], y[:, -1])


def test_ring_state_canonical_order():
    """After decode wraps the ring, canonical() is chronological and matches forward's."""
    m = make(window=5, sinks=2)
    x = randn(2, 23, 16)
    with torch.no_grad():
        _, s_par = m(x)
        _, s_dec = run_steps(m, x)
    assert s_dec.start != 0, "test needs a wrapped ring"
    assert_states_close("ring canonical", s_par, s_dec, **F64)


@pytest.mark.parametrize("policy", ["absolute", "rolling"])
def test_window_prefill_in_three_chunks_at_every_split(policy):
    """Chunked prefill (three pieces) = one forward, for splits before, inside and after the
    sinks and the first full window (s = 2, W = 4): exercises every cache layout."""
    m = make(window=4, sinks=2, sink_positions=policy, q_block=3)
    x = randn(2, 13, 16)
    with torch.no_grad():
        y, s = m(x)
        for a in range(0, 13):
            for b in (a, a + 1, min(13, a + 5)):
                y1, s1 = m(x[:, :a])
                y2, s2 = m(x[:, a:b], s1)
                y3, s3 = m(x[:, b:], s2)
                assert_close(f"split {a},{b}", y, torch.cat([y1, y2, y3], 1), **F64)
                assert_states_close(f"state split {a},{b}", s, s3, **F64)


def test_bad_options_and_states():
    with pytest.raises(ValueError, match="num_kv_heads"):
        make(num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="need a window"):
        make(sinks=4)
    with pytest.raises(ValueError, match="needs a window"):
        make(sink_positions="rolling")
    with pytest.raises(ValueError, match="even head_dim"):
        make(head_dim=5)
    with pytest.raises(ValueError, match="window must be"):
        make(window=0)
    with pytest.raises(ValueError, match="positions option"):
        make(positions="alibi")
    with pytest.raises(ValueError, match="q_block"):
        make(q_block=0)
    full, win = make(), make(window=4)
    with torch.no_grad():
        _, st = full(randn(2, 5, 16))
        with pytest.raises(ValueError, match="window"):
            win(randn(2, 3, 16), st)
        with pytest.raises(ValueError, match="batch"):
            full.step(randn(3, 16), st)
        with pytest.raises(TypeError, match="KVCache"):
            full.step(randn(2, 16), (st.k, st.v))
    assert kvfree.state_bytes(clone_state(st)) == kvfree.state_bytes(st)
