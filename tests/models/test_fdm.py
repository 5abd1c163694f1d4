"""The FDM model (docs/fdm.md §11): the block against a plain loop, decode = forward in float64,
chunked prefill, length independence, the cache mask, constant state, Freeze-Scan and HRBD
parameter counts, HRBD decoding."""

import copy
import heapq
import math

import pytest
import torch

import kvfree
from kvfree.mixers import fdm_cache as fc
from kvfree.mixers.fan import FanState
from kvfree.mixers.fdm_block import FDMState
from kvfree.models import LanguageModel, ModelConfig, preset
from kvfree.models.hrbd import HRBD
from kvfree.models.presets import paper_params
from kvfree.train.freeze_scan import FreezeScan, freeze_wave, is_wave_param
from kvfree.train.trainer import TrainConfig, Trainer
from tests.contract import MixerContract
from tests.mixers.test_fan import cplx, fan_step_ref, real
from tests.mixers.test_lgcache import cache_reference_loop

V = 40


# ----------------------------------------------------------------------------- the block


class TestFDMBlock(MixerContract):
    """The whole layer (wave + FFN + gated cache read) against a per-token loop built from the
    wave's complex-number reference and the cache's sort-based reference."""

    name = "fdm"
    configs = [
        dict(window=4, top_k=3, init_std=0.3, chunk_size=16),
        dict(variant="mqar", top_k=5, init_std=0.3),
        dict(variant="scan_only", init_std=0.3, chunk_size=8),
    ]
    lengths = (1, 37, 70)
    long_len = 2048

    def reference(self, m, x, state, mask):
        B, T, D = x.shape
        st = state if state is not None else m.init_state(B, dtype=x.dtype)
        ws = st.wave
        h1, h2, buf = cplx(ws.h1), cplx(ws.h2), ws.conv
        xh = m.ln_x(x) if m.ln_x is not None else m.ln_1(x)
        ys, ss = [], []
        for i in range(T):
            y, s, buf, h1, h2 = fan_step_ref(
                m.wave, xh[:, i], m.ln_1(x[:, i]), ws.pos + i, buf, h1, h2
            )
            ys.append(y)
            ss.append(s)
        z = x + torch.stack(ys, 1)
        h = z + m.ffn(m.ln_2(z))
        cache = st.cache
        if m.has_cache:
            s = torch.stack(ss, 1).detach()

            def read(b, i, keys):
                q = m.W_q(m.ln_h(h[b, i]))
                c = torch.softmax((m.W_k(keys) @ q) * D**-0.5, 0) @ m.W_v(keys)
                return torch.sigmoid(m.W_g(h[b, i])) * c

            c, cache = cache_reference_loop(xh, h, s, st.cache, m.window, m.top_k, read)
            h = h + c
        return h, FDMState(FanState(real(h1), real(h2), buf, ws.pos + T), cache)


# ----------------------------------------------------------------------------- models


def fdm_model(T_max=None, dtype=torch.float64, **opts) -> LanguageModel:
    torch.manual_seed(0)
    opts = {"window": 4, "top_k": 3, "init_std": 0.3, **opts}
    kw = dict(pos_emb="learned", max_len=T_max) if T_max else {}
    cfg = ModelConfig(
        vocab_size=V,
        d_model=16,
        layers=["fdm", "fdm"],
        norm="layer",
        mixer_options={"fdm": opts},
        init_std=0.3,
        **kw,
    )
    return LanguageModel(cfg).to(dtype).eval()


def make_ties(model):
    """β ≡ 0 and W_pos = 0: every token has the same s_eff, so top-K is decided by index."""
    with torch.no_grad():
        for blk in model.blocks:
            blk.wave.W_beta[-1].weight.zero_()
            blk.wave.W_beta[-1].bias.zero_()
        model.blocks[0].wave.shared.W_pos.weight.zero_()
    return model


