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
reproduce_app = typer.Typer(
    help="Reproduce a paper's table (results + markdown + plots under runs/).",
    no_args_is_help=True,
)
app.add_typer(bench_app, name="bench")
app.add_typer(reproduce_app, name="reproduce")
app.add_typer(data_app, name="data")
app.add_typer(report_app, name="report")


@app.callback()
def _root(
    debug: bool = typer.Option(
        False, "--debug", help="Show the full traceback of an error (also KVFREE_DEBUG=1)."
    ),
) -> None:
    pass  # --debug is taken off the command line by main(); declared here for --help


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean "the input is wrong", not "kvfree is broken": printed as one
    ``error: ...`` line with exit status 2 (``--debug`` / ``KVFREE_DEBUG=1``: the traceback)."""
    from kvfree.train.checkpoint import CheckpointError

    return (
        ValueError,  # unknown preset / config key / mixer / tokenizer, bad values, seq_len
        KeyError,
        CheckpointError,  # missing, corrupt or mismatched checkpoint
        FileNotFoundError,  # missing run folder, corpus, result file
        FileExistsError,  # existing run without --resume
        NotADirectoryError,
        IsADirectoryError,
        PermissionError,
        ImportError,  # a missing optional extra (the message names it)
    )


def _message(e: BaseException) -> str:
    if isinstance(e, KeyError) and len(e.args) == 1 and isinstance(e.args[0], str):
        return e.args[0]  # str(KeyError) would quote the message
    return str(e) or type(e).__name__


def main(argv: list[str] | None = None) -> None:
    """The console entry point: run the command; user errors become ``error: <message>`` on
    stderr and exit status 2, an interrupt exits 130, both without a traceback unless
    ``--debug`` (anywhere on the command line) or ``KVFREE_DEBUG=1``."""
    import os
    import sys

    import kvfree.commands  # noqa: F401  (registers every command)

    args = list(sys.argv[1:] if argv is None else argv)
    cut = args.index("--") if "--" in args else len(args)
    debug = "--debug" in args[:cut] or os.environ.get("KVFREE_DEBUG", "") not in ("", "0")
    if "--debug" in args[:cut]:
        args = [a for a in args[:cut] if a != "--debug"] + args[cut:]
        os.environ["KVFREE_DEBUG"] = "1"  # for worker processes
    try:  # typer ≥ 0.2x raises the exceptions of its own copy of click
        from typer._click import exceptions as cx
    except ImportError:
        from click import exceptions as cx

    no_args = getattr(cx, "NoArgsIsHelpError", ())  # click ≥ 8.2
    try:
        rv = app(args, prog_name="kvfree", standalone_mode=False)
    except no_args as e:
        e.show()  # the help text
        sys.exit(e.exit_code)
    except cx.ClickException as e:  # a bad option value, an unknown command
        if debug:
            raise
        print(f"error: {e.format_message()}", file=sys.stderr)
        ctx = getattr(e, "ctx", None)
        if ctx is not None:
            command = " ".join(["kvfree", *ctx.command_path.split()[1:]])
            print(f"({command} --help lists the options)", file=sys.stderr)
        sys.exit(e.exit_code)
    except typer.Abort:
        sys.exit(1)
    except KeyboardInterrupt:
        if debug:
            raise
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    except user_errors() as e:
        if debug:
            raise
        print(f"error: {_message(e)}", file=sys.stderr)
        print("(run with --debug for the traceback)", file=sys.stderr)
        sys.exit(2)
    sys.exit(rv if isinstance(rv, int) else 0)  # typer returns Exit codes (e.g. 130)


if __name__ == "__main__":
    main()
