"""``kvfree bench prefill-speed``: prefill throughput of a fixed-memory model with the prompt in
one parallel pass against the same prompt in segments (``LanguageModel.prefill``'s default for
such models, :data:`kvfree.models.lm.PREFILL_SEGMENT` tokens), measured side by side.

The segmented prefill bounds the prefill's memory (``bench decode``'s prefill-peak column); this
bench shows what it costs in speed. In one process per model (random weights, ``seed``): a
warm-up of both forms on a short prompt, then for every N ``repeats`` rounds of (whole,
segmented) on the same N-token prompt, the order alternating per round; tok/s of each form is the
median over rounds and the ratio segmented / whole is the median of the per-round ratios (which
cancels slow drift of a shared machine). Every round also records the largest difference of the
last position's logits between the two forms (the chunked-prefill invariant: round-off only).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from kvfree.bench.decode import CPU_MODELS

#: The fixed-memory models of ``bench decode``'s cpu suite (attention's KV cache is not segmented)
DEFAULT_MODELS = tuple(m for m in CPU_MODELS if m != "decode-attention")
DEFAULT_LENGTHS = (2048, 8192)


def _prefill_seconds(model, ids, segment):
    import torch

    t0 = time.perf_counter()
    with torch.inference_mode():
        logits, _ = model.prefill(ids, last_only=True, segment=segment)
    return time.perf_counter() - t0, logits


def check_model(name: str) -> None:
    """One line for a preset that is unknown or whose prefill is not segmented (weightless)."""
    import torch

    from kvfree.models import LanguageModel
    from kvfree.models import preset as get_preset

    with torch.device("meta"):
        model = LanguageModel(get_preset(name))
    if not model.fixed_memory or not model.causal:
        raise ValueError(f"{name} is not a fixed-memory causal model: its prefill is not segmented")


def measure_model(
    name: str, lengths: list[int], *, segment: int, repeats: int, seed: int = 0
) -> list[dict]:
    """Rows (one per N) for preset ``name`` in this process."""
    import torch

    from kvfree.bench.decode_worker import PointSpec, build_model

    model = build_model(PointSpec(preset=name, n=max(lengths)), torch.device("cpu"))
    gen = torch.Generator().manual_seed(seed + 1)
    V = model.config.vocab_size
    warm = torch.randint(0, V, (1, 2 * min(segment, 64)), generator=gen)
    for seg in (None, min(segment, 64)):
        _prefill_seconds(model, warm, seg)
    rows = []
    for n in lengths:
        ids = torch.randint(0, V, (1, n), generator=gen)
        whole, segd, ratios, diffs = [], [], [], []
        for r in range(repeats):
            order = (None, segment) if r % 2 == 0 else (segment, None)
            got = {seg: _prefill_seconds(model, ids, seg) for seg in order}
            (tw, lw), (ts, ls) = got[None], got[segment]
            whole.append(n / tw)
            segd.append(n / ts)
            ratios.append(tw / ts)
            diffs.append((lw - ls).abs().max().item())
        rows.append(
            {
                "model": name,
                "n": n,
                "segment": segment,
                "segments": -(-n // segment),
                "whole_tok_s": statistics.median(whole),
                "segmented_tok_s": statistics.median(segd),
                "ratio": statistics.median(ratios),
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
                "max_abs_logit_diff": max(diffs),
                "whole_tok_s_runs": whole,
                "segmented_tok_s_runs": segd,
            }
        )
    return rows


def run(
    models: list[str],
    out_dir: str | Path,
    *,
    lengths: list[int] = DEFAULT_LENGTHS,
    segment: int | None = None,
    repeats: int = 3,
    threads: int = 1,
    progress: bool = True,
) -> dict:
    """Measure every model; write ``prefill_speed.json`` and ``prefill_speed.md``."""
    import torch
    from tqdm.auto import tqdm

    from kvfree.models.lm import PREFILL_SEGMENT
    from kvfree.report.tables import write_result
    from kvfree.utils import environment

    segment = PREFILL_SEGMENT if segment is None else segment
    lengths = sorted(set(int(n) for n in lengths))
    if not models:
        raise ValueError("no models given: name at least one fixed-memory preset")
    if repeats < 1 or threads < 1 or segment < 1 or min(lengths) < 1:
        raise ValueError("repeats, threads, segment and lengths must be >= 1")
    if max(lengths) <= segment:
        raise ValueError(f"every length is <= the segment ({segment}): nothing to compare")
    for name in models:  # every refusal before anything is measured or written
        check_model(name)
    torch.set_num_threads(threads)
    env = environment("cpu")
    env["threads"] = threads
    result = {
        "benchmark": "prefill-speed",
        "rows": [],
        "config": {"lengths": lengths, "segment": segment, "repeats": repeats, "threads": threads},
        "env": env,
    }
    t0 = time.time()
    for name in tqdm(models, unit="model", disable=not progress):
        result["rows"] += measure_model(name, lengths, segment=segment, repeats=repeats)
        result["wall_seconds"] = time.time() - t0
        result["markdown"] = render(result)
        write_result(out_dir, "prefill_speed", result)  # after every model: Ctrl-C keeps them
    return result


def render(result: dict) -> str:
    """The markdown of a prefill-speed result."""
    from kvfree.report.tables import markdown_table

    c, env = result["config"], result["env"]
    head = (
        f"Prefill throughput, the whole prompt in one pass vs {c['segment']}-token segments "
        f"(the default for fixed-memory models), same process, same prompt, {c['repeats']} "
        f"rounds alternating the order; ratio = median over rounds of segmented / whole tok/s "
        f"(min–max). {env['device']} ({env['device_name']}), {c['threads']} thread(s), torch "
        f"{env['torch']}, float32, batch 1, random weights."
    )
    cols = ["model", "N", "whole tok/s", "segmented tok/s", "segmented / whole", "min–max"]
    cols.append("max abs Δ logit")
    rows = [
        dict(
            zip(
                cols,
                [
                    r["model"],
                    r["n"],
                    round(r["whole_tok_s"]),
                    round(r["segmented_tok_s"]),
                    f"{r['ratio']:.2f}×",
                    f"{r['ratio_min']:.2f}–{r['ratio_max']:.2f}",
                    f"{r['max_abs_logit_diff']:.1e}",
                ],
            )
        )
        for r in result["rows"]
    ]
    ratios = [r["ratio"] for r in result["rows"]]
    tail = f"Median ratio over all rows {statistics.median(ratios):.2f}× (range {min(ratios):.2f}–"
    tail += f"{max(ratios):.2f}×)."
    return head + "\n\n" + markdown_table(rows, cols) + "\n\n" + tail
