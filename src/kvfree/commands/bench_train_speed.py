"""``kvfree bench train-speed``."""

from __future__ import annotations

import typer

from kvfree.cli import bench_app


@bench_app.command("train-speed")
def bench_train_speed(
    models: str = typer.Option(
        None, help="Comma-separated recall presets (default: the main job's models)."
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
