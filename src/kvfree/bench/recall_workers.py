"""Run training jobs in parallel worker processes (one torch thread each by default).

Small models on CPU use cores better as independent processes than as threads of one
process. Workers send step counts through a queue so the parent's single progress bar shows
steps and the ETA of the whole grid. Used by ``bench recall``, ``bench fdm-mqar`` and ``reproduce
echo-table*``.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue as queue_mod
import signal
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path


def _ignore_sigint() -> None:
    """Pool initializer: Ctrl-C in a terminal signals the whole process group; only the parent
    acts on it, and stops each worker with one SIGTERM (a second signal would abort the worker
    before it saved its checkpoint)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


_STOPPING = False  # set in a worker once it was interrupted: tasks queued to it then return


def _worker(fn: Callable, payload, q):
    global _STOPPING
    if _STOPPING:  # the pool hands a stopped worker its queued tasks before it shuts down
        return None
    pending = [0]

    def on_step(n: int) -> None:
        pending[0] += n
        if pending[0] >= 10:
            q.put(pending[0])
            pending[0] = 0

    try:
        res = fn(payload, on_step)
    except KeyboardInterrupt:  # SIGINT/SIGTERM: the Trainer saved the job's checkpoint
        _STOPPING = True
        return None
    if pending[0]:
        q.put(pending[0])
    return res


def recall_job(payload: tuple, on_step):
    """One ``bench recall`` job in a worker: payload = (grid, job, out_dir, device, threads)."""
    from kvfree.bench.recall import Job, run_job
    from kvfree.bench.recall_grid import RecallGrid

    grid_dict, job_dict, out_dir, device, threads = payload
    grid, job = RecallGrid.from_dict(grid_dict), Job(**job_dict)
    return run_job(grid, job, Path(out_dir), device=device, on_step=on_step, threads=threads)


def run_parallel(fn: Callable, payloads: Iterable, workers: int, bar):
    """Yield ``fn(payload, on_step)`` of each payload as it finishes (``fn`` must be a
    module-level function; None results — interrupted jobs — are not yielded)."""
    ctx = mp.get_context("spawn")
    with (
        ctx.Manager() as manager,
        ProcessPoolExecutor(workers, mp_context=ctx, initializer=_ignore_sigint) as pool,
    ):
        q = manager.Queue()
        remaining = {pool.submit(_worker, fn, p, q) for p in payloads}
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


def run_jobs(fn: Callable, payloads: list, workers: int, bar):
    """Yield ``fn(payload, bar.update)`` of each payload: in worker processes when there are
    several workers and jobs (:func:`run_parallel`), else one after another in this process."""
    if workers > 1 and len(payloads) > 1:
        yield from run_parallel(fn, payloads, workers, bar)
    else:
        for p in payloads:
            yield fn(p, bar.update)
