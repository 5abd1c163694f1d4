"""``kvfree demo``: the main job — does a fixed-size memory recall as well as a KV cache?

The CPU preset trains six 2-layer d = 64 models — Transformer (KV cache), Mamba-2, Gated
DeltaNet, Mamba-2 + SKA without a mask (the recall recipe, the headline), MesaNet, FDM — on
Echo's MQAR-with-gap (docs/tasks.md §2) as one mixture of M ∈ {4, 8} pairs × gap ∈ {64, 256}, then
evaluates every cell on held-out examples and prints accuracy and decode-state bytes per model
and cell (``kvfree bench recall --grid cpu``; under 10 minutes on 2 cores). ``--models all``
adds the paper's SKA as written, SKA with the oracle prefix mask and Gated DeltaNet + SKA (nine
models, the README's table). ``--preset paper`` runs the papers' grids (Echo's 28 cells
per-cell, zoology's Based grid with an LR sweep) and is meant for a GPU.
"""

from __future__ import annotations

import typer

from kvfree.cli import app

MAIN_MODELS = [
    "recall-attention",
    "recall-mamba2",
    "recall-gdn",
    "recall-mamba2-ska",
    "recall-mamba2-ska-paper",
    "recall-mamba2-ska-prefix",
    "recall-gdn-ska",
    "recall-mesanet",
    "recall-fdm",
]
#: The default main job: the KV cache, the two fixed-state baselines and the three seeds' memories.
DEMO_MODELS = [
    "recall-attention",
    "recall-mamba2",
    "recall-gdn",
    "recall-mamba2-ska",
    "recall-mesanet",
    "recall-fdm",
]
#: The slowest models start first so that two workers finish together (order of the seed-0
#: training times of a timed demo: FDM 302 s, GDN 187 s, the paper's SKA ~170 s, ...).
SLOWEST_FIRST = [
    "recall-fdm",
    "recall-gdn",
    "recall-mamba2-ska-paper",
    "recall-mamba2",
    "recall-mesanet",
    "recall-mamba2-ska-prefix",
    "recall-mamba2-ska",
    "recall-attention",
    "recall-gdn-ska",
]


@app.command()
def demo(
    preset: str = typer.Option(
        "cpu", help="cpu (the main job, < 10 min on 2 cores) | paper (Echo + zoology grids; GPU)."
    ),
    models: str = typer.Option(
        "main",
        help="main (6 models) | all (9: adds the paper's SKA, SKA with the oracle mask and "
        "GDN + SKA) | comma-separated recall presets.",
    ),
    out: str = typer.Option("runs/demo", help="Output folder (a rerun resumes)."),
    seeds: str = typer.Option(
        None, help="Comma-separated seeds (default: 0 for cpu, 0,1,2 for paper)."
    ),
    workers: int = typer.Option(
        None, help="Parallel training processes (default: 2 on CPU, 1 on GPU)."
    ),
    device: str = typer.Option(None, help="cpu | cuda (default: cuda if available)."),
) -> None:
    """The main job: recall accuracy and state bytes of KV-cache attention against fixed-memory
    models (Mamba-2, Gated DeltaNet, Mamba-2 + SKA, MesaNet, FDM; with --models all also the
    paper's SKA, SKA with the oracle mask and GDN + SKA)."""
    import os
    import time
    from pathlib import Path

    import torch

    from kvfree.bench.recall import run
    from kvfree.bench.recall_grid import grid
    from kvfree.utils import default_device

    if preset not in ("cpu", "paper"):
        raise typer.BadParameter(f"preset must be 'cpu' or 'paper', got {preset!r}")
    try:
        seed_list = [int(s) for s in (seeds or ("0" if preset == "cpu" else "0,1,2")).split(",")]
    except ValueError:
        raise typer.BadParameter(f"seeds must be comma-separated integers, got {seeds!r}") from None
    model_list = _models(models)
    dev = torch.device(device) if device else default_device()
    if workers is None:
        workers = 1 if dev.type == "cuda" else min(2, os.cpu_count() or 1)
    t0 = time.time()
    grids = [grid("cpu")] if preset == "cpu" else [grid("echo"), grid("zoology-based")]
    for g in grids:
        folder = Path(out) if len(grids) == 1 else Path(out) / g.name
        print(
            f"main job: {len(model_list)} models × seeds {seed_list} on {g.task} "
            f"({g.name} grid, {len(g.cells)} cells) on {dev}, {workers} worker(s); "
            f"results in {folder}/",
            flush=True,
        )
        res = run(
            g,
            model_list,
            seed_list,
            folder,
            device=str(dev),
            workers=workers,
            threads=1 if dev.type == "cpu" else None,
            first=SLOWEST_FIRST,
        )
        print()
        print(res["markdown"])
        plots = [f for f in res["files"] if f.endswith(".png")]
        curves = [f for f in plots if f.endswith("learning_curves.png")]
        if curves:
            print(f"learning curves (validation accuracy vs examples seen): {curves[0]}")
        print(f"plots: {', '.join(plots)}")
        print(f"table: {folder}/recall.md (regenerate: kvfree report recall {folder})")
    print(
        f"main job finished in {time.time() - t0:.0f} s wall "
        f"({res['meta']['jobs_run']} runs trained now, {res['meta']['jobs_reused']} reused)."
    )


def _models(spec: str) -> list[str]:
    if spec == "main":
        return list(DEMO_MODELS)
    if spec == "all":
        return list(MAIN_MODELS)
    from kvfree.bench.recall import split_top

    names = [m.strip() for m in split_top(spec) if m.strip()]
    if not names:
        raise typer.BadParameter("--models: give main, all or comma-separated recall presets")
    return names
