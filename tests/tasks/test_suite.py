"""The Echo sub-million suite's shared format (docs/tasks.md §4): NIAH, MultiHop, SysPrompt,
ToolTrace, CommonWord, transfer-MQAR."""

import numpy as np
import pytest

from kvfree.tasks import IGNORE, make
from kvfree.tasks import suite as S
from kvfree.tasks.suite import A_LO, B_LO, CNT, HOP, QRY, RET, SET_SIZE, SYS, VAL_LO, curriculum

CASES = [
    ("niah", {"seq_len": 64, "n": 4}),
    ("niah", {"seq_len": 11, "n": 4}),
    ("multihop", {"seq_len": 32, "n": 3}),
    ("multihop", {"seq_len": 64, "n": 4, "hops": 3}),
    ("sysprompt", {"seq_len": 64, "n": 8}),
    ("sysprompt", {"seq_len": 40, "n": 2}),
    ("tooltrace", {"seq_len": 64, "n": 8}),
    ("tooltrace", {"seq_len": 64, "n": 4, "delayed": True}),
    ("commonword", {"seq_len": 32, "n": 8}),
    ("mqar_transfer", {"seq_len": 64, "n": 8}),
]


def in_set(x, lo):
    return (x >= lo) & (x < lo + SET_SIZE)


@pytest.mark.parametrize("task,opts", CASES)
def test_common_contract(task, opts):
    d = make(task, 2**31 + 9, num_examples=300, **opts)
    assert d.inputs.shape == (300, opts["seq_len"]) and d.vocab_size == 128
    assert (d.inputs >= 0).all() and (d.inputs < 128).all()
    scored = d.labels != IGNORE
    n_scored = opts["n"] if task == "mqar_transfer" else 1
    assert (scored.sum(1) == n_scored).all()
    assert in_set(d.labels[scored], VAL_LO if task != "commonword" else A_LO).all()
    # the answer follows the scored position (teacher forcing) and ends the sequence
    r, c = np.nonzero(scored)
    assert (d.inputs[r, c + 1] == d.labels[r, c]).all()
    assert (c.reshape(300, -1)[:, -1] == opts["seq_len"] - 2).all()
    # the prefix mask covers everything before the first query marker, and nothing after
    first = d.masks["prefix"].sum(1)
    assert (d.masks["prefix"] == (np.arange(d.seq_len) < first[:, None])).all()
    assert np.isin(d.inputs[np.arange(300), first], [QRY, HOP, CNT]).all()
    # determinism by seed
    again = make(task, 2**31 + 9, num_examples=300, **opts)
    assert (again.inputs == d.inputs).all() and (again.labels == d.labels).all()


def bindings(row, key_lo=A_LO):
    """{key: value} of adjacent (key, value) pairs in a token row."""
    out = {}
    for a, b in zip(row[:-1], row[1:]):
        if in_set(np.array(a), key_lo) and in_set(np.array(b), VAL_LO):
            out.setdefault(int(a), []).append(int(b))
    return out


def test_niah_answer_is_the_needle_and_depth_buckets():
    d = make("niah", 4, num_examples=2000, seq_len=128, n=2)
    for row, lab in zip(d.inputs[:100], d.labels[:100]):
        k = int(row[-2])
        assert bindings(row[:-3])[k] == [int(lab[-2])]
    depth = d.slices["depth"]
    assert depth.min() == 0 and depth.max() == 9
    assert np.bincount(depth, minlength=10).min() > 100  # needles spread over all depths


def test_multihop_chains_resolve():
    for hops in (2, 3):
        d = make("multihop", 5, num_examples=200, seq_len=64, n=3, hops=hops)
        for row, lab in zip(d.inputs, d.labels):
            body = row[: -(3 + (hops >= 3))]
            deep = hops > 2

            def src(x, deep=deep):
                return in_set(x, A_LO) or in_set(x, B_LO) or (deep and in_set(x, B_LO))

            def dst(x, a, deep=deep):
                return in_set(x, VAL_LO) or (in_set(x, B_LO) and (deep or not in_set(a, B_LO)))

            edges = {}
            for a, b in zip(body[:-1], body[1:]):
                if src(a) and dst(b, a):
                    edges.setdefault(int(a), set()).add(int(b))
            frontier = {int(row[-2])}
            for _ in range(hops):  # values reachable in exactly `hops` steps
                frontier = set().union(*(edges.get(x, set()) for x in frontier))
            assert int(lab[-2]) in frontier
            if hops == 2:  # with h = 2 only A→B and B→V adjacencies exist: the answer is unique
                assert frontier == {int(lab[-2])}
        if hops == 3:
            assert (d.inputs[:, -3] == 8 + 3).all() and (d.inputs[:, -4] == HOP).all()


