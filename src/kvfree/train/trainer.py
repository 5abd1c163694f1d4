"""The Trainer: a step loop over a deterministic batch function.

Data contract: ``batches(step) -> Batch`` is a pure function of the step index (and its own
seed), so the data position is the step counter and resuming is exact by construction.
A ``Batch`` is a dict with ``inputs`` [B, T] int64, ``labels`` [B, T] int64 (−100 = not
scored) and optionally ``mask`` [B, T] (the SKA oracle write mask). Under ``torchrun`` the
function still returns the global batch and each rank keeps its rows (``distributed.py``).

Resume: ``Trainer(..., resume=True)`` (or a checkpoint path) restores model, optimizer,
schedule state, step, best value and every RNG, so the resumed run's parameters equal an
uninterrupted run's bit for bit on CPU. Checkpoints are written every ``checkpoint_every``
steps and at the end to ``run_dir/checkpoints/last.pt`` (+ ``best.pt`` by ``best_metric``).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from kvfree import perf
from kvfree.config import from_dict, to_dict
from kvfree.train import distributed as D
from kvfree.train.checkpoint import (
    CheckpointError,
    config_mismatch,
    load_checkpoint,
    model_config_dict,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from kvfree.train.diagnostics import FallbackWatch, numerics
from kvfree.train.optim import no_decay_names, param_groups, warmup_cosine
from kvfree.utils import default_device, environment

Batch = dict[str, torch.Tensor]


class TrainingInterrupted(KeyboardInterrupt):
    """``fit`` stopped on SIGINT/SIGTERM after finishing a step; ``path`` is the checkpoint it
    saved there (``run_dir/checkpoints/last.pt``; None without a run folder)."""

    def __init__(self, step: int, path: Path | None, signame: str = "SIGINT"):
        self.step, self.path, self.signame = step, path, signame
        where = f"; saved {path}" if path is not None else " (no run folder: nothing saved)"
        super().__init__(f"{signame}: training stopped at step {step}{where}")


@contextlib.contextmanager
def interrupt_flag():
    """While active, SIGINT/SIGTERM set ``flag["signal"]`` instead of killing the process (a
    second one raises KeyboardInterrupt at once); the previous handlers are restored on exit.
    A signal the process ignores stays ignored (a worker of a parallel sweep ignores SIGINT: the
    terminal's Ctrl-C reaches the parent, which stops the workers with one SIGTERM each).
    Outside the main thread signals cannot be caught, and the flag stays unset."""
    flag: dict = {"signal": None}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag["signal"] is not None:
            raise KeyboardInterrupt
        flag["signal"] = signal.Signals(signum).name
        print(
            f"\n{flag['signal']}: saving a checkpoint after this step (again to abort)",
            file=sys.stderr,
        )

    sigs = [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) != signal.SIG_IGN]
    old = {s: signal.signal(s, handler) for s in sigs}
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)


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
    checkpoint_every: int = 0  # 0 = no checkpoints; N = every N steps and at the end
    keep_best: bool = True  # with checkpoints: also keep checkpoints/best.pt
    best_metric: str = "loss"  # key of eval_fn's result; lower is better
    tensorboard: bool = False  # also write run_dir/tb (needs the tensorboard package)
    distributed: str = "auto"  # auto (ddp when launched by torchrun) | none | ddp | fsdp

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return from_dict(cls, data, kind="train config key")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over scored positions (labels != −100), computed in fp32."""
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
    )


