"""``kvfree bench decode`` and ``kvfree report decode``."""

from __future__ import annotations

import typer

from kvfree.cli import bench_app, report_app


def _ints(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {text!r}") from None


@bench_app.command("decode")
def bench_decode(
    out: str = typer.Option(
        None,
        help="Output folder (default runs/bench-decode, or "
        "runs/bench-decode-fdm-paper for that suite).",
    ),
    suite: str = typer.Option(
        "cpu",
        help="cpu: matched CPU-sized presets over N up to 65536; "
        "fdm-paper: FDM-137M (d=576, 12 layers) vs KV-cached "
        "Transformers (d=576, 12 layers; 20 layers param-matched) at "
        "N=8192.",
    ),
    model: list[str] = typer.Option(
        None, help="Preset(s) to measure instead of the suite's (repeatable)."
    ),
    lengths: str = typer.Option(
        None, help="Comma-separated prompt lengths N (default: the suite's)."
    ),
    batch: int = typer.Option(1, help="Batch size."),
    decode_steps: int = typer.Option(64, help="Timed decode steps per point."),
    warmup_steps: int = typer.Option(4, help="Untimed decode steps before them."),
    dtype: str = typer.Option("float32", help="float32 | bfloat16 | float16."),
    device: str = typer.Option(None, help="cpu | cuda (default: cuda if available)."),
    threads: int = typer.Option(
        None,
        min=1,
        help="Torch threads in each worker (default: free physical cores, found at the start).",
    ),
    point_timeout: float = typer.Option(
        600,
        help="Seconds per point before it is killed; points predicted to take longer are skipped.",
    ),
    max_memory_gb: float = typer.Option(
        None, help="RSS budget per point (default half of available memory)."
    ),
    budget_minutes: float = typer.Option(None, help="Total time budget; later points are skipped."),
    kv_prealloc: bool = typer.Option(
        True,
        help="Preallocate attention KV caches for N + decode steps (else they grow x2 and copy).",
    ),
    prefill_chunk: int = typer.Option(
        None,
        min=0,
        help="Prefill in segments of this many tokens (default: the model's own, 512-token "
        "segments for fixed-memory models and the whole prompt otherwise; 0: whole prompt).",
    ),
    retry_prefill_chunk: int = typer.Option(
        4096,
        help="Retry a point that ran out of memory with prefill in segments of this size (0: no).",
    ),
    resume: bool = typer.Option(
        False,
        help="Reuse the points of an earlier (possibly "
        "interrupted) run in --out measured with the same settings.",
    ),
    isolate: bool = typer.Option(
        True, help="One fresh subprocess per point (needed for honest CPU peaks)."
    ),
    repeats: int = typer.Option(
        1,
        help="Measure every point this many times in fresh "
        "processes (rounds over N); ms/token is the median over them.",
    ),
) -> None:
    """Prefill N tokens, decode, and record state bytes, memory peaks and ms/token."""
    from kvfree.bench.decode import SUITES, DecodeBenchConfig, run
    from kvfree.utils import set_threads

    threads = set_threads(threads)  # this process (isolate=False) and every worker

    if suite not in SUITES:
        raise typer.BadParameter(f"unknown suite {suite!r}; choose from {sorted(SUITES)}")
    models, default_lengths = SUITES[suite]
    cfg = DecodeBenchConfig(
        models=list(model or models),
        lengths=_ints(lengths) if lengths else list(default_lengths),
        batch=batch,
        decode_steps=decode_steps,
        warmup_steps=warmup_steps,
        dtype=dtype,
        device=device,
        threads=threads,
        isolate=isolate,
        kv_prealloc=kv_prealloc,
        prefill_chunk=prefill_chunk,
        retry_prefill_chunk=retry_prefill_chunk,
        point_timeout_s=point_timeout,
        max_memory_gb=max_memory_gb,
        repeats=repeats,
        total_budget_s=60 * budget_minutes if budget_minutes else None,
    )
    out = out or ("runs/bench-decode" if suite == "cpu" else f"runs/bench-decode-{suite}")
    res = run(cfg, out, resume=resume)
    print()
    for s in res["summary"]:
        print(s["line"])
    print(
        f"wrote {out}/decode.json, decode.md, memory_vs_n.png, latency_vs_n.png "
        f"({len(res['rows'])} points, {len(res['skipped'])} skipped)"
    )


@report_app.command("decode")
def report_decode(
    runs: list[str] = typer.Argument(
        None, help="Result folders or decode.json files (default: runs/bench-decode)."
    ),
    readme: str = typer.Option(
        None, help="Also replace the generated decode section of this README (default: only print)."
    ),
    plots: bool = typer.Option(True, help="Also regenerate decode.md and the plots."),
) -> None:
    """Regenerate decode tables/plots and the README section from decode.json files."""
    from pathlib import Path

    from kvfree.bench.decode_report import load_result, readme_section, update_readme, write_outputs

    results = [load_result(p) for p in (runs or ["runs/bench-decode"])]
    if plots:
        for res in results:
            write_outputs(res, Path(res["source"]).parent)
    section = readme_section(results)
    print(section)
    if readme:
        print(f"updated the decode section of {update_readme(readme, section)}")
