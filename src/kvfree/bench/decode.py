"""``kvfree bench decode``: decode memory and speed against a KV-cached Transformer.

For each model and prompt length N: prefill N tokens (parallel form), decode
2 × (``warmup`` + 64) tokens (a memory phase, then a timed phase), and record (one fresh
subprocess per point, see ``decode_worker``):
- carried state: measured ``state_bytes`` per layer and total, next to each mixer's formula
  (``state_size(N)`` × bytes per element), and the bytes of the storages it keeps alive;
- memory above the loaded model: prefill peak and decode peak separately (RSS on CPU, the
  CUDA allocator on GPU), weight bytes on their own line;
- per-token decode latency (median over the timed steps) and prefill throughput;
- device, threads, dtype, torch version.

Attention KV caches are preallocated for N + decode steps (``kv_prealloc``; the mixer's
``max_len`` option), so decode never copies the cache; without it the cache grows ×2 and
the copy shows in the decode peak.

Points that do not fit are skipped and listed with the reason: the analytic state alone
exceeds the memory budget, the time predicted from the previous N exceeds the per-point budget
(prefill scaled by (N'/N)² for models with a growing state, N'/N otherwise), the point was
killed for time or memory, or a smaller N of the same model already failed. A prompt whose
whole-prompt prefill would not fit the memory budget (its peak scaled linearly from the previous
N, or found when the point fails for memory) is prefilled in ``retry_prefill_chunk``-token
segments of the same parallel form, carrying the state; such rows say so (``prefill_chunk``).

Latency on a shared CPU drifts between processes by ±15 % (the same point measured in
fresh processes a minute apart), more than the effect the bench looks for. Two defences:
``repeats`` measures every point R times in fresh processes, in rounds (all N, then all N
again), and reports the median of the per-process medians; and every point also times the
same number of decode steps from a 16-token context *before* its prefill, in the same process
(``ref_ms_median``), so ``decode_vs_ref`` is a within-process ratio that drift cancels from.

Results are written to ``decode.json`` after every point; ``resume`` reuses the rows of an
interrupted run measured with the same settings.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from kvfree.bench.decode_worker import (
    DTYPES,
    RESULT_TAG,
    PointSpec,
    decoded_tokens,
    element_bytes,
    measure_point,
)
from kvfree.models import LanguageModel
from kvfree.models import preset as get_preset
from kvfree.utils import default_device, environment

DEFAULT_LENGTHS = (128, 512, 2048, 8192, 32768, 65536)
#: CPU-sized presets at matched width and depth (``models/presets_decode.py``).
CPU_MODELS = (
    "decode-attention",
    "decode-swa",
    "decode-mamba2",
    "decode-gdn",
    "decode-mesanet",
    "decode-echo",
    "decode-fdm",
)
#: The FDM paper's memory table with an honest baseline: FDM-137M (d=576, 12 layers) against a
#: KV-cached Transformer at the same width and depth, and the parameter-matched 20-layer one.
FDM_PAPER_MODELS = ("fdm-137m", "decode-transformer-576", "fdm-137m-transformer")
SUITES = {"cpu": (CPU_MODELS, DEFAULT_LENGTHS), "fdm-paper": (FDM_PAPER_MODELS, (8192,))}
#: Fixed glibc mmap threshold in the worker: tensors ≥ 128 KiB are unmapped when freed, so
#: RSS follows live tensor memory rather than glibc's free-list caching (0: glibc default).
DEFAULT_MMAP_THRESHOLD = 128 * 1024


@dataclass
class DecodeBenchConfig:
    models: list[str] = field(default_factory=lambda: list(CPU_MODELS))
    lengths: list[int] = field(default_factory=lambda: list(DEFAULT_LENGTHS))
    batch: int = 1
    decode_steps: int = 64
    warmup_steps: int = 4
    dtype: str = "float32"
    device: str | None = None
    threads: int | None = None
    seed: int = 0
    isolate: bool = True  # one fresh subprocess per point (needed for honest CPU peaks)
    point_timeout_s: float = 600.0
    max_memory_gb: float | None = None  # default: half of MemAvailable at start
    total_budget_s: float | None = None
    mmap_threshold: int = DEFAULT_MMAP_THRESHOLD
    kv_prealloc: bool = True  # attention caches sized for N + decode steps up front
    #: prefill segment length (None: the model's default — 512-token segments for fixed-memory
    #: models, the whole prompt otherwise; 0: the whole prompt at once)
    prefill_chunk: int | None = None
    #: after a point fails for memory with a whole-prompt prefill, retry it once with the
    #: prompt prefilled in segments of this many tokens (0: no retry); marked in the results
    retry_prefill_chunk: int = 4096
    overrides: dict[str, dict] = field(default_factory=dict)  # per model: ModelConfig keys
    #: measure every point this many times (fresh processes, in rounds over N); latency is
    #: the median of the per-process medians, memory comes from the first round
    repeats: int = 1

    def __post_init__(self):
        if not self.models:
            raise ValueError("no models given: name at least one preset (kvfree info lists them)")
        if not self.lengths or min(self.lengths) < 1:
            raise ValueError(f"lengths must be positive prompt lengths, got {self.lengths}")
        self.lengths = sorted(set(int(n) for n in self.lengths))
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")


def mem_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def plan_model(name: str, overrides: dict, max_n: int) -> tuple[dict, LanguageModel]:
    """The overrides every point of a model needs (a learned position table long enough for
    the longest prompt plus decode, so the weights are the same at every N) and a weightless
    (meta-device) model for analytic counts."""
    cfg = get_preset(name, **overrides)
    extra = dict(overrides)
    if cfg.max_len is not None and cfg.max_len < max_n:
        extra["max_len"] = max_n  # random weights: the table is only longer (FDM §4.7)
        cfg = get_preset(name, **extra)
    try:
        with torch.device("meta"):
            model = LanguageModel(cfg)
    except Exception:  # a mixer whose construction needs real data: build it for real
        model = LanguageModel(cfg)
    return extra, model


def kv_prealloc_overrides(model: LanguageModel, total_len: int) -> dict:
    """Preallocate every attention layer's KV cache for the whole prompt + decode (a static
    cache, as a server that knows the generation length does), instead of growing it ×2 —
    which would copy the cache mid-decode and hold up to twice its size."""
    cfg = model.config
    if "attention" not in cfg.layers:
        return {}
    options = {k: dict(v) for k, v in cfg.mixer_options.items()}
    options.setdefault("attention", {})["max_len"] = total_len
    return {"mixer_options": options}


def analytic_state_bytes(model: LanguageModel, n: int, batch: int, dtype: str) -> int:
    return batch * sum(m.state_nbytes(n, DTYPES[dtype]) for m in model.mixers())


def predicted_seconds(prev: dict, n: int) -> float:
    """Time of point ``n`` extrapolated from the measured point ``prev``."""
    scale = n / prev["n"]
    grow = not prev["fixed_memory"]
    prefill = prev["prefill_s"] * scale ** (2 if grow else 1)
    steps = decoded_tokens(prev["warmup_steps"], prev["decode_steps"])
    decode = steps * prev["decode_ms_median"] / 1e3 * (scale if grow else 1.0)
    return prefill + decode


def _child_rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_isolated(
    spec: PointSpec,
    *,
    timeout_s: float,
    max_rss: int | None,
    mmap_threshold: int = DEFAULT_MMAP_THRESHOLD,
) -> tuple[dict | None, str | None]:
    """Measure ``spec`` in a fresh Python process; returns (result, None) or (None, reason).

    The child is killed when it runs past ``timeout_s`` or its RSS passes ``max_rss``.
    """
    env = dict(os.environ)
    if spec.threads:
        env.update(OMP_NUM_THREADS=str(spec.threads), MKL_NUM_THREADS=str(spec.threads))
    if mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    cmd = [sys.executable, "-m", "kvfree.bench.decode_worker", spec.to_json()]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, text=True)
        t0, peak, reason = time.monotonic(), 0, None
        while proc.poll() is None:
            peak = max(peak, _child_rss(proc.pid))
            if time.monotonic() - t0 > timeout_s:
                reason = f"killed: ran past the per-point time budget of {timeout_s:g} s"
            elif max_rss and peak > max_rss:
                reason = f"killed: resident memory passed the budget of {max_rss / 2**30:.1f} GiB"
            if reason:
                proc.kill()
                proc.wait()
                return None, reason
            time.sleep(0.05)
        out.seek(0)
        err.seek(0)
        lines = [ln for ln in out.read().splitlines() if ln.startswith(RESULT_TAG)]
        if not lines:
            tail = err.read()[-600:].strip()
            return (
                None,
                f"worker exited with code {proc.returncode} (signal 9 = killed, e.g. "
                f"out of memory): {tail or 'no output'}",
            )
        result = json.loads(lines[-1][len(RESULT_TAG) :])
    if "error" in result:
        return None, f"failed: {result['error']}"
    if mmap_threshold:
        result["memory_method"] += f"; MALLOC_MMAP_THRESHOLD_={mmap_threshold}"
    return result, None


def _measure(spec: PointSpec, cfg: DecodeBenchConfig, max_rss: int | None):
    if cfg.isolate:
        return run_isolated(
            spec, timeout_s=cfg.point_timeout_s, max_rss=max_rss, mmap_threshold=cfg.mmap_threshold
        )
    try:
        return measure_point(spec), None
    except (RuntimeError, MemoryError) as e:  # e.g. "can't allocate memory"
        return None, f"failed: {type(e).__name__}: {e}"


#: Settings that must agree for a stored row to be reused by ``resume``.
_SAME_MEASUREMENT = (
    "batch",
    "decode_steps",
    "warmup_steps",
    "dtype",
    "device",
    "threads",
    "seed",
    "kv_prealloc",
    "mmap_threshold",
    "isolate",
    "repeats",
)

#: Per-process latency figures combined over repeats (median of the per-process values).
LATENCY_KEYS = (
    "decode_ms_median",
    "ref_ms_median",
    "decode_vs_ref",
    "decode_cpu_ms_median",
    "decode_mmap_ms_median",
)


def merge_repeats(runs: list[dict]) -> dict:
    """One row from repeated measurements of a point: the first run's memory figures (each
    run's decode peak is kept under ``decode_peak_bytes_runs``), latencies = the median over
    runs of the per-run medians (each under ``<key>_runs``), the timed steps pooled."""
    row = dict(runs[0])
    row["repeats"] = len(runs)
    if len(runs) == 1:
        return row
    for key in (*LATENCY_KEYS, "decode_peak_bytes", "prefill_s"):
        row[f"{key}_runs"] = [r[key] for r in runs]
    for key in LATENCY_KEYS:
        row[key] = statistics.median(r[key] for r in runs)
    row["decode_ms"] = [t for r in runs for t in r["decode_ms"]]
    q = statistics.quantiles(row["decode_ms"], n=10)
    row["decode_ms_p10"], row["decode_ms_p90"] = q[0], q[-1]
    row["decode_tok_s"] = 1e3 * row["batch"] / row["decode_ms_median"]
    return row


def reusable_rows(cfg: DecodeBenchConfig, previous: dict | None) -> dict[tuple, dict]:
    """Rows of an earlier result measured with the same settings, keyed by (model, N)."""
    if not previous:
        return {}
    old = previous.get("config", {})
    if any(old.get(k) != getattr(cfg, k) for k in _SAME_MEASUREMENT):
        return {}
    return {
        (r["model"], r["n"]): r
        for r in previous.get("rows", [])
        if r.get("repeats", 1) >= cfg.repeats
    }  # not a row whose repeats were cut short


def _skip_reason(cfg, n, failed, prev, weights_state, max_rss, t_start) -> str | None:
    if failed:
        return f"skipped: N={failed[0]} already failed ({failed[1]})"
    if max_rss and weights_state > max_rss:
        return (
            f"skipped: weights + analytic state = {weights_state / 2**30:.2f} GiB > memory "
            f"budget {max_rss / 2**30:.2f} GiB"
        )
    if prev and (p := predicted_seconds(prev, n)) > cfg.point_timeout_s:
        return (
            f"skipped: predicted {p:.0f} s from N={prev['n']} > per-point budget "
            f"{cfg.point_timeout_s:g} s"
        )
    if cfg.total_budget_s and time.monotonic() - t_start > cfg.total_budget_s:
        return f"skipped: total budget of {cfg.total_budget_s:g} s used up"
    return None


def _needs_chunking(
    cfg: DecodeBenchConfig, prev: dict | None, n: int, chunk: int | None, max_rss: int | None
) -> bool:
    """Whole-prompt prefill whose peak, scaled linearly from the previous N, would pass 90 %
    of the memory budget (then prefill in ``retry_prefill_chunk`` segments at once)."""
    if (
        chunk
        or not prev
        or not max_rss
        or not cfg.retry_prefill_chunk
        or n <= cfg.retry_prefill_chunk
        or prev.get("prefill_chunk")
    ):
        return False
    return prev["prefill_peak_bytes"] * n / prev["n"] > 0.9 * max_rss


def _measure_with_retry(spec: PointSpec, cfg: DecodeBenchConfig, max_rss, log):
    """Measure; after a memory failure with a whole-prompt prefill, retry once with the prompt
    prefilled in ``cfg.retry_prefill_chunk``-token segments."""
    row, reason = _measure(spec, cfg, max_rss)
    retry = cfg.retry_prefill_chunk
    if reason and "memory" in reason and spec.prefill_chunk is None and retry and spec.n > retry:
        log(
            f"{spec.preset} N={spec.n}: {reason}; retrying with the prompt prefilled in "
            f"{retry}-token segments"
        )
        spec.prefill_chunk = retry
        row, again = _measure(spec, cfg, max_rss)
        reason = again and f"{reason}; with {retry}-token prefill segments: {again}"
    return row, reason


def run_grid(
    cfg: DecodeBenchConfig, log=print, previous: dict | None = None, on_point=None
) -> dict:
    """Measure every (model, N) point that fits; returns rows, skipped points and metadata.

    ``previous``: an earlier result whose rows with the same measurement settings are reused
    (resume). ``on_point(result_so_far)`` is called after every point (checkpointing).
    """
    device = cfg.device or str(default_device())
    max_rss = int(cfg.max_memory_gb * 2**30) if cfg.max_memory_gb else None
    if max_rss is None and (avail := mem_available_bytes()):
        max_rss = int(0.5 * avail)
    env = environment(device)
    if cfg.threads:
        env["threads"] = cfg.threads
    result = {
        "benchmark": "decode",
        "config": asdict(cfg),
        "env": {**env, "dtype": cfg.dtype},
        "max_rss_bytes": max_rss,
        "rows": [],
        "skipped": [],
        "wall_s": 0.0,
    }
    reuse = reusable_rows(cfg, previous)
    steps_total = decoded_tokens(cfg.warmup_steps, cfg.decode_steps)
    t_start = time.monotonic()
    for name in cfg.models:
        overrides, meta = plan_model(
            name, cfg.overrides.get(name, {}), max(cfg.lengths) + steps_total
        )
        weights = sum(p.numel() for p in meta.parameters()) * element_bytes(cfg.dtype)
        prev, failed, chunk = None, None, cfg.prefill_chunk
        measured: list[tuple[PointSpec, list[dict], int]] = []  # (spec, runs, index in rows)
        for n in cfg.lengths:
            row = reuse.get((name, n))
            state = analytic_state_bytes(meta, n + steps_total, cfg.batch, cfg.dtype)
            reason = (
                None
                if row
                else _skip_reason(cfg, n, failed, prev, weights + state, max_rss, t_start)
            )
            reused = row is not None
            if reused:
                log(f"{name} N={n}: reused from the earlier result")
            elif reason is None:
                if _needs_chunking(cfg, prev, n, chunk, max_rss):
                    chunk = cfg.retry_prefill_chunk
                    log(
                        f"{name} N={n}: the prefill peak predicted from N={prev['n']} exceeds "
                        f"the memory budget; prefilling in {chunk}-token segments"
                    )
                kv = kv_prealloc_overrides(meta, n + steps_total) if cfg.kv_prealloc else {}
                spec = PointSpec(
                    preset=name,
                    n=n,
                    batch=cfg.batch,
                    decode_steps=cfg.decode_steps,
                    warmup_steps=cfg.warmup_steps,
                    dtype=cfg.dtype,
                    device=device,
                    threads=cfg.threads,
                    seed=cfg.seed,
                    overrides={**overrides, **kv},
                    # an explicit chunk covering the prompt: one pass (0); none: the default
                    prefill_chunk=chunk if chunk and n > chunk else (None if chunk is None else 0),
                )
                row, reason = _measure_with_retry(spec, cfg, max_rss, log)
                failed = (n, reason) if reason else None
            if reason:
                result["skipped"].append({"model": name, "n": n, "reason": reason})
                log(f"{name} N={n}: {reason}")
            else:
                if not reused:  # rounds 2..R follow once every N has its first round
                    measured.append((spec, [row], len(result["rows"])))
                    row = merge_repeats([row])
                result["rows"].append(row)
                prev, chunk = row, row.get("prefill_chunk") or chunk  # chunked from here on
                log(
                    f"{name} N={n}: state {row['state_bytes'] / 2**20:.3f} MiB, prefill peak "
                    f"{row['prefill_peak_bytes'] / 2**20:.1f} MiB, decode peak "
                    f"{row['decode_peak_bytes'] / 2**20:.1f} MiB, {row['prefill_tok_s']:.0f} "
                    f"tok/s prefill, {row['decode_ms_median']:.2f} ms/token"
                )
            result["wall_s"] = time.monotonic() - t_start
            if on_point:
                on_point(result)
        _repeat_points(cfg, measured, result, max_rss, log, on_point, t_start)
    return result


def _repeat_points(cfg, measured, result, max_rss, log, on_point, t_start) -> None:
    """Rounds 2..R over a model's measured points (its spec as first measured, prefill
    segments included); a failed repeat is logged and leaves the runs that succeeded."""
    for rnd in range(2, cfg.repeats + 1):
        for spec, runs, index in measured:
            row, reason = _measure(spec, cfg, max_rss)
            if reason:
                log(f"{spec.preset} N={spec.n}: repeat {rnd} failed ({reason})")
                continue
            runs.append(row)
            result["rows"][index] = merged = merge_repeats(runs)
            log(
                f"{spec.preset} N={spec.n}: repeat {rnd}/{cfg.repeats}: "
                f"{row['decode_ms_median']:.2f} ms/token (median of {len(runs)} runs: "
                f"{merged['decode_ms_median']:.2f})"
            )
            result["wall_s"] = time.monotonic() - t_start
            if on_point:
                on_point(result)


def run(
    cfg: DecodeBenchConfig,
    out_dir: str | Path = "runs/bench-decode",
    log=print,
    plots: bool = True,
    resume: bool = False,
) -> dict:
    """Run the grid and write ``decode.json``, ``decode.md`` and the two plots; ``decode.json``
    is rewritten after every point, so an interrupted run can be resumed (``resume=True``
    reuses its rows measured with the same settings)."""
    from kvfree.bench.decode_report import summarise, write_outputs
    from kvfree.report.tables import write_json

    out_dir = Path(out_dir)
    previous = None
    if resume and (out_dir / "decode.json").exists():
        previous = json.loads((out_dir / "decode.json").read_text())

    def checkpoint(partial: dict) -> None:
        write_json(out_dir / "decode.json", {**partial, "partial": True})

    result = run_grid(cfg, log=log, previous=previous, on_point=checkpoint)
    result["summary"] = summarise(result["rows"])
    write_outputs(result, out_dir, plots=plots)
    return result
