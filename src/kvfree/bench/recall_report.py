"""Tables and plots of ``bench recall`` from its rows (also ``kvfree report recall``).

Model selection: the LR with the best mean **validation** accuracy (over cells and seeds) per
model; every number reported is test accuracy at that LR, mean over seeds (± the standard
deviation over seeds when there are several).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from kvfree.report.tables import atomic_write, markdown_table, write_json


def best_lrs(rows: list[dict]) -> dict[str, float]:
    out = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        by_lr: dict[float, list[float]] = {}
        for r in rows:
            if r["model"] == model:
                by_lr.setdefault(r["lr"], []).append(r["val_acc"])
        out[model] = max(sorted(by_lr), key=lambda lr: np.mean(by_lr[lr]))
    return out


def summarise(rows: list[dict]) -> dict:
    """Per model at its best LR: per-cell test mean/std over seeds, val means, state bytes."""
    lrs = best_lrs(rows)
    models = {}
    for model, lr in lrs.items():
        sel = [r for r in rows if r["model"] == model and r["lr"] == lr]
        cells = {}
        for cell in dict.fromkeys(r["cell"] for r in sel):
            rs = sorted((r for r in sel if r["cell"] == cell), key=lambda r: r["seed"])
            acc = [r["test_acc"] for r in rs]
            cells[cell] = {
                "test_acc": float(np.mean(acc)),
                "test_std": float(np.std(acc)),
                "test_min": float(np.min(acc)),
                "test_max": float(np.max(acc)),
                **{k: [r.get(k) for r in rs] for k in REACHED if k in rs[0]},
                "val_acc": float(np.mean([r["val_acc"] for r in rs])),
                "seeds": [r["seed"] for r in rs],
                "test_by_seed": acc,
                "state_bytes": rs[0]["state_bytes"],
                "state_bytes_formula": rs[0]["state_bytes_formula"],
                "seq_len": rs[0]["seq_len"],
                **{k: rs[0][k] for k in rs[0] if k not in _ROW_KEYS},
            }
        longest = max(cells.values(), key=lambda c: c["seq_len"])
        first_cell = sorted(
            (r for r in sel if r["cell"] == sel[0]["cell"]), key=lambda r: r["seed"]
        )
        models[model] = {
            "lr": lr,
            "lrs_tried": sorted({r["lr"] for r in rows if r["model"] == model}),
            "cells": cells,
            "mean_test_acc": float(np.mean([c["test_acc"] for c in cells.values()])),
            "mean_val_acc": float(np.mean([c["val_acc"] for c in cells.values()])),
            "state_bytes_at_longest": longest["state_bytes"],
            "longest_seq_len": longest["seq_len"],
            "params": sel[0]["params"],
            "oracle_mask": sel[0]["oracle_mask"],
            "seeds": sorted({r["seed"] for r in sel}),
            "outcomes": [r.get("outcome") for r in first_cell],
            "steps": [r.get("steps") for r in first_cell],
            "steps_cap": first_cell[0].get("steps_cap", first_cell[0].get("steps")),
            "train_seconds": float(
                np.mean([r["train_seconds"] for r in sel if r["cell"] == sel[0]["cell"]])
            ),
        }
    return models


REACHED = ("examples_to_0.9", "examples_to_0.99")
_ROW_KEYS = {
    *REACHED,
    "steps_cap",
    "examples_seen",
    "outcome",
    "curve",
    "grid",
    "task",
    "model",
    "seed",
    "lr",
    "cell",
    "seq_len",
    "val_acc",
    "test_acc",
    "n_val",
    "n_test",
    "state_bytes",
    "state_bytes_formula",
    "params",
    "oracle_mask",
    "steps",
    "batch_size",
    "train_seconds",
    "final_loss",
    "job",
}


def _kilo(n: float) -> str:
    return f"{n / 1000:.1f}k" if n >= 1000 else f"{n:g}"


def _reached(values: list, cap: int) -> str:
    """Median examples over the seeds; ``> cap`` when no seed reached the threshold within the
    cap; ``median (k/n)`` over the k of n seeds that did."""
    got = [v for v in values if v is not None]
    if not got:
        return f"> {_kilo(cap)}"
    med = _kilo(float(np.median(got)))
    return med if len(got) == len(values) else f"{med} ({len(got)}/{len(values)})"


def _stops(s: dict, batch: int) -> str:
    """Why and when each seed's run ended: converged / patience / budget @ examples."""
    outs = s.get("outcomes") or []
    if not any(outs):
        return "—"
    return ", ".join(
        f"{o} @ {_kilo(st * batch)}" for o, st in zip(outs, s["steps"]) if o is not None
    )


