"""Run recall jobs in parallel worker processes (one torch thread each by default).

Small models on CPU use cores better as independent processes than as threads of one
process. Workers send step counts through a queue so the parent's single progress bar shows
steps and the ETA of the whole grid.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue as queue_mod
import signal
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path


def _worker(grid_dict: dict, job_dict: dict, out_dir: str, device, threads: int, q) -> dict:
    from kvfree.bench.recall import Job, run_job
    from kvfree.bench.recall_grid import RecallGrid

    grid = RecallGrid.from_dict(grid_dict)
    job = Job(**job_dict)
    pending = [0]

    def on_step(n: int) -> None:
        pending[0] += n
        if pending[0] >= 10:
            q.put(pending[0])
            pending[0] = 0

    try:
        res = run_job(grid, job, Path(out_dir), device=device, on_step=on_step, threads=threads)
    except KeyboardInterrupt:  # SIGINT/SIGTERM: the Trainer saved the job's checkpoint
        return None
    if pending[0]:
        q.put(pending[0])
    return res


def run_parallel(grid, jobs, out_dir, device, workers: int, threads: int, bar):
    """Yield each job's result as it finishes."""
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager, ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        q = manager.Queue()
        futures = {
            pool.submit(_worker, grid.to_dict(), j.__dict__, str(out_dir), device, threads, q): j
            for j in jobs
        }
        remaining = set(futures)
        try:
            while remaining:
                done, remaining = wait(remaining, timeout=0.5, return_when=FIRST_COMPLETED)
                while True:
                    try:
                        bar.update(q.get_nowait())
                    except queue_mod.Empty:
                        break
                for f in done:
                    if f.result() is not None:
                        yield f.result()
        except KeyboardInterrupt:
            # each running worker gets SIGTERM: its Trainer saves a checkpoint and stops
            for proc in list(getattr(pool, "_processes", {}).values()):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
            pool.shutdown(wait=True, cancel_futures=True)
            raise
