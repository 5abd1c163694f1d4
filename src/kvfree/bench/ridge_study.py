"""The ridge-memory study (``kvfree bench ridge-study``): why SKA stayed on the no-binding
plateau in the main job, one change at a time (docs/ska.md §19).

Every variant is the main job's causal Mamba-2 + SKA recipe (``recall-mamba2-ska``: chunk mode,
β write gate, K = 1) with **one** option changed, trained on the main job's grid (``cpu``: the
8-cell mqar_gap mixture, the same cap, evaluation interval and stopping rule as every model) —
plus the paper-faithful rows (K = 2, the oracle prefix mask) and GDN + SKA. Each run's learning
curve carries SKA's diagnostics (ska_probe.py: gradient norms reaching the key/query/β
projections, cond(G̃), the filler share of the write mass). Results: the bench's own
``results.jsonl`` / ``jobs/*.json`` and plots in the output folder (``results.jsonl`` holds the
models of the last invocation only), plus ``ridge_study.json`` — every variant with finished
runs, every seed, the record to commit — and ``ridge_study.md`` / ``.png`` from it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: The cell the study's verdict is read on (the main job's hardest).
CELL = "gap=256,num_kv_pairs=8"
RECIPE = "recall-mamba2-ska"
MAIN_LR = 3e-3


@dataclass(frozen=True)
class Variant:
    name: str  # short id (``--variants``)
    change: str  # what differs from the recipe
    model: str  # model spec (preset[overrides])
    lr: float = MAIN_LR


VARIANTS = [
    Variant("recipe", "— (chunk, β gate, K = 1)", RECIPE),
    Variant("k0", "K = 0 (pure ridge readout)", f"{RECIPE}[ska.K=0]"),
    Variant("k2", "K = 2 (the paper's power)", f"{RECIPE}[ska.K=2]"),
    Variant("paper", "K = 2, no β gate (the paper's causal SKA)", "recall-mamba2-ska-paper"),
    Variant("no-beta", "no β gate", f"{RECIPE}[ska.beta_gate=false]"),
    Variant("beta-open", "β bias +3 at init (σ = 0.95, open)", f"{RECIPE}[ska.beta_bias_init=3]"),
    Variant(
        "beta-closed", "β bias −3 at init (σ = 0.05, closed)", f"{RECIPE}[ska.beta_bias_init=-3]"
    ),
    Variant("token", "token mode (reads its own chunk too)", f"{RECIPE}[ska.mode=token]"),
    Variant("conv", "short conv (k = 4) on z, q, v", f"{RECIPE}[ska.conv_size=4]"),
    Variant("k2-conv", "K = 2 + short conv", f"{RECIPE}[ska.K=2,ska.conv_size=4]"),
    Variant("k0-conv", "K = 0 + short conv", f"{RECIPE}[ska.K=0,ska.conv_size=4]"),
    Variant("eps-1e-2", "ε = 1e-2 (ridge λ; default 1e-3)", f"{RECIPE}[ska.eps=0.01]"),
    Variant("eps-1e-5", "ε = 1e-5", f"{RECIPE}[ska.eps=1e-05]"),
    Variant("eta-fixed", "η fixed at 1.5 (not learned)", f"{RECIPE}[ska.learn_eta=false]"),
    Variant(
        "layerscale",
        "out-projection: layerscale 1e-4 (not zero)",
        f"{RECIPE}[ska.out_init=layerscale]",
    ),
    Variant("no-specnorm", "no spectral normalisation", f"{RECIPE}[ska.spectral_norm=false]"),
    Variant("rank32", "rank r = 32 (default 16)", f"{RECIPE}[ska.rank=32]"),
    Variant("heads2", "2 heads × P = 32 (default 4 × 16)", f"{RECIPE}[ska.num_heads=2]"),
    Variant("lr-1e-3", "LR 1e-3 (default 3e-3)", RECIPE, 1e-3),
    Variant(
        "prefix", "oracle prefix mask, seqmax, K = 2 (the paper's MQAR)", "recall-mamba2-ska-prefix"
    ),
    Variant("prefix-k1", "oracle prefix mask, seqmax, K = 1", "recall-mamba2-ska-prefix[ska.K=1]"),
    Variant(
        "prefix-k1-l2",
        "oracle prefix mask, ℓ2 keys, K = 1",
        "recall-mamba2-ska-prefix[ska.K=1,ska.norm=l2]",
    ),
    Variant("gdn-ska", "GDN below SKA instead of Mamba-2 (recipe)", "recall-gdn-ska"),
    Variant("gdn-ska-k2", "GDN below SKA, K = 2", "recall-gdn-ska[ska.K=2]"),
]
BY_NAME = {v.name: v for v in VARIANTS}


def select(names: list[str] | None) -> list[Variant]:
    from kvfree.utils import unknown_keys_error

    if not names:
        return list(VARIANTS)
    bad = [n for n in names if n not in BY_NAME]
    if bad:
        raise unknown_keys_error("ridge-study variant", bad, BY_NAME)
    return [BY_NAME[n] for n in names]


def study_grid(variants: list[Variant], **overrides):
    """The main job's grid with each variant's LR."""
    from kvfree.bench.recall_grid import grid

    g = grid("cpu", **overrides)
    lrs: dict[str, list[float]] = {}
    for v in variants:
        lrs.setdefault(v.model, [])
        if v.lr not in lrs[v.model]:
            lrs[v.model].append(v.lr)
    g.model_lrs = {**g.model_lrs, **lrs}
    return g


def _diag(curve: list[dict], step: int | None) -> dict:
    """SKA diagnostics at the first curve point at or after ``step`` (None: the last)."""
    pts = [p for p in curve if "ska" in p]
    if not pts:
        return {}
    if step is None:
        return pts[-1]["ska"]
    return next((p["ska"] for p in pts if p["step"] >= step), pts[-1]["ska"])


def _seeds_run(out_dir: Path, v: Variant) -> list[int]:
    """The seeds with a finished job of variant ``v`` in ``out_dir``."""
    head, tail = _job_id(v, 0).split("__seed0__")
    found = []
    for name in os.listdir(out_dir / "jobs") if (out_dir / "jobs").is_dir() else []:
        if name.startswith(head + "__seed") and name.endswith(f"__{tail}.json"):
            seed = name[len(head) + 6 : -len(tail) - 7]
            if seed.isdigit():
                found.append(int(seed))
    return sorted(found)


def summarise(out_dir: str | Path, variants: list[Variant]) -> dict:
    """Per variant, over every seed that has run: test accuracy on :data:`CELL` and the mean
    over cells (mean, min, max), examples to 0.9 / 0.99, outcomes, and the first seed's diagnostics
    early (step 100) and at the end."""
    out_dir = Path(out_dir)
    rows = []
    for v in variants:
        jobs = [
            json.loads((out_dir / "jobs" / f"{_job_id(v, seed)}.json").read_text())
            for seed in _seeds_run(out_dir, v)
        ]
        if not jobs:
            continue
        cell = [next(r for r in j["rows"] if r["cell"] == CELL) for j in jobs]
        mean_cells = [float(np.mean([r["test_acc"] for r in j["rows"]])) for j in jobs]
        acc = [r["test_acc"] for r in cell]
        rows.append(
            {
                "variant": v.name,
                "change": v.change,
                "model": v.model,
                "lr": v.lr,
                "seeds": [j["job"]["seed"] for j in jobs],
                "per_seed": [
                    {"seed": j["job"]["seed"], "acc": r["test_acc"], "acc_all_cells": m}
                    for j, r, m in zip(jobs, cell, mean_cells, strict=True)
                ],
                "acc": _stat(acc),
                "acc_all_cells": _stat(mean_cells),
                "examples_to_0.9": [r["examples_to_0.9"] for r in cell],
                "examples_to_0.99": [r["examples_to_0.99"] for r in cell],
                "outcome": [f"{r['outcome']} @ {_k(r['examples_seen'])}" for r in cell],
                "cap_examples": cell[0]["steps_cap"] * cell[0]["batch_size"],
                "diag_early": _diag(jobs[0]["curve"], 100),
                "diag_final": _diag(jobs[0]["curve"], None),
                "curve": cell[0]["curve"],
                "state_bytes": cell[0]["state_bytes"],
            }
        )
    return {"cell": CELL, "rows": rows}


def _stat(xs: list[float]) -> dict:
    return {"mean": round(float(np.mean(xs)), 4), "min": min(xs), "max": max(xs), "n": len(xs)}


def _job_id(v: Variant, seed: int) -> str:
    from kvfree.bench.recall import Job

    return Job(v.model, seed, v.lr, [], []).id


def _k(n) -> str:
    return "—" if n is None else f"{n / 1000:.1f}k"


def _num(x, fmt="{:.2g}") -> str:
    return "—" if x is None else fmt.format(x)


def markdown(summary: dict) -> str:
    lines = [
        f"One change at a time from the SKA recipe (`{RECIPE}`), main-job grid `cpu` (same cap "
        f"and stopping rule as every model); test accuracy on M = 8, gap 256 (500 examples) and "
        "the mean over the 4 cells, mean (min–max) over seeds; examples until validation "
        "accuracy first reached 0.9 / 0.99 on that cell (— = not within the cap); SKA "
        "diagnostics of the first seed (ska_probe.py) at step 100 and at the end: ‖∂L/∂W‖ of the "
        "key/query/β projections, median cond(G̃) over the context + gap, the filler share "
        "of the write mass and the mean β on key / value / filler tokens.",
        "",
        "| change | M=8 gap 256 | 4 cells | to 0.9 / 0.99 | stopped | ‖∇k‖ ‖∇q‖ ‖∇β‖ @100 "
        "| cond G̃ (end) | filler share (end) | β key / value / filler (end) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        a, c = r["acc"], r["acc_all_cells"]
        acc = f"{a['mean']:.3f}" + (f" ({a['min']:.3f}–{a['max']:.3f})" if a["n"] > 1 else "")
        cells = f"{c['mean']:.3f}" + (f" ({c['min']:.3f}–{c['max']:.3f})" if c["n"] > 1 else "")
        reach = " / ".join(
            _k(float(np.median(xs))) if all(x is not None for x in xs) else "—"
            for xs in (r["examples_to_0.9"], r["examples_to_0.99"])
        )
        e, f = r["diag_early"], r["diag_final"]
        grads = " ".join(_num(e.get(k)) for k in ("grad_k", "grad_q", "grad_beta"))
        beta = " / ".join(
            _num(f.get(k), "{:.2f}") for k in ("beta_key", "beta_value", "beta_filler")
        )
        lines.append(
            f"| {r['change']} | {acc} | {cells} | {reach} | {', '.join(r['outcome'])} | {grads} "
            f"| {_num(f.get('cond_G'), '{:.3g}')} | {_num(f.get('filler_share'), '{:.2f}')} "
            f"| {beta} |"
        )
    return "\n".join(lines)


def plot(summary: dict, path: str | Path) -> Path:
    """Learning curves on the verdict cell, one line per variant (first seed): solid when the
    variant reached 0.9 within the cap, dashed when it did not; the recipe thick and black."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 6))
    colours = [*plt.get_cmap("tab20").colors, *plt.get_cmap("tab20b").colors]
    for i, r in enumerate(summary["rows"]):
        if not r["curve"]:
            continue
        xs, ys = zip(*r["curve"], strict=True)
        bound = any(x is not None for x in r["examples_to_0.9"])
        recipe = r["variant"] == "recipe"
        ax.plot(
            xs,
            ys,
            "-" if bound else "--",
            marker=".",
            lw=2.5 if recipe else 1.2,
            color="black" if recipe else colours[i % len(colours)],
            label=f"{r['variant']}: {r['change']}",
        )
    h = sum(1 / i for i in range(1, 9)) / 8
    for y, text in ((1 / 64, "chance"), (h, "no-binding plateau H_M/M")):
        ax.axhline(y, color="grey", ls=":", lw=1)
        ax.annotate(
            text,
            (1.0, y),
            xycoords=("axes fraction", "data"),
            xytext=(-4, 3),
            textcoords="offset points",
            ha="right",
            color="grey",
            fontsize=8,
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("training examples seen")
    ax.set_ylabel("validation accuracy, M = 8, gap 256")
    ax.set_ylim(0, 1.02)
    ax.set_title(
        "Ridge study: one change at a time from the SKA recipe "
        "(first seed; dashed: never reached 0.9)"
    )
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def write(out_dir: str | Path, variants: list[Variant] | None = None) -> dict:
    """Summary, table and plot of every variant (default: all) with finished runs."""
    from kvfree.report.tables import atomic_write, write_json

    out_dir = Path(out_dir)
    summary = summarise(out_dir, variants or VARIANTS)
    md = markdown(summary)
    write_json(out_dir / "ridge_study.json", summary)
    atomic_write(out_dir / "ridge_study.md", md + "\n")
    png = plot(summary, out_dir / "ridge_study.png")
    return {
        "summary": summary,
        "markdown": md,
        "files": [str(out_dir / "ridge_study.md"), str(png)],
    }
