"""``kvfree bench frontier`` and ``kvfree report frontier``: recall per byte (docs/frontier.md)."""

from __future__ import annotations

import typer

from kvfree.cli import bench_app, report_app


@bench_app.command("frontier")
def bench_frontier(
    preset: str = typer.Option(
        "cpu", help="cpu (11 trained families, 20 models) | gpu (more sizes)."
    ),
    families: str = typer.Option(None, help="Comma-separated families (default: all; --list)."),
    grid: str = typer.Option("cpu", help="The bench recall grid every model trains on."),
    seeds: str = typer.Option("0", help="Comma-separated seeds."),
    out: str = typer.Option("runs/frontier", help="Output folder (a rerun resumes)."),
    workers: int = typer.Option(2, min=1, help="Parallel worker processes."),
    threads: int = typer.Option(None, min=1, help="Torch threads per worker (default: split)."),
    list_: bool = typer.Option(False, "--list", help="List the families and their models."),
    readme: str = typer.Option(None, help="Also write the table into this README."),
    section: str = typer.Option(
        "frontier", help="README section name (e.g. frontier-zoology for --grid zoology-cpu)."
    ),
) -> None:
    """Train every family's models on one recall grid (same cap, same stopping rule) and plot
    accuracy against decode-state bytes; the smallest state per family reaching 0.9 / 0.99."""
    from kvfree.bench import frontier as F
    from kvfree.bench.recall import run
    from kvfree.bench.recall_grid import grid as get_grid

    only = [f.strip() for f in (families or "").split(",") if f.strip()]
    fams, post = F.families(preset, only)
    if list_:
        for fam, specs in fams.items():
            print(f"{fam}: " + ", ".join(specs))
        for fam, pairs in post.items():
            print(f"{fam} (post-training, through decode): " + ", ".join(p[2] for p in pairs))
        return
    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise typer.BadParameter(f"seeds must be comma-separated integers, got {seeds!r}") from None
    g = get_grid(grid)
    run(g, F.models_to_train(fams, post), seed_list, out, workers=workers, threads=threads)
    res = F.write(out, fams, post)
    print(res["markdown"])
    print("wrote " + ", ".join(res["files"]))
    if readme:
        from kvfree.report.tables import update_readme_section

        update_readme_section(readme, section, res["markdown"])
        print(f"updated section {section!r} of {readme}")


@report_app.command("frontier")
def report_frontier(
    run_dir: str = typer.Argument("results/frontier", help="A bench frontier output folder."),
    readme: str = typer.Option(None, help="Write the table into this README."),
    section: str = typer.Option("frontier", help="README section name."),
) -> None:
    """Regenerate recall_per_byte.md and .png from RUN_DIR/recall_per_byte.json."""
    from pathlib import Path

    from kvfree.bench import frontier as F
    from kvfree.commands.report_all import _from_json
    from kvfree.report.tables import atomic_write

    def render(result: dict) -> str:
        md = F.markdown(result)
        atomic_write(Path(run_dir) / "recall_per_byte.md", md + "\n")
        F.plot(result, Path(run_dir) / "recall_per_byte.png")
        return md

    _from_json(run_dir, "recall_per_byte.json", "bench frontier", render, section, readme)
