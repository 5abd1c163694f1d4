"""``kvfree reproduce echo-table2|3`` plumbing on tiny budgets: the tables run and share their
models, the evaluation beyond the training length goes through the recurrent decoder (and
agrees with the parallel form), state bytes are constant for the fixed-memory rows, an
interrupted training resumes with the same learning curve, and bad input gets one line."""

import json

import numpy as np
import pytest

from kvfree.bench import echo_suite as S
from kvfree.bench import echo_tables as T
from kvfree.tasks import make
from kvfree.tasks.suite import SUITE_TASKS, grid_cells

TINY = S.Recipe(steps=3, eval_every=2, n_val=8, n_test=4, decode_examples=2, warmup_steps=1)


@pytest.fixture
def short_lengths(monkeypatch):
    monkeypatch.setattr(T, "TEST_LENGTHS", (64, 128))


def test_table2_then_table3_share_the_models(tmp_path, short_lengths):
    rows = ["ssm-attn", "ssm-ska-mask"]
    res = T.run("table2", tmp_path, rows, [0], TINY, device="cpu", progress=False)
    assert {p.rsplit("/", 1)[-1] for p in res["files"]} >= {
        "echo_table2.json", "echo_table2.md", "echo_table2.png", "echo_curves.png",
    }  # fmt: skip
    by_row = {r["row"]: r for r in res["runs"]}
    for row in rows:
        at64, at128 = by_row[row]["lengths"]
        assert "decode_agree" not in at64  # the training length: parallel only
        # beyond the training length the recurrent decoder ran, token by token, and agrees
        assert at128["decode_examples"] == 2 and at128["decode_agree"] == 1.0
        assert at128["decode_max_abs_diff"] < 1e-3
    att, ska = by_row["ssm-attn"]["lengths"], by_row["ssm-ska-mask"]["lengths"]
    for rec in ska:  # chunk-mode SKA: accuracy split by whether SKA can see the needle
        k = rec["needles_in_query_chunk"]
        parts = [(4 - k, rec["acc_needle_in_earlier_chunk"]), (k, rec["acc_needle_in_query_chunk"])]
        assert rec["acc"] == pytest.approx(sum(n * a for n, a in parts if n) / 4)
    assert "ska_chunk" not in att[0]
    assert ska[0]["state_bytes"] == ska[1]["state_bytes"]  # fixed memory
    assert att[1]["state_bytes"] > att[0]["state_bytes"]  # a KV cache grows
    train = json.loads((tmp_path / "models/ssm-attn-s0/train.json").read_text())
    assert [p["step"] for p in train["curve"]] == [2, 3]
    assert set(train["curve"][0]["acc"]) == set(S.VAL_SETS)
    md = (tmp_path / "echo_table2.md").read_text()
    assert "SSM+Attn — kvfree" in md and "97.4" in md  # the paper's 128 entry beside ours
    assert "SKA ceiling: needle in an earlier chunk of 16" in md
    mtime = (tmp_path / "models/ssm-attn-s0/train.json").stat().st_mtime_ns

    res3 = T.run("table3", tmp_path, rows, [0], TINY, device="cpu", progress=False)
    assert (tmp_path / "models/ssm-attn-s0/train.json").stat().st_mtime_ns == mtime  # reused
    cells = res3["runs"][0]["cells"]
    assert {c["task"] for c in cells} == set(SUITE_TASKS)
    expected = sum(len(grid_cells(t)[0]) for t in SUITE_TASKS)
    assert len(cells) == expected
    assert all(0 <= c["acc"] <= 1 for c in cells)
    entry = res3["rows"][0]
    task_means = [entry["tasks"][t]["mean"] for t in SUITE_TASKS]
    assert entry["tasks"]["mean"]["mean"] == pytest.approx(np.mean(task_means))
    assert "81.1" in res3["markdown"]  # the paper's SSM+SKA mean

    again = T.run("table3", tmp_path, rows, [0], TINY, device="cpu", progress=False)
    assert again["meta"]["runs_done_now"] == 0  # results reused


