"""``kvfree bench recall``: train each model on a task grid, evaluate every cell, several seeds,
an optional learning-rate sweep; resumable.

Protocol (docs/tasks.md §0):
- a *job* is one training run: (model, seed, LR) on the grid's mixture of cells, or on one
  cell in ``per_cell`` mode. Its result file ``jobs/<job>.json`` holds one row per evaluated
  cell; a rerun skips every job whose file exists with the same grid and model fingerprint
  (resume at the job level; an interrupted job restarts from step 0);
- training data: train seeds [0, 2³¹) derived from (grid, cell, step) — fresh examples every
  step — or a fixed train set iterated for ``epochs``; validation sets (model selection)
  also come from the train range, test sets from the test range [2³¹, 2³²);
- the best LR per model is chosen by **validation** accuracy (mean over cells and seeds),
  never by test accuracy; the table reports test accuracy at that LR;
- accuracy: argmax over the full vocabulary at every scored position, mean per example, mean
  over examples (zoology's convention); state bytes: measured ``kvfree.state_bytes`` of the
  decode state after prefilling the cell's length, fp32, all layers (docs/baselines.md §8), next
  to the analytic formula value.

Outputs in ``out/``: ``results.jsonl`` (every row), ``summary.json`` (best LR, per-cell means),
``recall.md`` (tables), ``heatmap_<model>.png`` and ``acc_vs_state.png``.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvfree import perf
from kvfree.bench.recall_grid import RecallGrid, cell_key
from kvfree.tasks import TaskData, derive_seed, example_accuracy, make


@dataclass
class Job:
    model: str
    seed: int
    lr: float
    cells: list[dict]  # the cells this run is trained on and evaluated on
    eval_cells: list[dict]

    @property
    def id(self) -> str:
        tag = f"{self.model}__seed{self.seed}__lr{self.lr:.3g}"
        if len(self.cells) == 1 and self.eval_cells == self.cells:
            tag += "__" + cell_key(self.cells[0]).replace("=", "").replace(",", "_")
        return tag


def plan(grid: RecallGrid, models: list[str], seeds: list[int]) -> list[Job]:
    jobs = []
    for model in models:
        for seed in seeds:
            for lr in grid.lrs_for(model):
                if grid.train == "per_cell":
                    jobs += [Job(model, seed, lr, [c], [c]) for c in grid.cells]
                else:
                    jobs.append(Job(model, seed, lr, grid.training_cells(), grid.cells))
    return jobs


# ----------------------------------------------------------------------------- data


def _cell_data(grid: RecallGrid, cell: dict, split: str, n: int, *key) -> TaskData:
    seed = derive_seed(
        "test" if split == "test" else "train", grid.name, split, cell_key(cell), *key
    )
    return make(grid.task, seed, num_examples=n, **grid.options, **cell)


class Batches:
    """``batches(step)``: a pure function of the step (resume-exact). Each step draws from one
    training cell (round robin in online mode; a shuffled epoch of fixed batches otherwise),
    so a batch has one length and no padding."""

    def __init__(self, grid: RecallGrid, job: Job, mask: str | None):
        self.grid, self.job, self.mask = grid, job, mask
        self.fixed = None
        if grid.train_examples is not None:
            sizes = grid.train_examples
            if grid.train == "per_cell":
                sizes = [sizes[grid.training_cells().index(job.cells[0])]]
            self.fixed = [
                _cell_data(grid, c, "train", n, "fixed", job.seed) for c, n in zip(job.cells, sizes)
            ]
            b = grid.batch_size
            self.epoch_batches = [
                (i, j) for i, d in enumerate(self.fixed) for j in range(0, len(d), b)
            ]

    def steps(self) -> int:
        if self.fixed is None:
            return self.grid.steps
        return len(self.epoch_batches) * (self.grid.epochs or 1)

    def __call__(self, step: int) -> dict:
        g = self.grid
        if self.fixed is None:
            cell = self.job.cells[step % len(self.job.cells)]
            data = _cell_data(g, cell, "train", g.batch_size, "step", self.job.seed, step)
            return data.batch(mask=self.mask)
        epoch, k = divmod(step, len(self.epoch_batches))
        order = np.random.default_rng([self.job.seed, epoch]).permutation(len(self.epoch_batches))
        i, j = self.epoch_batches[order[k]]
        d = self.fixed[i]
        idx = np.random.default_rng([self.job.seed, epoch, i]).permutation(len(d))
        return d.batch(idx[j : j + g.batch_size], mask=self.mask)


# ----------------------------------------------------------------------------- evaluation


def evaluate(model, data: TaskData, mask: str | None, batch: int, device) -> float:
    """Mean per-example accuracy (argmax over the full vocabulary)."""
    return evaluate_with_loss(model, data, mask, batch, device)[0]


def evaluate_with_loss(
    model, data: TaskData, mask: str | None, batch: int, device
) -> tuple[float, float]:
    """(mean per-example accuracy, mean cross-entropy over the scored positions)."""
    accs, loss = example_accuracies(model, data, mask, batch, device)
    return float(np.nanmean(accs)), loss


def example_accuracies(
    model, data: TaskData, mask: str | None, batch: int, device
) -> tuple[np.ndarray, float]:
    """(per-example accuracy [N], mean cross-entropy over all scored positions). An example's
    accuracy is the share of its scored positions whose argmax over the vocabulary is the label."""
    import torch

    from kvfree.train import lm_loss

    model.eval()
    preds, nll, count = [], 0.0, 0
    with torch.no_grad():
        for i in range(0, len(data), batch):
            b = data.batch(np.arange(i, min(i + batch, len(data))), mask=mask, device=device)
            scored = b["labels"] != -100  # logits only there (a vocabulary of 8192 is large)
            logits, _ = model(b["inputs"], mask=b.get("mask"), select=scored)
            pred = torch.full_like(b["labels"], -1)
            pred[scored] = logits.argmax(-1)
            preds.append(pred.cpu().numpy())
            n = int(scored.sum())
            nll += float(lm_loss(logits, b["labels"][scored])) * n
            count += n
    return example_accuracy(np.concatenate(preds), data.labels), nll / max(count, 1)


def measure_state(model, data: TaskData, mask: str | None, device) -> tuple[int, int | None]:
    """(measured bytes of the decode state after prefilling one example, analytic formula
    bytes) — fp32, all layers."""
    import torch

    from kvfree.state import state_bytes

    b = data.batch([0], mask=mask, device=device)
    model.eval()
    with torch.no_grad():
        _, state = model.prefill(b["inputs"], mask=b.get("mask"))
    measured = state_bytes(state)
    try:
        formula = sum(m.state_nbytes(data.seq_len) for m in model.mixers())
    except (NotImplementedError, AttributeError, TypeError):
        formula = None
    return measured, formula


# ----------------------------------------------------------------------------- one job


def build_model(model_spec: str, vocab_size: int, seed: int):
    import torch

    from kvfree.models import LanguageModel
    from kvfree.models import preset as get_preset
    from kvfree.models.presets_recall import oracle_mask

    name, overrides = parse_model(model_spec)
    cfg = get_preset(name, vocab_size=vocab_size, **overrides)
    torch.manual_seed(seed)
    return LanguageModel(cfg), ("prefix" if oracle_mask(cfg) else None)


def parse_model(spec: str) -> tuple[str, dict]:
    """``preset`` or ``preset[key=value,…]``: a key is a config field or ``<mixer>.<option>``
    (``recall-mamba2-ska[ska.K=1,ska.conv_size=4]``); values are parsed as JSON when possible
    (commas inside JSON brackets do not split)."""
    if "[" not in spec:
        return spec, {}
    if not spec.endswith("]"):
        raise ValueError(f"model spec {spec!r}: write preset[key=value,...]")
    name, rest = spec[:-1].split("[", 1)
    out = {}
    for part in filter(None, split_top(rest)):
        if "=" not in part:
            raise ValueError(f"model spec {spec!r}: {part!r} is not key=value")
        k, v = part.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return name, out


def split_top(text: str) -> list[str]:
    """Split on commas outside [] and {}."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch in "[{") - (ch in "]}")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return [*parts, cur]


