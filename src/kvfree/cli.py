"""The ``kvfree`` command line. Thin: parse options, call one function, say where results went.

Commands live in ``kvfree/commands/*.py`` and attach themselves to the apps below
(``app``, ``bench_app``, ``data_app``, ``report_app``); every command has ``--help``.
"""

from __future__ import annotations

import typer

app = typer.Typer(
    help="kvfree: fixed-memory sequence models vs KV-cached attention.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
bench_app = typer.Typer(
    help="Benchmarks (write JSON + markdown + plots under runs/).", no_args_is_help=True
)
data_app = typer.Typer(help="Text corpora: build, inspect.", no_args_is_help=True)
report_app = typer.Typer(
    help="Regenerate tables/plots (and README sections) from result files.", no_args_is_help=True
)
app.add_typer(bench_app, name="bench")
app.add_typer(data_app, name="data")
app.add_typer(report_app, name="report")


def main() -> None:
    import kvfree.commands  # noqa: F401  (registers every command)

    app()


if __name__ == "__main__":
    main()