def test_mask_policy():
    sp = make("sysprompt", 1, num_examples=2, seq_len=64, n=2)
    niah = make("niah", 1, num_examples=2, seq_len=64, n=1)
    assert S.mask_for("ssm-ska", sp) is None
    assert S.mask_for("ssm-ska-mask", sp) == "action"
    assert S.mask_for("ssm-ska-mask", niah) == "prefix"  # NIAH defines no action mask


def test_interrupted_training_resumes_with_the_same_curve(tmp_path):
    r = S.Recipe(steps=4, eval_every=2, n_val=8, n_test=2, warmup_steps=1)
    _, whole = S.train(tmp_path / "a", "ssm", 0, r, device="cpu")

    def stop_at_3(n):
        stop_at_3.seen += n
        if stop_at_3.seen >= 3:
            raise KeyboardInterrupt

    stop_at_3.seen = 0
    with pytest.raises(KeyboardInterrupt):
        S.train(tmp_path / "b", "ssm", 0, r, device="cpu", on_step=stop_at_3)
    assert not (tmp_path / "b/models/ssm-s0/train.json").exists()
    assert (tmp_path / "b/models/ssm-s0/checkpoints/last.pt").exists()
    _, resumed = S.train(tmp_path / "b", "ssm", 0, r, device="cpu")
    assert [p["step"] for p in resumed["curve"]] == [2, 4]
    for a, b in zip(whole["curve"], resumed["curve"]):
        assert a["acc"] == b["acc"] and a["loss"] == pytest.approx(b["loss"], abs=1e-6)


def test_fingerprint_follows_training_not_evaluation():
    base = S.recipe("cpu")
    assert S.fingerprint("ssm", base) == S.fingerprint("ssm", S.recipe("cpu", n_test=7))
    assert S.fingerprint("ssm", base) != S.fingerprint("ssm", S.recipe("cpu", steps=7))
    assert S.fingerprint("ssm-ska", base) != S.fingerprint("ssm-ska-mask", base)


def test_bad_input_is_one_line(tmp_path):
    from tests.cli.test_train_cli import assert_user_error, kvfree_many

    bad_row, bad_preset, bad_seeds, no_result = kvfree_many(
        [
            ["reproduce", "echo-table2", "--models", "ssm,gpt", "--out", "x"],
            ["reproduce", "echo-table3", "--preset", "huge", "--out", "x"],
            ["reproduce", "echo-table2", "--seeds", "0,a", "--out", "x"],
            ["report", "echo-table3", "nowhere"],
        ],
        tmp_path,
    )
    assert_user_error(bad_row, "gpt", "ssm-attn")
    assert_user_error(bad_preset, "huge", "paper")
    assert_user_error(bad_seeds, "seeds")
    assert_user_error(no_result, "echo_table3.json", "kvfree reproduce echo-table3")
    assert not (tmp_path / "x").exists()  # validation before anything is written


def test_needle_in_query_chunk_is_what_chunk_mode_ska_cannot_read():
    assert T.ska_chunk("ssm") is None and T.ska_chunk("ssm-attn") is None
    assert T.ska_chunk("ssm-ska") == T.ska_chunk("ssm-ska-recipe") == 16
    for L in (64, 128, 200):
        data = make("niah", 5, num_examples=200, seq_len=L, n=1)
        hidden = T.needle_in_query_chunk(data, 16)
        first_of_query_chunk = 16 * ((L - 2) // 16)
        for row, h in zip(data.inputs, hidden):  # brute force: where is the queried key?
            start = [j for j in range(L - 3) if row[j] == row[L - 2]]
            assert len(start) == 1 and h == (start[0] + 1 >= first_of_query_chunk)
        assert 0 < hidden.sum() < len(hidden)
    # the test set's ceiling is the share of needles SKA can see: at L = 64 the last chunk holds
    # 14 of the 61 possible needle starts (47 … 60), about 23 %
    assert T.chunk_ceiling(64, 400, 16) == pytest.approx(1 - 14 / 61, abs=0.06)
