"""LocalGlobalCache (FDM's particle component, docs/fdm.md §3, §5): the mixer contract against a
plain per-token loop that keeps every past token and sorts (no ring, no heap), plus the
decode-store properties."""

import pytest
import torch

import kvfree
from kvfree.mixers import build_mixer
from kvfree.mixers import fdm_cache as fc
from kvfree.mixers.lgcache import LGCacheState
from tests.contract import MixerContract, run_steps


def cache_reference_loop(x_keys, x_query, s, state, W, K, read):
    """The visibility rule written plainly. ``x_keys`` [B, T, D] are the vectors stored for the
    new tokens, ``s`` [B, T] their scores, ``read(b, i, keys [n, D]) -> [D]`` the read of query i
    of row b. The past before ``state.pos`` is known only through the state: ring entries
    (window) and heap entries (top-K candidates). Returns (outputs [B, T, D], final state)."""
    B, T, D = x_keys.shape
    pos = state.pos
    outs, rings, heaps = [], [], []
    for b in range(B):
        ring = {}  # idx -> x  (all tokens whose x we hold for the window)
        for j in range(max(0, pos - W), pos):
            ring[j] = state.ring[b, j % W]
        cands = [
            (state.heap_s[b, k].item(), int(state.heap_idx[b, k]), state.heap_x[b, k])
            for k in range(K)
            if state.heap_idx[b, k] >= 0
        ]
        row = []
        for i in range(T):
            t = pos + i
            visible = {j: v for j, v in ring.items() if j >= t - W}
            for _, j, v in sorted(cands, key=lambda e: (-e[0], e[1]))[:K]:
                visible.setdefault(j, v)  # a window token is read from the ring
            keys = [visible[j] for j in sorted(visible)]
            row.append(
                read(b, i, torch.stack(keys)) if keys else torch.zeros(D, dtype=x_query.dtype)
            )
            ring[t] = x_keys[b, i]
            cands.append((s[b, i].item(), t, x_keys[b, i]))
        outs.append(torch.stack(row))
        end = pos + T
        rslots = [torch.zeros(D, dtype=x_keys.dtype) for _ in range(W)]
        for j in range(max(0, end - W), end):
            rslots[j % W] = ring[j]
        top = sorted(sorted(cands, key=lambda e: (-e[0], e[1]))[:K], key=lambda e: e[1])
        pad = K - len(top)
        heaps.append(
            (
                torch.stack([torch.zeros(D, dtype=x_keys.dtype)] * pad + [e[2] for e in top])
                if K
                else x_keys.new_zeros(0, D),
                torch.tensor([0.0] * pad + [e[0] for e in top], dtype=x_keys.dtype),
                torch.tensor([-1] * pad + [e[1] for e in top], dtype=torch.int64),
            )
        )
        rings.append(torch.stack(rslots) if W else x_keys.new_zeros(0, D))
    heap_x = torch.stack([h[0] for h in heaps])
    return torch.stack(outs), fc.CacheState(
        torch.stack(rings),
        heap_x,
        torch.stack([h[1] for h in heaps]),
        torch.stack([h[2] for h in heaps]),
        pos + T,
    )


class TestLocalGlobalCache(MixerContract):
    name = "lgcache"
    configs = [
        dict(window=4, top_k=3, init_std=0.5),  # T ≫ W + K: many evictions
        dict(window=0, top_k=5, init_std=0.5, score_bias=False),  # MQAR-style global only
        dict(window=6, top_k=0, init_std=0.5),  # sliding window only
        dict(window=3, top_k=40, init_std=0.5, segment=16),  # K > T early; segmented prefill
    ]

    def reference(self, m, x, state, mask):
        B, T, D = x.shape
        st = state.cache if state is not None else m.init_state(B, dtype=x.dtype).cache
        s = m.W_s(x)[..., 0].detach()

        def read(b, i, keys):
            q = m.W_q(x[b, i])
            logits = (m.W_k(keys) @ q) * D**-0.5
            if m.score_bias:
                logits = logits + m.W_s(keys)[:, 0]
            c = torch.softmax(logits, 0) @ m.W_v(keys)
            return torch.sigmoid(m.W_g(x[b, i])) * c

        y, cache = cache_reference_loop(x, x, s, st, m.window, m.top_k, read)
        return y, LGCacheState(cache)


def test_state_bytes_constant_to_30000_tokens():
    torch.manual_seed(0)
    m = build_mixer("lgcache", 16, window=8, top_k=4).double()
    sizes = set()
    for T in (300, 30_000):
        with torch.no_grad():
            _, s = m(torch.randn(1, T, 16, dtype=torch.float64))
        sizes.add(kvfree.state_bytes(s))
        assert kvfree.state_bytes(s) == m.state_size(T) * 8 == ((8 + 4) * 16 + 2 * 4) * 8
    assert len(sizes) == 1


def test_ties_go_to_the_earlier_token_in_decode_and_parallel():
    """All scores equal (W_s = 0): the K landmarks are the K earliest tokens, in both forms."""
    torch.manual_seed(0)
    m = build_mixer("lgcache", 8, window=2, top_k=3, init_std=0.5).double()
    with torch.no_grad():
        m.W_s.weight.zero_()
        x = torch.randn(2, 20, 8, dtype=torch.float64)
        y, s = m(x)
        y2, s2 = run_steps(m, x)
    assert s.cache.heap_idx.tolist() == [[0, 1, 2]] * 2
    assert torch.equal(s.cache.heap_idx, s2.cache.heap_idx)
    assert (y - y2).abs().max() < 1e-12


def test_first_token_reads_nothing_and_rows_are_independent():
    """t = 0 sees no key (c = 0, output 0); decoding a batch equals decoding rows alone."""
    torch.manual_seed(0)
    m = build_mixer("lgcache", 8, window=3, top_k=2, init_std=0.5).double()
    x = torch.randn(3, 15, 8, dtype=torch.float64)
    with torch.no_grad():
        y, _ = run_steps(m, x)
        assert y[:, 0].abs().max() == 0
        for b in range(3):
            yb, _ = run_steps(m, x[b : b + 1])
            assert (yb[0] - y[b]).abs().max() < 1e-13


def test_score_head_learns_only_through_the_bias():
    torch.manual_seed(0)
    x = torch.randn(2, 12, 8)
    for bias in (True, False):
        m = build_mixer("lgcache", 8, window=2, top_k=2, score_bias=bias)
        m(x)[0].square().sum().backward()
        g = m.W_s.weight.grad
        assert (g is not None and g.abs().sum() > 0) == bias


def test_bad_options():
    with pytest.raises(ValueError, match="window and top_k"):
        build_mixer("lgcache", 8, window=0, top_k=0)
    with pytest.raises(ValueError, match="window and top_k"):
        build_mixer("lgcache", 8, window=-1, top_k=2)
