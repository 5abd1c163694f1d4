"""FDM's MQAR generator (docs/tasks.md §3): layout, labels, determinism, errors."""

import numpy as np
import pytest

from kvfree.tasks import IGNORE, example_accuracy, make
from kvfree.tasks.fdm_mqar import PAD, SEP, SETTINGS, VOCAB


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_layout_and_labels(setting):
    L, n = SETTINGS[setting]
    d = make("fdm_mqar", 42, num_examples=300, seq_len=L, num_kv_pairs=n)
    x, y = d.inputs, d.labels
    assert x.shape == y.shape == (300, L) and d.vocab_size == VOCAB == 522
    keys, values = x[:, 0 : 2 * n : 2], x[:, 1 : 2 * n : 2]
    assert ((keys >= 0) & (keys < 128)).all() and ((values >= 128) & (values < 256)).all()
    assert all(len(set(r)) == n for r in keys.tolist()), "keys are distinct per sequence"
    q0 = 2 * n
    assert (x[:, q0 : q0 + 8 : 2] == SEP).all()
    qk = x[:, q0 + 1 : q0 + 8 : 2]
    assert all(len(set(r)) == 4 for r in qk.tolist()), "queried keys are distinct"
    assert (x[:, q0 + 8 :] == PAD).all()
    scored = y != IGNORE
    assert scored.sum(1).tolist() == [4] * 300
    assert (np.nonzero(scored)[1].reshape(300, 4) == np.arange(q0 + 1, q0 + 8, 2)).all()
    for r in range(300):  # the label at a query key is the value stored with that key
        table = dict(zip(keys[r].tolist(), values[r].tolist()))
        assert [table[k] for k in qk[r].tolist()] == y[r, q0 + 1 : q0 + 8 : 2].tolist()
    assert d.slices["num_kv_pairs"].tolist() == [n] * 300


def test_easy_has_24_real_tokens_and_is_deterministic():
    a = make("fdm_mqar", 42, num_examples=50)
    b = make("fdm_mqar", 42, num_examples=50)
    c = make("fdm_mqar", 43, num_examples=50)
    assert ((a.inputs != PAD).sum(1) == 24).all()
    assert np.array_equal(a.inputs, b.inputs) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.inputs, c.inputs)


def test_values_are_iid_and_queries_cover_all_pairs():
    d = make("fdm_mqar", 1, num_examples=4000)
    values = d.inputs[:, 1:16:2]
    counts = np.bincount(values.ravel() - 128, minlength=128)
    assert counts.min() > 0.6 * counts.mean()  # uniform over the 128 values
    repeated = np.mean([len(set(r)) < 8 for r in values.tolist()])
    assert 0.1 < repeated < 0.3  # i.i.d. (not distinct): P(repeat) = 1 − Π(1 − i/128) ≈ 0.2
    pos = [list(d.inputs[r, 0:16:2]).index(k) for r in range(4000) for k in d.inputs[r, 17:24:2]]
    assert np.bincount(pos, minlength=8).min() > 0.8 * len(pos) / 8


def test_chance_level_scoring():
    d = make("fdm_mqar", 5, num_examples=2000)
    guess = np.full_like(d.labels, 128)  # always the first value
    acc = np.nanmean(example_accuracy(guess, d.labels))
    assert abs(acc - 1 / 128) < 0.005


def test_bad_configs_raise():
    with pytest.raises(ValueError, match="too short"):
        make("fdm_mqar", 0, num_examples=2, seq_len=20, num_kv_pairs=8)
    with pytest.raises(ValueError, match="num_queries"):
        make("fdm_mqar", 0, num_examples=2, num_kv_pairs=2, num_queries=4)
    with pytest.raises(ValueError, match="num_kv_pairs"):
        make("fdm_mqar", 0, num_examples=2, seq_len=600, num_kv_pairs=129)
    with pytest.raises(ValueError, match="unknown option"):
        make("fdm_mqar", 0, pairs=3)
