"""Numerics reported during training: the Cholesky fallback counters of the ridge-type mixers
(SKA, MesaNet; :class:`kvfree.linalg.FallbackCounter`) and SKA's readout diagnostics.

    numerics(model)   -> {"linalg/jitter": 0, "linalg/eigen": 0, "ska/lambda_min": ..., ...}
    watch = FallbackWatch(model); watch.check(step)   # warns when a fallback has fired

The counters are cumulative over the model's life (training and evaluation forwards); the SKA
values are those of the most recent forward: the smallest λ_min(G̃) proxy over layers, the
largest power-iteration σ̂ and the mean fraction of heads whose operator was clamped
(σ̂ > 1; docs/ska.md §7, §9).
"""

from __future__ import annotations

import warnings

import torch

from kvfree.linalg import FallbackCounter


def _counters(model: torch.nn.Module) -> list[FallbackCounter]:
    return [
        m.fallbacks
        for m in model.modules()
        if isinstance(getattr(m, "fallbacks", None), FallbackCounter)
    ]


def numerics(model: torch.nn.Module) -> dict:
    """Flat metrics: fallback totals when the model has counters, SKA diagnostics when an SKA
    layer has run; empty for models with neither."""
    out: dict = {}
    counters = _counters(model)
    if counters:
        out["linalg/jitter"] = sum(c.jitter for c in counters)
        out["linalg/eigen"] = sum(c.eigen for c in counters)
    diags = [
        m.diagnostics
        for m in model.modules()
        if isinstance(getattr(m, "diagnostics", None), dict) and m.diagnostics
    ]
    if diags:

        def values(key):
            return [float(d[key]) for d in diags if key in d]

        if values("lambda_min"):
            out["ska/lambda_min"] = min(values("lambda_min"))
        if values("sigma_max"):
            out["ska/sigma_max"] = max(values("sigma_max"))
        if values("frac_clamped"):
            v = values("frac_clamped")
            out["ska/frac_clamped"] = sum(v) / len(v)
    return out


class FallbackWatch:
    """Warns (RuntimeWarning) the first time a Cholesky fallback fires, and again whenever the
    total has doubled since the last warning, so a run that keeps repairing is not silent but
    not flooded either."""

    def __init__(self, model: torch.nn.Module):
        self.counters = _counters(model)
        self.base = self._total()  # fallbacks before this watch began (an earlier fit)
        self.warned = 0  # new fallbacks at the last warning

    def _total(self) -> int:
        return sum(c.total() for c in self.counters)

    def check(self, step: int) -> bool:
        """True if it warned."""
        if not self.counters:
            return False
        new = self._total() - self.base
        if new <= 2 * self.warned:
            return False
        jitter = sum(c.jitter for c in self.counters)
        eigen = sum(c.eigen for c in self.counters)
        warnings.warn(
            f"step {step}: {new} Cholesky fallback(s) in this run (model totals: jitter "
            f"{jitter}, eigen {eigen}): an ill-conditioned Gram matrix in SKA/MesaNet was "
            "repaired (docs/ska.md §9); the counts are logged as linalg/* in metrics.jsonl",
            RuntimeWarning,
            stacklevel=2,
        )
        self.warned = new
        return True
