"""Summaries, markdown tables and the README section of ``kvfree bench decode`` results.

Everything here is computed from the result records (``decode.json``), never typed by hand.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from kvfree.bench.decode_worker import element_bytes
from kvfree.report.tables import atomic_write, markdown_table, update_readme_section, write_json

MiB = 2**20
README_SECTION = "decode"  # <!-- BEGIN decode --> … <!-- END decode --> in the README
#: Acceptance: a fixed-memory model's ms/token may grow at most this much from N=512 to 32768.
LATENCY_TOLERANCE = 0.20
ACCEPT_LO, ACCEPT_HI = 512, 32768
#: a fixed-memory model's prefill peak from N = 512 to the largest N may grow at most this much
#: (segmented prefill, LanguageModel.prefill)
PREFILL_PEAK_TOLERANCE = 1.2
#: FDM paper, decode memory at prompt N (docs/fdm.md §9.4): Transformer *recomputing* the sequence
#: every token (no KV cache) vs FDM (decode-only peak, W=64), torch.cuda.max_memory_allocated.
PAPER_WIDTH = 576
PAPER_FDM_MB = {
    128: (853, 867),
    512: (1006, 867),
    1024: (1210, 867),
    2048: (1619, 867),
    4096: (2462, 867),
    8192: (4247, 867),
}


def _by_model(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        out[r["model"]].append(r)
    return {m: sorted(rs, key=lambda r: r["n"]) for m, rs in out.items()}


def kv_cache_formula_bytes(row: dict) -> int | None:
    """2·L·N·d·bytes·batch for a pure full-attention model (every layer grows), else None."""
    if (
        row["fixed_memory"]
        or any(m != "attention" for m in row["layers_config"])
        or any(layer["fixed_memory"] for layer in row["layers"])
    ):
        return None
    return (
        2
        * row["num_layers"]
        * row["n"]
        * row["d_model"]
        * element_bytes(row["dtype"])
        * row["batch"]
    )


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def summarise(rows: list[dict]) -> list[dict]:
    """Per model: state checks, and memory / latency ratios between the largest and smallest N."""
    out = []
    for model, rs in _by_model(rows).items():
        lo, hi = rs[0], rs[-1]
        fixed = all(r["fixed_memory"] for r in rs)
        states = {r["state_bytes"] for r in rs}
        matches = all(
            r["state_bytes"] == r["state_bytes_analytic"]
            and r["state_bytes_end"] == r["state_bytes_end_analytic"]
            for r in rs
        )
        kv = [kv_cache_formula_bytes(r) for r in rs]
        kv_ok = None if kv[0] is None else all(k == r["state_bytes"] for k, r in zip(kv, rs))
        ms = {r["n"]: r["decode_ms_median"] for r in rs}
        cpu = {r["n"]: r.get("decode_cpu_ms_median") for r in rs}
        both = {ACCEPT_LO, ACCEPT_HI} <= set(ms)
        growth = ms[ACCEPT_HI] / ms[ACCEPT_LO] - 1 if both else None
        cpu_growth = (
            cpu[ACCEPT_HI] / cpu[ACCEPT_LO] - 1
            if both and cpu[ACCEPT_LO] and cpu[ACCEPT_HI]
            else None
        )
        paired = {r["n"]: r.get("decode_vs_ref") for r in rs}
        paired_growth = (
            paired[ACCEPT_HI] / paired[ACCEPT_LO] - 1
            if both and paired[ACCEPT_LO] and paired[ACCEPT_HI]
            else None
        )
        peak = {r["n"]: r["prefill_peak_bytes"] for r in rs}
        peak_ratio = (
            _ratio(peak[hi["n"]], peak[ACCEPT_LO]) if ACCEPT_LO in peak and hi["n"] > 512 else None
        )
        s = {
            "model": model,
            "fixed_memory": fixed,
            "n_min": lo["n"],
            "n_max": hi["n"],
            "points": len(rs),
            "state_constant": len(states) == 1,
            "state_matches_formula": matches,
            "kv_formula_ok": kv_ok,
            "formula_diff_bytes": hi["state_bytes"] - hi["state_bytes_analytic"],
            "weight_bytes": lo["weight_bytes"],
            "state_ratio": _ratio(hi["state_bytes"], lo["state_bytes"]),
            "memory_ratio": _ratio(hi["decode_peak_bytes"], lo["decode_peak_bytes"]),
            "steady_memory_ratio": _ratio(
                hi["decode_steady_peak_bytes"], lo["decode_steady_peak_bytes"]
            ),
            "prefill_peak_ratio": _ratio(hi["prefill_peak_bytes"], lo["prefill_peak_bytes"]),
            "latency_ratio": _ratio(hi["decode_ms_median"], lo["decode_ms_median"]),
            "latency_growth_512_32768": growth,
            "cpu_growth_512_32768": cpu_growth,
            "paired_growth_512_32768": paired_growth,
            "repeats": min(r.get("repeats", 1) for r in rs),
            "latency_ok": None if growth is None or not fixed else growth <= LATENCY_TOLERANCE,
            "prefill_peak_ratio_512": peak_ratio,
            "prefill_peak_ok": (
                None if peak_ratio is None or not fixed else peak_ratio <= PREFILL_PEAK_TOLERANCE
            ),
        }
        s["line"] = summary_line(s)
        out.append(s)
    return out


def _x(v: float | None) -> str:
    return "—" if v is None else f"×{v:.3g}"


def summary_line(s: dict) -> str:
    kind = "fixed state" if s["fixed_memory"] else "growing state"
    checks = []
    if s["fixed_memory"]:
        checks.append(
            "state identical at every N" if s["state_constant"] else "STATE CHANGES WITH N"
        )
    checks.append(
        "= formula"
        if s["state_matches_formula"]
        else f"≠ FORMULA by {s['formula_diff_bytes']:+,} B"
    )
    if s["kv_formula_ok"] is not None:
        checks.append("= 2·L·N·d·bytes" if s["kv_formula_ok"] else "≠ 2·L·N·d·bytes")
    line = f"{s['model']} ({kind}; {', '.join(checks)})"
    if s["n_min"] == s["n_max"]:
        return line + f": one point, N={s['n_min']:,}"
    line += (
        f": N {s['n_min']:,}→{s['n_max']:,}: state {_x(s['state_ratio'])}, decode peak "
        f"{_x(s['memory_ratio'])} (steady {_x(s['steady_memory_ratio'])}), prefill peak "
        f"{_x(s['prefill_peak_ratio'])}, ms/token {_x(s['latency_ratio'])}"
    )
    if s.get("prefill_peak_ok") is not None:
        line += (
            f"; prefill peak N=512→{s['n_max']:,} {_x(s['prefill_peak_ratio_512'])} (≤ ×1.2: "
            + ("yes" if s["prefill_peak_ok"] else "NO")
            + ")"
        )
    if s["latency_growth_512_32768"] is not None:
        line += f"; ms/token N=512→32768 {100 * s['latency_growth_512_32768']:+.1f}%"
        if s["latency_ok"] is not None:
            line += " (≤ 20%: " + ("yes" if s["latency_ok"] else "NO") + ")"
        if s.get("cpu_growth_512_32768") is not None:
            line += f", CPU time per token {100 * s['cpu_growth_512_32768']:+.1f}%"
        if s.get("paired_growth_512_32768") is not None:
            line += (
                f", relative to a 16-token decode in the same process "
                f"{100 * s['paired_growth_512_32768']:+.1f}%"
            )
        if s.get("repeats", 1) > 1:
            line += f" (median of {s['repeats']} processes per point)"
    return line


def _mib(b: float | None) -> float | None:
    return None if b is None else b / MiB


def header(result: dict) -> str:
    env, c = result["env"], result["config"]
    threads = sorted({r["threads"] for r in result["rows"]}) or [env.get("threads")]
    method = result["rows"][0]["memory_method"] if result["rows"] else "—"
    return (
        f"Device {env['device']} ({env.get('device_name') or '?'}), "
        f"{'/'.join(str(t) for t in threads)} threads, {env['dtype']}, torch {env['torch']}, "
        f"batch {c['batch']}; {c['decode_steps']} timed decode steps after "
        f"{c['warmup_steps']} warm-up steps (median); "
        f"{'one fresh process per point' if c['isolate'] else 'in-process'}"
        f"{repeats_text(c.get('repeats', 1))}. "
        f"Memory: {method}. Peaks are above the loaded model; weights on their own line. "
        f"ms/token is wall time (the acceptance metric); CPU ms/token is the process CPU "
        f"time of the step, less sensitive to other processes on a shared machine; "
        f"× ref is ms/token over the same process's decode from a 16-token context, "
        f"timed before the prefill (cancels drift between processes).\n"
    )


def repeats_text(repeats: int) -> str:
    return (
        (
            f", {repeats} processes per point in rounds over N (ms/token: median of the "
            f"per-process medians; memory: first round)"
        )
        if repeats > 1
        else ""
    )


def state_table(result: dict) -> str:
    """Per layer at the smallest and largest N: formula, analytic bytes, measured bytes."""
    rows = []
    for model, rs in _by_model(result["rows"]).items():
        for r in ({rs[0]["n"]: rs[0], rs[-1]["n"]: rs[-1]}).values():
            for layer in r["layers"]:
                rows.append(
                    {
                        "model": model,
                        "N": r["n"],
                        **layer,
                        "match": layer["measured_bytes"] == layer["analytic_bytes"],
                    }
                )
            rows.append(
                {
                    "model": model,
                    "N": r["n"],
                    "layer": "total",
                    "mixer": "",
                    "formula": "",
                    "analytic_bytes": r["state_bytes_analytic"],
                    "measured_bytes": r["state_bytes"],
                    "storage_bytes": r["state_storage_bytes"],
                    "match": r["state_bytes"] == r["state_bytes_analytic"],
                }
            )
    return markdown_table(
        rows,
        [
            "model",
            "N",
            "layer",
            "mixer",
            "formula",
            "analytic_bytes",
            "measured_bytes",
            "storage_bytes",
            "match",
        ],
        [
            "model",
            "N",
            "layer",
            "mixer",
            "formula (elements)",
            "formula × bytes",
            "state_bytes (measured)",
            "storage kept alive",
            "equal",
        ],
    )


def grid_table(result: dict) -> str:
    rows = [
        {
            "model": r["model"],
            "N": r["n"],
            "state": _mib(r["state_bytes"]),
            "storage": _mib(r["state_storage_bytes"]),
            "prefill": _mib(r["prefill_peak_bytes"]),
            "decode": _mib(r["decode_peak_bytes"]),
            "steady": _mib(r["decode_steady_peak_bytes"]),
            "tok_s": r["prefill_tok_s"],
            "ms": r["decode_ms_median"],
            "chunk": r.get("prefill_chunk") or "whole",
            "cpu_ms": r.get("decode_cpu_ms_median"),
            "vs_ref": r.get("decode_vs_ref"),
            "spread": f"{r['decode_ms_p10']:.3g}–{r['decode_ms_p90']:.3g}",
        }
        for r in result["rows"]
    ]
    return markdown_table(
        rows,
        [
            "model",
            "N",
            "state",
            "storage",
            "chunk",
            "prefill",
            "decode",
            "steady",
            "tok_s",
            "ms",
            "spread",
            "cpu_ms",
            "vs_ref",
        ],
        [
            "model",
            "N",
            "state (MiB)",
            "storage kept (MiB)",
            "prefill",
            "prefill peak (MiB)",
            "decode peak (MiB)",
            "steady decode peak (MiB)",
            "prefill tok/s",
            "decode ms/token",
            "p10–p90 ms",
            "CPU ms/token",
            "× ref",
        ],
    )


def weights_table(result: dict) -> str:
    """Weights next to the state and the peaks: the share of weights in a weights+peak figure
    (what ``max_memory_allocated`` reports when weights live on the same device)."""
    rows = []
    for r in result["rows"]:
        total = r["weight_bytes"] + r["decode_peak_bytes"]
        rows.append(
            {
                "model": r["model"],
                "N": r["n"],
                "params": r["params"],
                "weights": _mib(r["weight_bytes"]),
                "state": _mib(r["state_bytes"]),
                "kv": _mib(kv_cache_formula_bytes(r)),
                "prefill": _mib(r["prefill_peak_bytes"]),
                "decode": _mib(r["decode_peak_bytes"]),
                "total": _mib(total),
                "share": r["weight_bytes"] / total,
                "pshare": r["weight_bytes"] / (r["weight_bytes"] + r["prefill_peak_bytes"]),
            }
        )
    return markdown_table(
        rows,
        [
            "model",
            "N",
            "params",
            "weights",
            "state",
            "kv",
            "prefill",
            "decode",
            "total",
            "share",
            "pshare",
        ],
        [
            "model",
            "N",
            "params",
            "weights (MiB)",
            "state (MiB)",
            "2·L·N·d·b (MiB)",
            "prefill peak (MiB)",
            "decode peak (MiB)",
            "weights + decode peak (MiB)",
            "weight share (decode)",
            "weight share (prefill)",
        ],
    )


def fdm_paper_note(result: dict) -> str:
    """The FDM paper's memory table redone at the paper's width (d=576): each FDM row next to
    every KV-cached Transformer measured at the same N, weights in their own column, and the
    paper's figures."""
    rows = [r for r in result["rows"] if r["d_model"] == PAPER_WIDTH]
    fdm = [r for r in rows if any(m == "fdm" for m in r["layers_config"])]
    tf = [r for r in rows if kv_cache_formula_bytes(r) is not None]
    table, ratios = [], []
    for f in fdm:
        tfs = [t for t in tf if t["n"] == f["n"] and t["d_model"] == f["d_model"]]
        if not tfs:
            continue
        paper = PAPER_FDM_MB.get(f["n"], (None, None))
        for r in [f, *tfs]:
            total = r["weight_bytes"] + r["decode_peak_bytes"]
            table.append(
                {
                    "model": r["model"],
                    "N": r["n"],
                    "layers": r["num_layers"],
                    "params": r["params"],
                    "weights": _mib(r["weight_bytes"]),
                    "state": _mib(r["state_bytes"]),
                    "kv": _mib(kv_cache_formula_bytes(r)),
                    "prefill": _mib(r["prefill_peak_bytes"]),
                    "decode": _mib(r["decode_peak_bytes"]),
                    "total": _mib(total),
                    "share": f"{100 * r['weight_bytes'] / total:.0f}%",
                    "tok_s": r["decode_tok_s"],
                    "tok_s_all": r.get("tok_s_incl_prefill"),
                    "paper": paper[0 if r is not f else 1],
                }
            )
        f_total = f["weight_bytes"] + f["decode_peak_bytes"]
        for t in tfs:
            t_total = t["weight_bytes"] + t["decode_peak_bytes"]
            ratios.append(
                f"{t['model']} / {f['model']} at N={f['n']:,}: "
                f"{t_total / f_total:.2f}× (weights + decode peak), "
                f"{t['decode_peak_bytes'] / f['decode_peak_bytes']:.1f}× (decode peak "
                f"above weights), {t['state_bytes'] / f['state_bytes']:.1f}× (carried "
                f"state)"
            )
    if not table:
        return ""
    md = markdown_table(
        table,
        [
            "model",
            "N",
            "layers",
            "params",
            "weights",
            "state",
            "kv",
            "prefill",
            "decode",
            "total",
            "share",
            "tok_s",
            "tok_s_all",
            "paper",
        ],
        [
            "model",
            "N",
            "layers",
            "params",
            "weights (MiB)",
            "carried state (MiB)",
            "2·L·N·d·b (MiB)",
            "prefill peak above weights (MiB)",
            "decode peak above weights (MiB)",
            "weights + decode peak (MiB)",
            "weights' share",
            "decode tok/s",
            "tok/s incl. prefill",
            "paper (MB)",
        ],
    )
    paper_note = (
        "Paper column (docs/fdm.md §9.4): `torch.cuda.max_memory_allocated` in MB; its "
        "Transformer had **no KV cache** (it re-ran the whole sequence every token), "
        "its FDM figure is decode-only with W=64 and ≈98% weights and their bf16 "
        "copies.\n"
    )
    return md + "\n" + "".join(f"- {x}\n" for x in ratios) + "\n" + paper_note


