"""Small shared helpers: device choice, run environment record, strict option checking."""

from __future__ import annotations

import difflib
import inspect
import os
import platform
from collections.abc import Iterable

import torch


def default_device() -> torch.device:
    """``cuda`` when available, else ``cpu`` (chosen at run time, never hard-coded)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def usable_cpus() -> int:
    """CPUs this process may run on: the affinity mask, capped by physical cores (SMT siblings
    count once) and by a cgroup CPU quota (containers), at least 1."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = list(range(os.cpu_count() or 1))
    n = len(cpus)
    cores = set()
    for c in cpus:
        topo = f"/sys/devices/system/cpu/cpu{c}/topology"
        try:
            with open(f"{topo}/physical_package_id") as f1, open(f"{topo}/core_id") as f2:
                cores.add((f1.read().strip(), f2.read().strip()))
        except OSError:
            cores = set()
            break
    if cores:
        n = min(n, len(cores))
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            n = min(n, max(1, int(-(-int(quota) // int(period)))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def default_threads(workers: int = 1) -> int:
    """The torch thread count used when none is given: ``KVFREE_THREADS`` or ``OMP_NUM_THREADS``
    if set; else the usable CPUs (:func:`usable_cpus`) less those other processes keep busy
    right now (:func:`busy_cpus`), shared among ``workers`` processes; at least 1.

    Oversubscribing a busy machine is what hurts (OpenMP threads spin while waiting for a core):
    two threads on two cores with one other busy process run several times slower than one."""
    for var in ("KVFREE_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(var, "").strip()
        if value:
            try:
                return max(1, int(value))
            except ValueError:
                raise ValueError(f"{var}={value!r}: expected a positive integer") from None
    n = usable_cpus()
    n = max(1, n - min(busy_cpus(), n - 1))
    return max(1, n // max(1, workers))


def busy_cpus(samples: int = 5, interval: float = 0.01) -> int:
    """Runnable threads of other processes right now (``/proc/loadavg``'s running count less
    this process, the least of a few samples so that a passing spike does not count); 0 where
    it cannot be read."""
    import time

    counts = []
    for i in range(samples):
        try:
            with open("/proc/loadavg") as f:
                counts.append(int(f.read().split()[3].split("/")[0]) - 1)
        except (OSError, ValueError, IndexError):
            return 0
        if i + 1 < samples:
            time.sleep(interval)
    return max(0, min(counts))


def set_threads(n: int | None = None, *, workers: int = 1) -> int:
    """Set torch's intra-op thread count to ``n`` (None: :func:`default_threads`) and return it.
    The CLI calls this once per command (``--threads``); :func:`environment` records the count."""
    if n is None:
        n = default_threads(workers)
    elif n < 1:
        raise ValueError(f"threads must be ≥ 1, got {n}")
    torch.set_num_threads(int(n))
    return int(n)


def environment(device: torch.device | str | None = None) -> dict:
    """What a measurement was taken on: device, threads, versions."""
    device = torch.device(device) if device is not None else default_device()
    env = {
        "device": str(device),
        "device_name": (
            torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else platform.processor() or platform.machine()
        ),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable_cpus(),
        "platform": platform.platform(),
    }
    try:
        import numpy

        env["numpy"] = numpy.__version__
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    return env


def unknown_keys_error(kind: str, unknown: Iterable[str], valid: Iterable[str]) -> ValueError:
    """A ValueError naming unknown keys, the closest valid ones and the full valid list."""
    valid = sorted(valid)
    parts = []
    for key in sorted(unknown):
        close = difflib.get_close_matches(key, valid, n=1)
        parts.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return ValueError(f"unknown {kind}: {', '.join(parts)}. Valid {kind}s: {', '.join(valid)}")


def call_with_options(fn, kind: str, *args, **options):
    """Call ``fn(*args, **options)`` after checking ``options`` against its signature."""
    params = inspect.signature(fn).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        valid = [
            n
            for n, p in params.items()
            if p.kind is p.KEYWORD_ONLY
            or (p.kind is p.POSITIONAL_OR_KEYWORD and n not in ("self", "d_model"))
        ]
        unknown = set(options) - set(valid)
        if unknown:
            raise unknown_keys_error(kind, unknown, valid)
    return fn(*args, **options)
