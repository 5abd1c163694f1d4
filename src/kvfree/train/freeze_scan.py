"""Freeze-Scan: FDM's two-phase training schedule (docs/fdm.md §6).

Phase 1 trains every parameter. From step ``phase1_steps`` on, phase 2 freezes exactly the
wave parameters the original ``--freeze_wave`` flag froze — every parameter whose dotted name
has a component in :data:`WAVE_KEYS` (W_θ, W_r, W_i, MLP_β, both Givens modules, the δ gate g,
the causal conv) — and continues with its own learning rate. Everything else keeps training:
embeddings, positions, FFNs, the cache, every LayerNorm, W_pos and μ (so p_t still moves).
At the 137M preset that is 14 919 672 frozen and 122 143 684 trainable parameters.

    schedule = FreezeScan(phase1_steps=2000, phase2_lr=1e-4)
    Trainer(model, cfg, batches, schedule=schedule).fit()   # trainer.frozen / .trainable

The phase is part of ``state_dict`` so a resumed run continues in phase 2 (the trainer
restores ``requires_grad`` before the optimizer state; the schedule re-freezes only if it
finds the wave trainable, e.g. after loading plain weights).
"""

from __future__ import annotations

from torch import nn

from kvfree.train.optim import warmup_cosine
from kvfree.train.trainer import Schedule

WAVE_KEYS = ("W_theta", "W_r", "W_i", "W_beta", "givens_t", "givens_h", "delta_gate", "causal_conv")


def is_wave_param(name: str) -> bool:
    """True for the parameters ``--freeze_wave`` freezes (matched on whole name components)."""
    return any(part in WAVE_KEYS for part in name.split("."))


def wave_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if is_wave_param(n)]


def parameter_counts(model: nn.Module) -> dict[str, int]:
    params = list(model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    frozen = sum(p.numel() for p in params if not p.requires_grad)
    return {"frozen": frozen, "trainable": trainable, "total": frozen + trainable}


def freeze_wave(model: nn.Module) -> dict[str, int]:
    """Freeze the wave (scan) parameters of every FDM layer; return the model's
    frozen / trainable / total parameter counts afterwards."""
    wave = wave_parameters(model)
    if not wave:
        raise ValueError(
            "freeze_wave: the model has no FDM wave parameters (names with "
            f"{', '.join(WAVE_KEYS)}); Freeze-Scan needs 'fdm' or 'fan' layers"
        )
    for _, p in wave:
        p.requires_grad_(False)
    return parameter_counts(model)


class FreezeScan(Schedule):
    """Phase 1 (steps < ``phase1_steps``): the trainer's own warm-up + cosine LR, everything
    trains. Phase 2: wave frozen, LR = ``phase2_lr`` × warm-up (``phase2_warmup`` steps) +
    cosine to ``min_lr_ratio`` over the remaining steps (``phase2_schedule="constant"``
    keeps it flat)."""

    def __init__(
        self,
        phase1_steps: int,
        phase2_lr: float = 1e-4,
        *,
        phase2_warmup: int = 0,
        min_lr_ratio: float = 0.1,
        phase2_schedule: str = "cosine",
    ):
        if phase1_steps < 0:
            raise ValueError(f"phase1_steps must be >= 0, got {phase1_steps}")
        if phase2_lr <= 0:
            raise ValueError(f"phase2_lr must be positive, got {phase2_lr}")
        if phase2_schedule not in ("cosine", "constant"):
            raise ValueError(
                f"phase2_schedule must be 'cosine' or 'constant', got {phase2_schedule!r}"
            )
        self.phase1_steps, self.phase2_lr = phase1_steps, phase2_lr
        self.phase2_warmup, self.min_lr_ratio = phase2_warmup, min_lr_ratio
        self.phase2_schedule = phase2_schedule
        self.phase = 1
        self.switched_at: int | None = None
        self.total_steps: int | None = None
        self.counts: dict[str, int] | None = None

    def on_step(self, trainer) -> None:
        self.total_steps = trainer.cfg.steps
        if self.phase == 1 and trainer.step >= self.phase1_steps:
            self.phase, self.switched_at = 2, trainer.step
            self._freeze(trainer)
        elif self.phase == 2 and any(p.requires_grad for _, p in wave_parameters(trainer.model)):
            self._freeze(trainer)  # resumed from weights without the frozen flags

    def _freeze(self, trainer) -> None:
        self.counts = freeze_wave(trainer.model)
        trainer.rebuild_optimizer()
        log = getattr(trainer, "_log", None)
        if log is not None:
            log(
                {
                    "step": trainer.step,
                    "event": "freeze_scan_phase2",
                    "frozen_params": trainer.frozen,
                    "trainable_params": trainer.trainable,
                }
            )

    def lr_at(self, step: int) -> float | None:
        if self.phase == 1:
            return None
        start = self.switched_at if self.switched_at is not None else self.phase1_steps
        if self.phase2_schedule == "constant":
            return self.phase2_lr
        total = max(1, (self.total_steps or step + 1) - start)
        return self.phase2_lr * warmup_cosine(
            step - start, total, self.phase2_warmup, self.min_lr_ratio
        )

    def state_dict(self) -> dict:
        return {
            "phase": self.phase,
            "switched_at": self.switched_at,
            "phase1_steps": self.phase1_steps,
        }

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        if state.get("phase1_steps", self.phase1_steps) != self.phase1_steps:
            raise ValueError(
                f"checkpoint was trained with phase1_steps="
                f"{state['phase1_steps']}, this schedule has {self.phase1_steps}"
            )
        self.phase = int(state.get("phase", 1))
        self.switched_at = state.get("switched_at")
