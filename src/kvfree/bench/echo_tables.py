"""Echo's Table 2 (NIAH length generalisation) and Table 3 (zero-shot transfer), evaluated on
the models of ``echo_suite.py`` (``kvfree reproduce echo-table2|3``; docs/tasks.md §4).

Table 2: NIAH with one needle (KV = 1) at lengths 64, 128, …, 4096 (64× the training length),
``n_test`` examples per length, the same examples for every model and seed. At every length
beyond the training length the first ``decode_examples`` also run through the recurrent
decoder (prefill of one token, then ``step`` token by token): its argmax at the scored position
must equal the parallel form's (``decode_agree``, and the largest logit difference). The decode
state's bytes after prefilling one example are measured at every length (constant for SSM and
SSM + SKA, growing for attention's KV cache).

Table 3: the six tasks (transfer MQAR, SysPrompt, ToolTrace, NIAH, MultiHop, CommonWord) on the
grid L ∈ {64, 128, 256, 512} × n ∈ {1, 2, 4, 8}, ``n_test`` examples per cell; per task the mean
over its feasible cells (infeasible cells are listed), and the mean over tasks. SysPrompt and
ToolTrace were trained on (at length 64 only), so their rows are not zero-shot.

Each (table, row, seed) result is written to ``out/<table>/<row>-s<seed>.json`` at once; a rerun
reuses results with the same training fingerprint and evaluation sizes. Tables: mean (min–max)
over seeds, in %, next to the paper's numbers (one run each, no error bars published).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from kvfree.bench import echo_suite as S
from kvfree.tasks import IGNORE, derive_seed, example_accuracy, make
from kvfree.tasks.niah import TEST_LENGTHS
from kvfree.tasks.suite import SUITE_TASKS, grid_cells

TABLES = ("table2", "table3")
PAPER_LABELS = ("SSM", "SSM+Attn", "SSM+SKA")
PAPER_TABLE2 = tuple(  # docs/ska.md §15.2: {length: accuracy %} for SSM, +Attn, +SKA
    dict(zip((64, 128, 256, 512, 1024, 2048, 4096), accs))
    for accs in (
        (88.6, 82.1, 75.8, 66.9, 37.3, 2.0, 2.0),
        (88.5, 97.4, 92.9, 78.1, 64.8, 42.5, 5.0),
        (94.5, 89.4, 93.3, 95.6, 86.4, 81.2, 65.1),
    )
)
PAPER_TABLE3 = {  # docs/ska.md §15.1, mean accuracy % over the grid (SSM, +Attn, +SKA)
    "mqar_transfer": (55.1, 76.0, 82.2),
    "sysprompt": (64.2, 81.3, 85.3),
    "tooltrace": (56.5, 76.2, 80.5),
    "niah": (52.0, 81.1, 84.2),
    "multihop": (39.3, 71.1, 76.7),
    "commonword": (52.9, 68.2, 74.1),
    "mean": (54.4, 76.2, 81.1),
}


# ----------------------------------------------------------------------------- evaluation


def decode_check(model, data, mask: str | None, device) -> dict:
    """The recurrent decoder on ``data``: one-token prefill, then ``step`` per token up to the
    last scored position; compared with the parallel forward at the scored positions."""
    import torch

    b = data.batch(mask=mask, device=device)
    ids, labels, m = b["inputs"], b["labels"], b.get("mask")
    scored = labels != IGNORE
    last = int(scored.any(0).nonzero().max()) + 1
    model.eval()
    with torch.no_grad():
        parallel, _ = model(ids, mask=m, select=scored)
        logits, state = model.prefill(ids[:, :1], None if m is None else m[:, :1], segment=None)
        out = [logits[:, -1]]
        for t in range(1, last):
            lg, state = model.step(ids[:, t], state, None if m is None else m[:, t])
            out.append(lg)
    decoded = torch.stack(out, 1)[scored[:, :last]]
    pred = np.full(labels.shape, -1)
    pred[scored.cpu().numpy()] = decoded.argmax(-1).cpu().numpy()
    return {
        "decode_examples": len(data),
        "decode_agree": float((decoded.argmax(-1) == parallel.argmax(-1)).float().mean()),
        "decode_max_abs_diff": float((decoded - parallel).abs().max()),
        "decode_acc": float(np.nanmean(example_accuracy(pred, data.labels))),
    }


def ska_chunk(row: str) -> int | None:
    """The chunk size S of the row's SKA layers when they run in ``chunk`` mode, else None."""
    import inspect

    from kvfree.mixers.ska import SKA
    from kvfree.models import preset

    opts = preset(S.ROWS[row][1]).mixer_options.get("ska")
    if opts is None:
        return None
    defaults = inspect.signature(SKA.__init__).parameters
    mode = opts.get("mode", defaults["mode"].default)
    return opts.get("chunk_size", defaults["chunk_size"].default) if mode == "chunk" else None


