"""``kvfree bench fdm-mqar``: the FDM paper's MQAR protocol (docs/tasks.md §3)."""

from __future__ import annotations

import typer

from kvfree.cli import bench_app


def _list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


@bench_app.command("fdm-mqar")
def bench_fdm_mqar(
    out: str = typer.Option("runs/fdm-mqar", help="Output folder (JSON + markdown)."),
    models: str = typer.Option(
        "fdm-k0,fdm-k16,transformer,transformer-rope",
        help="Comma-separated: fdm-k0, fdm-k4, fdm-k8, fdm-k16, "
        "transformer (no positions), transformer-rope.",
    ),
    settings: str = typer.Option("easy,medium", help="Comma-separated: easy, medium, hard."),
    seeds: str = typer.Option("0,1,2", help="Comma-separated model seeds (init + batch order)."),
    epochs: int = typer.Option(100, help="Epochs per run (the paper: 100)."),
    num_examples: int = typer.Option(10_000, help="Sequences (first 10% = test)."),
    lr: float = typer.Option(3e-3, help="Adam learning rate."),
    batch_size: int = typer.Option(128, help="Batch size."),
    device: str = typer.Option(None, help="cpu | cuda (default: cuda if available)."),
    workers: int = typer.Option(
        1, min=1, help="Runs trained at once, each in its own process (CPU: one per core)."
    ),
    threads: int = typer.Option(
        None, min=1, help="Torch CPU threads per run (default: free cores / workers)."
    ),
    resume: bool = typer.Option(
        True,
        help="Reuse finished runs found in OUT/runs and continue runs from their checkpoints "
        "(OUT/runs/*.partial.pt, saved every epoch and on Ctrl-C).",
    ),
    finished_only: bool = typer.Option(
        False,
        help="Train nothing: aggregate the runs in OUT/runs that have finished (same protocol) "
        "and list the missing ones (the table of a sweep still running elsewhere).",
    ),
    readme: str = typer.Option(
        None, help="Also write the table into this README (section 'fdm-mqar')."
    ),
) -> None:
    """Train FDM (K=0, K=16, ...) and Transformers (without / with positions) on FDM's MQAR;
    report final, best-validation and max-over-epochs test accuracy over seeds."""
    from kvfree.bench.fdm_mqar import MODELS, Protocol, run
    from kvfree.tasks.fdm_mqar import SETTINGS

    bad = [m for m in _list(models) if m not in MODELS]
    bad += [s for s in _list(settings) if s not in SETTINGS]
    if bad:
        raise typer.BadParameter(
            f"unknown model/setting {bad}; models: {list(MODELS)}, settings: {list(SETTINGS)}"
        )
    try:
        seed_list = [int(s) for s in _list(seeds)]
    except ValueError:
        raise typer.BadParameter(f"seeds must be comma-separated integers, got {seeds!r}") from None
    p = Protocol(epochs=epochs, lr=lr, batch_size=batch_size, num_examples=num_examples)
    res = run(
        out,
        _list(models),
        _list(settings),
        seed_list,
        p,
        device,
        resume=resume or finished_only,
        train_missing=not finished_only,
        workers=workers,
        threads=threads,
    )
    print(f"wrote {out}/fdm_mqar.json and {out}/fdm_mqar.md ({res['wall_seconds']:.0f} s)")
    if readme:
        from kvfree.report.tables import update_readme_section

        path = update_readme_section(readme, "fdm-mqar", res["markdown"])
        print(f"updated section 'fdm-mqar' of {path}")
