"""``kvfree bench fdm-mqar``: the FDM paper's MQAR protocol (docs/tasks.md §3, docs/fdm.md §9.2).

Protocol (paper): 10 000 sequences from seed 42, the first 10 % is the test set; Adam,
LR 3e-3, cosine over epochs (stepped per epoch), batch 128, clip 1.0, loss on the query
positions only; d = 64, 2-layer models (docs/fdm.md §8.2). The paper trains 100 epochs and reports
the **maximum test accuracy over epochs** of one run.

Project reporting (docs/tasks.md §3): validation = the first 10 % of the remaining 9 000
sequences (never used for training); for every (model, setting, seed) we report the
final-epoch test accuracy, the test accuracy at the best-validation epoch (first best), and
the paper's max-over-epochs only as a labelled reproduction number. Model seeds set the
initialisation and the batch order; the data seed stays 42.

Each finished run is written to ``<out>/runs/<model>-<setting>-s<seed>.json`` at once and a run
in progress checkpoints itself every epoch (:mod:`kvfree.bench.fdm_mqar_train`), so an
interrupted sweep resumes where it stopped; ``fdm_mqar.json`` / ``fdm_mqar.md`` aggregate.
Runs go to ``workers`` processes in parallel (one torch thread each by default).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from kvfree.bench.fdm_mqar_train import (  # noqa: F401 - re-exported for callers and tests
    MODELS,
    Protocol,
    accuracy,
    checkpoint_path,
    differences,
    load_state,
    run_meta,
    run_name,
    run_one,
    scored_length,
    scored_logits,
    splits,
)
from kvfree.report.tables import atomic_write, markdown_table, write_json
from kvfree.tasks.fdm_mqar import SETTINGS
from kvfree.utils import environment

PAPER = {  # docs/fdm.md §9.2 (max test accuracy over 100 epochs, one run)
    ("transformer", "easy"): 0.606,
    ("transformer", "medium"): 0.238,
    ("fdm-k0", "easy"): 0.011,
    ("fdm-k0", "medium"): 0.011,
    ("fdm-k16", "easy"): 0.966,
    ("fdm-k16", "medium"): 0.064,
}


def _summary(rows: list[dict]) -> list[dict]:
    out = []
    keys = sorted(
        {(r["model"], r["setting"]) for r in rows},
        key=lambda k: (list(MODELS).index(k[0]), list(SETTINGS).index(k[1])),
    )
    for model_name, setting in keys:
        rs = [r for r in rows if r["model"] == model_name and r["setting"] == setting]

        def stat(k, rs=rs):
            v = np.array([r[k] for r in rs])
            return float(v.mean()), float(v.min()), float(v.max())

        def show(m, rs=rs):  # mean (min–max over seeds)
            return f"{m[0]:.3f}" + (f" ({m[1]:.3f}–{m[2]:.3f})" if len(rs) > 1 else "")

        f, bv, mx = (
            stat("final_test_acc"),
            stat("test_acc_at_best_val"),
            stat("max_test_acc_over_epochs"),
        )
        out.append(
            {
                "model": model_name,
                "setting": setting,
                "seeds": len(rs),
                "seed_list": ",".join(str(r["seed"]) for r in rs),
                "final_test": show(f),
                "test_at_best_val": show(bv),
                "max_over_epochs_repro": show(mx),
                "paper_max_over_epochs": PAPER.get((model_name, setting)),
                "seconds_per_run": round(float(np.mean([r["seconds"] for r in rs]))),
                "final_mean": f[0],
                "best_val_mean": bv[0],
                "max_mean": mx[0],
            }
        )
    return out


def _finished(path: Path, p: Protocol) -> dict | None:
    """A finished run's record, None when there is none; one trained under another protocol
    is an error (retraining would overwrite it)."""
    if not path.exists():
        return None
    rec = json.loads(path.read_text())
    if rec.get("protocol") != asdict(p):
        diffs = differences(rec.get("protocol") or {}, asdict(p))
        raise ValueError(
            f"{path} was trained under another protocol ({'; '.join(diffs)}); use another "
            "--out, or --no-resume to retrain it (the file is overwritten)"
        )
    return rec


def fdm_mqar_job(payload: tuple, on_epoch) -> dict:
    """One run, in this process or a worker: payload = (model, setting, seed, protocol dict,
    out dir, device, resume, threads). Writes the run's JSON and removes its checkpoint."""
    model_name, setting, seed, proto, out_dir, device, resume, threads = payload
    if threads is not None:
        from kvfree.utils import set_threads

        set_threads(threads)
    p = Protocol(**proto)
    name = run_name(model_name, setting, seed)
    ckpt = checkpoint_path(out_dir, name)
    rec = run_one(
        model_name, setting, seed, p, device, checkpoint=ckpt, resume=resume, on_epoch=on_epoch
    )
    rec["protocol"] = proto
    rec["threads"] = torch.get_num_threads()
    write_json(Path(out_dir) / "runs" / f"{name}.json", rec)
    ckpt.unlink(missing_ok=True)
    return rec