def skipped_table(result: dict) -> str:
    if not result["skipped"]:
        return "No point was skipped.\n"
    return markdown_table(result["skipped"], ["model", "n", "reason"], ["model", "N", "reason"])


def markdown(result: dict) -> str:
    parts = ["# Decode memory and speed\n", header(result), "\n## Summary\n"]
    parts += [f"- {s['line']}\n" for s in result.get("summary") or summarise(result["rows"])]
    note = fdm_paper_note(result)
    if note:
        parts += ["\n## FDM paper's memory table, with a KV-cached baseline\n\n", note]
    parts += [
        "\n## Memory and speed vs N\n\n",
        grid_table(result),
        "\n## Weights vs state\n\n",
        weights_table(result),
        "\n## Carried state vs formula (smallest and largest N)\n\n",
        state_table(result),
        "\n## Skipped points\n\n",
        skipped_table(result),
    ]
    return "".join(parts)


def write_outputs(result: dict, out_dir: str | Path, plots: bool = True) -> dict[str, Path]:
    out_dir = Path(out_dir)
    paths = {
        "json": write_json(out_dir / "decode.json", result),
        "markdown": atomic_write(out_dir / "decode.md", markdown(result)),
    }
    if plots and result["rows"]:
        from kvfree.report.decode_plots import plot_latency, plot_memory, plot_prefill_peak

        paths["memory_plot"] = plot_memory(result["rows"], out_dir / "memory_vs_n.png")
        paths["prefill_plot"] = plot_prefill_peak(result["rows"], out_dir / "prefill_peak_vs_n.png")
        paths["latency_plot"] = plot_latency(result["rows"], out_dir / "latency_vs_n.png")
    return paths


def load_result(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "decode.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: run `kvfree bench decode --out {path.parent}` first"
        )
    result = json.loads(path.read_text())
    result["source"] = str(path)
    result["summary"] = summarise(result["rows"])  # with the current checks and wording
    return result


def readme_section(results: list[dict]) -> str:
    """The README section: per result file, its header, summary lines, FDM note and grid."""
    parts = [
        "## Decode memory and speed\n\n",
        "Generated by `kvfree report decode … --readme README.md` from the result files named "
        "below (`kvfree bench decode` writes them; plots beside them).\n",
    ]
    for res in results:
        parts += [f"\n### `{res.get('source', '?')}`\n\n", header(res), "\n"]
        parts += [f"- {s['line']}\n" for s in res["summary"]]
        note = fdm_paper_note(res)
        if note:
            parts += ["\nFDM paper's memory table with a KV-cached baseline:\n\n", note]
        parts += ["\n", grid_table(res)]
        if res["skipped"]:
            parts += ["\n", skipped_table(res)]
    return "".join(parts)


def update_readme(readme: str | Path, section: str) -> Path:
    """Replace the README's generated decode section (appended if absent)."""
    return update_readme_section(readme, README_SECTION, section)
