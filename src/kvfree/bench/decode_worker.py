"""One point of ``kvfree bench decode``: build a model, prefill N tokens, decode, measure.

Run in a fresh process per (model, N) point on CPU, so resident-memory peaks belong to that
point alone::

    python -m kvfree.bench.decode_worker '<PointSpec as JSON>'

prints one line ``KVFREE_RESULT {json}``. :func:`measure_point` does the work and can also be
called in-process (tests, CUDA).

Order of a measurement:
1. build the model (random weights, ``seed``), cast it to ``dtype``, move it to the device;
   count the weight bytes (parameters + buffers);
2. warm up on a tiny prompt (16 tokens; two segments of 8 when the point's prefill is
   segmented) and decode ``warmup_steps + decode_steps`` tokens from
   it, timed: the **reference** latency of this process (``ref_ms_median``), then free it;
   **baseline** = memory with the model loaded (probe reset);
3. prefill the N-token prompt (made before the baseline: it is the input) with the parallel
   form, computing logits for the last position only (what a server needs); **prefill peak**
   = peak above the baseline;
4. count the carried state: measured ``state_bytes`` per layer next to ``state_size(N)`` ×
   bytes per element and the mixer's ``state_formula()``;
5. reset the probe and decode ``warmup_steps + decode_steps`` tokens greedily with ``step``;
   **decode peak** = peak above the same baseline (so it includes the state);
6. decode ``warmup_steps + decode_steps`` more tokens, timing each: the decode latency is the
   median over the last ``decode_steps`` (``decode_vs_ref``: over the reference).

On CPU, steps 2 and 6 run under ``AllocatorPhases.timing`` and steps 3–5 under the bench's
fixed mmap threshold (see ``decode_memory``), so neither figure pays for the other's setting;
step 5's own timings are kept as ``decode_mmap_ms_median``.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from kvfree.bench.decode_memory import AllocatorPhases, make_probe, rss_bytes
from kvfree.bench.timing import sync
from kvfree.config import from_dict
from kvfree.models import LanguageModel, ModelConfig, ModelState
from kvfree.models import preset as get_preset
from kvfree.state import iter_tensors, state_bytes
from kvfree.utils import default_device, environment

RESULT_TAG = "KVFREE_RESULT "
DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


@dataclass
class PointSpec:
    """One (model, N) measurement. ``overrides`` are ModelConfig keys applied to the preset."""

    preset: str
    n: int
    batch: int = 1
    decode_steps: int = 64
    warmup_steps: int = 4
    dtype: str = "float32"
    device: str | None = None
    threads: int | None = None
    seed: int = 0
    overrides: dict[str, Any] = field(default_factory=dict)
    #: a full ModelConfig dict to use instead of the preset (``preset`` is then only a label)
    config: dict[str, Any] | None = None
    #: prefill in segments of this many tokens, carrying the state (None: the model's default,
    #: ``LanguageModel.prefill_segment``; 0: the whole prompt at once)
    prefill_chunk: int | None = None

    def __post_init__(self):
        if self.n < 1 or self.batch < 1 or self.decode_steps < 1 or self.warmup_steps < 0:
            raise ValueError(
                f"need n >= 1, batch >= 1, decode_steps >= 1, warmup_steps >= 0; "
                f"got n={self.n}, batch={self.batch}, decode_steps="
                f"{self.decode_steps}, warmup_steps={self.warmup_steps}"
            )
        if self.prefill_chunk is not None and self.prefill_chunk < 0:
            raise ValueError(f"prefill_chunk must be >= 0 or None, got {self.prefill_chunk}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> PointSpec:
        return from_dict(cls, json.loads(text), kind="point spec key")


def decoded_tokens(warmup_steps: int, decode_steps: int) -> int:
    """Tokens a point decodes after its prompt: two phases (memory, then latency) of
    ``warmup_steps + decode_steps`` each (KV caches are preallocated for prompt + this)."""
    return 2 * (warmup_steps + decode_steps)


def element_bytes(dtype: str | torch.dtype) -> int:
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    return torch.empty((), dtype=dtype).element_size()


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer (shared tensors counted once)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def segment_of(chunk: int | None) -> int | str | None:
    """PointSpec.prefill_chunk -> ``LanguageModel.prefill``'s ``segment``."""
    return "auto" if chunk is None else (chunk or None)


