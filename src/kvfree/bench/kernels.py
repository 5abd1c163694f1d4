"""``kvfree bench kernels``: the chunked/parallel form of each mixer against its per-token loop.

Both are timed forward-only (no gradients) in one run on the same inputs, so the ratio is a
same-machine, same-moment comparison; the device, threads and versions are recorded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from kvfree.bench.timing import median_time
from kvfree.mixers import available, build_mixer
from kvfree.report.tables import atomic_write, markdown_table, write_json
from kvfree.utils import default_device, environment

DEFAULT_LENGTHS = (256, 1024, 4096)


def time_mixer(
    name: str,
    d_model: int,
    T: int,
    *,
    batch: int = 1,
    device=None,
    repeats: int = 3,
    loop_budget_s: float = 20.0,
) -> dict:
    device = torch.device(device or default_device())
    torch.manual_seed(0)
    mixer = build_mixer(name, d_model).to(device).eval()
    x = torch.randn(batch, T, d_model, device=device)

    def run_parallel():
        with torch.no_grad():
            mixer(x)

    def run_loop():
        with torch.no_grad():
            s = mixer.init_state(batch, device=device, dtype=x.dtype)
            for t in range(T):
                _, s = mixer.step(x[:, t], s)

    t_par = median_time(run_parallel, repeats=repeats, device=device)
    t_loop = median_time(run_loop, repeats=repeats, warmup=0, device=device, budget_s=loop_budget_s)
    return {
        "mixer": name,
        "T": T,
        "parallel_ms": 1e3 * t_par,
        "loop_ms": 1e3 * t_loop,
        "speedup": t_loop / t_par,
        "loop_us_per_token": 1e6 * t_loop / T,
    }


def run(
    out_dir: str | Path = "runs/bench-kernels",
    mixers: list[str] | None = None,
    lengths=DEFAULT_LENGTHS,
    d_model: int = 64,
    batch: int = 1,
    repeats: int = 3,
    device: str | None = None,
    progress: bool = True,
) -> dict:
    out_dir = Path(out_dir)
    names = mixers or available()
    rows = []
    jobs = [(n, T) for n in names for T in lengths]
    for name, T in tqdm(jobs, desc="bench kernels", disable=not progress):
        rows.append(time_mixer(name, d_model, T, batch=batch, device=device, repeats=repeats))
    env = environment(device)
    result = {
        "benchmark": "kernels",
        "d_model": d_model,
        "batch": batch,
        "repeats": repeats,
        "env": env,
        "rows": rows,
    }
    write_json(out_dir / "kernels.json", result)
    md = kernels_markdown(result)
    atomic_write(out_dir / "kernels.md", md)
    result["markdown"] = md
    return result


def kernels_markdown(result: dict) -> str:
    """The table of a ``kernels.json`` result (``kvfree report kernels``)."""
    env = result["env"]
    md = (
        f"Forward only, d_model={result['d_model']}, batch={result['batch']}, median of "
        f"{result.get('repeats', 3)}; {env['device']} ({env['device_name']}), "
        f"{env['threads']} threads, torch {env['torch']}.\n\n"
    )
    return md + markdown_table(
        result["rows"],
        ["mixer", "T", "parallel_ms", "loop_ms", "speedup", "loop_us_per_token"],
        ["mixer", "T", "parallel (ms)", "per-token loop (ms)", "loop / parallel", "loop µs/token"],
    )