class Schedule:
    """Hook for multi-phase training (e.g. Freeze-Scan). ``on_step`` runs before every step;
    it may change ``requires_grad`` and then call ``trainer.rebuild_optimizer()``. ``lr_at``
    may override the learning rate (return None to keep the warm-up + cosine schedule).
    ``state_dict``/``load_state_dict`` are saved in checkpoints, so a resumed run continues in
    the same phase."""

    def on_step(self, trainer: Trainer) -> None:
        pass

    def lr_at(self, step: int) -> float | None:
        return None

    def should_stop(self, trainer: Trainer) -> bool:
        """Checked before every step: True ends training there (e.g. converged, or patience
        exhausted); must depend only on state that ``state_dict`` saves."""
        return False

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class Trainer:
    def __init__(
        self,
        model: torch.nn.Module,
        config: TrainConfig,
        batches: Callable[[int], Batch],
        *,
        run_dir: str | Path | None = None,
        eval_fn: Callable[[torch.nn.Module], dict] | None = None,
        schedule: Schedule | None = None,
        desc: str = "train",
        resume: str | Path | bool | None = None,
        meta: dict | None = None,
    ):
        self.cfg, self.batches, self.eval_fn, self.desc = config, batches, eval_fn, desc
        self.schedule = schedule or Schedule()
        self.meta = meta or {}
        self.rank, self.world = D.rank(), D.world_size()
        self.mode = config.distributed
        if self.mode == "auto":
            self.mode = "ddp" if D.is_distributed() else "none"
        if self.mode != "none" and not D.is_distributed():
            raise ValueError(
                f"distributed={self.mode!r} needs a process group: launch with "
                "torchrun (WORLD_SIZE > 1) or set distributed='none'"
            )
        if config.device == "auto":
            self.device = D.local_device() if D.is_distributed() else default_device()
        else:
            self.device = torch.device(config.device)
        self.model = model.to(self.device)
        self._takes_select = "select" in inspect.signature(model.forward).parameters
        self.run_dir = Path(run_dir) if run_dir else None
        self._net = self.model
        self.no_decay = no_decay_names(self.model)  # before FSDP2 drops the parameter marks
        if self.mode == "fsdp":
            self._net = D.wrap(self.model, "fsdp", self.device)
        self.rebuild_optimizer()
        amp = (
            config.amp
            if config.amp != "auto"
            else ("bf16" if self.device.type == "cuda" else "none")
        )
        self.autocast = amp == "bf16"
        self.step = 0
        self.best: float | None = None
        self.eval_step: int | None = None  # step of the last evaluate()
        self.elapsed = 0.0  # training seconds over all runs of this training (resumes add up)
        self._t_start: float | None = None
        self.history: list[dict] = []
        self._pending_rng: dict | None = None
        self._tb = None
        if resume:
            self._resume(resume)

    # ----- optimizer ---------------------------------------------------------------------------
    def rebuild_optimizer(self) -> None:
        """(Re)create AdamW over the parameters that currently require gradients, and log the
        frozen / trainable parameter counts. Under DDP the wrapper is rebuilt too, since DDP
        fixes the set of gradient-carrying parameters when it is created."""
        self.opt = torch.optim.AdamW(
            param_groups(self.model, self.cfg.weight_decay, self.no_decay),
            lr=self.cfg.lr,
            betas=(self.cfg.beta1, self.cfg.beta2),
        )
        params = list(self.model.parameters())
        for p in params:
            if not p.requires_grad:
                p.grad = None  # a stale gradient of a frozen parameter must not reach clipping
        self.trainable = sum(p.numel() for p in params if p.requires_grad)
        self.frozen = sum(p.numel() for p in params if not p.requires_grad)
        if self.mode == "ddp":
            self._net = D.wrap(self.model, "ddp", self.device)

    # ----- logging -----------------------------------------------------------------------------
    def _log(self, record: dict) -> None:
        self.history.append(record)
        if self.run_dir is None or self.rank != 0:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.cfg.tensorboard:
            if self._tb is None:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError as e:
                    raise ImportError(
                        "tensorboard=True needs the tensorboard package: "
                        "pip install 'kvfree[tensorboard]'"
                    ) from e
                self._tb = SummaryWriter(str(self.run_dir / "tb"))
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, record["step"])

    # ----- one step ----------------------------------------------------------------------------
    def train_step(self, batch: Batch) -> float:
        self.model.train()
        batch = D.shard_batch(batch, self.rank, self.world)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        self.schedule.on_step(self)
        lr = self.schedule.lr_at(self.step)
        if lr is None:
            lr = self.cfg.lr * warmup_cosine(
                self.step, self.cfg.steps, self.cfg.warmup_steps, self.cfg.min_lr_ratio
            )
        for g in self.opt.param_groups:
            g["lr"] = lr
        labels = batch["labels"]
        # perf.py: logits only where a label is (the same mean loss); not under DDP/FSDP, whose
        # wrappers forward positional arguments only
        select = None
        if perf.fast() and self._net is self.model and self._takes_select:
            select = labels != -100
            if bool(select.all()):
                select = None
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            if select is not None:
                logits, _ = self._net(batch["inputs"], mask=batch.get("mask"), select=select)
                labels = labels[select]
            else:
                logits, _ = self._net(batch["inputs"], mask=batch.get("mask"))
        if self.world > 1:
            loss, report = D.global_mean_loss(logits, labels)
        else:
            loss = report = lm_loss(logits, labels)
        if hasattr(self.model, "aux_loss"):  # e.g. HRBD's orthogonality penalty (not reported)
            loss = loss + self.model.aux_loss()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(
                [p for p in self.model.parameters() if p.requires_grad], self.cfg.grad_clip
            )
        self.opt.step()
        self.step += 1
        return report.item()

    def evaluate(self) -> dict:
        """Run ``eval_fn`` (on every rank, as FSDP needs all of them), log, keep the best."""
        if self.eval_fn is None:
            return {}
        self.model.eval()
        with torch.no_grad():
            out = self.eval_fn(self.model)
        self.eval_step = self.step
        self._log({"step": self.step, **{f"eval/{k}": v for k, v in out.items()}})
        value = out.get(self.cfg.best_metric)
        if isinstance(value, (int, float)) and (self.best is None or value < self.best):
            self.best = float(value)
            if self.cfg.checkpoint_every and self.cfg.keep_best and self.run_dir is not None:
                self.save_checkpoint(self.run_dir / "checkpoints" / "best.pt")
        return out

    # ----- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self, path: str | Path) -> Path:
        """Snapshot everything a resumed run needs (collective under DDP/FSDP; rank 0 writes)."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=self.mode == "fsdp")
        model_sd = get_model_state_dict(self.model, options=opts)
        optim_sd = get_optimizer_state_dict(self.model, self.opt, options=opts)
        rngs = D.gather_objects(rng_state())
        if self.rank == 0:
            save_checkpoint(
                path,
                {
                    "model": model_sd,
                    "optimizer": optim_sd,
                    "requires_grad": {n: p.requires_grad for n, p in self.model.named_parameters()},
                    "trainer": {
                        "step": self.step,
                        "best": self.best,
                        "eval_step": self.eval_step,
                        "world_size": self.world,
                        "elapsed": self._elapsed(),
                    },
                    "schedule": self.schedule.state_dict(),
                    "rng": rngs,
                    "model_config": model_config_dict(self.model),
                    "train_config": self.cfg.to_dict(),
                    "meta": self.meta,
                },
            )
        D.barrier()
        return Path(path)

    def _resume(self, resume: str | Path | bool) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        if resume is True:
            if self.run_dir is None:
                raise ValueError("resume=True needs run_dir (its checkpoints/last.pt is loaded)")
            path = self.run_dir / "checkpoints" / "last.pt"
            if not path.exists():  # nothing to resume: start fresh
                return
        else:
            path = Path(resume)
        ckpt = load_checkpoint(path)
        diff = config_mismatch(ckpt.get("model_config"), model_config_dict(self.model))
        if diff:
            raise CheckpointError(
                f"{path} was trained with a different model config:\n  "
                + "\n  ".join(diff)
                + "\nbuild the model from the checkpoint's "
                "config (kvfree.train.lm.load_model) or start a new run"
            )
        names = {n for n, _ in self.model.named_parameters()}
        saved = ckpt.get("requires_grad", {})
        if set(saved) != names:
            raise CheckpointError(
                f"{path}: parameter names differ from the model's (missing "
                f"{sorted(names - set(saved))[:5]}, unexpected "
                f"{sorted(set(saved) - names)[:5]}); wrong model for this run"
            )
        opts = StateDictOptions(full_state_dict=True, strict=True)
        try:
            set_model_state_dict(self.model, ckpt["model"], options=opts)
        except (RuntimeError, KeyError, ValueError) as e:
            raise CheckpointError(
                f"{path}: model weights do not fit this model ({e}); "
                "wrong model for this checkpoint"
            ) from e
        for n, p in self.model.named_parameters():
            p.requires_grad_(saved[n])
        self.rebuild_optimizer()
        set_optimizer_state_dict(self.model, self.opt, ckpt["optimizer"], options=opts)
        self.schedule.load_state_dict(ckpt.get("schedule", {}))
        self.step = int(ckpt["trainer"]["step"])
        self.best = ckpt["trainer"].get("best")
        self.eval_step = ckpt["trainer"].get("eval_step")
        self.elapsed = float(ckpt["trainer"].get("elapsed", 0.0))
        rngs = ckpt.get("rng", [])
        self._pending_rng = rngs[self.rank] if len(rngs) == self.world else None
        self._truncate_metrics()

    def _truncate_metrics(self) -> None:
        """Drop metric lines logged after the checkpoint by the interrupted run."""
        if self.run_dir is None or self.rank != 0:
            return
        path = self.run_dir / "metrics.jsonl"
        if path.exists():
            keep = [
                ln
                for ln in path.read_text().splitlines()
                if ln.strip() and json.loads(ln).get("step", 0) <= self.step
            ]
            path.write_text("".join(ln + "\n" for ln in keep))

    # ----- loop --------------------------------------------------------------------------------
    def _elapsed(self) -> float:
        return self.elapsed if self._t_start is None else time.time() - self._t_start

    def fit(self) -> dict:
        """Train to ``cfg.steps``; returns the summary. SIGINT/SIGTERM stop it after the current
        step: it saves ``checkpoints/last.pt`` (with a run folder) and raises
        :class:`TrainingInterrupted`."""
        with interrupt_flag() as self._interrupt:
            return self._fit()

    def _stop_requested(self) -> bool:
        flag = getattr(self, "_interrupt", None)
        stop = flag is not None and flag["signal"] is not None
        if self.world > 1:  # every rank stops at the same step (saving is collective)
            t = torch.tensor([float(stop)], device=self.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            stop = bool(t.item())
        return stop

    def _stop(self, bar) -> None:
        bar.close()
        path = None
        if self.run_dir is not None:
            path = self.save_checkpoint(self.run_dir / "checkpoints" / "last.pt")
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        self.elapsed, self._t_start = self._elapsed(), None
        raise TrainingInterrupted(
            self.step, path, (self._interrupt or {}).get("signal") or "SIGINT"
        )

    def _fit(self) -> dict:
        if self._pending_rng is not None:
            set_rng_state(self._pending_rng)
            self._pending_rng = None
        elif self.step == 0:
            seed = self.cfg.seed + self.rank
            torch.manual_seed(seed)
            np.random.seed(seed)
            random.seed(seed)
        ckpt_dir = self.run_dir / "checkpoints" if self.run_dir is not None else None
        save = bool(self.cfg.checkpoint_every and ckpt_dir is not None)
        t0, loss, last_eval = time.time(), float("nan"), {}
        self._t_start = t0 - self.elapsed
        start = self.step
        watch = FallbackWatch(self.model)  # warns when a Cholesky fallback fires
        bar = tqdm(
            total=self.cfg.steps,
            initial=self.step,
            desc=self.desc,
            disable=not self.cfg.progress or self.rank != 0,
            leave=False,
            dynamic_ncols=True,
        )
        while self.step < self.cfg.steps and not self.schedule.should_stop(self):
            if self._stop_requested():
                self._stop(bar)
            loss = self.train_step(self.batches(self.step))
            bar.update(1)
            watch.check(self.step)
            if self.step % self.cfg.log_every == 0 or self.step == self.cfg.steps:
                bar.set_postfix(loss=f"{loss:.4f}")
                self._log(
                    {
                        "step": self.step,
                        "loss": loss,
                        "lr": self.opt.param_groups[0]["lr"],
                        "elapsed_s": round(self._elapsed(), 3),
                        **numerics(self.model),  # linalg fallbacks, SKA diagnostics
                    }
                )
            if (
                self.cfg.eval_every
                and self.step % self.cfg.eval_every == 0
                and self.step < self.cfg.steps
            ):
                last_eval = self.evaluate()
            if save and self.step % self.cfg.checkpoint_every == 0 and self.step < self.cfg.steps:
                self.save_checkpoint(ckpt_dir / "last.pt")
        bar.close()
        if self.eval_step != self.step:  # not when an early stop has just evaluated
            last_eval = self.evaluate() or last_eval
        if save:
            self.save_checkpoint(ckpt_dir / "last.pt")
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        self.elapsed, self._t_start = self._elapsed(), None
        summary = {
            "steps": self.step,
            "final_loss": loss,
            "train_seconds": time.time() - t0,
            "train_seconds_total": self.elapsed,
            "steps_this_run": self.step - start,
            **{f"eval/{k}": v for k, v in last_eval.items()},
            **numerics(self.model),
        }
        if self.best is not None:
            summary["best_" + self.cfg.best_metric] = self.best
        if self.run_dir is not None and self.rank == 0:
            from kvfree.report.tables import write_json

            write_json(
                self.run_dir / "summary.json",
                {
                    **summary,
                    "trainable_params": self.trainable,
                    "frozen_params": self.frozen,
                    "world_size": self.world,
                    "distributed": self.mode,
                    "environment": environment(self.device),
                },
            )
        return summary