def storage_bytes(state: Any) -> int:
    """Bytes of the storages the state's tensors keep alive (each storage counted once).

    ``state_bytes`` counts the elements a state carries; a state tensor that is a view into a
    larger prefill buffer (e.g. ``S_all[:, -1]``) keeps that whole buffer alive, and a
    preallocated cache holds its full capacity. This counts what is really held.
    """
    seen: dict[int, int] = {}
    for t in iter_tensors(state):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def layer_accounting(
    model: LanguageModel, state: ModelState, seq_len: int, batch: int, dtype: torch.dtype
) -> list[dict]:
    """Per layer: mixer, formula, analytic count and bytes, and the measured carried bytes."""
    rows = []
    for i, (mixer, s) in enumerate(zip(model.mixers(), state.layers)):
        elems = int(mixer.state_size(seq_len)) * batch
        rows.append(
            {
                "layer": i,
                "mixer": model.config.layers[i],
                "fixed_memory": bool(mixer.fixed_memory),
                "formula": mixer.state_formula(),
                "analytic_elements": elems,
                "analytic_bytes": mixer.state_nbytes(seq_len, dtype) * batch,
                "measured_bytes": state_bytes(s),
                "storage_bytes": storage_bytes(s),
            }
        )
    return rows


def build_model(spec: PointSpec, device: torch.device) -> LanguageModel:
    torch.manual_seed(spec.seed)
    if spec.config is not None:
        cfg = ModelConfig.from_dict({**spec.config, **spec.overrides})
    else:
        cfg = get_preset(spec.preset, **spec.overrides)
    return LanguageModel(cfg).to(device=device, dtype=DTYPES[spec.dtype]).eval()


def measure_point(spec: PointSpec, *, force_sampling: bool = False) -> dict:
    """Measure one point (see the module docstring); returns a JSON-ready record."""
    if spec.threads:
        torch.set_num_threads(spec.threads)
    device = torch.device(spec.device) if spec.device else default_device()
    probe = make_probe(device, force_sampling=force_sampling)
    try:
        return _measure(spec, device, probe)
    finally:
        probe.close()


