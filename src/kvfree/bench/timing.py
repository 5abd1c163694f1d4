"""Wall-clock timing helpers: warm-up, then the median of repeated runs."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def sync(device: torch.device | str | None = None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_time(
    fn: Callable[[], object],
    *,
    repeats: int = 5,
    warmup: int = 1,
    device=None,
    budget_s: float | None = None,
) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs; stops early
    (with at least one timed run) once ``budget_s`` seconds of timed runs have passed."""
    for _ in range(warmup):
        fn()
    sync(device)
    times: list[float] = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
        if budget_s is not None and sum(times) > budget_s:
            break
    return statistics.median(times)
