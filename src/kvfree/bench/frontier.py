"""``kvfree bench frontier``: recall accuracy against state bytes, one line per family — KV-cache
engineering (fewer KV heads, a latent cache, a window), hybrids and fixed states on one axis
(docs/frontier.md).

Every point is a model trained by ``bench recall`` on the same grid with the same cap and
stopping rule (``recall_convergence.py``), seeds alike; its x is the measured decode-state bytes
after prefilling the grid's longest cell (fp32, all layers), its y the test accuracy — mean over the
grid's cells, mean (min–max) over seeds. A family's points differ in one size (width, KV heads,
latent width, window, d_state, rank). Reported per family: the smallest state reaching 0.9 and 0.99.
Drawn with the points: the information floor N·log₂V_values bits of the largest cell (no memory
holding all N pairs can be smaller at accuracy 1) and zoology's published points (another task and
grid: a reference, labelled).

Quantised and evicting caches (:data:`POST_TRAINING`: ``attention(kv_bits=8|4|2)``,
``attention_h2o``, ``attention_snapkv`` at token budgets) are not trained: each is the trained
full-attention model of the same seed with its cache replaced (the parameters are the same),
evaluated through **decode** — the prompt up to the first query prefilled (H2O and SnapKV cut
it there), then one ``step`` per token — on the same test sets, bytes measured on that decode
state. The trained model itself is evaluated the same way as a check (``decode check`` row: it
must equal its parallel accuracy).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

#: preset -> {family: [model specs, smallest state first]}
PRESETS: dict[str, dict[str, list[str]]] = {
    "cpu": {
        "attention (KV cache)": [
            "recall-attention[attention.num_kv_heads=1]",
            "recall-attention",
        ],
        "sliding window": [
            "recall-attention[attention.window=16]",
            "recall-attention[attention.window=64]",
        ],
        "MLA (latent KV)": ["recall-mla[mla.latent_dim=8,mla.rope_dim=8]", "recall-mla"],
        "Gated DeltaNet": ["recall-gdn[d_model=32]", "recall-gdn"],
        "KDA (per-channel decay)": ["recall-kda[d_model=32]", "recall-kda"],
        "Gated DeltaNet-2": ["recall-gdn2[d_model=32]", "recall-gdn2"],
        "Mamba-2": ["recall-mamba2", "recall-mamba2[mamba2.d_state=64]"],
        "Mamba-3 (SISO)": ["recall-mamba3", "recall-mamba3[mamba3.d_state=64]"],
        "Mamba-3 (MIMO r = 4)": ["recall-mamba3-mimo"],
        "Mamba-2 + SKA": ["recall-mamba2-ska[ska.rank=8]", "recall-mamba2-ska"],
        "hybrid GDN + window": ["recall-gdn-swa"],
    },
}
PRESETS["gpu"] = {
    **{f: list(specs) for f, specs in PRESETS["cpu"].items()},
    "attention (KV cache)": [
        "recall-attention[attention.num_kv_heads=1]",
        "recall-attention",
        "recall-attention[d_model=128,attention.num_heads=4]",
    ],
    "Gated DeltaNet": ["recall-gdn[d_model=32]", "recall-gdn", "recall-gdn[d_model=128]"],
    "Mamba-2": [
        "recall-mamba2[mamba2.d_state=8]",
        "recall-mamba2",
        "recall-mamba2[mamba2.d_state=64]",
        "recall-mamba2[d_model=128,mamba2.d_state=64]",
    ],
    "Mamba-2 + SKA": [
        "recall-mamba2-ska[ska.rank=8]",
        "recall-mamba2-ska",
        "recall-mamba2-ska[ska.rank=32]",
    ],
    "hybrid GDN + window": ["recall-gdn-swa", "recall-gdn-attn"],
    "MesaNet": ["recall-mesanet"],
}


def _evicting(kind: str, budget: int) -> str:
    layer = f"attention_{kind}"
    opts = {"num_heads": 2, "positions": "rope", "budget": budget}
    return (
        f'recall-attention[layers=["{layer}","{layer}"],mixer_options='
        f"{json.dumps({layer: opts}, separators=(',', ':'))}]"
    )


_BASE = "recall-attention"
#: preset -> {family: [(trained base spec, post-training variant spec, label)]}, smallest first
POST_TRAINING: dict[str, dict[str, list[tuple[str, str, str]]]] = {
    "cpu": {
        "int4 / int8 KV cache (per token)": [
            (_BASE, f"{_BASE}[attention.kv_bits={b}]", f"{_BASE} + int{b} KV") for b in (4, 8)
        ],
        "KIVI int2 / int4 (per-channel keys; R = 32)": [
            (
                _BASE,
                f"{_BASE}[attention.kv_bits={b},attention.kv_residual=32]",
                f"{_BASE} + KIVI int{b}",
            )
            for b in (2, 4)
        ],
        "H2O (token budget)": [
            (_BASE, _evicting("h2o", B), f"{_BASE} + H2O, B = {B}") for B in (32, 128)
        ],
        "SnapKV (token budget)": [
            (_BASE, _evicting("snapkv", B), f"{_BASE} + SnapKV, B = {B}") for B in (32, 128)
        ],
        "decode check": [(_BASE, _BASE, f"{_BASE} through decode")],
    },
}
POST_TRAINING["gpu"] = POST_TRAINING["cpu"]

#: zoology's figure (docs/frontier.md §1): (family, fp32 state bytes, mean MQAR accuracy over its 7
#: test slices, best LR) read off a plot (±0.02 / ±10 %) — another grid, a reference only
ZOOLOGY = [
    ("attention", 5.2e5, 1.00),
    ("DeltaNet", 8.9e3, 0.79),
    ("DeltaNet", 3.4e4, 0.96),
    ("DeltaNet", 1.34e5, 0.99),
    ("Gated DeltaNet", 1.7e4, 0.89),
    ("Gated DeltaNet", 6.7e4, 0.99),
    ("Based", 1.6e5, 0.99),
]
THRESHOLDS = (0.9, 0.99)


def families(preset: str, only: list[str] | None = None) -> tuple[dict, dict]:
    """(trained families {family: [specs]}, post-training families {family: [(base, variant)]})
    of ``preset``, restricted to ``only``."""
    if preset not in PRESETS:
        raise ValueError(f"unknown frontier preset {preset!r}; choose from {list(PRESETS)}")
    fams, post = PRESETS[preset], POST_TRAINING[preset]
    bad = [f for f in only or [] if f not in fams and f not in post]
    if bad:
        raise ValueError(f"unknown families {bad}; {preset} has {list(fams) + list(post)}")
    keep = lambda d: {f: v for f, v in d.items() if not only or f in only}  # noqa: E731
    return keep(fams), keep(post)


def models_to_train(fams: dict, post: dict) -> list[str]:
    """Every trained spec, and the base of every post-training variant, once."""
    specs = [s for ss in fams.values() for s in ss] + [p[0] for ps in post.values() for p in ps]
    return list(dict.fromkeys(specs))


def information_floor_bytes(grid: dict) -> float | None:
    """N·log₂V_values bits of the grid's largest cell, in bytes: the values a memory must hold
    (mqar_gap: 64 values; zoology's mqar: the V/2 upper tokens of its vocabulary)."""
    cells = grid["cells"]
    if grid["task"] == "mqar_gap":
        from kvfree.tasks.mqar_gap import N_VALUES

        bits = [c["num_kv_pairs"] * math.log2(N_VALUES) for c in cells]
    elif grid["task"] == "mqar":
        from kvfree.tasks.mqar import Config

        v = grid.get("options", {}).get("vocab_size", Config.vocab_size)
        bits = [c["num_kv_pairs"] * math.log2(c.get("vocab_size", v) // 2) for c in cells]
    else:
        return None
    return max(bits) / 8


def at_selected_lr(rows: list[dict]) -> list[dict]:
    """The rows of each model at its LR chosen by validation accuracy (as ``bench recall``'s
    tables), so that a grid sweeping LRs gives one point per model, not a mean over LRs."""
    from kvfree.bench.recall_report import best_lrs

    lr = best_lrs(rows)
    return [r for r in rows if r["lr"] == lr[r["model"]]]


def points(rows: list[dict], fams: dict[str, list[str]]) -> list[dict]:
    """One point per model spec: bytes at the longest cell, mean test accuracy over cells
    (per seed), mean / min / max over seeds."""
    out = []
    for family, specs in fams.items():
        for spec in specs:
            rs = [r for r in rows if r["model"] == spec]
            if not rs:
                continue
            longest = max(r["seq_len"] for r in rs)
            per_seed = [
                float(np.mean([r["test_acc"] for r in rs if r["seed"] == s]))
                for s in sorted({r["seed"] for r in rs})
            ]
            out.append(
                {
                    "family": family,
                    "model": spec,
                    "state_bytes": next(r["state_bytes"] for r in rs if r["seq_len"] == longest),
                    "longest_seq_len": longest,
                    "accuracy": float(np.mean(per_seed)),
                    "acc_min": min(per_seed),
                    "acc_max": max(per_seed),
                    "seeds": len(per_seed),
                    "params": rs[0]["params"],
                }
            )
    return out


def smallest(pts: list[dict]) -> list[dict]:
    """Per family, the smallest state whose mean accuracy reaches each threshold."""
    rows = []
    for family in dict.fromkeys(p["family"] for p in pts):
        fp = sorted((p for p in pts if p["family"] == family), key=lambda p: p["state_bytes"])
        row = {"family": family, "points": len(fp), "seeds": max(p["seeds"] for p in fp)}
        for t in THRESHOLDS:
            hit = next((p for p in fp if p["accuracy"] >= t), None)
            row[f"smallest state ≥ {t:g}"] = (
                f"{hit['state_bytes']:,} B" if hit else f"> {fp[-1]['state_bytes']:,} B"
            )
        best = max(fp, key=lambda p: p["accuracy"])
        row["best accuracy (state)"] = f"{best['accuracy']:.3f} ({best['state_bytes']:,} B)"
        rows.append(row)
    return rows


def markdown(result: dict) -> str:
    from kvfree.report.tables import markdown_table

    pts, meta = result["points"], result["meta"]
    floor = result.get("floor_bytes")
    table = [
        {
            "family": p["family"],
            "model": f"`{p['model']}`" + (" (decode)" if p.get("evaluated") else ""),
            "state bytes": f"{p['state_bytes']:,}",
            "accuracy": f"{p['accuracy']:.3f}"
            + (f" ({p['acc_min']:.3f}–{p['acc_max']:.3f})" if p["seeds"] > 1 else ""),
            "params": f"{p['params']:,}",
        }
        for p in pts
    ]
    env = meta.get("env", {})
    head = (
        f"Grid `{meta['grid']}` of `bench recall` (the same cells, cap and stopping rule for "
        f"every model), seeds {meta['seeds']}; accuracy = test accuracy, mean over the grid's "
        f"cells, mean (min–max) over seeds; state bytes = measured decode state after the "
        f"longest cell ({pts[0]['longest_seq_len'] if pts else '?'} tokens), fp32, all layers"
        + (f"; information floor {floor:g} B" if floor else "")
        + f". {env.get('device', '?')}, torch {env.get('torch', '?')}.\n\n"
    )
    return (
        head + markdown_table(smallest(pts)) + "\nEvery point:\n\n" + markdown_table(table)
    ).rstrip()


def plot(result: dict, path) -> Path:
    from kvfree.report.plots import _plt, _save

    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 4.4))
    pts = result["points"]
    for i, family in enumerate(dict.fromkeys(p["family"] for p in pts)):
        fp = sorted((p for p in pts if p["family"] == family), key=lambda p: p["state_bytes"])
        x = [p["state_bytes"] for p in fp]
        y = [p["accuracy"] for p in fp]
        err = [
            [p["accuracy"] - p["acc_min"] for p in fp],
            [p["acc_max"] - p["accuracy"] for p in fp],
        ]
        ax.errorbar(
            x, y, yerr=err, marker="o", lw=1.4, capsize=2, color=plt.cm.tab20(i % 20), label=family
        )
    zx = [b for _, b, _ in ZOOLOGY]
    ax.scatter(zx, [a for *_, a in ZOOLOGY], marker="x", color="grey", s=22, zorder=3,
               label="zoology's figure (another grid; reference)")  # fmt: skip
    if result.get("floor_bytes"):
        ax.axvline(result["floor_bytes"], color="k", ls=":", lw=1)
        ax.text(result["floor_bytes"], 0.02, " N·log₂V floor", fontsize=7, rotation=90)
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("decode-state bytes at the longest cell (fp32, all layers)")
    ax.set_ylabel("test accuracy (mean over cells)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(
        fontsize=6.5, loc="center left", bbox_to_anchor=(1.01, 0.5)
    )  # outside: no points hidden
    ax.set_title("recall per byte (bars: min–max over seeds)", fontsize=9)
    out = _save(fig, path)
    plt.close(fig)
    return out


def write(out_dir: str | Path, fams: dict[str, list[str]], post: dict | None = None) -> dict:
    """recall_per_byte.json / .md / .png from the recall results in ``out_dir`` (and the
    post-training variants, evaluated here through decode)."""
    from kvfree.bench.frontier_decode import post_training_points, rows_of
    from kvfree.report.tables import atomic_write, write_json

    out_dir = Path(out_dir)
    rows = at_selected_lr(rows_of(out_dir))
    meta = json.loads((out_dir / "summary.json").read_text())["meta"]
    g = meta["grid"]
    pts = points(rows, fams) + post_training_points(out_dir, g, rows, post or {})
    result = {
        "benchmark": "frontier",
        "families": fams,
        "post_training": post or {},
        "points": pts,
        "floor_bytes": information_floor_bytes(g),
        "meta": {"grid": g["name"], "seeds": meta["seeds"], "env": meta.get("env", {})},
    }
    write_json(out_dir / "recall_per_byte.json", result)
    md = markdown(result)
    atomic_write(out_dir / "recall_per_byte.md", md + "\n")
    png = plot(result, out_dir / "recall_per_byte.png")
    return {**result, "markdown": md, "files": [str(out_dir / "recall_per_byte.json"), str(png)]}
