"""``kvfree report lm``: the language-modelling table from run folders."""

from __future__ import annotations

import typer

from kvfree.cli import report_app

COLUMNS = [
    "model",
    "layers",
    "params",
    "tokenizer",
    "steps",
    "tokens",
    "wall min",
    "threads",
    "val tokens",
    "val bpb",
    "val ppl",
    "decode Δbpb",
    "max Δnll",
]


def lm_summaries(paths) -> list[dict]:
    """The ``summary.json`` of each LM run folder among ``paths`` (folders without one, or
    without a validation result, are skipped); a ``.json`` file among them is a committed
    record (``--json``) whose summaries are taken as they are."""
    import json
    from pathlib import Path

    out = []
    for d in paths:
        d = Path(d)
        if d.suffix == ".json" and d.is_file():
            out.extend(json.loads(d.read_text())["runs"])
            continue
        path = d / "summary.json"
        if path.exists():
            s = json.loads(path.read_text())
            if "val" in s:
                out.append(s)
    return out


def lm_rows(summaries: list[dict]) -> list[dict]:
    rows = []
    for s in summaries:
        p, dec = s["val"]["parallel"], s["val"].get("decode", {})
        layers = s.get("layers", [])
        short = "+".join(sorted(set(layers), key=layers.index)) + f" ×{len(layers)}"
        rows.append(
            {
                "model": s.get("preset") or s.get("name"),
                "layers": short,
                "params": s["parameters"],
                "tokenizer": s["tokenizer"],
                "steps": s["steps"],
                "tokens": s["tokens_seen"],
                "wall min": round(s["train_wall_seconds"] / 60, 1),
                "threads": s.get("threads"),
                "val tokens": p["tokens"],
                "val bpb": p["bpb"],
                "val ppl": p["ppl"],
                "decode Δbpb": f"{dec['bpb_diff']:+.1e}" if dec else None,
                "max Δnll": f"{dec['max_token_nll_diff']:.1e}" if dec else None,
            }
        )
    return rows


def lm_markdown(record: dict) -> str:
    """The README 'lm' table from a committed record ``{"runs": [summary, ...]}``."""
    from kvfree.report.tables import markdown_table

    return markdown_table(lm_rows(record["runs"]), COLUMNS)


@report_app.command("lm")
def report_lm(
    runs: list[str] = typer.Argument(
        ..., help="Run folders (e.g. runs/lm-*) or a committed record (results/lm/lm.json)."
    ),
    json_out: str = typer.Option(
        None, "--json", help="Also write the runs' summaries to this record (results/lm/lm.json)."
    ),
    readme: str = typer.Option(None, help="Also replace the README section 'lm' with the table."),
) -> None:
    """Validation bits per byte / perplexity, size, steps, tokens, wall time and the
    decode-vs-parallel difference of each LM run, as markdown."""
    summaries = lm_summaries(runs)
    if not summaries:
        raise typer.BadParameter("no run folder with an LM summary.json among the arguments")
    record = {"runs": summaries}
    table = lm_markdown(record)
    print(table)
    if json_out:
        from kvfree.report.tables import write_json

        write_json(json_out, record)
        print(f"wrote {json_out}")
    if readme:
        from kvfree.report.tables import update_readme_section

        update_readme_section(readme, "lm", table)
        print(f"updated section 'lm' of {readme}")
