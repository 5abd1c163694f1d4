"""``kvfree bench capacity``: key–value capacity of fixed states by write rule, no training."""

from __future__ import annotations

import typer

from kvfree.cli import bench_app


def _floats(text: str, name: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise typer.BadParameter(f"{name} must be comma-separated numbers, got {text!r}") from None


@bench_app.command("capacity")
def bench_capacity(
    out: str = typer.Option("runs/bench-capacity", help="Output folder (JSON, markdown, PNG)."),
    dims: str = typer.Option("32,64,128", help="Key dimensions d (d_v = d)."),
    ratios: str = typer.Option("0.25,0.5,1,2,4,8", help="Stored pairs per dimension N/d."),
    rhos: str = typer.Option("0,0.5,0.8", help="Key correlations ρ."),
    trials: int = typer.Option(20, help="Random streams per point."),
    seed: int = typer.Option(0, help="Seed of keys, values and the vocabulary table."),
    methods: str = typer.Option(
        ",".join(("linear", "delta1", "delta4", "ridge", "ska2", "softmax", "softmax_hard")),
        help="Write rules.",
    ),
    structured: bool = typer.Option(
        True,
        help="Also run the structured stream (each pair written twice, 2 distractors) at d = 64.",
    ),
    blas_threads: int = typer.Option(
        1, min=1, help="numpy BLAS threads (1 is fastest on busy CPUs)."
    ),
    threads: int = typer.Option(
        None, min=1, help="Torch CPU threads (default: free physical cores)."
    ),
) -> None:
    """Store N random key/value pairs in a d-dimensional state (linear attention, delta rule,
    ridge = SKA K=0, SKA K=2, softmax over a KV cache) and retrieve them: accuracy against
    the stored values and a 4096-row vocabulary as N/d grows (docs/tasks.md §5)."""
    from kvfree.bench.capacity import METHODS, run
    from kvfree.utils import set_threads

    set_threads(threads)

    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    bad = [m for m in chosen if m not in METHODS]
    if bad:
        raise typer.BadParameter(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}")
    if trials < 1:
        raise typer.BadParameter("trials must be ≥ 1")
    rho_list = _floats(rhos, "rhos")
    if any(not 0 <= r < 1 for r in rho_list):
        raise typer.BadParameter("every ρ must be in [0, 1)")
    res = run(
        out,
        tuple(int(d) for d in _floats(dims, "dims")),
        tuple(_floats(ratios, "ratios")),
        tuple(rho_list),
        trials,
        seed,
        tuple(chosen),
        ("iid", "structured") if structured else ("iid",),
        blas_threads=blas_threads,
    )
    print(res["markdown"])
    print(
        f"wrote {out}/capacity.json, {out}/capacity.md and {out}/capacity.png "
        f"({res['seconds']:.1f} s)"
    )