def _measure(spec: PointSpec, device: torch.device, probe) -> dict:
    rss_start = rss_bytes()
    phases = AllocatorPhases(
        int(os.environ.get("MALLOC_MMAP_THRESHOLD_", 0)) if device.type == "cpu" else None
    )
    model = build_model(spec, device)
    V = model.config.vocab_size
    gen = torch.Generator().manual_seed(spec.seed + 1)
    segment = segment_of(spec.prefill_chunk)
    with torch.inference_mode():
        # warm-up on a tiny prompt: loads kernels and allocator pools, then is freed; in two
        # segments when the point's prefill is segmented (the carried-state path runs too)
        warm = min(spec.n, 16)
        warm_seg = warm // 2 if model.prefill_segment(spec.n, segment) and warm > 1 else None
        warm_ids = torch.randint(0, V, (spec.batch, warm), generator=gen).to(device)
        logits, st = model.prefill(warm_ids, last_only=True, segment=warm_seg)
        phases.timing()
        ref_times: list[float] = []
        _decode(
            model,
            logits.argmax(-1),
            st,
            spec.warmup_steps + spec.decode_steps,
            ref_times,
            [],
            device,
        )
        del logits, st, warm_ids
        gc.collect()
        # the prompt is the input, not prefill memory: made before the baseline
        ids = torch.randint(0, V, (spec.batch, spec.n), generator=gen).to(device)
        phases.measuring_memory()
        base = probe.reset()
        rss_loaded = rss_bytes()

        sync(device)
        t0 = time.perf_counter()
        logits, state = model.prefill(ids, last_only=True, segment=segment)
        sync(device)
        prefill_s = time.perf_counter() - t0
        prefill_peak = probe.peak() - base
        layers = layer_accounting(model, state, spec.n, spec.batch, DTYPES[spec.dtype])

        tok = logits.argmax(-1)  # [B]
        del logits, ids
        gc.collect()
        held = probe.reset() - base  # memory held between steps (state + anything kept)
        mem_times: list[float] = []
        tok, state = _decode(model, tok, state, spec.warmup_steps, mem_times, [], device)
        first_peak = probe.peak() - base  # warm-up steps, incl. freeing prefill leftovers
        held_steady = probe.reset() - base  # held at the start of the steady steps
        tok, state = _decode(model, tok, state, spec.decode_steps, mem_times, [], device)
        steady_peak = probe.peak() - base  # the steady steps only
        decode_peak = max(first_peak, steady_peak) if spec.warmup_steps else steady_peak

        phases.timing()
        times: list[float] = []
        cpu: list[float] = []
        tok, state = _decode(
            model, tok, state, spec.warmup_steps + spec.decode_steps, times, cpu, device
        )
        end_len = spec.n + decoded_tokens(spec.warmup_steps, spec.decode_steps)
        layers_end = layer_accounting(model, state, end_len, spec.batch, DTYPES[spec.dtype])

    timed = [1e3 * t for t in times[spec.warmup_steps :]]
    median_ms = statistics.median(timed)
    ref_ms = statistics.median(1e3 * t for t in ref_times[spec.warmup_steps :])
    mmap_ms = statistics.median(1e3 * t for t in mem_times[spec.warmup_steps :])
    q = statistics.quantiles(timed, n=10) if len(timed) > 1 else [median_ms] * 9
    wbytes = weight_bytes(model)
    out = {
        "model": spec.preset,
        "n": spec.n,
        "batch": spec.batch,
        "dtype": spec.dtype,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "layers_config": list(model.config.layers),
        "d_model": model.config.d_model,
        "num_layers": len(model.config.layers),
        "fixed_memory": all(r["fixed_memory"] for r in layers),
        "params": model.num_parameters(),
        "weight_bytes": wbytes,
        "state_bytes": sum(r["measured_bytes"] for r in layers),
        "state_bytes_analytic": sum(r["analytic_bytes"] for r in layers),
        "state_storage_bytes": sum(r["storage_bytes"] for r in layers),
        "state_bytes_end": sum(r["measured_bytes"] for r in layers_end),
        "state_bytes_end_analytic": sum(r["analytic_bytes"] for r in layers_end),
        "end_len": end_len,
        "layers": layers,
        "layers_end": [
            {k: r[k] for k in ("layer", "analytic_bytes", "measured_bytes")} for r in layers_end
        ],
        "prefill_chunk": model.prefill_segment(spec.n, segment),  # None: one pass
        "prefill_s": prefill_s,
        "prefill_tok_s": spec.batch * spec.n / prefill_s,
        "prefill_peak_bytes": prefill_peak,
        "held_bytes": held,
        "decode_peak_bytes": decode_peak,
        "decode_steady_peak_bytes": steady_peak,
        "held_steady_bytes": held_steady,
        "decode_ms": timed,
        "decode_ms_median": median_ms,
        "decode_ms_p10": q[0],
        "decode_ms_p90": q[-1],
        "decode_tok_s": 1e3 * spec.batch / median_ms,
        "ref_ms_median": ref_ms,
        "decode_vs_ref": median_ms / ref_ms,
        "decode_mmap_ms_median": mmap_ms,
        # generated tokens per second counting the prefill too (what the FDM paper timed)
        "tok_s_incl_prefill": spec.batch * len(times) / (prefill_s + sum(times)),
        "decode_cpu_ms_median": statistics.median(1e3 * c for c in cpu[spec.warmup_steps :]),
        "decode_steps": spec.decode_steps,
        "warmup_steps": spec.warmup_steps,
        "memory_method": probe.method + phases.method,
        "rss_start_bytes": rss_start,
        "rss_model_loaded_bytes": rss_loaded,
    }
    if device.type == "cuda":
        out["cuda_max_reserved_bytes"] = probe.reserved_peak()
    return out


def _decode(model, tok, state, steps: int, times: list[float], cpu: list[float], device):
    """``steps`` greedy decode steps, appending each step's wall time to ``times`` and its
    process CPU time (all threads) to ``cpu``."""
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        logits, state = model.step(tok, state)
        tok = logits.argmax(-1)
        sync(device)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return tok, state


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m kvfree.bench.decode_worker '<PointSpec JSON>'", file=sys.stderr)
        return 2
    spec = PointSpec.from_json(argv[0])
    try:
        result = measure_point(spec)
    except Exception as e:  # reported to the parent as a skipped point with the reason
        result = {
            "model": spec.preset,
            "n": spec.n,
            "error": f"{type(e).__name__}: {e}",
            "env": environment(spec.device),
        }
        print(RESULT_TAG + json.dumps(result), flush=True)
        return 1
    print(RESULT_TAG + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