def test_multihop_records_are_shuffled():
    d = make("multihop", 6, num_examples=500, seq_len=32, n=3)
    hop2_first = 0
    for row in d.inputs:
        firsts = [
            i
            for i in range(len(row) - 4)
            if in_set(np.array(row[i]), B_LO) and in_set(np.array(row[i + 1]), VAL_LO)
        ]
        seconds = [
            i
            for i in range(len(row) - 4)
            if in_set(np.array(row[i]), A_LO) and in_set(np.array(row[i + 1]), B_LO)
        ]
        hop2_first += min(firsts) < min(seconds)
    assert 150 < hop2_first < 350  # a hop-2 record precedes every hop-1 record about half the time


def test_sysprompt_tiers_and_decoys():
    d = make("sysprompt", 1, num_examples=500, seq_len=64, n=4)
    assert (d.inputs[:, 0] == SYS).all() and (d.masks["action"][:, :10] == 1).all()
    assert (d.masks["action"][:, 10:] == 0).all()
    for row, lab in zip(d.inputs[:50], d.labels[:50]):
        assert bindings(row[1:9])[int(row[-2])] == [int(lab[-2])]
    from kvfree.tasks.sysprompt import TIERS

    for tier, (n, lo, hi, decoy) in TIERS.items():
        t = make("sysprompt", 2, num_examples=400, tier=tier)
        g = t.slices["gap"]
        assert g.min() >= lo and g.max() <= hi
        assert (t.slices["seq_len"] == 2 * n + 5 + 2 * g).all()
        if decoy:  # decoys bind system keys to wrong values inside the scratchpad
            wrong = 0
            for row, L in zip(t.inputs, t.slices["seq_len"]):
                sys_bind = bindings(row[1 : 2 * n + 1])
                for k, vs in bindings(row[2 * n + 2 : L - 3]).items():
                    assert k in sys_bind and all(v != sys_bind[k][0] for v in vs)
                    wrong += len(vs)
            per_step = wrong / g.sum()
            assert abs(per_step - decoy) < 0.03


@pytest.mark.parametrize("delayed", [False, True])
def test_tooltrace(delayed):
    d = make("tooltrace", 3, num_examples=300, seq_len=80, n=6, delayed=delayed)
    for row, lab, act in zip(d.inputs, d.labels, d.masks["action"]):
        a, t = int(row[-3]), int(row[-2])
        body = row[:-4]
        triples = [
            (int(body[i]), int(body[i + 1]), int(body[i + 2]))
            for i in range(len(body) - 2)
            if in_set(np.array(body[i]), A_LO)
            and in_set(np.array(body[i + 1]), B_LO)
            and in_set(np.array(body[i + 2]), VAL_LO)
        ]
        pairs = [(x, y) for x, y, _ in triples]
        assert len(pairs) == len(set(pairs))  # each (agent, tool) once
        assert (a, t, int(lab[-2])) in triples
        if delayed:
            i = next(
                i
                for i in range(len(body) - 3)
                if body[i] == RET and body[i + 1] == a and body[i + 2] == t
            )
            assert act[i : i + 4].all() and act.sum() == 4 * (body == RET).sum()
    tiers = make("tooltrace", 4, num_examples=200, tier="easy", delayed=True)
    assert tiers.slices["n"].min() >= 10 and tiers.slices["n"].max() <= 30
    assert tiers.slices["seq_len"].max() <= 400


def test_commonword_target_is_most_frequent():
    d = make("commonword", 2, num_examples=200, seq_len=40, n=6)
    for row, lab in zip(d.inputs, d.labels):
        words = row[:-2][in_set(row[:-2], A_LO)]
        counts = np.bincount(words - A_LO, minlength=SET_SIZE)
        assert counts.argmax() + A_LO == lab[-2] and counts.max() == 3
        assert sorted(counts[counts > 0].tolist()) == [1] * 5 + [3]


def test_feasibility_and_grid():
    ok, bad = S.grid_cells("multihop", lengths=(16, 32), counts=(3, 4, 8))
    assert bad == [(16, 4), (16, 8), (32, 8)]  # docs/tasks.md §4.5
    assert S.feasible("sysprompt", 13, 4) and not S.feasible("sysprompt", 12, 4)
    with pytest.raises(ValueError, match="infeasible"):
        make("niah", 1, seq_len=10, n=4)
    with pytest.raises(ValueError, match="infeasible"):
        make("tooltrace", 1, seq_len=20, n=4, delayed=True)


def test_curriculum_mix():
    d = curriculum(7, 1600)
    assert d.seq_len == 64 and set(d.slices["task"]) == {"sysprompt", "tooltrace"}
    assert abs((d.slices["task"] == "sysprompt").mean() - 0.5) < 0.01
    assert set(d.slices["n"]) == set(range(1, 9))
