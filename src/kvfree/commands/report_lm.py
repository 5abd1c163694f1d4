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


def lm_rows(run_dirs) -> list[dict]:
    import json
    from pathlib import Path

    rows = []
    for d in run_dirs:
        path = Path(d) / "summary.json"
        if not path.exists():
            continue
        s = json.loads(path.read_text())
        if "val" not in s:
            continue
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


@report_app.command("lm")
def report_lm(
    runs: list[str] = typer.Argument(..., help="Run folders (e.g. runs/lm-*)."),
    readme: str = typer.Option(None, help="Also replace the README section 'lm' with the table."),
) -> None:
    """Validation bits per byte / perplexity, size, steps, tokens, wall time and the
    decode-vs-parallel difference of each LM run, as markdown."""
    from kvfree.report.tables import markdown_table

    rows = lm_rows(runs)
    if not rows:
        raise typer.BadParameter("no run folder with an LM summary.json among the arguments")
    table = markdown_table(rows, COLUMNS)
    print(table)
    if readme:
        from kvfree.report.tables import update_readme_section

        update_readme_section(readme, "lm", table)
        print(f"updated section 'lm' of {readme}")
