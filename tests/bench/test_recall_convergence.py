"""Training to convergence in ``bench recall``: the stopping rule (target, patience, cap), the
learning curve in the results, and a mid-run resume that reproduces the uninterrupted curve."""

import json

import pytest

from kvfree.bench import recall as R
from kvfree.bench.recall_convergence import Convergence
from kvfree.bench.recall_grid import RecallGrid, grid
from tests.bench.test_recall import tiny as base_tiny

MODELS = ["tiny-linear[d_model=16]", "recall-attention[d_model=16]"]


def tiny(**kw) -> RecallGrid:
    return base_tiny(**{**dict(steps=12, eval_every=3, eval_batch=6), **kw})


def rule(**kw) -> Convergence:
    base = dict(
        eval_every=10,
        target=0.99,
        patience=3,
        min_delta_acc=0.005,
        min_delta_loss=0.01,
        batch_size=32,
    )
    return Convergence(**{**base, **kw})


def test_target_reached_on_every_cell_stops():
    c = rule()
    c.record(10, {"a": 0.995, "b": 0.5}, 1.0)
    assert c.status is None  # one cell is not there yet
    c.record(20, {"a": 0.995, "b": 0.991}, 0.9)
    assert c.status == "converged" and c.should_stop(None)
    assert c.first_examples("a", 0.99) == 320 and c.first_examples("b", 0.99) == 640
    assert c.first_examples("b", 0.9) == 640 and c.first_examples("b", 0.999) is None


def test_patience_stops_a_flat_run_but_not_a_falling_loss():
    flat = rule(patience=3)
    for i in range(1, 4):
        flat.record(10 * i, {"a": 0.016}, 4.16)
        assert flat.status is None
    flat.record(40, {"a": 0.016}, 4.16)  # three evaluations without improvement
    assert flat.status == "patience"
    plateau = rule(patience=3)  # accuracy flat on the H_M/M plateau, loss still falling
    for i in range(1, 12):
        plateau.record(10 * i, {"a": 0.34}, 3.0 * 0.97**i)
    assert plateau.status is None
    late = rule(patience=2, patience_after=50)  # flat at chance until a late transition
    for i in range(1, 6):
        late.record(10 * i, {"a": 0.016}, 4.16)
    assert late.status is None
    late.record(60, {"a": 0.016}, 4.16)
    late.record(70, {"a": 0.016}, 4.16)
    assert late.status == "patience"
    never = rule(patience=0)
    for i in range(1, 20):
        never.record(10 * i, {"a": 0.1}, 4.0)
    assert never.status is None


def test_state_dict_round_trip_and_bad_values():
    c = rule()
    c.record(10, {"a": 0.3}, 2.0)
    d = rule()
    d.load_state_dict(json.loads(json.dumps(c.state_dict())))
    assert d.state_dict() == c.state_dict()
    with pytest.raises(ValueError, match="target"):
        rule(target=0)


def test_target_stops_early_and_every_model_has_the_same_cap(tmp_path, monkeypatch):
    g = tiny(target=0.5)
    # validation reports the target reached at the first evaluation (step 3 of 12)
    monkeypatch.setattr(R, "evaluate_with_loss", lambda *a, **k: (0.75, 0.1))
    res = R.run(g, MODELS, [0], tmp_path, progress=False, plots=True)
    rows = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert {r["steps_cap"] for r in rows} == {12}  # one cap for every model
    assert all(r["outcome"] == "converged" and r["steps"] == 3 for r in rows)
    assert all(r["curve"] == [[12, 0.75]] and r["examples_to_0.9"] is None for r in rows)
    assert (tmp_path / "learning_curves.png").exists() and (tmp_path / "heatmaps.png").exists()
    assert "converged @ 12" in res["markdown"]
    assert not (tmp_path / "jobs" / R.plan(g, MODELS, [0])[0].id / "checkpoints").exists()


def test_budget_outcome_and_reach_table(tmp_path):
    res = R.run(tiny(), MODELS[:1], [0, 1], tmp_path, progress=False, plots=False)
    rows = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert all(r["outcome"] == "budget" and r["steps"] == 12 for r in rows)
    assert all([p[0] for p in r["curve"]] == [12, 24, 36, 48] for r in rows)
    assert "| > 48 |" in res["markdown"]  # no seed reached 0.9 within the cap


class Interrupt(Exception):
    pass


def test_interrupted_job_resumes_with_the_same_curve(tmp_path):
    g = tiny()
    job = R.plan(g, MODELS[1:], [0])[0]
    whole = R.run_job(g, job, tmp_path / "whole")

    seen = [0]

    def stop_after_7(n):
        seen[0] += n
        if seen[0] >= 7:  # after the checkpoint at step 6
            raise Interrupt

    with pytest.raises(Interrupt):
        R.run_job(g, job, tmp_path / "cut", on_step=stop_after_7)
    assert (tmp_path / "cut" / "jobs" / job.id / "checkpoints" / "last.pt").exists()
    resumed = R.run_job(g, job, tmp_path / "cut")
    assert resumed["train"]["resumed_at_step"] == 6
    assert resumed["curve"] == whole["curve"]  # bit for bit on CPU
    assert [r["test_acc"] for r in resumed["rows"]] == [r["test_acc"] for r in whole["rows"]]
    # a checkpoint of another grid is not resumed
    with pytest.raises(Interrupt):
        R.run_job(g, job, tmp_path / "other", on_step=stop_after_7)
    fresh = R.run_job(tiny(lrs=[1e-3], warmup_steps=2), job, tmp_path / "other")
    assert fresh["train"]["resumed_at_step"] == 0


def test_cpu_grid_trains_to_convergence():
    g = grid("cpu")
    assert g.eval_every > 0 and g.patience > 0 and g.target == 0.99 and g.min_lr_ratio == 1.0
