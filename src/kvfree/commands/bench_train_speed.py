"""``kvfree bench train-speed``."""

from __future__ import annotations

import typer

from kvfree.cli import bench_app, report_app


@bench_app.command("train-speed")
def bench_train_speed(
    models: str = typer.Option(
        None, help="Comma-separated recall presets (default: the main job's six)."
    ),
    out: str = typer.Option("runs/bench-train-speed", help="Output folder (JSON + markdown)."),
    steps: int = typer.Option(24, help="Timed training steps per process."),
    warmup: int = typer.Option(8, help="Untimed steps first."),
    rounds: int = typer.Option(3, help="Rounds of (reference, fast) processes per model."),
    threads: int = typer.Option(1, help="torch threads per process (the main job uses 1)."),
    readme: str = typer.Option(
        None, help="Also write the table into this README (section 'train-speed')."
    ),
) -> None:
    """Training steps/s of each recall preset: fast CPU paths vs the reference code path."""
    from kvfree.bench.train_speed import run
    from kvfree.commands.demo import MAIN_MODELS

    names = [m for m in models.split(",") if m] if models else list(MAIN_MODELS)
    res = run(names, out, steps=steps, warmup=warmup, rounds=rounds, threads=threads)
    print(res["markdown"])
    print(f"wrote {out}/train_speed.json and {out}/train_speed.md ({res['wall_seconds']:.0f} s)")
    if readme:
        from kvfree.report.tables import update_readme_section

        path = update_readme_section(readme, "train-speed", res["markdown"])
        print(f"updated section 'train-speed' of {path}")


@report_app.command("train-speed")
def report_train_speed(
    run_dir: str = typer.Argument(..., help="A `bench train-speed` output folder."),
    readme: str = typer.Option(None, help="Write the table into this README."),
    section: str = typer.Option("train-speed", help="README section name."),
) -> None:
    """Regenerate the train-speed table from RUN_DIR/train_speed.json."""
    import json
    from pathlib import Path

    from kvfree.bench.train_speed import render

    path = Path(run_dir) / "train_speed.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `kvfree bench train-speed --out {run_dir}`")
    md = render(json.loads(path.read_text()))
    print(md)
    if readme:
        from kvfree.report.tables import update_readme_section

        update_readme_section(readme, section, md)
        print(f"updated section {section!r} of {readme}")