def model_fingerprint(model_spec: str, vocab_size: int) -> str:
    """Hash of the model's full config (a changed preset invalidates finished runs)."""
    from kvfree.models import preset as get_preset

    name, overrides = parse_model(model_spec)
    cfg = get_preset(name, vocab_size=vocab_size, **overrides).to_dict()
    return hashlib.blake2b(
        json.dumps(cfg, sort_keys=True, default=str).encode(), digest_size=6
    ).hexdigest()


@perf.with_flushed_denormals  # perf.py: subnormal floats take a slow path on x86
def run_job(
    grid: RecallGrid,
    job: Job,
    out_dir: Path,
    *,
    device=None,
    on_step=None,
    threads: int | None = None,
) -> dict:
    """Train one job to convergence or to the cap (recall_convergence.py), evaluate every cell
    on its test set; returns {"job", "rows", "train", "curve"} (also written to disk).

    Checkpoints go to ``jobs/<id>/checkpoints`` at every evaluation: an interrupted job resumes
    from there with the same learning curve (deleted when the job has finished)."""
    import shutil

    import torch

    from kvfree.bench.recall_convergence import THRESHOLDS, Convergence
    from kvfree.report.tables import atomic_write, write_json
    from kvfree.train import TrainConfig, Trainer
    from kvfree.utils import default_device, environment, set_threads

    if threads:
        set_threads(threads)
    perf.tune_allocator()
    device = torch.device(device) if device else default_device()
    probe = _cell_data(grid, job.eval_cells[0], "val", 1)
    model, mask = build_model(job.model, probe.vocab_size, job.seed)
    batches = Batches(grid, job, mask)
    steps = batches.steps()
    conv = Convergence(
        eval_every=grid.eval_every,
        target=grid.target,
        patience=grid.patience,
        patience_after=grid.patience_after,
        min_delta_acc=grid.min_delta_acc,
        min_delta_loss=grid.min_delta_loss,
        batch_size=grid.batch_size,
        on_step=on_step,
    )
    val_sets = {cell_key(c): _cell_data(grid, c, "val", grid.n_val) for c in job.eval_cells}
    ska_diag = _ska_probe(grid, job, model, val_sets, mask, device)
    trainer: Trainer | None = None

    curve_keys = [cell_key(c) for c in grid.curve_cells(job.eval_cells)]

    def eval_fn(m) -> dict:
        accs, losses = {}, []
        for key in curve_keys:
            accs[key], loss = evaluate_with_loss(m, val_sets[key], mask, grid.eval_batch, device)
            losses.append(loss)
        conv.record(trainer.step, accs, float(np.mean(losses)))
        if ska_diag is not None:  # SKA diagnostics at this point of the curve (ska_probe.py)
            conv.curve[-1]["ska"] = ska_diag(m)
        return {"val_acc": float(np.mean(list(accs.values()))), "val_loss": conv.curve[-1]["loss"]}

    cfg = TrainConfig(
        steps=steps,
        lr=job.lr,
        warmup_steps=min(grid.warmup_steps, steps // 2),
        weight_decay=grid.weight_decay,
        min_lr_ratio=grid.min_lr_ratio,
        seed=job.seed,
        device=str(device),
        progress=False,
        log_every=max(1, min(steps // 20, grid.eval_every or steps)),
        eval_every=grid.eval_every,
        checkpoint_every=grid.eval_every,
        keep_best=False,
        best_metric="val_loss",
    )
    run_dir = out_dir / "jobs" / job.id
    stamp = run_dir / "fingerprint"
    fingerprint = f"{grid.fingerprint()}-{model_fingerprint(job.model, probe.vocab_size)}"
    resume = (
        stamp.exists()
        and stamp.read_text() == fingerprint
        and (run_dir / "checkpoints" / "last.pt").exists()
    )
    if not resume:  # nothing of this grid and model to continue: start afresh
        shutil.rmtree(run_dir, ignore_errors=True)
        atomic_write(stamp, fingerprint)
    t0 = time.time()
    trainer = Trainer(
        model,
        cfg,
        batches,
        run_dir=run_dir,
        eval_fn=eval_fn if grid.eval_every else None,
        schedule=conv,
        desc=job.id,
        resume=resume,
    )
    resumed_at = trainer.step
    if on_step is not None and resumed_at:
        on_step(resumed_at)
    summary = trainer.fit()
    if on_step is not None:  # the last step, and the steps an early stop left out
        on_step(1 + steps - trainer.step)
    train_s = summary["train_seconds_total"]
    outcome = conv.status or "budget"
    # the final weights were just evaluated on the validation sets (the curve's last point)
    last = conv.curve[-1] if conv.curve and conv.curve[-1]["step"] == trainer.step else None
    rows = []
    for cell in job.eval_cells:
        key = cell_key(cell)
        test = _cell_data(grid, cell, "test", grid.n_test)
        measured, formula = measure_state(model, test, mask, device)
        reached = (  # only for the cells on the learning curve
            {f"examples_to_{t:g}": conv.first_examples(key, t) for t in THRESHOLDS}
            if key in curve_keys or not conv.curve
            else {}
        )
        rows.append(
            {
                "grid": grid.name,
                "task": grid.task,
                "model": job.model,
                "seed": job.seed,
                "lr": job.lr,
                "cell": key,
                **cell,
                "seq_len": test.seq_len,
                "val_acc": last["acc"][key]
                if last is not None and key in last["acc"]
                else evaluate(model, val_sets[key], mask, grid.eval_batch, device),
                "test_acc": evaluate(model, test, mask, grid.eval_batch, device),
                "n_val": grid.n_val,
                "n_test": len(test),
                "state_bytes": measured,
                "state_bytes_formula": formula,
                "params": model.num_parameters(),
                "oracle_mask": mask is not None,
                "steps": trainer.step,
                "steps_cap": steps,
                "examples_seen": trainer.step * grid.batch_size,
                "outcome": outcome,
                **reached,
                "curve": [
                    [p["step"] * grid.batch_size, round(p["acc"][key], 4)]
                    for p in conv.curve
                    if key in p["acc"]
                ],
                "batch_size": grid.batch_size,
                "train_seconds": train_s,
                "final_loss": summary["final_loss"],
                "job": job.id,
            }
        )
    result = {
        "job": {**job.__dict__, "id": job.id},
        "grid_fingerprint": grid.fingerprint(),
        "fingerprint": fingerprint,
        "rows": rows,
        "curve": conv.curve,
        "train": {
            **summary,
            "outcome": outcome,
            "resumed_at_step": resumed_at,
            "wall_seconds": time.time() - t0,
        },
        "env": environment(device),
    }
    # the trained weights (no optimizer): post-training variants — a quantised or evicting KV
    # cache on a trained attention model (bench frontier) — are evaluated on them
    torch.save(model.state_dict(), weights_path(out_dir, job))
    write_json(out_dir / "jobs" / f"{job.id}.json", result)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return result


def weights_path(out_dir: Path, job: Job) -> Path:
    return Path(out_dir) / "jobs" / f"{job.id}.weights.pt"


def _ska_probe(grid: RecallGrid, job: Job, model, val_sets: dict, mask, device):
    """``probe(model) -> dict`` of SKA's training diagnostics on 16 examples of the longest
    ``mqar_gap`` validation cell, or None (no SKA layer, another task)."""
    from kvfree.bench.ska_probe import probe, ska_layers

    if grid.task != "mqar_gap" or not ska_layers(model):
        return None
    cell = max(job.eval_cells, key=lambda c: (c["gap"], c["num_kv_pairs"]))
    data = val_sets[cell_key(cell)]
    batch = data.batch(range(min(16, len(data))), mask=mask, device=device)
    return lambda m: probe(m, batch, num_kv_pairs=cell["num_kv_pairs"], gap=cell["gap"])


def load_job(out_dir: Path, grid: RecallGrid, job: Job) -> dict | None:
    """The finished result of ``job`` if its file exists and matches the grid and the model's
    config."""
    path = out_dir / "jobs" / f"{job.id}.json"
    if not path.exists():
        return None
    try:
        res = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    vocab = _cell_data(grid, job.eval_cells[0], "val", 1).vocab_size
    expected = f"{grid.fingerprint()}-{model_fingerprint(job.model, vocab)}"
    return res if res.get("fingerprint") == expected else None


# ----------------------------------------------------------------------------- the bench


def run(
    grid: RecallGrid,
    models: list[str],
    seeds: list[int],
    out_dir: str | Path,
    *,
    device: str | None = None,
    workers: int = 1,
    threads: int | None = None,
    progress: bool = True,
    plots: bool = True,
    first: list[str] | None = None,
) -> dict:
    """Run (or resume) every job, then write results.jsonl, summary.json, recall.md, plots.

    ``first``: models whose jobs start first (put the slowest first to balance workers); the
    tables keep the order of ``models``."""
    from tqdm.auto import tqdm

    from kvfree.bench.recall_report import write_outputs
    from kvfree.report.tables import write_json
    from kvfree.utils import environment

    out_dir = Path(out_dir)
    if threads is None and (device or "cpu").startswith("cpu"):
        from kvfree.utils import default_threads

        threads = default_threads(workers)  # one per free core, split over the workers
    if not models or not seeds:
        raise ValueError("give at least one model and one seed")
    for m in models:  # fail fast on an unknown preset
        build_model(m, _cell_data(grid, grid.cells[0], "val", 1).vocab_size, 0)
    jobs = plan(grid, models, seeds)
    write_json(
        out_dir / "config.json",
        {
            "grid": grid.to_dict(),
            "models": models,
            "seeds": seeds,
            "device": device,
            "workers": workers,
        },
    )
    done = {j.id: r for j in jobs if (r := load_job(out_dir, grid, j)) is not None}
    todo = [j for j in jobs if j.id not in done]
    if first:
        todo.sort(key=lambda j: first.index(j.model) if j.model in first else len(first))
    steps_of = {
        j.id: Batches(grid, j, None).steps()
        if grid.train_examples is None
        else _fixed_steps(grid, j)
        for j in todo
    }
    t0 = time.time()
    n_cells = sum(len(j.eval_cells) for j in jobs)

    def label() -> str:
        cells = sum(len(j.eval_cells) for j in jobs if j.id in done)
        return f"recall: {cells}/{n_cells} cells, {len(done)}/{len(jobs)} runs done"

    bar = tqdm(
        total=sum(steps_of.values()),
        unit="step",
        disable=not progress,
        dynamic_ncols=True,
        desc=label(),
    )
    try:
        if workers > 1 and len(todo) > 1:
            from kvfree.bench.recall_workers import recall_job, run_parallel

            payloads = [
                (grid.to_dict(), j.__dict__, str(out_dir), device, threads or 1) for j in todo
            ]
            for res in run_parallel(recall_job, payloads, workers, bar):
                done[res["job"]["id"]] = res
                bar.set_description(label())
        else:
            for job in todo:
                bar.set_postfix_str(job.id)
                done[job.id] = run_job(
                    grid, job, out_dir, device=device, on_step=bar.update, threads=threads
                )
                bar.set_description(label())
    except KeyboardInterrupt:
        pass  # below: the jobs without a result
    if any(j.id not in done for j in jobs):  # interrupted (here or in a worker)
        bar.close()
        print(
            f"\ninterrupted: {len(done)} of {len(jobs)} runs finished (kept in {out_dir}/jobs); "
            "the running ones saved a checkpoint. Run the same command again to resume.",
            file=sys.stderr,
        )
        raise KeyboardInterrupt
    bar.close()
    rows = [r for j in jobs for r in done[j.id]["rows"]]
    env = environment(device)
    meta = {
        "grid": grid.to_dict(),
        "models": models,
        "seeds": seeds,
        "wall_seconds_this_run": time.time() - t0,
        "jobs_run": len(todo),
        "jobs_reused": len(jobs) - len(todo),
        "env": env,
        "workers": workers,
        "threads_per_worker": threads,
    }
    return write_outputs(out_dir, rows, meta, plots=plots)


def _fixed_steps(grid: RecallGrid, job: Job) -> int:
    b = grid.batch_size
    sizes = grid.train_examples
    if grid.train == "per_cell":
        sizes = [sizes[grid.training_cells().index(job.cells[0])]]
    return sum(-(-n // b) for n in sizes) * (grid.epochs or 1)