def run(
    out_dir: str | Path = "runs/fdm-mqar",
    models=("fdm-k0", "fdm-k16", "transformer", "transformer-rope"),
    settings=("easy", "medium"),
    seeds=(0, 1, 2),
    protocol: Protocol | None = None,
    device=None,
    progress: bool = True,
    resume: bool = True,
    train_missing: bool = True,
    workers: int = 1,
    threads: int | None = None,
) -> dict:
    """The whole sweep; results go to ``out_dir`` (JSON + markdown). Returns the summary.
    ``train_missing=False`` aggregates the runs already finished (same protocol) and lists
    the others as missing, without training (a long sweep's table while it goes on).
    ``workers`` > 1 trains that many runs at once in worker processes, ``threads`` torch
    threads each (default: the free cores split over the workers)."""
    from tqdm.auto import tqdm

    from kvfree.utils import default_threads

    p = protocol or Protocol()
    out_dir = Path(out_dir)
    keys = [(m, s, seed) for s in settings for m in models for seed in seeds]
    done, todo, missing = {}, [], []
    for key in keys:
        rec = _finished(out_dir / "runs" / f"{run_name(*key)}.json", p) if resume else None
        if rec is not None:
            done[key] = rec
        elif train_missing:
            todo.append(key)
            if resume:  # a checkpoint that cannot be resumed stops the sweep before it starts
                load_state(checkpoint_path(out_dir, run_name(*key)), run_meta(*key, p))
        else:
            missing.append(run_name(*key))
    if todo and threads is None and (device or "cpu").startswith("cpu"):
        threads = default_threads(workers)
    payloads = [(*k, asdict(p), str(out_dir), device, resume, threads) for k in todo]
    t0 = time.time()
    bar = tqdm(
        total=p.epochs * len(todo),
        unit="epoch",
        disable=not progress or not todo,
        dynamic_ncols=True,
        desc=f"fdm-mqar: {len(done)}/{len(keys)} runs done",
    )
    try:
        from kvfree.bench.recall_workers import run_jobs

        for rec in run_jobs(fdm_mqar_job, payloads, workers, bar):
            done[(rec["model"], rec["setting"], rec["seed"])] = rec
            bar.set_description(f"fdm-mqar: {len(done)}/{len(keys)} runs done")
            bar.write(
                f"{rec['model']:16s} {rec['setting']:6s} seed {rec['seed']}: final "
                f"{rec['final_test_acc']:.3f}, at best val {rec['test_acc_at_best_val']:.3f}, "
                f"max {rec['max_test_acc_over_epochs']:.3f} ({rec['seconds']:.0f} s)"
            )
    except KeyboardInterrupt:
        bar.close()
        print(
            f"\ninterrupted: {len(done)} of {len(keys)} runs finished (kept in {out_dir}/runs); "
            "each run in progress saved a checkpoint there. Run the same command again to "
            "resume.",
            file=sys.stderr,
        )
        raise
    bar.close()
    rows = [done[k] for k in keys if k in done]
    env = environment(device)
    recorded = {r["threads"] for r in rows if "threads" in r}
    if threads is not None or len(recorded) == 1:  # the runs', not this process's
        env["threads"] = threads if threads is not None else recorded.pop()
    result = {
        "benchmark": "fdm_mqar",
        "protocol": asdict(p),
        "env": {**env, "workers": workers},
        "wall_seconds": time.time() - t0,
        "summary": _summary(rows),
        "runs": rows,  # with each run's per-epoch curve (train loss, val and test accuracy)
        "missing": missing,
    }
    write_json(out_dir / "fdm_mqar.json", result, compact=True)
    md = fdm_mqar_markdown(result)
    atomic_write(out_dir / "fdm_mqar.md", md)
    return {**result, "markdown": md}


def fdm_mqar_markdown(result: dict) -> str:
    """The table of an ``fdm_mqar.json`` result (``kvfree report fdm-mqar``)."""
    p, env, summary = Protocol(**result["protocol"]), result["env"], result["summary"]
    cols = [
        "model",
        "setting",
        "seeds",
        "final_test",
        "test_at_best_val",
        "max_over_epochs_repro",
        "paper_max_over_epochs",
        "seconds_per_run",
    ]
    return (
        f"FDM MQAR protocol (docs/tasks.md §3): {p.num_examples} sequences (data seed "
        f"{p.data_seed}), first {p.test_frac:.0%} test, validation {p.val_frac:.0%} of the "
        f"rest; Adam LR {p.lr}, cosine over {p.epochs} epochs, batch {p.batch_size}, clip "
        f"{p.grad_clip}. Accuracy = mean per-example accuracy on the query positions, "
        f"mean (min–max) over model seeds. `max_over_epochs_repro` selects on the test set "
        f"(the paper's metric, reproduction only); the paper trained 100 epochs, one run. "
        f"{env['device']} ({env['device_name']}), {env['threads']} threads, torch "
        f"{env['torch']}.\n\n"
        + markdown_table(summary, cols).rstrip()
        + (
            f"\n\nNot finished yet ({len(result['missing'])} runs): "
            + ", ".join(result["missing"])
            + "."
            if result.get("missing")
            else ""
        )
    )
