"""SKA mode semantics (docs/ska.md §5, §11, §16 tests 1–4): prefix/masked modes (parallel = prefill
+ frozen decode after the prefix), chunk-causal = token-causal statistics at cS − 1, causality,
and the closed form at every position."""

import pytest
import torch

import kvfree
from kvfree.mixers import build_mixer
from tests.contract import F64, assert_close, assert_states_close, run_steps
from tests.mixers.ska_reference import (
    closed_form,
    core_out,
    features,
    gamma_of,
    randomize,
    stats,
    whitened_sigma,
)

D = 16


def make(**kw):
    torch.manual_seed(0)
    kw = {"num_heads": 2, "rank": 4, **kw}
    return randomize(build_mixer("ska", D, **kw), gamma=1.25).double()


def inputs(T, B=2, seed=0):
    return torch.randn(B, T, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def prefix_mask(B, T, a):
    return (torch.arange(T) < a).to(torch.float64).expand(B, T).clone()


def oracle(m, G, M, C, q):
    sig = whitened_sigma(G, M, m.cfg.eps, m.cfg.power_iters) if m.cfg.spectral_norm else None
    return closed_form(
        G, M, C, q, gamma=gamma_of(m), eta=m.eta, eps=m.cfg.eps, K=m.cfg.K, sigma=sig
    )


# ----- prefix / masked modes --------------------------------------------------------------
PREFIX_CONFIGS = [
    dict(mode="prefix"),
    dict(mode="prefix", norm="seqmax"),
    dict(mode="masked", beta_gate=True, K=1),
    dict(mode="prefix", K=0, spectral_norm=False),
]


@pytest.mark.parametrize(
    "cfg", PREFIX_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items())
)
class TestPrefixModes:
    T, A = 50, 23  # sequence length, prefix length

    def test_padded_batch_equals_each_sequence_alone(self, cfg):
        """Left padding (garbage inputs, mask 1 there too) writes nothing and does not count
        towards seqmax: each row's operator, outputs and decode steps are its own."""
        m = make(**cfg)
        lengths = (self.T, 31, 9)
        x, xs = inputs(self.T, B=3, seed=4), inputs(4, B=3, seed=5)
        left_pad = torch.tensor([self.T - n for n in lengths])
        mask = torch.ones(3, self.T, dtype=torch.float64)  # padding claims to write: ignored
        for b, n in enumerate(lengths):
            mask[b, self.T - n + min(n, self.A) :] = 0.0  # each row's own prefix of ≤ A tokens
        with torch.no_grad():
            y, s = m(x, None, mask, left_pad=left_pad)
            ys, _ = run_steps(m, xs, s)
            for b, p in enumerate(left_pad.tolist()):
                y_b, s_b = m(x[b : b + 1, p:], None, mask[b : b + 1, p:])
                ys_b, _ = run_steps(m, xs[b : b + 1], s_b)
                assert_close(f"row {b} output", y_b[0], y[b, p:], **F64)
                assert_close(f"row {b} decode", ys_b[0], ys[b], **F64)

    def test_parallel_equals_prefill_plus_frozen_decode(self, cfg):
        m = make(**cfg)
        x = inputs(self.T)
        mask = prefix_mask(2, self.T, self.A)
        with torch.no_grad():
            y, s = m(x, None, mask)
            for a in (self.A, self.A + 9):  # prefill ends at or after the prefix
                y1, s1 = m(x[:, :a], None, mask[:, :a])
                y2, s2 = run_steps(m, x[:, a:], kvfree.clone_state(s1))  # no mask: read only
                assert_close(f"decode after prefill of {a}", y[:, a:], y2, **F64)
                y3, s3 = m(x[:, a:], kvfree.clone_state(s1))  # parallel continuation
                assert_close(f"continuation after {a}", y[:, a:], y3, **F64)
                assert_states_close("continued state", s2, s3, **F64)
                for t1, t2 in ((s1.G, s2.G), (s1.M, s2.M), (s1.C, s2.C)):
                    assert torch.equal(t1, t2), "decoding without a mask must not write"
            # chunked prefill inside the prefix: identical from the prefix end on
            y1, s1 = m(x[:, :9], None, mask[:, :9])
            y2, s2 = m(x[:, 9:], s1, mask[:, 9:])
            assert_close("split inside prefix", y[:, self.A :], y2[:, self.A - 9 :], **F64)
            assert_states_close("split inside prefix, state", s, s2, **F64)
            # step-by-step with the mask reproduces the last positions too
            y4, s4 = run_steps(m, x, None, mask)
            assert_close("stepwise with mask", y[:, self.A :], y4[:, self.A :], **F64)
            assert_states_close("stepwise state", s, s4, **F64)

    def test_operator_from_prefix_applied_everywhere(self, cfg):
        m = make(**cfg)
        x = inputs(self.T)
        mask = prefix_mask(2, self.T, self.A)
        if m.mode == "masked":  # an arbitrary action mask
            mask = torch.rand(2, self.T, generator=torch.Generator().manual_seed(3)) < 0.6
            mask = mask.double()
        with torch.no_grad():
            y = core_out(m, x, None, mask)[0]
            scale = None
            if m.norm == "seqmax":
                B, T = x.shape[:2]
                z = m.k_proj(x).view(B, T, m.H, m.r)
                scale = (z.norm(dim=-1) * mask[..., None]).amax(1)[:, None, :, None]
            zh, qh, v = features(m, x, scale)
            w = mask.clone()
            if m.beta_proj is not None:
                beta = torch.sigmoid(m.beta_proj(x))  # [B, T, H]
            else:
                beta = torch.ones(2, self.T, m.H, dtype=x.dtype)
            # statistics by explicit sums (β-weighted, sqrt mode, binary mask)
            xw = (beta * w[..., None]).sqrt()[..., None] * zh
            G = torch.einsum("bthi,bthj->bhij", xw, xw)
            Mm = torch.einsum("bthi,bthj->bhij", xw[:, 1:], xw[:, :-1])
            C = torch.einsum("bthi,bthj->bhij", (beta * w[..., None]).sqrt()[..., None] * v, xw)
            ref = oracle(m, G[:, None], Mm[:, None], C[:, None], qh)
        assert_close("prefix operator at every position", ref, y, **F64)

    def test_state_bytes(self, cfg):
        m = make(**cfg)
        sizes = set()
        for T in (16, 3000):
            with torch.no_grad():
                _, s = m(inputs(T, B=1), None, prefix_mask(1, T, 10))
            sizes.add(kvfree.state_bytes(s))
        H, r, P = m.H, m.r, m.P
        assert sizes == {H * (2 * r * r + P * r + r + 1) * 8}


