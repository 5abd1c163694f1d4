"""``bench recall``: job planning, pure batches, seed ranges, LR selection on validation,
outputs, the oracle mask, state bytes, and resume (a rerun skips finished jobs)."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from kvfree.bench import recall as R
from kvfree.bench.recall_grid import RecallGrid, grid
from kvfree.bench.recall_report import best_lrs
from kvfree.tasks import seed_split

MODELS = [
    "tiny-linear[d_model=16]",
    "recall-attention[d_model=16]",
    "recall-mamba2-ska-prefix[d_model=16]",
]


def tiny(**kw) -> RecallGrid:
    base = dict(
        name="tiny",
        task="mqar_gap",
        cells=[{"num_kv_pairs": 2, "gap": 4}, {"num_kv_pairs": 2, "gap": 12}],
        axes=("num_kv_pairs", "gap"),
        steps=3,
        batch_size=4,
        lrs=[1e-3],
        warmup_steps=1,
        n_val=6,
        n_test=8,
        eval_batch=4,
    )
    return RecallGrid(**{**base, **kw})


def test_plan_and_job_ids():
    g = tiny()
    jobs = R.plan(g, ["a", "b"], [0, 1])
    assert len(jobs) == 2 * 2 and len({j.id for j in jobs}) == 4
    sweep = R.plan(tiny(lrs=[1e-3, 3e-3]), ["a"], [0])
    assert [j.lr for j in sweep] == [1e-3, 3e-3] and sweep[0].id != sweep[1].id
    per_model = R.plan(tiny(model_lrs={"b": [5e-4]}), ["a", "b[d_model=8]"], [0])
    assert [j.lr for j in per_model] == [1e-3, 5e-4]
    per = R.plan(tiny(train="per_cell"), ["a"], [0])
    assert len(per) == 2 and all(len(j.cells) == 1 for j in per)
    assert len({j.id for j in per}) == 2


def test_fingerprint_follows_what_a_run_trains_on_not_the_lr_lists():
    fp = tiny().fingerprint()  # a run's LR is in its id: a wider sweep reuses trained runs
    assert tiny(lrs=[1e-3, 3e-3], model_lrs={"b": [5e-4]}, note="x").fingerprint() == fp
    assert tiny(steps=4).fingerprint() != fp and tiny(batch_size=8).fingerprint() != fp


def test_batches_are_pure_round_robin_and_seeded_in_range():
    g = tiny()
    job = R.plan(g, ["m"], [3])[0]
    b = R.Batches(g, job, None)
    assert (b(5)["inputs"] == b(5)["inputs"]).all()
    assert (b(5)["inputs"] != b(7)["inputs"]).any()
    assert b(0)["inputs"].shape[1] == 4 * 2 + 4 and b(1)["inputs"].shape[1] == 4 * 2 + 12
    assert "mask" in R.Batches(g, job, "prefix")(0)
    val = R._cell_data(g, g.cells[0], "val", 2)
    test = R._cell_data(g, g.cells[0], "test", 2)
    assert seed_split(val.meta["seed"]) == "train" and seed_split(test.meta["seed"]) == "test"


def test_fixed_train_set_epochs():
    g = tiny(train_examples=[10, 6], epochs=3)
    job = R.plan(g, ["m"], [0])[0]
    b = R.Batches(g, job, None)
    assert b.steps() == (3 + 2) * 3 == R._fixed_steps(g, job)
    seen = np.concatenate([b(s)["inputs"][:, :2].numpy() for s in range(5)])
    assert len(seen) == 16  # one epoch covers every training example once


def test_best_lr_is_chosen_on_validation_not_test():
    rows = [
        {"model": "m", "lr": 1e-3, "val_acc": 0.9, "test_acc": 0.1},
        {"model": "m", "lr": 1e-2, "val_acc": 0.2, "test_acc": 0.99},
    ]
    assert best_lrs(rows) == {"m": 1e-3}


def test_run_outputs_and_resume(tmp_path):
    g = tiny()
    res = R.run(g, MODELS, [0], tmp_path, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(rows) == len(MODELS) * 1 * 1 * 2
    assert {r["model"] for r in rows} == set(MODELS)
    assert all(0 <= r["test_acc"] <= 1 and r["n_test"] == 8 for r in rows)
    by = {(r["model"], r["gap"]): r for r in rows if r["lr"] == 1e-3}
    att, lin = MODELS[1], MODELS[0]
    assert by[(att, 12)]["state_bytes"] > by[(att, 4)]["state_bytes"]  # the KV cache grows
    assert by[(lin, 12)]["state_bytes"] == by[(lin, 4)]["state_bytes"]  # fixed memory
    assert by[(att, 12)]["state_bytes"] == by[(att, 12)]["state_bytes_formula"]
    assert by[(MODELS[2], 4)]["oracle_mask"] and not by[(lin, 4)]["oracle_mask"]
    md = (tmp_path / "recall.md").read_text()
    assert md == res["markdown"] and "oracle prefix mask" in md and "state bytes" in md.lower()
    assert (tmp_path / "acc_vs_state.png").exists()
    assert len(list(tmp_path.glob("heatmap_*.png"))) == len(MODELS)

    job_files = sorted((tmp_path / "jobs").glob("*.json"))
    stamps = {p: p.stat().st_mtime_ns for p in job_files}
    again = R.run(g, MODELS, [0], tmp_path, progress=False, plots=False)
    assert again["meta"]["jobs_run"] == 0 and again["meta"]["jobs_reused"] == len(job_files)
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    assert again["summary"] == res["summary"]
    # a deleted result file is recomputed, the others are reused
    job_files[0].unlink()
    third = R.run(g, MODELS, [0], tmp_path, progress=False, plots=False)
    assert third["meta"]["jobs_run"] == 1 and job_files[0].exists()
    # a changed grid does not reuse results
    fourth = R.run(tiny(steps=4), MODELS[:1], [0], tmp_path / "other", progress=False, plots=False)
    assert fourth["meta"]["jobs_run"] == 1

    out = CliRunner().invoke(_app(), ["report", "recall", str(tmp_path)])
    assert out.exit_code == 0, out.output
    assert "tiny-linear" in out.output


def _app():
    import kvfree.commands  # noqa: F401
    from kvfree.cli import app

    return app


def test_parse_model_and_errors(tmp_path):
    assert R.parse_model("p[d_model=32,mlp=gelu]") == ("p", {"d_model": 32, "mlp": "gelu"})
    with pytest.raises(ValueError, match="key=value"):
        R.parse_model("p[d_model]")
    with pytest.raises(ValueError, match="unknown preset"):
        R.run(tiny(), ["no-such-preset"], [0], tmp_path, progress=False)
    with pytest.raises(ValueError, match="train must be"):
        tiny(train="both")
    with pytest.raises(ValueError, match="unknown recall grid"):
        grid("nope")
    assert grid("echo").train == "per_cell" and len(grid("echo").cells) == 28
    z = grid("zoology-based")
    assert len(z.cells) == 7 and sum(z.train_examples) == 180_000


def test_main_job_presets_and_oracle_mask():
    from kvfree.commands.demo import DEMO_MODELS, MAIN_MODELS, SLOWEST_FIRST, _models
    from kvfree.models import preset
    from kvfree.models.presets_recall import oracle_mask

    assert sorted(MAIN_MODELS) == sorted(SLOWEST_FIRST) and len(MAIN_MODELS) == 9
    assert set(DEMO_MODELS) < set(MAIN_MODELS) and len(DEMO_MODELS) == 6
    assert _models("main") == DEMO_MODELS and _models("all") == MAIN_MODELS
    assert _models("recall-gdn, recall-gdn-ska[ska.K=2,ska.rank=8]") == [
        "recall-gdn",
        "recall-gdn-ska[ska.K=2,ska.rank=8]",
    ]
    masks = {m: oracle_mask(preset(m)) for m in MAIN_MODELS}
    assert masks == {m: m == "recall-mamba2-ska-prefix" for m in MAIN_MODELS}
    g = grid("cpu")
    assert {c["num_kv_pairs"] for c in g.cells} == {4, 8} and {c["gap"] for c in g.cells} == {
        64,
        256,
    }
    assert g.lrs_for("recall-attention") == [1e-3] and g.lrs_for("recall-gdn") == [3e-3]
    z = grid("zoology-cpu")  # softmax attention learns this slice at 1e-2 only (README)
    assert z.lrs_for("recall-attention[attention.window=16]") == [1e-2]
    assert z.lrs_for("recall-mla[mla.latent_dim=8]") == [3e-3, 1e-2]
    assert z.lrs_for("recall-gdn") == [3e-3]


def test_merge_combines_seeds_and_refuses_overlaps(tmp_path):
    from kvfree.bench.recall_report import merge

    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    R.run(tiny(), MODELS[:1], [0], a, progress=False, plots=False)
    R.run(tiny(), MODELS[:1], [1], b, progress=False, plots=False)
    R.run(tiny(steps=4), MODELS[:1], [2], c, progress=False, plots=False)
    before = (a / "results.jsonl").read_text()
    with pytest.raises(ValueError, match="in both"):
        merge(a, [a, b, b])
    with pytest.raises(ValueError, match="another grid"):
        merge(a, [a, c])
    assert (a / "results.jsonl").read_text() == before  # a refused merge writes nothing

    def broken(*_):
        raise RuntimeError("rendering failed")

    with pytest.MonkeyPatch.context() as mp:  # a failure while rendering replaces no file
        mp.setattr("kvfree.bench.recall_report.markdown", broken)
        with pytest.raises(RuntimeError, match="rendering failed"):
            merge(a, [a, b], plots=False)
    assert (a / "results.jsonl").read_text() == before

    res = merge(a, [a, b], plots=False)
    rows = [json.loads(x) for x in (a / "results.jsonl").read_text().splitlines()]
    assert sorted({r["seed"] for r in rows}) == [0, 1] and len(rows) == 2 * 2
    assert res["meta"]["seeds"] == [0, 1] and len(res["meta"]["merged_from"]) == 2
    cell = next(iter(res["summary"][MODELS[0]]["cells"].values()))
    accs = [r["test_acc"] for r in rows if r["cell"] == rows[0]["cell"]]
    assert cell["seeds"] == [0, 1] and cell["test_acc"] == pytest.approx(np.mean(accs))
    assert "Merged from 2 invocations" in res["markdown"] and "–" in res["markdown"]

    d = tmp_path / "d"  # a merged folder merges again, keeping one entry per invocation
    R.run(tiny(), MODELS[:1], [3], d, progress=False, plots=False)
    again = merge(a, [a, d], plots=False)
    assert again["meta"]["seeds"] == [0, 1, 3] and len(again["meta"]["merged_from"]) == 3
    assert "Merged from 3 invocations" in again["markdown"]

    with pytest.raises(FileExistsError, match="not among the sources"):
        merge(d, [a, b])  # d's own results would be overwritten
    assert len((d / "results.jsonl").read_text().splitlines()) == 2

    out = CliRunner().invoke(_app(), ["report", "recall-merge", str(tmp_path / "m"), str(a)])
    assert out.exit_code != 0 and not (tmp_path / "m").exists()


def test_length_table_averages_depths_per_seed_then_spans_seeds():
    from kvfree.bench.recall_report import length_table, summarise

    acc = {(256, 0.0): (1.0, 0.8), (256, 1.0): (0.6, 0.4), (512, 0.0): (0.2, 0.2)}
    base = dict(model="m", lr=1e-3, val_acc=0.5, n=1, state_bytes=1, state_bytes_formula=1)
    rows = [
        dict(
            base,
            seed=s,
            cell=f"L={L},d={d}",
            seq_len=L,
            depth=d,
            test_acc=a[s],
            params=1,
            oracle_mask=False,
            train_seconds=1.0,
        )
        for (L, d), a in acc.items()
        for s in (0, 1)
    ]
    md = length_table(summarise(rows), ("depth", "seq_len"))
    # L=256: seed 0 mean 0.8, seed 1 mean 0.6 -> 0.7 (0.6-0.8); L=512: one cell, both 0.2
    assert "| m | 0.700 (0.600–0.800) | 0.200 (0.200–0.200) |" in md
    assert length_table(summarise(rows), ("num_kv_pairs", "gap")) == ""
    one_per_length = [r for r in rows if r["depth"] == 0.0]
    assert length_table(summarise(one_per_length), ("depth", "seq_len")) == ""


def test_curve_panels_keep_the_seed_that_trained_longer():
    from kvfree.bench.recall_report import curve_panels, summarise
    from kvfree.report.plots import _kilo

    base = dict(model="m", lr=1e-3, cell="c", seq_len=8, num_kv_pairs=2, val_acc=0.5,
                state_bytes=1, state_bytes_formula=1, params=1, oracle_mask=False,
                train_seconds=1.0)  # fmt: skip
    rows = [
        dict(base, seed=0, test_acc=1.0, curve=[[100, 0.2], [200, 0.99]]),
        dict(base, seed=1, test_acc=0.3, curve=[[100, 0.1], [200, 0.3], [300, 0.3], [400, 0.31]]),
    ]
    panel = curve_panels(rows, summarise(rows), ("num_kv_pairs",))["M=2"]["m"]
    assert panel["x"] == [100, 200] and panel["mean"] == pytest.approx([0.15, 0.645])
    assert panel["tails"] == [([200, 300, 400], [0.3, 0.3, 0.31])]  # joined at the last common
    assert [_kilo(v) for v in (512, 4096, 131072, 2e6)] == ["512", "4.1k", "131k", "2M"]