CASES = {
    "T>>W+K": (lambda: fdm_model(), 64),
    "T<K": (lambda: fdm_model(top_k=16), 10),
    "ties": (lambda: make_ties(fdm_model(window=3, top_k=4)), 40),
    "learned-positions": (lambda: fdm_model(T_max=80, window=5, top_k=2), 50),
    "mqar-K4": (lambda: fdm_model(variant="mqar", window=None, top_k=4), 40),
    "scan-only": (lambda: fdm_model(variant="scan_only", window=None, top_k=None), 40),
}


def decode(model, ids, split):
    with torch.no_grad():
        logits, state = model.prefill(ids[:, :split])
        out = [logits]
        for t in range(split, ids.shape[1]):
            lt, state = model.step(ids[:, t], state)
            out.append(lt[:, None])
    return torch.cat(out, 1), state


@pytest.mark.parametrize("case", list(CASES))
def test_forward_equals_prefill_plus_step_fp64(case):
    build, T = CASES[case]
    model = build()
    ids = torch.randint(0, V, (3, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, s_full = model(ids)
    for split in (1, 7, T - 1):
        got, s = decode(model, ids, split)
        assert (got - full).abs().max().item() < 1e-9, (case, split)
        assert torch.equal(got.argmax(-1), full.argmax(-1))
        assert kvfree.state_bytes(s) == kvfree.state_bytes(s_full)
        for a, b in zip(s.layers, s_full.layers):
            if a.cache is not None:
                assert torch.equal(a.cache.heap_idx, b.cache.heap_idx)


def test_ties_resolve_to_the_earliest_tokens():
    model = make_ties(fdm_model(window=3, top_k=4))
    ids = torch.randint(0, V, (2, 30), generator=torch.Generator().manual_seed(2))
    _, state = decode(model, ids, 1)
    for layer in state.layers:
        assert layer.cache.heap_idx.tolist() == [[0, 1, 2, 3]] * 2


def test_fp32_decode_matches_forward():
    """docs/fdm.md §11.1: fp32 relative RMSE ≤ 1e-5 with 100 % greedy top-1 agreement."""
    model = fdm_model(dtype=torch.float32)
    ids = torch.randint(0, V, (2, 80), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full, _ = model(ids)
    got, _ = decode(model, ids, 5)
    rel = ((got - full).pow(2).mean().sqrt() / full.pow(2).mean().sqrt()).item()
    assert rel <= 1e-5, rel
    assert torch.equal(got.argmax(-1), full.argmax(-1))


@pytest.mark.parametrize("segment", [512, 8])
def test_chunked_prefill_at_arbitrary_splits(segment):
    model = fdm_model(segment=segment)
    ids = torch.randint(0, V, (2, 45), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full, s_full = model(ids)
        for a in (1, 3, 8, 9, 16, 30, 44):
            l1, s1 = model.prefill(ids[:, :a])
            l2, s2 = model.prefill(ids[:, a:], state=s1)
            assert (torch.cat([l1, l2], 1) - full).abs().max() < 1e-10, a
            for x, y in zip(s2.layers, s_full.layers):
                assert torch.equal(x.cache.heap_idx, y.cache.heap_idx)
                assert (x.cache.ring - y.cache.ring).abs().max() < 1e-12
                assert (x.wave.h2 - y.wave.h2).abs().max() < 1e-12


def test_prefix_logits_do_not_depend_on_total_length():
    """docs/fdm.md §4.1/§11.4: with the fixed T_train position term, a prefix's logits are the same
    whatever follows (the original's T−1 denominator changed them by up to 0.75)."""
    model = fdm_model(t_train=64)
    assert model.blocks[0].wave.shared.W_pos.weight.abs().min() > 0.01
    ids = torch.randint(0, V, (2, 120), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        long, _ = model(ids)
        short, _ = model(ids[:, :24])
    assert (long[:, :24] - short).abs().max() < 1e-12


def test_decode_rows_are_independent():
    """Batch > 1 decode keeps separate buffers per row (docs/fdm.md §4.6)."""
    model = fdm_model()
    ids = torch.randint(0, V, (3, 40), generator=torch.Generator().manual_seed(6))
    got, _ = decode(model, ids, 2)
    for b in range(3):
        alone, _ = decode(model, ids[b : b + 1], 2)
        assert (alone[0] - got[b]).abs().max() < 1e-12


def test_state_bytes_identical_after_300_and_30000_tokens():
    model = fdm_model(window=8, top_k=4, segment=64)
    sizes = {}
    for T in (300, 30_000):
        ids = torch.randint(0, V, (1, T), generator=torch.Generator().manual_seed(T))
        with torch.no_grad():
            _, s = model.prefill(ids)
        sizes[T] = kvfree.state_bytes(s)
    per_layer = 4 * 16 + 3 * 16 + (8 + 4) * 16 + 2 * 4  # wave + conv + cache (+ K s, K idx)
    assert sizes[300] == sizes[30_000] == 2 * per_layer * 8
    assert all(b.state_size(T) == per_layer for b in model.blocks for T in (1, 10**6))


def test_bf16_model_decodes_with_fp32_scores_and_constant_state():
    """A model cast to bf16 (decode benchmarks) still runs its score path and scan in fp32,
    keeps a constant state size, and stays close to the fp32 model."""
    ref = fdm_model(dtype=torch.float32)
    model = fdm_model(dtype=torch.bfloat16)
    ids = torch.randint(0, V, (2, 60), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        full, _ = model(ids)
        want, _ = ref(ids)
    got, state = decode(model, ids, 20)
    _, s16 = model.prefill(ids[:, :16])
    assert kvfree.state_bytes(state) == kvfree.state_bytes(s16)
    layer = state.layers[0]
    assert layer.cache.heap_s.dtype == layer.wave.h1.dtype == layer.wave.conv.dtype == torch.float32
    assert torch.isfinite(got.float()).all()
    for x in (full, got):
        rel = ((x.float() - want).norm() / want.norm()).item()
        assert rel < 0.05, rel


# ----------------------------------------------------------------------------- the mask


def mask_by_sort(s, W, K):
    B, T = s.shape
    m = torch.zeros(B, T, T, dtype=torch.bool)
    for b in range(B):
        for t in range(T):
            top = sorted(range(t), key=lambda j: (-s[b, j].item(), j))[:K]
            for j in range(t):
                m[b, t, j] = j >= t - W or j in top
    return m


def mask_by_heap(s, W, K):
    """The decoder's rule with Python's heapq: a min-heap of (s, −index); push while < K, else
    replace the minimum iff s_t > s_min (strict); the token is inserted after its read."""
    B, T = s.shape
    m = torch.zeros(B, T, T, dtype=torch.bool)
    for b in range(B):
        heap = []
        for t in range(T):
            for j in [j for _, j in ((e[0], -e[1]) for e in heap)] + list(range(max(0, t - W), t)):
                m[b, t, j] = True
            item = (s[b, t].item(), -t)
            if len(heap) < K:
                heapq.heappush(heap, item)
            elif K and item[0] > heap[0][0]:
                heapq.heapreplace(heap, item)
    return m


@pytest.mark.parametrize("W,K", [(0, 4), (3, 2), (5, 0), (2, 10), (4, 3)])
def test_mask_heap_built_equals_sort_built(W, K):
    g = torch.Generator().manual_seed(W * 10 + K)
    s = torch.randint(0, 4, (2, 35), generator=g).double()  # many ties
    m = fc.causal_topk_mask(s, W, K)
    assert torch.equal(m, mask_by_sort(s, W, K))
    assert torch.equal(m, mask_by_heap(s, W, K))


def test_mask_properties():
    g = torch.Generator().manual_seed(0)
    W, K, T = 6, 4, 60
    s = torch.randint(0, 5, (3, T), generator=g).double()
    m = fc.causal_topk_mask(s, W, K)
    t = torch.arange(T)
    assert not m[:, t, t].any(), "a token must not see itself"
    assert not (m & (t[None, :] >= t[:, None])).any(), "only past tokens are visible"
    rows = m.sum(-1)
    assert (rows <= W + K).all()
    assert torch.equal(rows[:, : K + 1], t[: K + 1].expand(3, -1))  # < K past: all visible
    s_tie = torch.zeros(1, T, dtype=torch.float64)  # all tied: the earliest K win
    mt = fc.causal_topk_mask(s_tie, W, K)
    for tt in range(K, T):
        assert mt[0, tt, :K].all() and not mt[0, tt, K : max(K, tt - W)].any()


def test_mask_row_sizes_at_paper_scale():
    """docs/fdm.md §3.1: T = 1024, W = 256, K = 16, random scores: rows hold ≤ W + K keys, and a
    full-window row holds 256 + (landmarks outside the window)."""
    s = torch.randn(1, 1024, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rows = fc.causal_topk_mask(s, 256, 16).sum(-1)[0]
    assert rows.max() <= 272 and rows[:257].tolist() == list(range(257))
    late = rows[512:].double()
    assert late.min() >= 256 and 258 <= late.mean() <= 272


# ----------------------------------------------------------------------------- shared W_pos / μ


def test_position_term_and_mu_are_shared_across_layers():
    model = fdm_model()
    names = [n for n, _ in model.named_parameters() if ".shared." in n]
    assert names == [
        "blocks.0.wave.shared.mu",
        "blocks.0.wave.shared.W_pos.weight",
        "blocks.0.wave.shared.W_pos.bias",
    ]
    assert model.blocks[1].wave.shared is model.blocks[0].wave.shared
    clone = copy.deepcopy(model)
    assert clone.blocks[1].wave.shared is clone.blocks[0].wave.shared
    assert clone.blocks[1].wave.shared is not model.blocks[0].wave.shared
    ids = torch.randint(0, V, (1, 20))
    before = model(ids)[0]
    with torch.no_grad():  # μ moves p in every layer, so changing it changes layer 1 too
        model.blocks[0].wave.shared.mu.add_(1.0)
    after = model(ids)[0]
    assert (after - before).abs().max() > 1e-6
    fresh = fdm_model()
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh(ids)[0], after)


# ----------------------------------------------------------------------------- counts


def meta_model(name, **over):
    with torch.device("meta"):
        return LanguageModel(preset(name, **over))


def test_137m_parameter_count_matches_the_paper():
    m = meta_model("fdm-137m")
    total = sum(p.numel() for p in m.parameters())
    assert total == paper_params("fdm-137m") == 137_063_356
    blk = m.blocks[0]
    cache = sum(
        p.numel()
        for mod in (blk.ln_x, blk.ln_h, blk.W_q, blk.W_k, blk.W_v, blk.W_g)
        for p in mod.parameters()
    )
    assert cache == 1_331_712  # docs/fdm.md §3.2
    tf = sum(p.numel() for p in meta_model("fdm-137m-transformer").parameters())
    assert abs(tf / total - 1) < 0.10  # §8.1 [project]: depth-matched within 10 %


def test_freeze_scan_counts_at_137m():
    m = meta_model("fdm-137m")
    counts = freeze_wave(m)
    assert counts == {"frozen": 14_919_672, "trainable": 122_143_684, "total": 137_063_356}
    assert not is_wave_param("blocks.0.W_q.weight") and is_wave_param("blocks.3.wave.W_i.bias")
    assert not is_wave_param("blocks.0.wave.shared.mu")  # μ and W_pos keep training


@pytest.mark.parametrize("heads,count", [(1, 333_504), (4, 1_330_560), (8, 2_659_968)])
def test_hrbd_trainable_counts_at_137m(heads, count):
    hr = HRBD(meta_model("fdm-137m"), heads)
    assert hr.num_parameters(trainable_only=True) == count


def test_freeze_wave_without_fdm_layers_raises():
    model = LanguageModel(ModelConfig(vocab_size=V, d_model=16, layers=["shortconv"]))
    with pytest.raises(ValueError, match="no FDM wave parameters"):
        freeze_wave(model)


# ----------------------------------------------------------------------------- Freeze-Scan


def tiny_batches(step):
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(0, V, (4, 17), generator=g)
    return {"inputs": ids[:, :-1], "labels": ids[:, 1:]}


def test_freeze_scan_schedule_in_the_trainer():
    model = fdm_model(dtype=torch.float32)
    sched = FreezeScan(phase1_steps=3, phase2_lr=5e-3, phase2_warmup=0, min_lr_ratio=0.1)
    cfg = TrainConfig(steps=7, lr=1e-2, warmup_steps=0, device="cpu", progress=False, log_every=1)
    tr = Trainer(model, cfg, tiny_batches, schedule=sched)
    snap = lambda: {n: p.detach().clone() for n, p in model.named_parameters()}  # noqa: E731
    p0 = snap()
    for _ in range(3):
        tr.train_step(tiny_batches(tr.step))
    p3 = snap()
    assert sched.phase == 1 and tr.frozen == 0
    assert any(not torch.equal(p0[n], p3[n]) for n in p0 if is_wave_param(n))
    for _ in range(4):
        tr.train_step(tiny_batches(tr.step))
    p7 = snap()
    wave = sum(p.numel() for n, p in model.named_parameters() if is_wave_param(n))
    assert sched.phase == 2 and sched.switched_at == 3
    assert tr.frozen == wave and tr.trainable == model.num_parameters() - wave
    for n in p0:
        changed = not torch.equal(p3[n], p7[n])
        assert changed != is_wave_param(n), n  # wave frozen, everything else moves
    assert sched.lr_at(3) == pytest.approx(5e-3)
    cos = 0.5 * (1 + math.cos(math.pi * 3 / 4))  # step 6 = 3/4 of phase 2 (steps 3..6)
    assert sched.lr_at(6) == pytest.approx(5e-3 * (0.1 + 0.9 * cos))
    # resume: a fresh schedule loaded in phase 2 re-freezes a model that was not frozen
    fresh_model = fdm_model(dtype=torch.float32)
    s2 = FreezeScan(phase1_steps=3, phase2_lr=5e-3)
    s2.load_state_dict(sched.state_dict())
    tr2 = Trainer(fresh_model, cfg, tiny_batches, schedule=s2)
    tr2.step = 5
    tr2.train_step(tiny_batches(5))
    assert s2.phase == 2 and tr2.frozen == wave
    with pytest.raises(ValueError, match="phase1_steps"):
        FreezeScan(phase1_steps=4).load_state_dict(sched.state_dict())


# ----------------------------------------------------------------------------- HRBD


def hrbd_model(heads=4, scale=0.2):
    base = fdm_model(T_max=64)
    hr = HRBD(base, heads).double().eval()
    if scale:
        with torch.no_grad():
            hr.beam_weight.normal_(0, scale, generator=torch.Generator().manual_seed(0))
            hr.beam_bias.normal_(0, scale, generator=torch.Generator().manual_seed(1))
    return hr


def test_hrbd_zero_init_is_the_base_model():
    hr = hrbd_model(scale=0)
    ids = torch.randint(0, V, (2, 30))
    with torch.no_grad():
        assert torch.equal(hr(ids)[0], hr.base(ids)[0])


def test_hrbd_decode_equals_forward():
    hr = hrbd_model()
    ids = torch.randint(0, V, (2, 40), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        full, _ = hr(ids)
        assert (full - hr.base(ids)[0]).abs().max() > 1e-3  # the beams do something
    got, _ = decode(hr, ids, 3)
    assert (got - full).abs().max() < 1e-9
    assert torch.equal(got.argmax(-1), full.argmax(-1))


def test_hrbd_penalty_and_what_trains():
    hr = hrbd_model(heads=3)
    W = hr.beam_weight
    want = sum(((W[i] @ W[j].T) ** 2).mean() for i in range(3) for j in range(i + 1, 3))
    assert torch.allclose(hr.aux_loss(), 0.01 * want)
    assert hrbd_model(heads=1).aux_loss().item() == 0.0
    hr = hrbd_model(heads=2, scale=0).float()
    base_before = {n: p.clone() for n, p in hr.base.named_parameters()}
    cfg = TrainConfig(steps=2, lr=1e-2, warmup_steps=0, device="cpu", progress=False)
    tr = Trainer(hr, cfg, tiny_batches)
    assert tr.trainable == 2 * (16 * 16 + 16) + 2 * 16
    tr.fit()
    assert all(torch.equal(p, base_before[n]) for n, p in hr.base.named_parameters())
    assert hr.beam_weight.abs().sum() > 0  # left zero-init