def _label(model: str, s: dict) -> str:
    return f"{model} (oracle prefix mask)" if s["oracle_mask"] else model


SHORT = {"num_kv_pairs": "M", "gap": "gap", "input_seq_len": "L", "seq_len": "L", "n": "n"}


def _cell_label(cell: dict, axes) -> str:
    keys = [k for k in axes if k in cell] or sorted(k for k in cell if k in SHORT)
    return " ".join(f"{SHORT.get(k, k)}={cell[k]}" for k in keys)


def _fmt_seeds(accs: list[float]) -> str:
    m = f"{np.mean(accs):.3f}"
    return m + (f" ({min(accs):.3f}–{max(accs):.3f})" if len(accs) > 1 else "")


def length_table(summary: dict, axes) -> str:
    """Per model and length: each seed's mean over the cell's other axes (e.g. needle depth),
    then mean (min–max) over seeds. Empty when no length has more than one cell."""
    others = [a for a in axes if a != "seq_len"]
    if "seq_len" not in axes or not others:
        return ""
    rows = []
    for model, s in summary.items():
        by_len: dict[int, list[dict[int, float]]] = {}
        for x in s["cells"].values():
            per_seed = dict(zip(x["seeds"], x["test_by_seed"]))
            by_len.setdefault(x["seq_len"], []).append(per_seed)
        rec = {"model": _label(model, s)}
        for L, cells in sorted(by_len.items()):
            seeds = set.intersection(*(set(c) for c in cells))  # seeds every cell has
            rec[f"L={L}"] = _fmt_seeds([float(np.mean([c[k] for c in cells])) for k in seeds])
        rows.append(rec)
    if all(len(cells) == 1 for cells in by_len.values()):
        return ""  # one cell per length: the main table says it already
    return (
        f"\nPer length, mean over {', '.join(others)} (each seed's mean, then mean and min–max "
        "over seeds):\n\n" + markdown_table(rows)
    )


