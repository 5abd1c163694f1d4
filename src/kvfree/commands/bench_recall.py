"""``kvfree bench recall`` and ``kvfree report recall`` / ``kvfree report capacity``."""

from __future__ import annotations

import typer

from kvfree.cli import bench_app, report_app
from kvfree.commands.demo import MAIN_MODELS


def _split(text: str | None) -> list[str]:
    """Comma-separated items; commas inside a model spec's [...] (or JSON) do not split."""
    from kvfree.bench.recall import split_top

    return [t.strip() for t in split_top(text or "") if t.strip()]


def _numbers(text: str | None, kind, name: str) -> list:
    try:
        return [kind(t) for t in _split(text)]
    except ValueError:
        raise typer.BadParameter(f"{name} must be comma-separated numbers, got {text!r}") from None


@bench_app.command("recall")
def bench_recall(
    grid: str = typer.Option(
        "cpu",
        help="Task grid: cpu | echo | zoology-based | zoology-cpu | text-niah | text-niah-mk4.",
    ),
    models: str = typer.Option(
        ",".join(MAIN_MODELS),
        help="Comma-separated model presets; preset\\[key=value,…] overrides "
        "a config field or a mixer option, e.g. recall-gdn\\[d_model=128], "
        "recall-mamba2-ska\\[ska.K=1].",
    ),
    seeds: str = typer.Option("0", help="Comma-separated model seeds (init and data order)."),
    lrs: str = typer.Option(
        None,
        help="Comma-separated learning rates for every model (default: the grid's, which "
        "may differ per model); several = a sweep, best LR per model by validation accuracy.",
    ),
    steps: int = typer.Option(
        None, help="Training steps per run: the cap, the same for every model (default: grid's)."
    ),
    eval_every: int = typer.Option(
        None, help="Validation curve every N steps, 0 = only at the end (default: the grid's)."
    ),
    patience: int = typer.Option(
        None, help="Stop after N evaluations without improvement, 0 = never (default: grid's)."
    ),
    target: float = typer.Option(
        None, help="Stop when every cell's validation accuracy reaches this (default: grid's)."
    ),
    n_val: int = typer.Option(None, help="Validation examples per cell (default: the grid's)."),
    batch_size: int = typer.Option(None, help="Batch size (default: the grid's)."),
    n_test: int = typer.Option(None, help="Test examples per cell (default: the grid's)."),
    out: str = typer.Option("runs/bench-recall", help="Output folder; a rerun resumes."),
    device: str = typer.Option(None, help="cpu | cuda (default: cuda if available)."),
    workers: int = typer.Option(1, help="Parallel worker processes (CPU: one per core)."),
    threads: int = typer.Option(None, help="Torch threads per worker."),
    readme: str = typer.Option(
        None, help="Also write the table into this README (section recall-<grid>)."
    ),
) -> None:
    """Train every model on a recall grid (mixture or per cell), evaluate every cell on held-out
    test examples, several seeds and an optional LR sweep; resumable. Writes results.jsonl,
    recall.md, a heatmap per model and accuracy-vs-state-bytes."""
    from kvfree.bench.recall import run
    from kvfree.bench.recall_grid import GRIDS
    from kvfree.bench.recall_grid import grid as get_grid

    if grid not in GRIDS:
        raise typer.BadParameter(f"unknown grid {grid!r}; choose from {', '.join(GRIDS)}")
    over = {}
    if lrs:  # replaces the grid's LRs, the per-model ones too
        over["lrs"] = _numbers(lrs, float, "lrs")
        over["model_lrs"] = {}
    for key, val in (
        ("steps", steps),
        ("batch_size", batch_size),
        ("n_test", n_test),
        ("n_val", n_val),
    ):
        if val is not None:
            if val < 1:
                raise typer.BadParameter(f"{key} must be ≥ 1")
            over[key] = val
    for key, val in (("eval_every", eval_every), ("patience", patience)):
        if val is not None:
            if val < 0:
                raise typer.BadParameter(f"{key} must be ≥ 0")
            over[key] = val
    if target is not None:
        if not 0 < target <= 1:
            raise typer.BadParameter("target must be in (0, 1]")
        over["target"] = target
    g = get_grid(grid, **over)
    res = run(
        g,
        _split(models),
        _numbers(seeds, int, "seeds"),
        out,
        device=device,
        workers=workers,
        threads=threads,
    )
    print(res["markdown"])
    if readme:
        from kvfree.report.tables import update_readme_section

        update_readme_section(readme, f"recall-{grid}", res["markdown"])
    print("wrote " + ", ".join(res["files"]))


@report_app.command("recall")
def report_recall(
    run_dir: str = typer.Argument(..., help="A `bench recall` (or `demo`) output folder."),
    readme: str = typer.Option(None, help="Write the table into this README."),
    section: str = typer.Option("recall", help="README section name."),
) -> None:
    """Regenerate the recall tables and plots from RUN_DIR/results.jsonl."""
    from kvfree.bench.recall_report import report

    _show(report(run_dir), readme, section)


@report_app.command("recall-merge")
def report_recall_merge(
    out: str = typer.Argument(..., help="Folder for the merged results (may be a source)."),
    sources: list[str] = typer.Argument(..., help="`bench recall` folders of the same grid."),
    readme: str = typer.Option(None, help="Write the table into this README."),
    section: str = typer.Option("recall", help="README section name."),
) -> None:
    """Merge `bench recall` folders of one grid (seeds or models trained in separate
    invocations) into OUT and regenerate its tables and plots."""
    from kvfree.bench.recall_report import merge

    res = merge(out, sources)
    _show(res, readme, section)
    print("wrote " + ", ".join(res["files"]))


def _show(res: dict, readme: str | None, section: str) -> None:
    print(res["markdown"])
    if readme:
        from kvfree.report.tables import update_readme_section

        update_readme_section(readme, section, res["markdown"])
        print(f"updated section {section!r} of {readme}")


@report_app.command("capacity")
def report_capacity(
    run_dir: str = typer.Argument("runs/bench-capacity", help="A `bench capacity` folder."),
    readme: str = typer.Option(None, help="Write the tables into this README."),
    section: str = typer.Option("capacity", help="README section name."),
) -> None:
    """Regenerate the capacity tables and plot from RUN_DIR/capacity.json."""
    import json
    from pathlib import Path

    from kvfree.bench.capacity import capacity_markdown, capacity_plot
    from kvfree.report.tables import atomic_write

    path = Path(run_dir) / "capacity.json"
    if not path.exists():
        raise typer.BadParameter(
            f"{path} not found: run `kvfree bench capacity --out {run_dir}` first"
        )
    result = json.loads(path.read_text())
    md = capacity_markdown(result)
    atomic_write(Path(run_dir) / "capacity.md", md)
    capacity_plot(
        [r for r in result["rows"] if r.get("layout", "iid") == "iid"],
        Path(run_dir) / "capacity.png",
    )
    print(md)
    if readme:
        from kvfree.report.tables import update_readme_section

        update_readme_section(readme, section, md)
        print(f"updated section {section!r} of {readme}")
