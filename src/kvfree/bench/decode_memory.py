"""Peak-memory probes for one decode measurement (prefill and decode phases, separately).

CPU (Linux). The kernel keeps the process's resident-set high-water mark ``VmHWM`` next to the
current ``VmRSS`` in ``/proc/self/status``; writing ``5`` to ``/proc/self/clear_refs`` resets
the high-water mark to the current RSS (proc(5)). A phase's peak above its start is therefore
``VmHWM`` after the phase minus ``VmRSS`` when it began: exact to a page, nothing sampled.
Before each reset, glibc's free lists are handed back to the kernel with ``malloc_trim(0)``,
so memory that an earlier phase freed but the allocator kept cached is not charged to a later
phase. Where ``clear_refs`` cannot be written, a thread samples ``VmRSS`` every millisecond
instead; the method used is recorded with every measurement.

The fixed ``MALLOC_MMAP_THRESHOLD_`` the bench sets for honest RSS has a price: every tensor
of at least the threshold (a 128 KiB SSM state, for one) is ``mmap``-ed and unmapped again on
every decode step, page faults included. That made Mamba-2's steps about 1.3× slower (median
over N of ``decode_mmap_ms_median / decode_ms_median`` in runs/bench-decode) and their timing
depend on the process's history (runs/bench-decode-r3-mmap128k: +32 % in-process after a 32k
prefill). So latency is timed under :meth:`AllocatorPhases.timing` (threshold 32 MiB, glibc's
own dynamic ceiling: what an unconfigured server process converges to) and memory under the
configured threshold, each phase in its own decode steps.

CUDA. ``torch.cuda.reset_peak_memory_stats`` then ``max_memory_allocated`` (the caching
allocator's live bytes, the figure the FDM paper reported) minus ``memory_allocated`` at the
start of the phase; ``max_memory_reserved`` is kept as well.
"""

from __future__ import annotations

import ctypes
import threading
import time

import torch

from kvfree.perf import MAX_MMAP_THRESHOLD, set_mmap_threshold

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


def proc_status_kib(*keys: str) -> dict[str, int]:
    """The named ``/proc/self/status`` fields (``VmRSS``, ``VmHWM``, …) in KiB."""
    out: dict[str, int] = {}
    with open(_STATUS) as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in keys:
                out[key] = int(rest.split()[0])
    missing = set(keys) - set(out)
    if missing:
        raise RuntimeError(f"{_STATUS} has no field(s) {sorted(missing)}; RSS probes need Linux")
    return out


def rss_bytes() -> int:
    """Current resident set size of this process, in bytes."""
    return proc_status_kib("VmRSS")["VmRSS"] * 1024


def trim_heap() -> bool:
    """Return glibc's cached free memory to the kernel (``malloc_trim(0)``); False if absent."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True


#: glibc's upper bound for its dynamic mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
TIMING_MMAP_THRESHOLD = MAX_MMAP_THRESHOLD


class AllocatorPhases:
    """Switch glibc between the measuring threshold (the ``MALLOC_MMAP_THRESHOLD_`` this
    process was started with) and :data:`TIMING_MMAP_THRESHOLD`. Inert when the process was
    started without the variable (in-process tests, CUDA): the allocator is left alone."""

    def __init__(self, measuring: int | None):
        self.measuring = measuring
        self.active = bool(measuring)

    def timing(self) -> None:
        if self.active:
            self.active = set_mmap_threshold(TIMING_MMAP_THRESHOLD)

    def measuring_memory(self) -> None:
        if self.active:
            set_mmap_threshold(self.measuring)
            trim_heap()

    @property
    def method(self) -> str:
        return (
            (
                f"; latency timed with the mmap threshold at {TIMING_MMAP_THRESHOLD >> 20} MiB, "
                f"memory with it at {self.measuring}"
            )
            if self.active
            else ""
        )


class CpuRssProbe:
    """Resident-memory peaks on Linux: ``VmHWM`` reset through ``clear_refs`` (or sampling)."""

    def __init__(self, sample_interval_s: float = 1e-3, force_sampling: bool = False):
        self._sampler: threading.Thread | None = None
        self._max = 0
        self._stop = threading.Event()
        if not force_sampling and self._can_reset_hwm():
            self.method = (
                "VmHWM - VmRSS from /proc/self/status, VmHWM reset by writing 5 to "
                "/proc/self/clear_refs; malloc_trim(0) before each phase"
            )
        else:
            self.method = (
                f"VmRSS sampled every {1e3 * sample_interval_s:g} ms by a thread; "
                "malloc_trim(0) before each phase"
            )
            self._interval = sample_interval_s
            self._max = rss_bytes()
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()

    @staticmethod
    def _can_reset_hwm() -> bool:
        try:
            with open(_CLEAR_REFS, "w") as f:
                f.write("5")
            proc_status_kib("VmHWM", "VmRSS")
            return True
        except (OSError, RuntimeError):
            return False

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, rss_bytes())
            time.sleep(self._interval)

    def current(self) -> int:
        return rss_bytes()

    def reset(self) -> int:
        """Trim the heap, restart the peak at the current RSS and return that RSS (bytes)."""
        trim_heap()
        if self._sampler is None:
            with open(_CLEAR_REFS, "w") as f:
                f.write("5")
            return proc_status_kib("VmRSS")["VmRSS"] * 1024
        now = rss_bytes()
        self._max = now
        return now

    def peak(self) -> int:
        """Highest RSS (bytes) since the last :meth:`reset`."""
        if self._sampler is None:
            return proc_status_kib("VmHWM")["VmHWM"] * 1024
        self._max = max(self._max, rss_bytes())
        return self._max

    def close(self) -> None:
        self._stop.set()


class CudaProbe:
    """CUDA caching-allocator peaks (``max_memory_allocated``) for one device."""

    def __init__(self, device: torch.device):
        self.device = device
        self.method = (
            "torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus "
            "memory_allocated at the start of the phase"
        )

    def current(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def reset(self) -> int:
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        return torch.cuda.memory_allocated(self.device)

    def peak(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device)

    def reserved_peak(self) -> int:
        return torch.cuda.max_memory_reserved(self.device)

    def close(self) -> None:
        pass


def make_probe(device: torch.device | str, force_sampling: bool = False):
    device = torch.device(device)
    if device.type == "cuda":
        return CudaProbe(device)
    if device.type != "cpu":
        raise ValueError(f"no memory probe for device {device}; use cpu or cuda")
    return CpuRssProbe(force_sampling=force_sampling)