def needle_in_query_chunk(data, chunk: int) -> np.ndarray:
    """Per NIAH example [N]: whether the queried needle's value token lies in the same chunk of
    ``chunk`` tokens as the scored query position (L − 2) or later. Chunk-mode SKA reads only
    strictly earlier chunks (docs/ska.md §5), so no SKA read can retrieve such a needle; the
    share of the other examples is the ceiling of a model that recalls through SKA alone."""
    L = data.inputs.shape[1]
    key = data.inputs[:, L - 2]
    start = (data.inputs[:, : L - 3] == key[:, None]).argmax(1)  # keys are distinct tokens
    return start + 1 >= ((L - 2) // chunk) * chunk


def table2_data(L: int, n_test: int):
    """The NIAH test set of length ``L`` (the same examples for every model and seed)."""
    return make("niah", derive_seed("test", "echo-table2", L), num_examples=n_test, seq_len=L, n=1)


def chunk_ceiling(L: int, n_test: int, chunk: int) -> float:
    """Share of the length-``L`` test needles that chunk-mode SKA with chunk ``chunk`` can see."""
    return float(1 - needle_in_query_chunk(table2_data(L, n_test), chunk).mean())


def table2_eval(model, row: str, r: S.Recipe, device) -> dict:
    from kvfree.bench.recall import example_accuracies, measure_state

    chunk = ska_chunk(row)
    out = []
    for L in TEST_LENGTHS:
        data = table2_data(L, r.n_test)
        mask = S.mask_for(row, data)
        measured, formula = measure_state(model, data, mask, device)
        accs, _ = example_accuracies(model, data, mask, S.eval_batch(r, L), device)
        rec = {
            "length": L,
            "acc": float(np.nanmean(accs)),
            "state_bytes": measured,
            "state_bytes_formula": formula,
        }
        if chunk:  # the split by whether chunk-mode SKA can see the needle at all
            hidden = needle_in_query_chunk(data, chunk)
            rec.update(
                ska_chunk=chunk,
                needles_in_query_chunk=int(hidden.sum()),
                acc_needle_in_earlier_chunk=_mean_or_none(accs[~hidden]),
                acc_needle_in_query_chunk=_mean_or_none(accs[hidden]),
            )
        if r.seq_len < L and r.decode_examples:
            k = min(r.decode_examples, len(data))
            rec.update(decode_check(model, data.subset(np.arange(k)), mask, device))
        out.append(rec)
    return {"lengths": out}


def _mean_or_none(v: np.ndarray) -> float | None:
    return float(v.mean()) if len(v) else None


def table3_eval(model, row: str, r: S.Recipe, device) -> dict:
    from kvfree.bench.recall import evaluate

    cells, infeasible = [], []
    for task in SUITE_TASKS:
        ok, bad = grid_cells(task)
        infeasible += [{"task": task, "seq_len": L, "n": n} for L, n in bad]
        for L, n in ok:
            seed = derive_seed("test", "echo-table3", task, L, n)
            data = make(task, seed, num_examples=r.n_test, seq_len=L, n=n)
            acc = evaluate(model, data, S.mask_for(row, data), S.eval_batch(r, L), device)
            cells.append({"task": task, "seq_len": L, "n": n, "acc": acc})
    return {"cells": cells, "infeasible": infeasible}


EVALS = {"table2": table2_eval, "table3": table3_eval}


def result_path(out_dir: Path, table: str, row: str, seed: int) -> Path:
    return Path(out_dir) / table / f"{row}-s{seed}.json"


def eval_key(table: str, row: str, r: S.Recipe) -> dict:
    return {
        "fingerprint": S.fingerprint(row, r),
        "n_test": r.n_test,
        "decode_examples": r.decode_examples if table == "table2" else None,
    }


def load_result(out_dir: Path, table: str, row: str, seed: int, r: S.Recipe) -> dict | None:
    path = result_path(out_dir, table, row, seed)
    if not path.exists():
        return None
    rec = json.loads(path.read_text())
    return rec if rec.get("key") == eval_key(table, row, r) else None


def job(payload: tuple, on_step=None) -> dict:
    """Train (or reuse) one model, evaluate one table; payload = (table, out_dir, row, seed,
    recipe fields, device, threads). Module-level so that worker processes can run it."""
    from kvfree.report.tables import write_json
    from kvfree.utils import default_device, set_threads

    table, out_dir, row, seed, fields, device, threads = payload
    if threads:
        set_threads(threads)
    r = S.Recipe(**fields)
    device = device or str(default_device())
    model, train_rec = S.train(Path(out_dir), row, seed, r, device=device, on_step=on_step)
    model.to(device)
    t0 = time.time()
    res = EVALS[table](model, row, r, device)
    rec = {
        "table": table,
        "row": row,
        "label": S.ROWS[row][0],
        "seed": seed,
        "key": eval_key(table, row, r),
        "params": train_rec["params"],
        "train_seconds": train_rec["train_seconds"],
        "eval_seconds": time.time() - t0,
        **res,
    }
    write_json(result_path(out_dir, table, row, seed), rec)
    return rec


# ----------------------------------------------------------------------------- the sweep


def run(
    table: str,
    out_dir: str | Path,
    rows: list[str],
    seeds: list[int],
    r: S.Recipe,
    *,
    workers: int = 1,
    threads: int | None = None,
    device: str | None = None,
    progress: bool = True,
) -> dict:
    """Every (row, seed) of ``table``: trained (or reused), evaluated (or reused), aggregated
    into ``out/echo_<table>.json`` + ``.md`` + plots. Returns the aggregate."""
    from tqdm.auto import tqdm

    from kvfree.bench.echo_report import write_outputs
    from kvfree.utils import default_threads

    if table not in TABLES:
        raise ValueError(f"unknown table {table!r}; choose from {TABLES}")
    S.check_rows(rows)
    out_dir = Path(out_dir)
    if threads is None and (device or "cpu").startswith("cpu"):
        threads = default_threads(workers)  # the free cores, split over the workers
    keys = [(row, s) for row in rows for s in seeds]
    done = {k: res for k in keys if (res := load_result(out_dir, table, *k, r)) is not None}
    todo = [k for k in keys if k not in done]
    # seed by seed (an interrupted sweep has whole seeds), SKA first (it trains slowest)
    todo.sort(key=lambda k: (k[1], "ska" not in k[0]))
    payloads = [(table, str(out_dir), row, s, vars(r).copy(), device, threads) for row, s in todo]
    t0 = time.time()
    bar = tqdm(
        total=r.steps * len(todo),
        unit="step",
        disable=not progress,
        dynamic_ncols=True,
        desc=f"echo {table}: {len(done)}/{len(keys)} runs done",
    )
    try:
        from kvfree.bench.recall_workers import run_jobs

        for res in run_jobs(job, payloads, workers, bar):
            done[(res["row"], res["seed"])] = res
            bar.set_description(f"echo {table}: {len(done)}/{len(keys)} runs done")
    except KeyboardInterrupt:
        bar.close()
        print(
            f"\ninterrupted: {len(done)} of {len(keys)} runs finished (kept in {out_dir}); the "
            "running trainings saved a checkpoint. Run the same command again to resume.",
            file=sys.stderr,
        )
        raise
    bar.close()
    from kvfree.utils import environment

    meta = {
        "table": table,
        "recipe": vars(r).copy(),
        "rows": rows,
        "seeds": seeds,
        "wall_seconds_this_run": time.time() - t0,
        "runs_done_now": len(todo),
        "workers": workers,
        "threads_per_worker": threads,
        "env": environment(device),
    }
    return write_outputs(out_dir, table, [done[k] for k in keys], meta)