def markdown(summary: dict, meta: dict) -> str:
    grid = meta["grid"]
    models = summary
    cells = list(next(iter(models.values()))["cells"])
    first = next(iter(models.values()))["cells"]
    labels = {c: _cell_label(first[c], grid["axes"]) for c in cells}
    acc_rows, byte_rows, reach_rows = [], [], []
    for model, s in models.items():
        rec = {"model": _label(model, s)}
        for c in cells:
            x = s["cells"].get(c)
            rec[labels[c]] = None if x is None else _fmt_seeds(x["test_by_seed"])
        rec["mean"] = f"{s['mean_test_acc']:.3f}"
        rec["stopped (per seed)"] = _stops(s, grid["batch_size"])
        rec["LR"] = f"{s['lr']:g}"
        rec["params"] = s["params"]
        acc_rows.append(rec)
        brec = {"model": _label(model, s)}
        for c in cells:
            x = s["cells"].get(c)
            brec[labels[c]] = None if x is None else x["state_bytes"]
        byte_rows.append(brec)
        reach_cells = [c for c in cells if REACHED[0] in s["cells"].get(c, {})]
        if grid.get("eval_every") and reach_cells:
            erec = {"model": _label(model, s)}
            cap = s["steps_cap"] * grid["batch_size"]
            for c in reach_cells:
                x = s["cells"].get(c)
                parts = None if x is None else [_reached(x[k], cap) for k in REACHED]
                erec[labels[c]] = (
                    None
                    if parts is None
                    else parts[0]
                    if parts[0] == parts[1]
                    else " / ".join(parts)
                )
            reach_rows.append(erec)
    seeds = sorted({x for s in models.values() for x in s["seeds"]})
    lrs = sorted({x for s in models.values() for x in s["lrs_tried"]})
    env = meta.get("env", {})
    workers, threads = meta.get("workers", 1), meta.get("threads_per_worker")
    compute = (
        f"{workers} worker process(es) × {threads} torch thread(s)"
        if threads
        else f"{env.get('threads', '?')} torch threads"
    )
    wall = meta.get("wall_seconds_this_run")
    timing = (
        f" Wall time {wall:.0f} s for the {meta.get('jobs_run')} runs trained in that invocation."
        if wall and meta.get("jobs_run")
        else ""
    )
    if meta.get("merged_from"):
        parts = [
            f"seeds {m['seeds']} of {len(m['models'])} model(s) on {m['env'].get('device', '?')}, "
            f"{m.get('workers', 1)} × "
            f"{m.get('threads_per_worker') or m['env'].get('threads', '?')} thread(s)"
            + (f", {m['wall_seconds_this_run']:.0f} s" if m.get("wall_seconds_this_run") else "")
            for m in meta["merged_from"]
        ]
        compute = "worker processes × torch threads as listed next"
        timing = (
            f" Merged from {len(parts)} invocations (`kvfree report recall-merge`): "
            + "; ".join(parts)
            + "."
        )
    where = (
        "validation cell ("
        + ", ".join(_cell_label(c, grid["axes"]) for c in grid["val_cells"])
        + ")"
        if grid.get("val_cells")
        else "cell"
    )
    stop = (
        f"until every {where} reaches {grid['target']:g} validation accuracy or "
        f"{grid['patience']} evaluations without improvement after step "
        f"{grid.get('patience_after', 0)}, at most {grid['steps']} steps"
        if grid.get("eval_every")
        else f"{grid['steps']} steps"
    )
    length = (
        stop if grid.get("train_examples") is None else f"{grid['epochs']} epochs of a fixed set"
    )
    head = (
        f"Task `{grid['task']}`, grid `{grid['name']}` ({grid['train']} training, "
        f"{length}, batch {grid['batch_size']}); test accuracy per cell "
        f"({grid['n_test']} held-out "
        f"examples per cell, test seeds ≥ 2³¹), mean over seeds {seeds}. Learning rates "
        f"tried: {lrs} (column LR: the model's LR; with several, the best by validation "
        "accuracy, never by test). "
        f"Measured on {env.get('device', '?')} ({env.get('device_name', '')}, "
        f"{env.get('cpu_count', '?')} cores), torch {env.get('torch', '?')}, {compute}."
        f"{timing}\n\n"
    )
    note = (
        "\nState bytes of the decode state after prefilling each cell's sequence "
        "(measured `kvfree.state_bytes`, fp32, all layers; attention's KV cache grows "
        "with the length):\n\n"
    )
    foot = ""
    if grid["task"] == "mqar_gap":
        ms = sorted({first[c]["num_kv_pairs"] for c in cells if "num_kv_pairs" in first[c]})
        shortcut = ", ".join(f"{sum(1 / i for i in range(1, m + 1)) / m:.2f} (M = {m})" for m in ms)
        foot = (
            "\nReference points: chance is 1/64 = 0.016; a model that matches no key but "
            "answers with a context value not yet queried (every key is queried once) "
            f"scores H_M/M = {shortcut}.\n"
        )
    reach = ""
    if reach_rows:
        reach = (
            "\nExamples seen until the validation accuracy (train-seed range, evaluated every "
            f"{grid.get('eval_every')} steps) first reached 0.9 / 0.99 (one number: the same "
            "for both), median over seeds; `> N`: not within the cap of N examples; `(k/n)`: "
            "only k of n seeds reached it, median over those:\n\n" + markdown_table(reach_rows)
        )
    return (
        head
        + markdown_table(acc_rows)
        + length_table(models, grid["axes"])
        + foot
        + reach
        + note
        + markdown_table(byte_rows)
        + (
            "\nSKA rows marked *oracle prefix mask* receive the query boundary from the task "
            "(docs/ska.md §16); the unmarked SKA row is the headline, causal, without a mask.\n"
            if any(s["oracle_mask"] for s in models.values())
            else ""
        )
    )


