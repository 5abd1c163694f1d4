"""Echo's MQAR-with-gap [project definition] (docs/tasks.md §2)."""

import numpy as np
import pytest

from kvfree.tasks import IGNORE, make
from kvfree.tasks.mqar_gap import seq_len


@pytest.mark.parametrize("M,G", [(4, 64), (8, 256), (32, 0), (1, 5)])
def test_layout_labels_and_ranges(M, G):
    d = make("mqar_gap", 2**31 + 3, num_examples=200, num_kv_pairs=M, gap=G)
    L = seq_len(M, G)
    assert d.inputs.shape == (200, L) == (200, 4 * M + G) and d.vocab_size == 192
    keys, vals = d.inputs[:, 0 : 2 * M : 2], d.inputs[:, 1 : 2 * M : 2]
    assert (keys < 64).all() and ((vals >= 64) & (vals < 128)).all()
    assert all(len(set(r)) == M for r in keys) and all(len(set(r)) == M for r in vals)
    gap = d.inputs[:, 2 * M : 2 * M + G]
    assert ((gap >= 128) & (gap < 192)).all()
    q0 = 2 * M + G
    qk, qv = d.inputs[:, q0::2], d.inputs[:, q0 + 1 :: 2]
    assert (np.sort(qk, 1) == np.sort(keys, 1)).all()  # the queries are a permutation
    # labels only at query keys, equal to the bound value, which is then shown (teacher forcing)
    scored = np.nonzero(d.labels[0] != IGNORE)[0]
    assert scored.tolist() == list(range(q0, L, 2))
    j = (qk[:, :, None] == keys[:, None, :]).argmax(-1)
    assert (d.labels[:, q0::2] == np.take_along_axis(vals, j, 1)).all()
    assert (qv == d.labels[:, q0::2]).all()
    assert (d.masks["prefix"][:, :q0] == 1).all() and (d.masks["prefix"][:, q0:] == 0).all()
    assert (d.slices["gap"] == G).all() and (d.slices["num_kv_pairs"] == M).all()


def test_query_order_is_a_uniform_permutation():
    d = make("mqar_gap", 1, num_examples=4000, num_kv_pairs=4, gap=8)
    keys, qk = d.inputs[:, 0:8:2], d.inputs[:, 16::2]
    first = (qk[:, :1] == keys).argmax(1)  # which pair is queried first
    assert np.allclose(np.bincount(first, minlength=4) / 4000, 0.25, atol=0.03)


def test_determinism_and_errors():
    a = make("mqar_gap", 5, num_examples=20, num_kv_pairs=8, gap=64)
    b = make("mqar_gap", 5, num_examples=20, num_kv_pairs=8, gap=64)
    assert (a.inputs == b.inputs).all()
    assert (a.inputs != make("mqar_gap", 6, num_examples=20, num_kv_pairs=8, gap=64).inputs).any()
    with pytest.raises(ValueError, match="num_kv_pairs"):
        make("mqar_gap", 1, num_kv_pairs=65)
    with pytest.raises(ValueError, match="gap"):
        make("mqar_gap", 1, gap=-1)
