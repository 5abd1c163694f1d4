"""KV eviction (H2O, SnapKV): below the budget both are plain attention in every mode (values and
gradients); above it decode follows H2O's per-token rule exactly (a literal reference loop), a long
prompt is cut once by the documented scoring, and the bytes follow the formula."""

import math

import pytest
import torch
import torch.nn.functional as F

import kvfree
from kvfree.mixers import build_mixer
from tests.contract import F64, assert_close, grads_of, parallel, run_steps, stepwise
from tests.mixers.test_attention import token_qkv

D = 16


def pair(name, **opts):
    torch.manual_seed(0)
    plain = build_mixer("attention", D, num_heads=4, num_kv_heads=2).double()
    evict = build_mixer(name, D, num_heads=4, num_kv_heads=2, **opts).double()
    evict.load_state_dict(plain.state_dict())
    return plain, evict


def x_of(T, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, D, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("name", ["attention_h2o", "attention_snapkv"])
def test_below_the_budget_it_is_plain_attention(name):
    plain, m = pair(name, budget=64)
    for T in (1, 37):
        x = x_of(T)
        for fn in (parallel, stepwise):
            with torch.no_grad():
                y_ref, s_ref = plain(x)
                y, s = fn(m, x, None, None)
            assert_close(f"{name} {fn.__name__} T={T}", y_ref, y, **F64)
            K, V = s_ref.canonical()
            assert_close("kept keys", K, s.k, **F64)
            assert_close("kept values", V, s.v, **F64)
        out_only = lambda mm, xx, st, mk: (mm(xx)[0], None)  # noqa: E731
        ref, w = grads_of(out_only, plain, x, None, None)
        got, _ = grads_of(out_only, m, x, None, None, w)
        for k in ref:
            assert_close(f"gradient of {k}", ref[k], got[k], **F64)
        with torch.no_grad():  # chunked prefill
            y1, s1 = m(x[:, : T // 2])
            y2, _ = m(x[:, T // 2 :], s1)
        assert_close("chunked prefill", plain(x)[0], torch.cat([y1, y2], 1), **F64)


def h2o_reference(m, x):
    """H2O literally, per token and per (row, KV head): a list of [key, value, score]; every query
    head of the group adds its attention probabilities; over budget, drop the lowest score among
    all but the newest `recent`."""
    B, T, _ = x.shape
    kept = [[[] for _ in range(m.n_kv)] for _ in range(B)]
    ys = []
    for t in range(T):
        q, k, v = token_qkv(m, x, t, t)
        o = torch.zeros(B, m.H, m.dh, dtype=x.dtype)
        for b in range(B):
            for h in range(m.n_kv):
                entries = kept[b][h]
                entries.append([k[b, h], v[b, h], 0.0])
                K = torch.stack([e[0] for e in entries])
                V = torch.stack([e[1] for e in entries])
                for j in range(m.g):
                    p = torch.softmax(K @ q[b, h * m.g + j] / math.sqrt(m.dh), 0)
                    o[b, h * m.g + j] = p @ V
                    for e, pe in zip(entries, p.tolist()):
                        e[2] += pe
                if len(entries) > m.budget:
                    old = range(len(entries) - m.recent)
                    del entries[min(old, key=lambda i: entries[i][2])]
        ys.append(m.o_proj(o.reshape(B, -1)))
    return torch.stack(ys, 1), kept


def test_h2o_decode_follows_the_per_token_rule():
    _, m = pair("attention_h2o", budget=8, recent=3)
    x = x_of(30)
    with torch.no_grad():
        y, s = run_steps(m, x)
        y_ref, kept = h2o_reference(m, x)
    assert_close("H2O decode output", y_ref, y, **F64)
    for b in range(2):
        for h in range(m.n_kv):
            assert_close("kept keys", torch.stack([e[0] for e in kept[b][h]]), s.k[b, h], **F64)
            score = torch.tensor([e[2] for e in kept[b][h]], dtype=torch.float64)
            assert_close("scores", score, s.score[b, h], **F64)
    assert kvfree.state_bytes(s) == 2 * m.state_nbytes(30, torch.float64)  # per row, B = 2
    assert s.k.shape[2] == 8


def full_probs(plain, x):
    """Full causal attention probabilities [B, n_kv, g, T, T] of a plain layer."""
    B, T, _ = x.shape
    q, k, _ = zip(*(token_qkv(plain, x, t, t) for t in range(T)))
    q, k = torch.stack(q, 2), torch.stack(k, 2)  # [B, H, T, d], [B, n_kv, T, d]
    s = torch.einsum("bkgtd,bksd->bkgts", q.view(B, plain.n_kv, plain.g, T, -1), k)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    return torch.softmax((s / math.sqrt(plain.dh)).masked_fill(~causal, -math.inf), -1)


def test_h2o_cuts_a_long_prompt_by_its_column_sums():
    plain, m = pair("attention_h2o", budget=16, recent=4)
    x = x_of(50)
    with torch.no_grad():
        y_ref, s_ref = plain(x)
        y, s = m(x)
        mass = full_probs(plain, x).sum((2, 3))  # [B, n_kv, T]
    assert_close("prefill output = full attention", y_ref, y, **F64)
    heavy = mass[:, :, :46].topk(12, -1).indices
    keep = torch.cat([heavy, torch.arange(46, 50).expand(2, 2, 4)], -1).sort(-1).values
    K, _ = s_ref.canonical()
    assert_close("kept keys", torch.gather(K, 2, keep[..., None].expand(-1, -1, -1, 4)), s.k, **F64)
    assert_close("kept scores", torch.gather(mass, 2, keep), s.score, **F64)


def test_snapkv_cuts_once_by_the_observation_window_then_appends():
    plain, m = pair("attention_snapkv", budget=16, obs_window=4, pool=3)
    x = x_of(56)
    prompt, rest = x[:, :50], x[:, 50:]
    with torch.no_grad():
        y_ref, s_ref = plain(prompt)
        y, s = m(prompt)
        votes = full_probs(plain, prompt)[:, :, :, -4:, :46].sum((2, 3))  # [B, n_kv, 46]
        pooled = F.avg_pool1d(votes.reshape(4, 1, 46), 3, 1, 1).view(2, 2, 46)
    assert_close("prefill output = full attention", y_ref, y, **F64)
    top = pooled.topk(12, -1).indices
    keep = torch.cat([top, torch.arange(46, 50).expand(2, 2, 4)], -1).sort(-1).values
    K, V = s_ref.canonical()
    idx = keep[..., None].expand(-1, -1, -1, 4)
    assert_close("kept keys", torch.gather(K, 2, idx), s.k, **F64)
    with torch.no_grad():
        y_dec, s_dec = run_steps(m, rest, s)
    assert s_dec.k.shape[2] == 16 + 6  # decoded tokens are appended, nothing evicted
    # decode = attention over the kept tokens plus the new ones
    ks, vs = [torch.gather(K, 2, idx)], [torch.gather(V, 2, idx)]
    for t in range(6):
        q, k, v = token_qkv(m, x, 50 + t, 50 + t)
        ks.append(k[:, :, None])
        vs.append(v[:, :, None])
        Kt, Vt = torch.cat(ks, 2).repeat_interleave(2, 1), torch.cat(vs, 2).repeat_interleave(2, 1)
        p = torch.softmax(torch.einsum("bhd,bhnd->bhn", q, Kt) / 2.0, -1)
        ref = m.o_proj(torch.einsum("bhn,bhnd->bhd", p, Vt).reshape(2, -1))
        assert_close(f"decode step {t}", ref, y_dec[:, t], **F64)
    assert kvfree.state_bytes(s_dec) == 2 * 2 * 22 * 2 * 4 * 8  # K, V: B·n_kv·S·d_h, float64


def test_bad_options():
    with pytest.raises(ValueError, match="budget"):
        build_mixer("attention_h2o", D, budget=0)
    with pytest.raises(ValueError, match="recent"):
        build_mixer("attention_h2o", D, budget=4, recent=5)
    with pytest.raises(ValueError, match="obs_window"):
        build_mixer("attention_snapkv", D, budget=4, obs_window=4)
    with pytest.raises(ValueError, match="window"):
        build_mixer("attention_h2o", D, window=8)


@pytest.mark.parametrize(
    "name, opts",
    [
        ("attention_h2o", dict(budget=8, recent=3)),
        ("attention_snapkv", dict(budget=8, obs_window=3, pool=3)),
    ],
)
def test_a_padded_batch_keeps_and_computes_what_each_prompt_does_alone(name, opts):
    """Prompts of 23, 9, 1 and 15 tokens, left-padded, over a budget of 8: the padding is
    never read and evicted first, so each row's prefill and 12 decode steps (H2O evicting
    every step) equal its prompt's alone."""
    _, m = pair(name, **opts)
    lengths = (23, 9, 1, 15)
    T = max(lengths)
    x, xs = x_of(T, B=4, seed=3), x_of(12, B=4, seed=4)
    left_pad = torch.tensor([T - n for n in lengths])
    with torch.no_grad():
        y, s = m(x, left_pad=left_pad)
        ys, _ = run_steps(m, xs, s)
        for b, p in enumerate(left_pad.tolist()):
            y_b, s_b = m(x[b : b + 1, p:])
            ys_b, _ = run_steps(m, xs[b : b + 1], s_b)
            assert_close(f"row {b} prefill", y_b[0], y[b, p:], **F64)
            assert_close(f"row {b} decode", ys_b[0], ys[b], **F64)