def write_outputs(out_dir: str | Path, rows: list[dict], meta: dict, plots: bool = True) -> dict:
    out_dir = Path(out_dir)
    summary = summarise(rows)  # everything is computed before the first file is replaced
    md = markdown(summary, meta)
    atomic_write(out_dir / "results.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    write_json(out_dir / "summary.json", {"meta": meta, "models": summary})
    atomic_write(out_dir / "recall.md", md)
    files = [out_dir / "results.jsonl", out_dir / "summary.json", out_dir / "recall.md"]
    if plots:
        files += make_plots(out_dir, summary, meta, rows)
    return {"summary": summary, "markdown": md, "files": [str(f) for f in files], "meta": meta}


def reference_points(task: str, cells: list[dict]) -> list[tuple[str, float]]:
    """(label, accuracy) lines worth drawing: chance and the no-binding plateau H_M/M."""
    if task == "text_niah":
        return [("chance 0.1 (a digit)", 0.1)]
    if task != "mqar_gap":
        return []
    ms = sorted({c["num_kv_pairs"] for c in cells if "num_kv_pairs" in c})
    return [("chance 1/64", 1 / 64)] + [
        (f"H_M/M, M={m}", sum(1 / i for i in range(1, m + 1)) / m) for m in ms
    ]


def curve_panels(rows: list[dict], summary: dict, axes) -> dict[str, dict[str, dict]]:
    """Learning curves per cell and model (at its selected LR): mean and min–max over seeds
    at each evaluation, up to the last evaluation every seed reached; ``tails``: each longer
    seed's curve from there on (so that a seed left on a plateau stays visible)."""
    panels: dict[str, dict[str, dict]] = {}
    for model, s in summary.items():
        for cell, x in s["cells"].items():
            curves = [
                r["curve"]
                for r in rows
                if r["model"] == model
                and r["lr"] == s["lr"]
                and r["cell"] == cell
                and r.get("curve")
            ]
            if not curves:
                continue
            n = min(len(c) for c in curves)
            acc = np.array([[p[1] for p in c[:n]] for c in curves])
            label = _cell_label(x, axes)
            panels.setdefault(label, {})[_label(model, s)] = {
                "x": [p[0] for p in curves[0][:n]],
                "mean": acc.mean(0).tolist(),
                "lo": acc.min(0).tolist(),
                "hi": acc.max(0).tolist(),
                "tails": [
                    ([p[0] for p in c[n - 1 :]], [p[1] for p in c[n - 1 :]])
                    for c in curves
                    if len(c) > n
                ],
            }
    return panels


def make_plots(
    out_dir: Path, summary: dict, meta: dict, rows: list[dict] | None = None
) -> list[Path]:
    from kvfree.report.plots import accuracy_vs_state, heatmap, heatmaps, learning_curves

    g = meta["grid"]
    rk, ck = g["axes"]
    files, panels = [], {}
    all_rows, all_cols = set(), set()
    for model, s in summary.items():
        vals = {(c[rk], c[ck]): c["test_acc"] for c in s["cells"].values() if rk in c and ck in c}
        if not vals:
            continue
        rows_ = sorted({k[0] for k in vals})
        cols_ = sorted({k[1] for k in vals})
        all_rows |= set(rows_)
        all_cols |= set(cols_)
        panels[_label(model, s)] = vals
        safe = model.replace("/", "_").replace("[", "_").replace("]", "").replace("=", "")
        files.append(
            heatmap(
                vals,
                rows_,
                cols_,
                out_dir / f"heatmap_{safe}.png",
                title=f"{_label(model, s)}: test accuracy ({g['task']})",
                row_label=rk,
                col_label=ck,
            )
        )
    if panels:
        files.append(
            heatmaps(
                panels,
                sorted(all_rows),
                sorted(all_cols),
                out_dir / "heatmaps.png",
                title=f"{g['task']} ({g['name']}): test accuracy per cell",
                row_label=rk,
                col_label=ck,
            )
        )
    cells = [c for s in summary.values() for c in s["cells"].values()]
    points = [
        {
            "model": _label(m.split("[")[0], s),
            "state_bytes": s["state_bytes_at_longest"],
            "accuracy": s["mean_test_acc"],
        }
        for m, s in summary.items()
    ]
    files.append(
        accuracy_vs_state(
            points,
            out_dir / "acc_vs_state.png",
            title=f"{g['task']} ({g['name']}): mean test accuracy vs state bytes",
            refs=reference_points(g["task"], cells),
        )
    )
    curves = curve_panels(rows or [], summary, g["axes"])
    if curves:
        refs = {
            _cell_label(c, g["axes"]): reference_points(g["task"], [c])
            for s in summary.values()
            for c in s["cells"].values()
        }
        files.append(
            learning_curves(
                curves,
                out_dir / "learning_curves.png",
                title=f"{g['task']} ({g['name']}): validation accuracy while training "
                "(mean over seeds, band min–max; thin: a seed trained on after the others stopped)",
                refs=refs,
            )
        )
    return files


def _load_run(run_dir: Path) -> tuple[list[dict], dict]:
    path = run_dir / "results.jsonl"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: run `kvfree bench recall --out {run_dir}` first"
        )
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows, json.loads((run_dir / "summary.json").read_text())["meta"]


