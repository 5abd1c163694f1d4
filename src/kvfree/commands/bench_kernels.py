"""``kvfree bench kernels``."""

from __future__ import annotations

import typer

from kvfree.cli import bench_app


@bench_app.command("kernels")
def bench_kernels(
    out: str = typer.Option("runs/bench-kernels", help="Output folder (JSON + markdown)."),
    mixer: list[str] = typer.Option(None, help="Mixer(s) to time (repeatable); default: all."),
    lengths: str = typer.Option("256,1024,4096", help="Comma-separated sequence lengths."),
    d_model: int = typer.Option(64, help="Model width."),
    batch: int = typer.Option(1, help="Batch size."),
    repeats: int = typer.Option(3, help="Timed repeats (median reported)."),
    device: str = typer.Option(None, help="cpu | cuda (default: cuda if available)."),
    threads: int = typer.Option(
        None, min=1, help="Torch CPU threads (default: free physical cores)."
    ),
    readme: str = typer.Option(
        None, help="Also write the table into this README (section 'kernels')."
    ),
) -> None:
    """Time each mixer's parallel (chunked) form against its per-token loop."""
    from kvfree.bench.kernels import run
    from kvfree.utils import set_threads

    set_threads(threads)

    res = run(
        out,
        mixer or None,
        tuple(int(t) for t in lengths.split(",")),
        d_model,
        batch,
        repeats,
        device,
    )
    print(res["markdown"])
    print(f"wrote {out}/kernels.json and {out}/kernels.md")
    if readme:
        from kvfree.report.tables import update_readme_section

        path = update_readme_section(readme, "kernels", res["markdown"])
        print(f"updated section 'kernels' of {path}")
