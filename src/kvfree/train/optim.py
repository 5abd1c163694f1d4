"""AdamW with weight-decay groups, and the warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn


def no_decay(name: str, p: torch.nn.Parameter) -> bool:
    """Norms, biases, embeddings, and parameters flagged ``_no_weight_decay`` (SSM A/D/dt, SKA γ
    and η) get no weight decay."""
    return p.ndim < 2 or "embed" in name or getattr(p, "_no_weight_decay", False)


def no_decay_names(model: nn.Module) -> set[str]:
    """Names of the parameters that get no weight decay (:func:`no_decay`). Take them before
    wrapping the model: FSDP2 replaces every parameter by a sharded one without the
    ``_no_weight_decay`` attribute (the names stay the same)."""
    return {name for name, p in model.named_parameters() if no_decay(name, p)}


def param_groups(
    model: nn.Module, weight_decay: float, no_decay_set: set[str] | None = None
) -> list[dict]:
    """AdamW groups over the parameters that require gradients: ``weight_decay`` for matrices,
    0 for the :func:`no_decay` ones, decided by name from ``no_decay_set`` when given (see
    :func:`no_decay_names`), else from the parameters themselves."""
    decay, plain = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            skip = name in no_decay_set if no_decay_set is not None else no_decay(name, p)
            (plain if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if plain:
        groups.append({"params": plain, "weight_decay": 0.0})
    return groups


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up to 1 over ``warmup`` steps, cosine to ``min_ratio``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
