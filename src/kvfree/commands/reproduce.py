"""``kvfree reproduce echo-table2|echo-table3`` and ``kvfree report echo-table2|echo-table3``:
Echo's sub-million suite (docs/tasks.md §4; ``kvfree.bench.echo_suite``)."""

from __future__ import annotations

import typer

from kvfree.cli import report_app, reproduce_app


def _reproduce(table, out, models, seeds, preset, steps, n_test, workers, threads, device, readme):
    from kvfree.bench import echo_suite as S
    from kvfree.bench.echo_tables import run

    rows = S.check_rows([m.strip() for m in models.split(",") if m.strip()])
    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise typer.BadParameter(f"seeds must be comma-separated integers, got {seeds!r}") from None
    overrides = {k: v for k, v in {"steps": steps, "n_test": n_test}.items() if v is not None}
    r = S.recipe(preset, **overrides)
    res = run(table, out, rows, seed_list, r, workers=workers, threads=threads, device=device)
    print(res["markdown"])
    env = res["meta"]["env"]
    print(
        f"\n{res['meta']['wall_seconds_this_run'] / 60:.1f} min on {env['device']} "
        f"({env.get('device_name', '')}); wrote " + ", ".join(res["files"])
    )
    if readme:
        from kvfree.report.tables import update_readme_section

        update_readme_section(readme, f"echo-{table}", res["markdown"])
        print(f"updated section 'echo-{table}' of {readme}")


def _command(table: str, doc: str):
    def command(
        out: str = typer.Option(
            "runs/echo-suite", help="Output folder, shared by both tables (models are reused)."
        ),
        models: str = typer.Option(
            "ssm,ssm-attn,ssm-ska,ssm-ska-mask,ssm-ska-recipe",
            help="Comma-separated rows: ssm, ssm-attn, ssm-ska (causal), ssm-ska-mask, "
            "ssm-ska-recipe (kvfree's SKA recipe: K = 1, β gate).",
        ),
        seeds: str = typer.Option("0,1,2", help="Comma-separated seeds (init + data order)."),
        preset: str = typer.Option(
            "cpu",
            help="cpu (6000 steps at LR 3e-3, 100 test examples per cell) | paper (LR 3e-4, 500).",
        ),
        steps: int = typer.Option(None, min=1, help="Training steps (overrides the preset)."),
        n_test: int = typer.Option(None, min=1, help="Test examples per cell / length."),
        workers: int = typer.Option(2, min=1, help="Parallel training processes."),
        threads: int = typer.Option(
            None, min=1, help="Torch threads per process (default: free cores / workers)."
        ),
        device: str = typer.Option(None, help="cpu | cuda (default: cuda if available)."),
        readme: str = typer.Option(None, help=f"Also write section 'echo-{table}' of this README."),
    ) -> None:
        _reproduce(
            table, out, models, seeds, preset, steps, n_test, workers, threads, device, readme
        )

    command.__doc__ = doc
    return command


reproduce_app.command("echo-table2")(
    _command(
        "table2",
        "Echo Table 2: NIAH (one needle) trained at length 64 — zero-shot, on the SysPrompt + "
        "ToolTrace mix — tested at 64 … 4096; parallel and recurrent decoder, state bytes.",
    )
)
reproduce_app.command("echo-table3")(
    _command(
        "table3",
        "Echo Table 3: trained once on SysPrompt + ToolTrace, evaluated zero-shot on six tasks "
        "(mean over lengths 64–512 × KV counts 1–8).",
    )
)


def _report(table: str):
    def command(
        run_dir: str = typer.Argument("results/echo-suite", help="A reproduce output folder."),
        readme: str = typer.Option(None, help="Write the table into this README."),
    ) -> None:
        from pathlib import Path

        from kvfree.bench.echo_report import render
        from kvfree.commands.report_all import _from_json

        def make(summary: dict) -> str:
            return render(Path(run_dir), table, summary)[0]

        _from_json(
            run_dir, f"echo_{table}.json", f"reproduce echo-{table}", make, f"echo-{table}", readme
        )

    command.__doc__ = f"Regenerate echo_{table}.md and its plots from RUN_DIR/echo_{table}.json."
    return command


report_app.command("echo-table2")(_report("table2"))
report_app.command("echo-table3")(_report("table3"))
