"""One run of the FDM MQAR protocol (``kvfree bench fdm-mqar``; docs/tasks.md §3): data,
splits, the training loop, and its checkpoint.

A run checkpoints itself to ``<out>/runs/<model>-<setting>-s<seed>.partial.pt`` after every
epoch, and, on SIGINT/SIGTERM, after the step in progress (with the epoch's batch order and
position). Running the same command again continues from there with the same batches, so the
resumed learning curve equals an uninterrupted one. The file is removed once the run's JSON
is written. A checkpoint that is corrupt or was written under another protocol stops the run
with one line saying what to do, and is left as it is.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from kvfree.models import LanguageModel, preset
from kvfree.tasks import IGNORE, TaskData, example_accuracy, make
from kvfree.tasks.fdm_mqar import SETTINGS
from kvfree.train.checkpoint import (
    CheckpointError,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from kvfree.train.trainer import interrupt_flag
from kvfree.utils import default_device

MODELS = {  # runner name -> preset
    "fdm-k0": "fdm-mqar-k0",
    "fdm-k4": "fdm-mqar-k4",
    "fdm-k8": "fdm-mqar-k8",
    "fdm-k16": "fdm-mqar-k16",
    "transformer": "fdm-mqar-transformer",
    "transformer-rope": "fdm-mqar-transformer-rope",
}


@dataclass
class Protocol:
    epochs: int = 100
    lr: float = 3e-3
    batch_size: int = 128
    grad_clip: float = 1.0
    num_examples: int = 10_000
    data_seed: int = 42
    test_frac: float = 0.1
    val_frac: float = 0.1  # of the non-test part


def run_name(model_name: str, setting: str, seed: int) -> str:
    return f"{model_name}-{setting}-s{seed}"


def run_meta(model_name: str, setting: str, seed: int, p: Protocol) -> dict:
    """What a checkpoint must match to be resumed."""
    return {"model": model_name, "setting": setting, "seed": seed, "protocol": asdict(p)}


def checkpoint_path(out_dir: str | Path, name: str) -> Path:
    return Path(out_dir) / "runs" / f"{name}.partial.pt"


def scored_length(labels: np.ndarray) -> int:
    """1 + the last position scored in any example."""
    cols = np.nonzero((labels != IGNORE).any(0))[0]
    if len(cols) == 0:
        raise ValueError("no scored positions in the data")
    return int(cols[-1]) + 1


def splits(n: int, p: Protocol) -> dict[str, np.ndarray]:
    """test = first ``test_frac``; validation = the next ``val_frac`` of the rest; train."""
    n_test = int(round(n * p.test_frac))
    n_val = int(round((n - n_test) * p.val_frac))
    idx = np.arange(n)
    return {
        "test": idx[:n_test],
        "val": idx[n_test : n_test + n_val],
        "train": idx[n_test + n_val :],
    }


def scored_logits(model: LanguageModel, inputs: torch.Tensor, labels: torch.Tensor):
    """(logits [n, V], labels [n]) at the scored positions only: the model's forward without
    the LM head on unscored positions (the loss and the accuracy need nothing else)."""
    x = model._embed(inputs, 0)
    for block in model.blocks:
        x, _ = block(x)
    sel = labels != IGNORE
    return model._logits(x[sel]), labels[sel]


@torch.no_grad()
def accuracy(model, data, idx, device, batch_size: int = 512) -> float:
    """Mean per-example accuracy (argmax over the full vocabulary) on examples ``idx``."""
    model.eval()
    accs = []
    for i in range(0, len(idx), batch_size):
        b = data.batch(idx[i : i + batch_size], device=device)
        logits, labels = scored_logits(model, b["inputs"], b["labels"])
        pred = torch.full_like(b["labels"], IGNORE)
        pred[b["labels"] != IGNORE] = logits.argmax(-1)
        accs.append(example_accuracy(pred.cpu().numpy(), b["labels"].cpu().numpy()))
    return float(np.nanmean(np.concatenate(accs))) if accs else float("nan")


def _task_data(setting: str, p: Protocol) -> TaskData:
    L, n = SETTINGS[setting]
    data = make("fdm_mqar", p.data_seed, num_examples=p.num_examples, seq_len=L, num_kv_pairs=n)
    # Trailing PAD after the last query is never scored and, the models being causal, never
    # influences a scored position: drop it (exact; 24 of 64 tokens in Easy, 40 of 128 in
    # Medium; tests/bench/test_fdm_mqar.py checks the logits are unchanged).
    cut = scored_length(data.labels)
    return TaskData(data.inputs[:, :cut], data.labels[:, :cut], data.slices, {}, data.meta)


def differences(saved: dict, current: dict) -> list[str]:
    """``key saved vs current`` for each differing key (nested dicts flattened: ``epochs``)."""
    out = []
    for k, v in current.items():
        old = saved.get(k)
        if isinstance(v, dict) and isinstance(old, dict):
            out += differences(old, v)
        elif old != v:
            out.append(f"{k} {old!r} vs {v!r}")
    return out


def load_state(path: Path, meta: dict) -> dict | None:
    """The run's checkpoint, checked against ``meta`` (None when there is none)."""
    if not path.exists():
        return None
    ckpt = load_checkpoint(path)
    diffs = differences(ckpt.get("meta", {}), meta)
    if diffs:
        raise CheckpointError(
            f"{path} belongs to another run ({'; '.join(diffs)}); use another --out, or "
            "--no-resume to start this run afresh (the file is overwritten)"
        )
    return ckpt


