"""``kvfree bench train-speed``: training steps per second of each recall preset, the fast CPU
paths (perf.py) against the reference code path, measured side by side in one run.

Each measurement is a fresh process (the allocator setting is process-wide) that trains one
preset for ``warmup + steps`` optimizer steps exactly as ``bench recall`` does (the Trainer's own
``train_step``: forward, backward, gradient clipping, AdamW) on the main job's batches (grid
``cpu``: batch 32, the 8-cell round-robin mixture, lengths 32–288) and reports the steps/s of
the timed steps. Processes run in rounds, reference and fast alternating (which goes first
alternates per round), and the ratio of a preset is the median over rounds of fast/reference
within a round, which cancels slow drift of a shared machine.

Reference = ``KVFREE_REFERENCE_KERNELS=1`` (every fast path off) and the chunk sizes the recall
presets had before the fast paths (:data:`REFERENCE_CHUNKS`).

Each fast process then profiles one more step per training cell and reports the share of the
time spent in matrix products and fused attention (:data:`GEMM_OPS`). ratio / share bounds the
ratio any change that keeps the math (and so these products) could reach.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

#: Chunk sizes of the recall presets before this bench existed (mixer name -> chunk size);
#: the reference mode restores them. 16 is faster at the recall lengths (T ≤ 288): the
#: intra-chunk work grows with T·C and the loop over chunks is short.
REFERENCE_CHUNKS = {"mamba2": 64, "gated_deltanet": 64}

#: Dense kernels whose work the math fixes (matrix products and PyTorch's fused attention): their
#: share of a step's time bounds what removing or fusing every other op could gain.
GEMM_OPS = frozenset(
    {
        "aten::mm",
        "aten::addmm",
        "aten::bmm",
        "aten::baddbmm",
        "aten::_scaled_dot_product_flash_attention_for_cpu",
        "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
    }
)
PROFILED_STEPS = 8  # one step per training cell of the grid's round-robin mixture


def _set_chunks(model, chunks: dict[str, int]) -> None:
    for mixer in model.mixers():
        if getattr(mixer, "name", None) in chunks and hasattr(mixer, "chunk_size"):
            mixer.chunk_size = chunks[mixer.name]


def measure(model_spec: str, mode: str, steps: int, warmup: int, threads: int) -> dict:
    """Time ``steps`` training steps of ``model_spec`` in this process (``mode``: fast |
    reference; the environment variable must already match for reference)."""
    import torch

    from kvfree import perf
    from kvfree.bench.recall import Batches, Job, build_model
    from kvfree.bench.recall_grid import grid
    from kvfree.train import TrainConfig, Trainer

    torch.set_num_threads(threads)
    perf.set_fast(mode == "fast")
    tuned = perf.tune_allocator()
    flushed = perf.flush_denormals()
    g = grid("cpu")
    model, mask = build_model(model_spec, 192, 0)
    if mode == "reference":
        _set_chunks(model, REFERENCE_CHUNKS)
    job = Job(model_spec, 0, 1e-3, g.training_cells(), g.cells)
    make = Batches(g, job, mask)
    batches = [make(i) for i in range(warmup + steps)]
    cfg = TrainConfig(steps=warmup + steps, lr=1e-3, warmup_steps=0, device="cpu", progress=False)
    trainer = Trainer(model, cfg, lambda s: batches[s])
    for b in batches[:warmup]:
        trainer.train_step(b)
    t0, c0 = time.perf_counter(), time.process_time()
    for b in batches[warmup:]:
        trainer.train_step(b)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    profiled = batches[warmup : warmup + PROFILED_STEPS]
    gemm_share = _gemm_share(trainer, profiled) if mode == "fast" else None  # fast only
    return {
        "model": model_spec,
        "mode": mode,
        "steps": steps,
        "steps_per_s": steps / wall,
        "cpu_s_per_step": cpu / steps,
        "allocator_tuned": tuned,
        "flush_denormals": flushed,
        "chunks": {m.name: m.chunk_size for m in model.mixers() if hasattr(m, "chunk_size")},
        "params": model.num_parameters(),
        "gemm_share": gemm_share,
    }


def _gemm_share(trainer, batches) -> float:
    """Share of the self CPU time of ``batches``' training steps (after the timed ones, under
    ``torch.profiler``) spent in :data:`GEMM_OPS`. The profiler's per-op overhead falls mostly on
    the many small ops, so this errs low, and the bound it gives (1 / share) errs high."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for b in batches:
            trainer.train_step(b)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    return sum(e.self_cpu_time_total for e in events if e.key in GEMM_OPS) / total


