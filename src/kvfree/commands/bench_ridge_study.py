"""``kvfree bench ridge-study`` and ``kvfree report ridge-study``."""

from __future__ import annotations

import typer

from kvfree.cli import bench_app, report_app


@bench_app.command("ridge-study")
def bench_ridge_study(
    variants: str = typer.Option(
        None,
        help="Comma-separated variant names (default: all; `kvfree bench ridge-study "
        "--list` shows them).",
    ),
    seeds: str = typer.Option("0", help="Comma-separated seeds."),
    out: str = typer.Option("runs/ridge-study", help="Output folder (a rerun resumes)."),
    steps: int = typer.Option(None, help="Step cap per run (default: the main job's)."),
    workers: int = typer.Option(2, help="Parallel worker processes (one torch thread each)."),
    list_: bool = typer.Option(False, "--list", help="List the variants and exit."),
) -> None:
    """Why SKA stays on the no-binding plateau: the main job's SKA recipe with one option
    changed per run (K, β gate, conv, ε, η, out-init, rank, heads, mode, LR, the oracle mask,
    GDN below SKA), learning curves and SKA diagnostics; writes ridge_study.{md,json,png}."""
    from kvfree.bench import ridge_study as rs
    from kvfree.bench.recall import run

    if list_:
        for v in rs.VARIANTS:
            print(f"{v.name:14s} {v.model:52s} lr {v.lr:g}  {v.change}")
        return
    chosen = rs.select([n.strip() for n in (variants or "").split(",") if n.strip()])
    try:
        seed_list = [int(s) for s in seeds.split(",")]
    except ValueError:
        raise typer.BadParameter(f"seeds must be comma-separated integers, got {seeds!r}") from None
    if steps is not None and steps < 1:
        raise typer.BadParameter("steps must be ≥ 1")
    grid = rs.study_grid(chosen, **({"steps": steps} if steps else {}))
    models = list(dict.fromkeys(v.model for v in chosen))
    run(grid, models, seed_list, out, workers=workers, threads=1)
    res = rs.write(out)  # every variant with finished runs, every seed they have
    print(res["markdown"])
    print("wrote " + ", ".join(res["files"]))


@report_app.command("ridge-study")
def report_ridge_study(
    run_dir: str = typer.Argument("results/ridge-study", help="A ridge-study folder."),
    readme: str = typer.Option(None, help="Write the table into this README."),
    section: str = typer.Option("ridge-study", help="README section name."),
) -> None:
    """Regenerate ridge_study.md and ridge_study.png from RUN_DIR/ridge_study.json."""
    from pathlib import Path

    from kvfree.bench import ridge_study as rs
    from kvfree.commands.report_all import _from_json
    from kvfree.report.tables import atomic_write

    def render(summary: dict) -> str:
        md = rs.markdown(summary)
        atomic_write(Path(run_dir) / "ridge_study.md", md + "\n")
        rs.plot(summary, Path(run_dir) / "ridge_study.png")
        return md

    _from_json(run_dir, "ridge_study.json", "bench ridge-study", render, section, readme)
