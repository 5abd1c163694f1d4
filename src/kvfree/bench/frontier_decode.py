"""Post-training points of ``bench frontier``: a trained attention model with its KV cache
quantised or evicting, evaluated through decode (docs/frontier.md §2: eviction makes decode differ
from the parallel form by design, so decode is what is measured)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from kvfree.report.tables import write_json
from kvfree.tasks import IGNORE, TaskData, example_accuracy


def decode_accuracy(model, data: TaskData, device, batch: int = 100) -> tuple[float, int]:
    """(mean per-example accuracy, decode-state bytes per sequence at the end): the tokens before
    the first query (the task's ``prefix`` mask) are prefilled, then one ``step`` per token."""
    import torch

    from kvfree.state import state_bytes

    P = int(data.masks["prefix"].sum(1).min())
    if P < 1 or (data.labels[:, : P - 1] != IGNORE).any():
        raise ValueError("decode evaluation needs scored positions after a non-empty prompt")
    L = data.seq_len
    preds, nbytes = np.full(data.labels.shape, -1), 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(data), batch):
            ids = torch.from_numpy(data.inputs[i : i + batch]).to(device)
            logits, state = model.prefill(ids[:, :P], last_only=True)
            out = [logits]
            for t in range(P, L - 1):
                logits, state = model.step(ids[:, t], state)
                out.append(logits)
            preds[i : i + len(ids), P - 1 : L - 1] = torch.stack(out, 1).argmax(-1).cpu().numpy()
            nbytes = state_bytes(state) // len(ids)
    return float(np.nanmean(example_accuracy(preds, data.labels))), nbytes


def post_training_points(out_dir: Path, grid_dict: dict, rows: list[dict], post: dict) -> list:
    """One point per variant: mean over the grid's test cells and over the seeds of its trained
    base; x = decode-state bytes at the end of the longest cell."""
    import torch
    from tqdm.auto import tqdm

    from kvfree.bench.recall import _cell_data, build_model
    from kvfree.bench.recall_grid import RecallGrid, cell_key
    from kvfree.utils import default_device

    device = default_device()
    grid = RecallGrid.from_dict(grid_dict)
    test = {cell_key(c): _cell_data(grid, c, "test", grid.n_test) for c in grid.cells}
    longest = max(test, key=lambda k: test[k].seq_len)
    points = []
    jobs_of = {
        base: sorted({(r["seed"], r["job"]) for r in rows if r["model"] == base})
        for pairs in post.values()
        for base, _, _ in pairs
    }
    total = sum(len(jobs_of[base]) for pairs in post.values() for base, _, _ in pairs)
    bar = tqdm(total=total, unit="model", desc="post-training variants through decode")
    for family, pairs in post.items():
        for base, variant, label in pairs:
            per_seed, nbytes = [], None
            model, _ = build_model(variant, test[longest].vocab_size, 0)
            for seed, job in jobs_of[base]:
                bar.set_postfix_str(f"{label}, seed {seed}")
                path = Path(out_dir) / "jobs" / f"{job}.weights.pt"
                if not path.exists():
                    raise FileNotFoundError(f"{path}: rerun the base model {base!r}")
                cache = _cache_path(out_dir, job, variant, grid_dict, path)
                if cache.exists():  # the same weights, variant and test cells: reuse
                    got = json.loads(cache.read_text())
                else:
                    model.load_state_dict(torch.load(path, weights_only=True, map_location="cpu"))
                    model.to(device)
                    got = {"per_cell": {}, "variant": variant, "job": job}
                    for key, data in test.items():
                        acc, b = decode_accuracy(model, data, device)
                        got["per_cell"][key] = acc
                        got["state_bytes"] = b if key == longest else got.get("state_bytes")
                    write_json(cache, got)
                nbytes = got["state_bytes"]
                per_seed.append(float(np.mean(list(got["per_cell"].values()))))
                bar.update(1)
            if not per_seed:
                continue
            points.append(
                {
                    "family": family,
                    "model": label,
                    "spec": variant,
                    "base": base,
                    "state_bytes": nbytes,
                    "longest_seq_len": test[longest].seq_len,
                    "accuracy": float(np.mean(per_seed)),
                    "acc_min": min(per_seed),
                    "acc_max": max(per_seed),
                    "seeds": len(per_seed),
                    "params": int(sum(p.numel() for p in model.parameters())),
                    "evaluated": "decode",
                }
            )
    bar.close()
    return points


def _cache_path(out_dir, job: str, variant: str, grid_dict: dict, weights: Path) -> Path:
    """``<out>/post/<job>__<key>.json``: the key hashes the variant, the grid and the weights'
    bytes, so retrained weights or other test cells are evaluated afresh."""
    h = hashlib.sha256(json.dumps([variant, grid_dict], sort_keys=True, default=str).encode())
    h.update(weights.read_bytes())
    return Path(out_dir) / "post" / f"{job}__{h.hexdigest()[:16]}.json"


def rows_of(out_dir: Path) -> list[dict]:
    text = (Path(out_dir) / "results.jsonl").read_text()
    return [json.loads(x) for x in text.splitlines() if x.strip()]
