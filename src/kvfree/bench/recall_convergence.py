"""Training to convergence in ``bench recall``: the learning curve and the stopping rule.

Every ``eval_every`` steps the run measures validation accuracy (train-seed range) and
validation loss on every evaluation cell and appends them to its learning curve. It stops

- **converged**: when every cell reaches ``target`` accuracy;
- **patience**: when for ``patience`` evaluations in a row neither the mean accuracy rose by
  ``min_delta_acc`` nor the mean loss fell by the fraction ``min_delta_loss`` below their best
  (the loss counts because on the H_M/M plateau accuracy is flat while the loss still falls).
  Evaluations before step ``patience_after`` never count: recall is learned in a late, sharp
  transition, and before it the loss of e.g. Gated DeltaNet sits at chance (log 64) for 600+
  steps, exactly like a model that never learns;
- **budget**: at the grid's ``steps``, the cap, the same for every model.

The rule's state lives in :class:`Convergence` (a Trainer :class:`Schedule`), so it is saved in
every checkpoint and a resumed run continues the same curve and the same patience count.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from kvfree.train import Schedule

THRESHOLDS = (0.9, 0.99)


class Convergence(Schedule):
    def __init__(
        self,
        *,
        eval_every: int,
        target: float,
        patience: int,
        patience_after: int = 0,
        min_delta_acc: float,
        min_delta_loss: float,
        batch_size: int,
        on_step: Callable[[int], None] | None = None,
    ):
        if eval_every < 0 or patience < 0 or not 0 < target <= 1:
            raise ValueError(
                f"eval_every and patience must be >= 0 and 0 < target <= 1, got "
                f"{eval_every}, {patience}, {target}"
            )
        self.eval_every, self.target, self.patience = eval_every, target, patience
        self.patience_after = patience_after
        self.min_delta_acc, self.min_delta_loss = min_delta_acc, min_delta_loss
        self.batch_size, self._on_step = batch_size, on_step
        self.curve: list[dict] = []  # {"step", "examples", "acc": {cell: a}, "loss": l}
        self.best_acc, self.best_loss, self.since_best = -math.inf, math.inf, 0
        self.status: str | None = None  # converged | patience (None: still training)

    # ----- the rule ----------------------------------------------------------------------
    def record(self, step: int, acc: dict[str, float], loss: float) -> None:
        """Append one evaluation and update the stopping state."""
        mean = sum(acc.values()) / len(acc)
        self.curve.append(
            {"step": step, "examples": step * self.batch_size, "acc": dict(acc), "loss": loss}
        )
        improved = mean > self.best_acc + self.min_delta_acc or loss < self.best_loss * (
            1 - self.min_delta_loss
        )
        self.best_acc, self.best_loss = max(self.best_acc, mean), min(self.best_loss, loss)
        counts = step > self.patience_after
        self.since_best = 0 if improved or not counts else self.since_best + 1
        if min(acc.values()) >= self.target:
            self.status = "converged"
        elif self.patience and self.since_best >= self.patience:
            self.status = "patience"

    def should_stop(self, trainer) -> bool:
        return self.status is not None

    def on_step(self, trainer) -> None:
        if self._on_step is not None and trainer.step > 0:
            self._on_step(1)

    # ----- what the result reports ---------------------------------------------------------
    def first_examples(self, cell: str, threshold: float) -> int | None:
        """Examples seen at the first evaluation where ``cell`` reached ``threshold``."""
        return next(
            (p["examples"] for p in self.curve if p["acc"].get(cell, -1) >= threshold), None
        )

    # ----- checkpointed state --------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "curve": self.curve,
            "best_acc": self.best_acc,
            "best_loss": self.best_loss,
            "since_best": self.since_best,
            "status": self.status,
        }

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        self.curve = list(state["curve"])
        self.best_acc, self.best_loss = state["best_acc"], state["best_loss"]
        self.since_best, self.status = state["since_best"], state["status"]
