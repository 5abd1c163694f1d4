"""``kvfree bench prefill-speed``."""

from __future__ import annotations

import typer

from kvfree.cli import bench_app
from kvfree.commands.bench_decode import _ints


@bench_app.command("prefill-speed")
def bench_prefill_speed(
    models: str = typer.Option(
        None, help="Comma-separated fixed-memory presets (default: bench decode's, attention off)."
    ),
    lengths: str = typer.Option("2048,8192", help="Comma-separated prompt lengths N."),
    segment: int = typer.Option(None, min=1, help="Segment length (default: the models' own)."),
    repeats: int = typer.Option(3, min=1, help="Rounds of (whole, segmented) per N."),
    threads: int = typer.Option(1, min=1, help="torch threads."),
    out: str = typer.Option("runs/bench-prefill-speed", help="Output folder (JSON + markdown)."),
) -> None:
    """Prefill tok/s of each fixed-memory model: whole prompt vs segments, side by side."""
    from kvfree.bench.prefill_speed import DEFAULT_MODELS, run

    names = [m for m in models.split(",") if m] if models else list(DEFAULT_MODELS)
    res = run(names, out, lengths=_ints(lengths), segment=segment, repeats=repeats, threads=threads)
    print(res["markdown"])
    files = f"{out}/prefill_speed.json and {out}/prefill_speed.md"
    print(f"wrote {files} ({res['wall_seconds']:.0f} s)")
