"""Shared task conventions: seeds, vectorised draws, TaskData, scoring, registry."""

import numpy as np
import pytest

from kvfree.tasks import (
    IGNORE,
    TaskData,
    check_seed,
    derive_seed,
    example_accuracy,
    make,
    make_rng,
    seed_split,
    task_config,
    task_names,
)
from kvfree.tasks.base import distinct_draws, random_slots
from kvfree.tasks.suite import compositions


def test_seed_ranges():
    assert seed_split(0) == "train" and seed_split(2**31 - 1) == "train"
    assert seed_split(2**31) == "test" and seed_split(2**32 - 1) == "test"
    for bad in (-1, 2**32):
        with pytest.raises(ValueError, match="outside"):
            seed_split(bad)
    with pytest.raises(ValueError, match="test seed"):
        check_seed(5, "test")
    with pytest.raises(ValueError, match="split must be"):
        check_seed(5, "val")


def test_derive_seed_stable_and_in_range():
    a = derive_seed("train", "mqar_gap", 8, 256, 0)
    assert a == derive_seed("train", "mqar_gap", 8, 256, 0)
    assert a != derive_seed("train", "mqar_gap", 8, 256, 1)
    assert 0 <= a < 2**31
    assert 2**31 <= derive_seed("test", "mqar_gap", 8, 256, 0) < 2**32
    # PCG64 streams from make_rng are reproducible
    assert (make_rng(a).integers(0, 100, 10) == make_rng(a).integers(0, 100, 10)).all()


@pytest.mark.parametrize("lo,hi,k", [(1, 4096, 16), (0, 64, 32), (0, 8, 8)])
def test_distinct_draws(lo, hi, k):
    x = distinct_draws(make_rng(1), 4000, k, lo, hi)
    assert x.shape == (4000, k) and x.min() >= lo and x.max() < hi
    s = np.sort(x, 1)
    assert (s[:, 1:] != s[:, :-1]).all()
    # uniform marginal of the first draw: every value about equally often
    counts = np.bincount(x[:, 0] - lo, minlength=hi - lo)
    expected = 4000 / (hi - lo)
    if expected >= 50:
        assert abs(counts - expected).max() < 5 * np.sqrt(expected)
    with pytest.raises(ValueError, match="distinct"):
        distinct_draws(make_rng(1), 2, hi - lo + 1, lo, hi)


def test_compositions_and_slots():
    rng = make_rng(3)
    total = np.array([0, 5, 17, 40])
    c = compositions(rng, total, 4)
    assert (c >= 0).all() and (c.sum(1) == total).all()
    # uniform over compositions: 3 into 2 parts -> (0,3),(1,2),(2,1),(3,0) equally likely
    first = compositions(rng, np.full(20000, 3), 2)[:, 0]
    assert np.allclose(np.bincount(first) / 20000, 0.25, atol=0.02)
    s = random_slots(rng, np.array([5, 10]), 3)
    assert (np.diff(s, axis=1) > 0).all() and s[0].max() < 5


def test_taskdata_validation_concat_and_groups():
    a = make("mqar_gap", 1, num_examples=6, num_kv_pairs=2, gap=4)
    b = make("mqar_gap", 2, num_examples=4, num_kv_pairs=4, gap=8)
    c = TaskData.concat([a, b])
    assert c.inputs.shape == (10, 24)
    assert (c.labels[:6, 12:] == IGNORE).all() and (c.inputs[:6, 12:] == 0).all()
    assert (c.masks["prefix"][:6, 12:] == 0).all()
    g = c.groups(["num_kv_pairs", "gap"])
    assert {k: len(v) for k, v in g.items()} == {(2, 4): 6, (4, 8): 4}
    with pytest.raises(ValueError, match="unknown slice"):
        c.groups(["nope"])
    with pytest.raises(ValueError, match=r"\[N, L\]"):
        TaskData(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="one value per example"):
        TaskData(np.zeros((2, 3)), np.zeros((2, 3)), {"x": np.zeros(3)})
    batch = c.batch([0, 7], mask="prefix")
    assert batch["inputs"].shape == (2, 24) and batch["mask"].dtype.is_floating_point
    with pytest.raises(KeyError, match="no 'action' mask"):
        c.batch(mask="action")


def test_example_accuracy():
    labels = np.array([[IGNORE, 3, IGNORE, 4], [IGNORE] * 4, [1, 1, 1, 1]])
    pred = np.array([[9, 3, 9, 0], [0, 0, 0, 0], [1, 1, 0, 0]])
    acc = example_accuracy(pred, labels)
    assert acc[0] == 0.5 and np.isnan(acc[1]) and acc[2] == 0.5


def test_registry_and_strict_options():
    assert {
        "mqar",
        "mqar_gap",
        "fdm_mqar",
        "niah",
        "multihop",
        "sysprompt",
        "tooltrace",
        "commonword",
    } <= set(task_names())
    with pytest.raises(ValueError, match="did you mean 'num_kv_pairs'"):
        task_config("mqar_gap", num_kv_pair=3)
    with pytest.raises(ValueError, match="unknown task"):
        make("mqar_gapp", 1)
    d = make("mqar_gap", 7, num_examples=3)
    assert d.meta["task"] == "mqar_gap" and d.meta["seed"] == 7 and d.vocab_size == 192
