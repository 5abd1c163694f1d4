"""Tables and plots of ``kvfree reproduce echo-table2|3`` (aggregates over seeds; the paper's
numbers beside them). ``kvfree report echo-table2|3`` regenerates them from the JSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from kvfree.bench import echo_suite as S
from kvfree.bench import echo_tables as T


def _stat(values) -> dict:
    v = np.asarray(values, float)
    return {"mean": float(v.mean()), "min": float(v.min()), "max": float(v.max()), "n": len(v)}


def _pct(s: dict | None) -> str:
    if s is None:
        return "–"
    text = f"{100 * s['mean']:.1f}"
    return text + (f" ({100 * s['min']:.0f}–{100 * s['max']:.0f})" if s["n"] > 1 else "")


def aggregate(table: str, results: list[dict]) -> list[dict]:
    """One entry per row: the per-length (table 2) or per-task (table 3) statistics."""
    out = []
    for row in dict.fromkeys(r["row"] for r in results):
        rs = [r for r in results if r["row"] == row]
        entry = {
            "row": row,
            "label": S.ROWS[row][0],
            "seeds": [r["seed"] for r in rs],
            "params": rs[0]["params"],
            "paper_column": S.PAPER_COLUMN[row],
        }
        if table == "table2":
            entry["lengths"] = []
            for i, L in enumerate(p["length"] for p in rs[0]["lengths"]):
                per = [r["lengths"][i] for r in rs]
                agree = [p["decode_agree"] for p in per if "decode_agree" in p]
                hidden = [p.get("acc_needle_in_query_chunk") for p in per]
                entry["lengths"].append(
                    {
                        "length": L,
                        "acc": _stat([p["acc"] for p in per]),
                        "acc_needle_in_query_chunk": (
                            _stat(hidden) if None not in hidden else None
                        ),
                        "state_bytes": per[0]["state_bytes"],
                        "decode_agree_min": min(agree) if agree else None,
                        "decode_max_abs_diff": max(
                            (p["decode_max_abs_diff"] for p in per if "decode_agree" in p),
                            default=None,
                        ),
                    }
                )
        else:
            tasks = {}
            for task in T.PAPER_TABLE3:
                if task == "mean":
                    continue
                per_seed = [
                    np.mean([c["acc"] for c in r["cells"] if c["task"] == task]) for r in rs
                ]
                tasks[task] = _stat(per_seed)
            seed_means = [
                np.mean([np.mean([c["acc"] for c in r["cells"] if c["task"] == t]) for t in tasks])
                for r in rs
            ]
            entry["tasks"] = {**tasks, "mean": _stat(seed_means)}
            entry["infeasible"] = rs[0]["infeasible"]
        out.append(entry)
    return out


def _num(v) -> str:
    return "–" if v is None else f"{v:.1f}"


def _cell_name(c: dict) -> str:
    return f"{c['task']} L{c['seq_len']} n{c['n']}"


def _recipe_line(meta: dict) -> str:
    r, env = meta["recipe"], meta["env"]
    return (
        f"Trained once per seed on 50 % SysPrompt + 50 % ToolTrace at length {r['seq_len']} "
        f"(n = 1–{r['max_n']}), AdamW (0.9, 0.95) wd {r['weight_decay']}, LR {r['lr']:g} "
        f"(warm-up {r['warmup_steps']}, cosine), {r['steps']} steps of batch {r['batch_size']}, "
        f"clip {r['grad_clip']}; {r['n_test']} test examples per cell. Accuracy %, mean "
        f"(min–max) over seeds {', '.join(map(str, meta['seeds']))}; the paper: one run. "
        f"{env['device']} ({env.get('device_name', '')}), {meta['workers']} worker(s) × "
        f"{meta['threads_per_worker']} thread(s), torch {env['torch']}; "
        f"{meta['wall_seconds_this_run'] / 60:.0f} min this run."
    )


def markdown(summary: dict) -> str:
    """The table of an ``echo_table2.json`` / ``echo_table3.json`` summary."""
    entries, meta = summary["rows"], summary["meta"]
    table = meta["table"]
    if table == "table2":
        lengths = [x["length"] for x in entries[0]["lengths"]] if entries else []
        span = f"{lengths[0]} → {lengths[-1]}" if lengths else ""
        cols = ["model", *map(str, lengths), f"state bytes {span}", "decoder"]
        lines = []
        for e in entries:
            ls = e["lengths"]
            agree = [x["decode_agree_min"] for x in ls if x["decode_agree_min"] is not None]
            dec = f"{min(agree):.0%} agree" if agree else "–"
            lines.append(
                [
                    f"{e['label']} — kvfree",
                    *(_pct(x["acc"]) for x in ls),
                    f"{ls[0]['state_bytes']:,} → {ls[-1]['state_bytes']:,}",
                    dec,
                ]
            )
            if all(x.get("acc_needle_in_query_chunk") for x in ls):
                lines.append(
                    [
                        f"{e['label']}: needles in the query's chunk only",
                        *(_pct(x["acc_needle_in_query_chunk"]) for x in ls),
                        "",
                        "",
                    ]
                )
        n_test = meta["recipe"]["n_test"]
        for c in sorted({c for e in entries if (c := T.ska_chunk(e["row"]))}):
            shares = (100 * T.chunk_ceiling(L, n_test, c) for L in lengths)
            label = f"SKA ceiling: needle in an earlier chunk of {c} (test set)"
            lines.append([label, *(f"{v:.1f}" for v in shares), "", ""])
        for i, label in enumerate(T.PAPER_LABELS):
            paper = T.PAPER_TABLE2[i]
            lines.append([f"{label} — paper", *(_num(paper.get(L)) for L in lengths), "", ""])
        head = (
            "NIAH, one needle, trained at length 64 (zero-shot: the training mix has no NIAH), "
            f"tested at {span.replace('→', '…')}. Decoder: at every length beyond 64 the first "
            f"{meta['recipe']['decode_examples']} examples also run token by token through the "
            "recurrent decoder; the share of scored positions whose argmax equals the parallel "
            "form's (lowest over lengths and seeds). SKA ceiling: the share of the test "
            "needles that lie in a strictly earlier chunk than the query; chunk-mode SKA reads "
            "only earlier chunks, so a model that recalls through SKA alone cannot exceed it. "
        )
    else:
        cols = ["task", *(e["label"] for e in entries), *(f"{p} paper" for p in T.PAPER_LABELS)]
        lines = []
        for task, paper in T.PAPER_TABLE3.items():
            name = "**mean**" if task == "mean" else task
            lines.append(
                [name, *(_pct(e["tasks"][task]) for e in entries), *(f"{v:.1f}" for v in paper)]
            )
        bad = entries[0]["infeasible"] if entries else []
        head = (
            "Zero-shot transfer: mean accuracy over the grid L ∈ {64, 128, 256, 512} × "
            "n ∈ {1, 2, 4, 8} (feasible cells; SysPrompt and ToolTrace were trained on, at "
            f"length 64). Infeasible cells skipped: {len(bad)} "
            f"({', '.join(_cell_name(c) for c in bad) or 'none'}). "
        )
    out = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    out += "".join("| " + " | ".join(map(str, x)) + " |\n" for x in lines)
    return head + _recipe_line(meta) + "\n\n" + out.rstrip()


def curves(out_dir: Path, entries: list[dict]) -> dict:
    """Learning curves per validation set: {set: {label: {"x", "mean", "lo", "hi"}}}."""
    panels: dict[str, dict] = {name: {} for name in S.VAL_SETS}
    for e in entries:
        recs = [
            json.loads((S.run_dir(out_dir, e["row"], s) / "train.json").read_text())
            for s in e["seeds"]
            if (S.run_dir(out_dir, e["row"], s) / "train.json").exists()
        ]
        if not recs:
            continue
        n = min(len(r["curve"]) for r in recs)
        for name in S.VAL_SETS:
            acc = np.array([[p["acc"][name] for p in r["curve"][:n]] for r in recs])
            panels[name][e["label"]] = {
                "x": [p["examples"] for p in recs[0]["curve"][:n]],
                "mean": acc.mean(0).tolist(),
                "lo": acc.min(0).tolist(),
                "hi": acc.max(0).tolist(),
            }
    return panels


def plot_table2(entries: list[dict], path, n_test: int) -> Path:
    from kvfree.report.plots import _plt, _save

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for i, e in enumerate(entries):
        x = [p["length"] for p in e["lengths"]]
        acc = [p["acc"] for p in e["lengths"]]
        ax.plot(x, [a["mean"] for a in acc], color=f"C{i}", marker="o", lw=1.5, label=e["label"])
        ax.fill_between(
            x, [a["min"] for a in acc], [a["max"] for a in acc], color=f"C{i}", alpha=0.18, lw=0
        )
    for i, label in enumerate(T.PAPER_LABELS):
        ax.plot(
            list(T.PAPER_TABLE2[i]),
            [v / 100 for v in T.PAPER_TABLE2[i].values()],
            color="grey",
            ls=("--", ":", "-.")[i],
            lw=1,
            label=f"{label} (paper)",
        )
    for c in sorted({c for e in entries if (c := T.ska_chunk(e["row"]))}):
        x = [p["length"] for p in entries[0]["lengths"]]
        ceiling = [T.chunk_ceiling(L, n_test, c) for L in x]
        ax.plot(x, ceiling, color="black", ls=":", lw=1.2, label=f"SKA ceiling (chunk {c})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(T.PAPER_TABLE2[0]), [str(L) for L in T.PAPER_TABLE2[0]])
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("test length (trained at 64)")
    ax.set_ylabel("NIAH accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("Echo Table 2: NIAH length generalisation (band: min–max over seeds)", fontsize=9)
    out = _save(fig, path)
    plt.close(fig)
    return out


def render(out_dir: Path, table: str, summary: dict) -> tuple[str, list[Path]]:
    """Write echo_<table>.md and the plots from a summary; returns (markdown, files)."""
    from kvfree.report.plots import learning_curves
    from kvfree.report.tables import atomic_write

    md = markdown(summary)
    files = [atomic_write(out_dir / f"echo_{table}.md", md + "\n")]
    if table == "table2":
        n_test = summary["meta"]["recipe"]["n_test"]
        files.append(plot_table2(summary["rows"], out_dir / "echo_table2.png", n_test))
    panels = {k: v for k, v in summary.get("curves", {}).items() if v}
    if panels:
        files.append(
            learning_curves(
                panels,
                out_dir / "echo_curves.png",
                title="Echo suite: validation accuracy while training (band: min–max over seeds)",
            )
        )
    return md, files


def write_outputs(out_dir: Path, table: str, results: list[dict], meta: dict) -> dict:
    from kvfree.report.tables import write_json

    summary = {
        "benchmark": f"echo_{table}",
        "meta": meta,
        "rows": aggregate(table, results),
        "runs": results,
    }
    summary["curves"] = curves(out_dir, summary["rows"])
    write_json(out_dir / f"echo_{table}.json", summary)
    md, files = render(out_dir, table, summary)
    return {
        **summary,
        "markdown": md,
        "files": [str(f) for f in [out_dir / f"echo_{table}.json", *files]],
    }