_INVOCATION = (
    "models",
    "seeds",
    "wall_seconds_this_run",
    "jobs_run",
    "workers",
    "threads_per_worker",
)


def merge(out_dir: str | Path, sources: list[str | Path], plots: bool = True) -> dict:
    """Combine the rows of several ``bench recall`` folders of the same grid (seeds or models
    trained in separate invocations, on one machine or several) into ``out_dir`` and regenerate
    its tables and plots. ``out_dir`` may be one of the sources. A (model, seed, LR) run in two
    sources, or a grid that differs, is an error; everything is checked before anything is
    written."""
    if len(sources) < 2:
        raise ValueError("give at least two run folders to merge")
    if (Path(out_dir) / "results.jsonl").exists() and Path(out_dir).resolve() not in {
        Path(s).resolve() for s in sources
    }:
        raise FileExistsError(
            f"{out_dir} already holds results that are not among the sources: name it as a "
            "source to merge into it, or choose another folder"
        )
    loaded = [(Path(s), *_load_run(Path(s))) for s in sources]
    grid = loaded[0][2]["grid"]
    owner: dict[tuple, Path] = {}
    rows: list[dict] = []
    for src, src_rows, meta in loaded:
        if meta["grid"] != grid:
            raise ValueError(
                f"{src} was run on another grid than {loaded[0][0]} (grid "
                f"{meta['grid']['name']!r} vs {grid['name']!r}, or changed settings): only "
                "runs of the same grid merge"
            )
        for run in dict.fromkeys((r["model"], r["seed"], r["lr"]) for r in src_rows):
            if run in owner:
                raise ValueError(
                    f"{run[0]} seed {run[1]} LR {run[2]:g} is in both {owner[run]} and {src}: "
                    "keep one of them"
                )
            owner[run] = src
        rows += src_rows
    metas = [m for _, _, m in loaded]
    meta = {
        "grid": grid,
        "models": list(dict.fromkeys(m for x in metas for m in x["models"])),
        "seeds": sorted({s for x in metas for s in x["seeds"]}),
        "env": metas[0]["env"],
        "merged_from": [  # one entry per invocation (a merged source brings its own list)
            e
            for src, _, m in loaded
            for e in m.get("merged_from")
            or [{"folder": str(src), **{k: m.get(k) for k in _INVOCATION}, "env": m["env"]}]
        ],
    }
    for key in ("workers", "threads_per_worker"):
        if len({e.get(key) for e in meta["merged_from"]}) == 1:
            meta[key] = meta["merged_from"][0].get(key)
    return write_outputs(out_dir, rows, meta, plots=plots)


def report(run_dir: str | Path, plots: bool = True) -> dict:
    """Regenerate summary, markdown and plots from ``run_dir/results.jsonl``."""
    rows, meta = _load_run(Path(run_dir))
    return write_outputs(run_dir, rows, meta, plots=plots)
