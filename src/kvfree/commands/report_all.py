"""``kvfree report all``, ``report kernels`` and ``report train-speed``: README sections from
result files (``results/`` holds the committed ones)."""

from __future__ import annotations

import typer

from kvfree.cli import report_app


@report_app.command("all")
def report_all(
    results: str = typer.Argument("results", help="The folder of committed results."),
    readme: str = typer.Option(None, help="Write every regenerated section into this README."),
) -> None:
    """Regenerate every README section that has committed results (results/<bench>/)."""
    from kvfree.report.sections import SECTIONS, regenerate

    done = regenerate(results, readme)
    for section, (folder, required, _) in SECTIONS.items():
        state = "regenerated" if section in done else f"skipped (no {results}/{folder}/{required})"
        print(f"{section}: {state}")
    if readme:
        print(f"updated {len(done)} section(s) of {readme}")


def _from_json(run_dir: str, filename: str, command: str, render, section: str, readme) -> None:
    import json
    from pathlib import Path

    path = Path(run_dir) / filename
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `kvfree {command} --out {run_dir}`")
    md = render(json.loads(path.read_text()))
    print(md)
    if readme:
        from kvfree.report.tables import update_readme_section

        update_readme_section(readme, section, md)
        print(f"updated section {section!r} of {readme}")


@report_app.command("kernels")
def report_kernels(
    run_dir: str = typer.Argument(..., help="A `bench kernels` output folder."),
    readme: str = typer.Option(None, help="Write the table into this README."),
    section: str = typer.Option("kernels", help="README section name."),
) -> None:
    """Regenerate the kernels table from RUN_DIR/kernels.json."""
    from kvfree.bench.kernels import kernels_markdown

    _from_json(run_dir, "kernels.json", "bench kernels", kernels_markdown, section, readme)


@report_app.command("train-speed")
def report_train_speed(
    run_dir: str = typer.Argument(..., help="A `bench train-speed` output folder."),
    readme: str = typer.Option(None, help="Write the table into this README."),
    section: str = typer.Option("train-speed", help="README section name."),
) -> None:
    """Regenerate the train-speed table from RUN_DIR/train_speed.json."""
    from kvfree.bench.train_speed import render

    _from_json(run_dir, "train_speed.json", "bench train-speed", render, section, readme)


@report_app.command("fdm-mqar")
def report_fdm_mqar(
    run_dir: str = typer.Argument(..., help="A `bench fdm-mqar` output folder."),
    readme: str = typer.Option(None, help="Write the table into this README."),
    section: str = typer.Option("fdm-mqar", help="README section name."),
) -> None:
    """Regenerate the FDM MQAR table from RUN_DIR/fdm_mqar.json."""
    from kvfree.bench.fdm_mqar import fdm_mqar_markdown

    _from_json(run_dir, "fdm_mqar.json", "bench fdm-mqar", fdm_mqar_markdown, section, readme)