def run_one(
    model_name: str,
    setting: str,
    seed: int,
    p: Protocol,
    device=None,
    *,
    checkpoint: str | Path | None = None,
    resume: bool = True,
    on_epoch=None,
) -> dict:
    """Train one model on one setting with one seed; return the per-epoch record.
    ``checkpoint``: where the run saves itself (after each epoch and on SIGINT/SIGTERM) and,
    with ``resume``, continues from; ``on_epoch(n)`` is told of every n epochs done."""
    if model_name not in MODELS:
        raise ValueError(f"unknown model {model_name!r}; choose from {list(MODELS)}")
    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r}; choose from {list(SETTINGS)}")
    device = torch.device(device or default_device())
    meta = run_meta(model_name, setting, seed, p)
    ckpt_path = Path(checkpoint) if checkpoint is not None else None
    state = load_state(ckpt_path, meta) if ckpt_path is not None and resume else None
    data = _task_data(setting, p)
    sp = splits(len(data), p)
    torch.manual_seed(seed)
    model = LanguageModel(preset(MODELS[model_name])).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=p.lr)
    gen = torch.Generator().manual_seed(seed)
    curve, elapsed, order, start = [], 0.0, None, 0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        set_rng_state(state["rng"])
        curve, elapsed = state["curve"], state["seconds"]
        order, start = state["order"], state["next_batch"]
        order = None if order is None else order.numpy()
        if on_epoch is not None and curve:
            on_epoch(len(curve))
    losses = state["losses"] if state is not None and order is not None else []

    def save(order=None, next_batch=0):
        save_checkpoint(
            ckpt_path,
            {
                "meta": meta,
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "generator": gen.get_state(),
                "rng": rng_state(),
                "curve": curve,
                "seconds": elapsed + time.time() - t0,
                # the epoch in progress: its batch order and the next batch
                "order": None if order is None else torch.from_numpy(order),
                "next_batch": next_batch,
                "losses": list(losses),
            },
        )

    t0 = time.time()
    with interrupt_flag() as flag:
        for epoch in range(len(curve), p.epochs):
            lr = p.lr * 0.5 * (1 + math.cos(math.pi * epoch / p.epochs))  # CosineAnnealingLR
            for g in opt.param_groups:
                g["lr"] = lr
            model.train()
            if order is None:
                order = sp["train"][torch.randperm(len(sp["train"]), generator=gen).numpy()]
                start, losses = 0, []
            for i in range(start, len(order), p.batch_size):
                b = data.batch(order[i : i + p.batch_size], device=device)
                logits, labels = scored_logits(model, b["inputs"], b["labels"])
                loss = torch.nn.functional.cross_entropy(logits.float(), labels)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), p.grad_clip)
                opt.step()
                losses.append(loss.item())
                if flag["signal"] is not None:
                    if ckpt_path is not None:
                        save(order, i + p.batch_size)
                    where = f"saved {ckpt_path}" if ckpt_path is not None else "nothing saved"
                    raise KeyboardInterrupt(
                        f"{flag['signal']}: {run_name(model_name, setting, seed)} stopped in "
                        f"epoch {epoch + 1} of {p.epochs}; {where}"
                    )
            curve.append(
                {
                    "epoch": epoch + 1,
                    "lr": lr,
                    "train_loss": float(np.mean(losses)),
                    "val_acc": accuracy(model, data, sp["val"], device),
                    "test_acc": accuracy(model, data, sp["test"], device),
                }
            )
            order = None
            if ckpt_path is not None:
                save()
            if on_epoch is not None:
                on_epoch(1)
    val = [c["val_acc"] for c in curve]
    test = [c["test_acc"] for c in curve]
    best = int(np.argmax(val))
    return {
        "model": model_name,
        "preset": MODELS[model_name],
        "setting": setting,
        "seq_len": SETTINGS[setting][0],
        "trained_len": data.inputs.shape[1],
        "num_kv_pairs": SETTINGS[setting][1],
        "seed": seed,
        "epochs": p.epochs,
        "params": sum(q.numel() for q in model.parameters()),
        "final_test_acc": test[-1],
        "best_val_epoch": best + 1,
        "test_acc_at_best_val": test[best],
        "max_test_acc_over_epochs": max(test),
        "seconds": elapsed + time.time() - t0,
        "curve": curve,
    }