def test_seqmax_scope_all_matches_stepwise_only_at_the_end():
    m = make(mode="prefix", norm="seqmax", seqmax_scope="all")
    x = inputs(30)
    mask = prefix_mask(2, 30, 12)
    with torch.no_grad():
        y, s = m(x, None, mask)
        y2, s2 = run_steps(m, x, None, mask)
    assert_close("last position", y[:, -1], y2[:, -1], **F64)
    assert_states_close("final state (m over every token)", s, s2, **F64)
    assert (y[:, 12:-1] - y2[:, 12:-1]).abs().max() > 1e-6  # non-causal even for queries


def test_prefix_mode_is_not_causal_but_causal_modes_are():
    x = inputs(40)
    x2 = x.clone()
    x2[:, 25:] += torch.randn_like(x2[:, 25:])
    with torch.no_grad():
        for mode in ("token", "chunk"):
            m = make(mode=mode, chunk_size=8)
            y, y2 = m(x)[0], m(x2)[0]
            assert torch.equal(y[:, :25], y2[:, :25]), f"{mode}: future tokens leaked"
            assert (y[:, 25:] - y2[:, 25:]).abs().max() > 1e-6  # perturbation is visible
        m = make(mode="prefix")
        ones = torch.ones(2, 40, dtype=torch.float64)
        y, y2 = m(x, None, ones)[0], m(x2, None, ones)[0]
        assert (y[:, :25] - y2[:, :25]).abs().max() > 1e-6  # as documented: non-causal


def test_prefix_mode_errors():
    m = make(mode="prefix")
    x = inputs(10)
    with pytest.raises(ValueError, match="mask"):
        m(x)
    bad = torch.tensor([[1, 0, 1, 1, 0, 0, 0, 0, 0, 0]] * 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="prefix mask"):
        m(x, None, bad)
    make(mode="masked")(x, None, bad)  # arbitrary masks are fine in masked mode
    for mode in ("token", "chunk", "token_causal", "chunk_causal"):
        with pytest.raises(ValueError, match="seqmax"):
            build_mixer("ska", D, mode=mode, norm="seqmax")
    with pytest.raises(ValueError, match="mode"):
        build_mixer("ska", D, mode="tokens")


# ----- chunk-causal semantics -------------------------------------------------------------
@pytest.mark.parametrize("S", [8, 5])
def test_chunk_reads_token_statistics_at_chunk_start_minus_one(S):
    m = make(mode="chunk", chunk_size=S, K=2)
    T = 29
    x = inputs(T)
    with torch.no_grad():
        y = core_out(m, x)[0]  # [B, T, H, P]
        zh, qh, v = features(m, x)
        st = stats(zh, v)
        ref = torch.zeros_like(y)
        for t in range(S, T):
            G, M, C = st[S * (t // S) - 1]
            ref[:, t] = oracle(m, G, M, C, qh[:, t])
    assert torch.equal(y[:, :S], torch.zeros_like(y[:, :S])), "chunk 0 must output zero"
    assert_close("chunk c reads the statistics at cS - 1", ref, y, **F64)


def test_inclusive_boundary_adds_the_crossing_lag_pair():
    m = make(mode="chunk", chunk_size=6, boundary="inclusive")
    x = inputs(20)
    with torch.no_grad():
        y = core_out(m, x)[0]
        zh, qh, v = features(m, x)
        st = stats(zh, v)
        for t in range(6, 20):
            c0 = 6 * (t // 6)
            G, M, C = st[c0 - 1]
            M = M + zh[:, c0, :, :, None] * zh[:, c0 - 1, :, None, :]
            assert_close(f"t={t}", oracle(m, G, M, C, qh[:, t]), y[:, t], **F64)


def test_token_mode_closed_form_every_position():
    """docs/ska.md §16 test 1: parallel = recurrent = closed form at every t (K = 2, γ = 1.25)."""
    m = make(mode="token")
    x = inputs(33)
    with torch.no_grad():
        y = core_out(m, x)[0]
        zh, qh, v = features(m, x)
        ref = torch.stack([oracle(m, *s, qh[:, t]) for t, s in enumerate(stats(zh, v))], 1)
        state = m.init_state(2, dtype=torch.float64)
        ys = []
        for t in range(33):
            yt, state = core_out(m, x[:, t], state, step=True)
            ys.append(yt)
    scale = ref.abs().max().item()
    assert (y - ref).abs().max().item() <= 1e-10 * scale
    assert (torch.stack(ys, 1) - ref).abs().max().item() <= 1e-10 * scale
