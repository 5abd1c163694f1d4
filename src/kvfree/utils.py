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
