"""Zoology MQAR: exact semantics, power-law placement statistics (docs/tasks.md §1.1–1.3)."""

import time

import numpy as np
import pytest
import torch

from kvfree.tasks import IGNORE, make
from kvfree.tasks.mqar import Config, _assemble, grid_segments, power_law_weights


def positions(d):
    sc = d.labels != IGNORE
    return np.nonzero(sc)[1].reshape(len(d), -1)


def test_worked_example():
    cfg = Config(
        num_examples=1, input_seq_len=16, num_kv_pairs=2, vocab_size=32, random_non_queries=False
    )
    inputs, labels, prefix = _assemble(
        cfg, np.array([[2, 7]]), np.array([[20, 28]]), np.array([[2, 5]])
    )
    assert inputs[0].tolist() == [2, 20, 7, 28, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 7, 0]
    assert {i: v for i, v in enumerate(labels[0]) if v != IGNORE} == {8: 20, 14: 28}
    assert prefix[0].tolist() == [1] * 8 + [0] * 8  # up to the first query key (index 8)


@pytest.mark.parametrize("mode", ["fast", "zoology_compatible"])
@pytest.mark.parametrize("L,K,P", [(64, 4, 1), (128, 8, 2), (16, 2, 1)])
def test_semantics(mode, L, K, P):
    V = 32 if L == 16 else 512
    d = make(
        "mqar",
        11,
        num_examples=300,
        input_seq_len=L,
        num_kv_pairs=K,
        vocab_size=V,
        num_passes=P,
        random_non_queries=False,
        mode=mode,
    )
    ctx = 2 * K * P
    assert d.inputs.shape == (300, L) and (d.inputs >= 0).all() and (d.inputs < V).all()
    keys, vals = d.inputs[:, 0 : 2 * K : 2], d.inputs[:, 1 : 2 * K : 2]
    assert (keys >= 1).all() and (keys < V // 2).all() and (vals >= V // 2).all()
    assert all(len(set(r)) == K for r in keys) and all(len(set(r)) == K for r in vals)
    assert (d.inputs[:, :ctx] == np.tile(d.inputs[:, : 2 * K], (1, P))).all()  # JRT passes
    pos = positions(d)
    assert pos.shape == (300, K)  # exactly K scored positions
    assert ((pos - ctx) % 2 == 0).all() and (pos >= ctx).all()  # queries on even offsets
    # the label is the value bound to the query key, predicted at the key's position
    q = np.take_along_axis(d.inputs, pos, 1)
    lab = np.take_along_axis(d.labels, pos, 1)
    j = (q[:, :, None] == keys[:, None, :]).argmax(-1)
    assert (np.take_along_axis(vals, j, 1) == lab).all()
    assert all(sorted(r) == list(range(K)) for r in j)  # every pair queried once
    # without filler, every non-query slot of the query region is 0 (the value is not shown)
    region = d.inputs[:, ctx:].copy()
    np.put_along_axis(region, pos - ctx, 0, 1)
    assert (region == 0).all()
    # the prefix mask covers every position before the first query key and nothing after
    assert (d.masks["prefix"].sum(1) == pos.min(1)).all()
    assert (d.masks["prefix"] == (np.arange(L) < pos.min(1)[:, None])).all()


def test_zoology_compatible_matches_reference_loop():
    """zoology's RNG call order, re-done as a plain per-row loop with the legacy global RNG."""
    V, L, K, n, seed = 256, 64, 4, 40, 2**31 + 5
    np.random.seed(seed)
    keys = [np.random.choice(np.arange(1, V // 2), replace=False, size=K) for _ in range(n)]
    vals = [np.random.choice(np.arange(V // 2, V), replace=False, size=K) for _ in range(n)]
    p = 0.01 * np.arange(1, (L - 2 * K) // 2 + 1) ** (0.01 - 1)
    gaps = [
        np.random.choice(np.arange((L - 2 * K) // 2), replace=False, p=p / p.sum(), size=K)
        for _ in range(n)
    ]
    torch.manual_seed(123)
    fill = torch.randint(V, size=(n, L)).numpy()
    ref = np.zeros((n, L), np.int64)
    for i in range(n):
        seq = [0] * (L + 1)
        for j in range(K):
            seq[2 * j], seq[2 * j + 1] = keys[i][j], vals[i][j]
            seq[2 * K + 2 * gaps[i][j]] = keys[i][j]
        ref[i] = [t if t != 0 else fill[i, t_i] for t_i, t in enumerate(seq[:-1])]
    d = make(
        "mqar",
        seed,
        num_examples=n,
        input_seq_len=L,
        num_kv_pairs=K,
        vocab_size=V,
        mode="zoology_compatible",
        torch_seed=123,
    )
    assert (d.inputs == ref).all()


def test_determinism_by_seed():
    a = make("mqar", 3, num_examples=50, input_seq_len=64, num_kv_pairs=4)
    b = make("mqar", 3, num_examples=50, input_seq_len=64, num_kv_pairs=4)
    c = make("mqar", 4, num_examples=50, input_seq_len=64, num_kv_pairs=4)
    assert (a.inputs == b.inputs).all() and (a.labels == b.labels).all()
    assert (a.inputs != c.inputs).any()


@pytest.mark.parametrize("mode,n", [("fast", 6000), ("zoology_compatible", 2000)])
def test_power_law_statistics(mode, n):
    """docs/tasks.md §1.2 at L = 256, K = 16: median query position 64, 42 % in the first 10 % of
    the query region, order bias (rank correlation 0.21, first query's pair 3.8, last 8.3)."""
    d = make("mqar", 2**31 + 1, num_examples=n, input_seq_len=256, num_kv_pairs=16, mode=mode)
    pos = positions(d)  # sorted by position
    assert 62 <= np.median(pos) <= 66
    assert abs(((pos - 32) < 0.1 * 224).mean() - 0.42) < 0.02
    keys = d.inputs[:, 0:32:2]
    pair = (np.take_along_axis(d.inputs, pos, 1)[:, :, None] == keys[:, None, :]).argmax(-1)
    rank = np.broadcast_to(np.arange(16), pair.shape)
    assert abs(np.corrcoef(rank.ravel(), pair.ravel())[0, 1] - 0.21) < 0.025
    assert abs(pair[:, 0].mean() - 3.8) < 0.2 and abs(pair[:, -1].mean() - 8.3) < 0.2


def test_fast_and_zoology_modes_share_the_gap_distribution():
    kw = dict(num_examples=3000, input_seq_len=128, num_kv_pairs=8, random_non_queries=False)
    hist = []
    for mode in ("fast", "zoology_compatible"):
        pos = positions(make("mqar", 9, mode=mode, **kw))
        hist.append(np.bincount(pos.ravel(), minlength=128) / pos.size)
    assert 0.5 * np.abs(hist[0] - hist[1]).sum() < 0.04  # total variation


def test_fake_queries_and_filler():
    d = make("mqar", 5, num_examples=10000, input_seq_len=256, num_kv_pairs=16)
    keys = d.inputs[:, 0:32:2]
    filler = np.ones(d.inputs.shape, bool)
    filler[:, :32] = False
    filler[d.labels != IGNORE] = False
    fake = ((d.inputs[:, :, None] == keys[:, None, :]).any(-1) & filler).sum(1).mean()
    assert abs(fake - 208 * 16 / 8192) < 0.03  # 208 fillers, each a key with p = 16/8192
    # filler covers the whole vocabulary, values included
    assert (d.inputs[filler] >= 4096).mean() == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("L,K", [(64, 16), (128, 32), (256, 64)])
def test_saturated_slices_are_deterministic(L, K):
    pos = positions(make("mqar", 1, num_examples=50, input_seq_len=L, num_kv_pairs=K))
    assert (pos == np.arange(2 * K, L, 2)).all()


def test_power_law_weights_and_errors():
    p = power_law_weights(100, 0.01)
    assert p.sum() == pytest.approx(1) and (np.diff(p) < 0).all()
    assert p[0] / p[1] == pytest.approx(2**0.99)
    with pytest.raises(ValueError, match="even"):
        make("mqar", 1, input_seq_len=63)
    with pytest.raises(ValueError, match="2KP"):
        make("mqar", 1, input_seq_len=64, num_kv_pairs=17)
    with pytest.raises(ValueError, match="exceed"):
        make("mqar", 1, input_seq_len=64, vocab_size=64)


def test_standard_grids():
    train = grid_segments("based", "train")
    test = grid_segments("based", "test")
    assert [(s["input_seq_len"], s["num_kv_pairs"]) for s in test] == [
        (64, 4),
        (64, 8),
        (64, 16),
        (128, 32),
        (256, 64),
        (512, 128),
        (1024, 256),
    ]
    assert max(s["input_seq_len"] for s in train) == 256  # train ≤ 256, test up to 1024
    assert sum(s["num_examples"] for s in train) == 180_000
    with pytest.raises(ValueError, match="unknown MQAR grid"):
        grid_segments("nope", "train")


@pytest.mark.slow
def test_vectorised_speed():
    t0 = time.perf_counter()
    make("mqar", 1, num_examples=100_000, input_seq_len=256, num_kv_pairs=16)
    assert time.perf_counter() - t0 < 20


# sha256(inputs ‖ labels as int64) of datasets made by zoology dbcb60d's own `multiquery_ar`
# (run once, read-only, with torch.manual_seed(torch_seed) right before the call), keyed by
# (V, n, L, K, seed, torch_seed, random_non_queries).
ZOOLOGY_DBCB60D = {
    (
        8192,
        64,
        64,
        4,
        0,
        0,
        True,
    ): "a5ccdde1981305a53577929b6fe34c0558aa8b5cd6eb901378bed9c2b5d59017",
    (
        8192,
        32,
        256,
        16,
        2**31 + 7,
        123,
        True,
    ): "3c01f065caf11f0789b545d0a161f2112efd8488e5e5b525f7553c2ae45df2a9",
    (
        512,
        50,
        128,
        8,
        17,
        5,
        False,
    ): "c48a5bcf666573b1295732ee102d410087f12f86d1d7eed86a6912a60784faf2",
}


@pytest.mark.parametrize("key", list(ZOOLOGY_DBCB60D))
def test_zoology_compatible_matches_zoology_hashes(key):
    import hashlib

    V, n, L, K, seed, tseed, rnq = key
    d = make(
        "mqar",
        seed,
        num_examples=n,
        input_seq_len=L,
        num_kv_pairs=K,
        vocab_size=V,
        random_non_queries=rnq,
        mode="zoology_compatible",
        torch_seed=tseed,
    )
    digest = hashlib.sha256(
        d.inputs.astype(np.int64).tobytes() + d.labels.astype(np.int64).tobytes()
    ).hexdigest()
    assert digest == ZOOLOGY_DBCB60D[key]