def _spawn(model_spec: str, mode: str, steps: int, warmup: int, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    env.pop("KVFREE_REFERENCE_KERNELS", None)
    if mode == "reference":
        env["KVFREE_REFERENCE_KERNELS"] = "1"
    args = json.dumps([model_spec, mode, steps, warmup, threads])
    out = subprocess.run(
        [sys.executable, "-m", "kvfree.bench.train_speed", args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"train-speed worker for {model_spec} ({mode}) failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(
    models: list[str],
    out_dir: str | Path,
    *,
    steps: int = 24,
    warmup: int = 8,
    rounds: int = 3,
    threads: int = 1,
    progress: bool = True,
) -> dict:
    """Measure every model in ``rounds`` rounds; write ``train_speed.json`` and ``.md``."""
    from tqdm.auto import tqdm

    from kvfree.report.tables import write_result
    from kvfree.utils import environment

    if steps < 1 or warmup < 0 or rounds < 1 or threads < 1:
        raise ValueError("steps, rounds and threads must be >= 1 and warmup >= 0")
    from kvfree.bench.recall import build_model

    for m in models:  # an unknown preset fails here in one line, not in a worker
        build_model(m, 192, 0)
    runs: list[dict] = []
    load = os.getloadavg()[0]  # other jobs on the machine slow the memory-bound ops most
    bar = tqdm(total=rounds * len(models) * 2, unit="proc", disable=not progress)
    t0 = time.time()
    for r in range(rounds):
        for m in models:
            order = ("reference", "fast") if r % 2 == 0 else ("fast", "reference")
            for mode in order:
                bar.set_postfix_str(f"{m} {mode}")
                runs.append({**_spawn(m, mode, steps, warmup, threads), "round": r})
                bar.update(1)
    bar.close()
    rows = []
    for m in models:
        mine = [x for x in runs if x["model"] == m]
        by = {
            mode: [x["steps_per_s"] for x in mine if x["mode"] == mode]
            for mode in ("reference", "fast")
        }
        ratios = [
            f["steps_per_s"] / ref["steps_per_s"]
            for r in range(rounds)
            for f in mine
            if f["round"] == r and f["mode"] == "fast"
            for ref in mine
            if ref["round"] == r and ref["mode"] == "reference"
        ]
        rows.append(
            {
                "model": m,
                "reference_steps_per_s": statistics.median(by["reference"]),
                "fast_steps_per_s": statistics.median(by["fast"]),
                "ratio": statistics.median(ratios),
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
                "gemm_share_fast": statistics.median(
                    x["gemm_share"] for x in mine if x["mode"] == "fast"
                ),
                "chunks_fast": next(x["chunks"] for x in mine if x["mode"] == "fast"),
                "chunks_reference": next(x["chunks"] for x in mine if x["mode"] == "reference"),
            }
        )
    env = environment("cpu")
    env["threads"] = threads
    env["load_average"] = load
    result = {
        "rows": rows,
        "runs": runs,
        "config": {
            "steps": steps,
            "warmup": warmup,
            "rounds": rounds,
            "threads": threads,
            "profiled_steps": PROFILED_STEPS,
        },
        "env": env,
        "wall_seconds": time.time() - t0,
    }
    result["markdown"] = render(result)
    write_result(out_dir, "train_speed", result)
    return result


def render(result: dict) -> str:
    """The markdown section of a train-speed result."""
    from kvfree.report.tables import markdown_table

    c, env = result["config"], result["env"]
    head = (
        f"Training steps/s of the recall presets (grid `cpu` batches: batch 32, lengths "
        f"32–288), fresh process per measurement, {c['warmup']} warm-up + {c['steps']} timed "
        f"steps, {c['rounds']} rounds alternating reference/fast; ratio = median over rounds "
        f"of fast/reference in the same round (min–max). {env['device']} ({env['device_name']}"
        f"), {c['threads']} thread(s) per process, torch {env['torch']}."
    )
    if any("gemm_share_fast" in r for r in result["rows"]):
        head += (
            " GEMM share = the share of a fast step's time in matrix products and fused "
            f"attention (torch.profiler, {c['profiled_steps']} more steps after the timing, one "
            "per training cell), work the math fixes; bound = ratio / share, the most fast / "
            "reference could reach at today's GEMM shapes if every other op took no time."
        )
    if "load_average" in env:
        head += f" Load average (1 min) at start {env['load_average']:.1f}."
    cols = ["model", "reference steps/s", "fast steps/s", "fast / reference", "min–max"]
    cols += ["GEMM share", "bound", "chunks"]
    rows = [
        dict(
            zip(
                cols,
                [
                    r["model"],
                    round(r["reference_steps_per_s"], 2),
                    round(r["fast_steps_per_s"], 2),
                    f"{r['ratio']:.2f}×",
                    f"{r['ratio_min']:.2f}–{r['ratio_max']:.2f}",
                    f"{r['gemm_share_fast']:.0%}" if "gemm_share_fast" in r else "—",
                    f"{r['ratio'] / r['gemm_share_fast']:.1f}×" if "gemm_share_fast" in r else "—",
                    ", ".join(
                        f"{k} {r['chunks_reference'][k]}→{v}" for k, v in r["chunks_fast"].items()
                    )
                    or "—",
                ],
            )
        )
        for r in result["rows"]
    ]
    table = markdown_table(rows, cols)
    return head + "\n\n" + table


if __name__ == "__main__":
    print(json.dumps(measure(*json.loads(sys.argv[1]))))
