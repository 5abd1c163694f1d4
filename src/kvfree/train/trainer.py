"""The Trainer: a step loop over a deterministic batch function.

Data contract: ``batches(step) -> Batch`` is a pure function of the step index (and its own
seed), so the data position is the step counter and resuming is exact by construction.
A ``Batch`` is a dict with ``inputs`` [B, T] int64, ``labels`` [B, T] int64 (−100 = not
scored) and optionally ``mask`` [B, T] (the SKA oracle write mask).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from kvfree.config import from_dict, to_dict
from kvfree.train.optim import param_groups, warmup_cosine
from kvfree.utils import default_device

Batch = dict[str, torch.Tensor]


@dataclass
class TrainConfig:
    steps: int = 1000
    lr: float = 1e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 0  # 0 = only at the end
    log_every: int = 50
    seed: int = 0
    amp: str = "auto"  # auto (bf16 on CUDA) | bf16 | none
    device: str = "auto"  # auto | cpu | cuda
    progress: bool = True

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return from_dict(cls, data, kind="train config key")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over scored positions (labels != −100), computed in fp32."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)


class Schedule:
    """Hook for multi-phase training (e.g. Freeze-Scan). ``on_step`` runs before every step;
    it may change ``requires_grad`` and then call ``trainer.rebuild_optimizer()``. ``lr_at``
    may override the learning rate (return None to keep the warm-up + cosine schedule)."""

    def on_step(self, trainer: Trainer) -> None:
        pass

    def lr_at(self, step: int) -> float | None:
        return None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class Trainer:
    def __init__(self, model: torch.nn.Module, config: TrainConfig,
                 batches: Callable[[int], Batch], *, run_dir: str | Path | None = None,
                 eval_fn: Callable[[torch.nn.Module], dict] | None = None,
                 schedule: Schedule | None = None, desc: str = "train"):
        self.cfg, self.batches, self.eval_fn, self.desc = config, batches, eval_fn, desc
        self.schedule = schedule or Schedule()
        self.device = default_device() if config.device == "auto" else torch.device(config.device)
        self.model = model.to(self.device)
        self.run_dir = Path(run_dir) if run_dir else None
        self.rebuild_optimizer()
        amp = config.amp if config.amp != "auto" else (
            "bf16" if self.device.type == "cuda" else "none")
        self.autocast = amp == "bf16"
        self.step = 0
        self.history: list[dict] = []

    def rebuild_optimizer(self) -> None:
        """(Re)create AdamW over the parameters that currently require gradients, and log the
        frozen / trainable parameter counts."""
        self.opt = torch.optim.AdamW(param_groups(self.model, self.cfg.weight_decay),
                                     lr=self.cfg.lr, betas=(self.cfg.beta1, self.cfg.beta2))
        params = list(self.model.parameters())
        self.trainable = sum(p.numel() for p in params if p.requires_grad)
        self.frozen = sum(p.numel() for p in params if not p.requires_grad)

    def _log(self, record: dict) -> None:
        self.history.append(record)
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def train_step(self, batch: Batch) -> float:
        self.model.train()
        batch = {k: v.to(self.device) for k, v in batch.items()}
        self.schedule.on_step(self)
        lr = self.schedule.lr_at(self.step)
        if lr is None:
            lr = self.cfg.lr * warmup_cosine(self.step, self.cfg.steps, self.cfg.warmup_steps,
                                             self.cfg.min_lr_ratio)
        for g in self.opt.param_groups:
            g["lr"] = lr
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            logits, _ = self.model(batch["inputs"], mask=batch.get("mask"))
        loss = lm_loss(logits, batch["labels"])
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.step += 1
        return loss.item()

    def evaluate(self) -> dict:
        if self.eval_fn is None:
            return {}
        self.model.eval()
        with torch.no_grad():
            out = self.eval_fn(self.model)
        self._log({"step": self.step, **{f"eval/{k}": v for k, v in out.items()}})
        return out

    def fit(self) -> dict:
        torch.manual_seed(self.cfg.seed)
        t0, loss, last_eval = time.time(), float("nan"), {}
        bar = tqdm(total=self.cfg.steps, initial=self.step, desc=self.desc,
                   disable=not self.cfg.progress, leave=False, dynamic_ncols=True)
        while self.step < self.cfg.steps:
            loss = self.train_step(self.batches(self.step))
            bar.update(1)
            if self.step % self.cfg.log_every == 0 or self.step == self.cfg.steps:
                bar.set_postfix(loss=f"{loss:.4f}")
                self._log({"step": self.step, "loss": loss,
                           "lr": self.opt.param_groups[0]["lr"],
                           "elapsed_s": round(time.time() - t0, 3)})
            if self.cfg.eval_every and self.step % self.cfg.eval_every == 0 \
                    and self.step < self.cfg.steps:
                last_eval = self.evaluate()
        bar.close()
        last_eval = self.evaluate() or last_eval
        return {"steps": self.step, "final_loss": loss, "train_seconds": time.time() - t0,
                **{f"eval/{k}": v for k, v in last_eval.items()}}
