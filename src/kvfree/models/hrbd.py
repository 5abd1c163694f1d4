"""Holographic Reference Beam Decoding (HRBD): FDM's post-hoc layer-0 adapter, as implemented
in the original ``holographic_multihead.py`` (docs/fdm.md §7 "as implemented").

Glossary (H heads, D = d_model, layer ℓ = 0 by default):
    r_t        [D]     layer ℓ's input (token + position embedding for ℓ = 0), gradient-detached
    W_h, b_h           H zero-initialised Linear(D→D) "beams"
    m_t        [D]     (1/H) Σ_h (1 + tanh(W_h r_t + b_h))       (= 1 at init: no change)
    x^{ℓ+1}_t  [D]     m_t ⊙ (layer ℓ's output h_t + σ(W_g h_t) ⊙ c_t)  — the real residual
                       stream after wave, FFN and cache; the complex state is untouched
    LN_f               a fresh, trainable copy of the trained final LayerNorm
    loss               CE + λ·Σ_{i<j} mean((W_i W_jᵀ)²), λ = 0.01  (``aux_loss``; every entry
                       penalised, diagonal included)

The base model is frozen; only the beams and LN_f train: H·(D² + D) + 2D parameters
(1 / 4 / 8 heads at D = 576: 333 504 / 1 330 560 / 2 659 968).

Decoding is exact: ``prefill`` + ``step`` reproduce ``forward`` (the beam is a per-token map).
The original trained with AdamW LR 1e-3, (0.9, 0.95), wd 0.1, 200 warm-up steps, cosine to
10 %, 5 000 steps, batch 8 × 1 024 (:func:`hrbd_train_config`).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from kvfree.models.lm import LanguageModel, ModelState


class HRBD(nn.Module):
    def __init__(
        self, base: LanguageModel, heads: int = 4, *, layer: int = 0, penalty: float = 0.01
    ):
        super().__init__()
        if heads < 1:
            raise ValueError(f"heads must be >= 1, got {heads}")
        if not 0 <= layer < len(base.blocks):
            raise ValueError(f"layer must be in [0, {len(base.blocks)}), got {layer}")
        self.base, self.heads, self.layer, self.penalty = base, heads, layer, penalty
        self.config = base.config
        for p in base.parameters():
            p.requires_grad_(False)
        D = base.config.d_model
        self.beam_weight = nn.Parameter(torch.zeros(heads, D, D))  # W_h [out, in]
        self.beam_bias = nn.Parameter(torch.zeros(heads, D))
        self.norm = copy.deepcopy(base.norm)
        for p in self.norm.parameters():
            p.requires_grad_(True)

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def modulation(self, r: torch.Tensor) -> torch.Tensor:
        """m = mean_h (1 + tanh(W_h r + b_h)) for r [..., D]."""
        z = torch.einsum("...d,hed->...he", r, self.beam_weight.to(r.dtype)) + self.beam_bias.to(
            r.dtype
        )
        return 1.0 + torch.tanh(z).mean(-2)

    def aux_loss(self) -> torch.Tensor:
        """λ·Σ_{i<j} mean((W_i W_jᵀ)²) (0 for one head); the trainer adds it to the CE."""
        W = self.beam_weight
        if self.heads < 2:
            return W.sum() * 0.0
        G = torch.einsum("iab,jcb->ijac", W, W).pow(2).mean((-2, -1))  # [H, H]
        i, j = torch.triu_indices(self.heads, self.heads, 1, device=W.device)
        return self.penalty * G[i, j].sum()

    def _run(self, x, states, call):
        new = []
        for i, (block, mixer, s) in enumerate(zip(self.base.blocks, self.base.mixers(), states)):
            r = x.detach()
            x, s = call(block, x, s, mixer)
            if i == self.layer:
                x = x * self.modulation(r)
            new.append(s)
        return x, new

    def _logits(self, x):
        x = self.norm(x)
        base = self.base
        return base.head(x) if base.head is not None else x @ base.embed.weight.t()

    def forward(
        self, ids: torch.Tensor, state: ModelState | None = None, mask: torch.Tensor | None = None
    ):
        base = self.base
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            raise ValueError("ids must have shape [batch, seq]")
        pos = state.pos if state is not None else 0
        base._check_ids(ids, pos)
        states = state.layers if state is not None else [None] * len(base.blocks)
        x, new = self._run(
            base._embed(ids, pos),
            states,
            lambda b, x, s, m: b(x, s, mask if m.supports_mask else None),
        )
        return self._logits(x), ModelState(new, pos + ids.shape[1])

    @torch.no_grad()
    def prefill(
        self, ids: torch.Tensor, mask: torch.Tensor | None = None, state: ModelState | None = None
    ):
        return self.forward(ids, state, mask)

    def step(self, ids_t: torch.Tensor, state: ModelState, mask: torch.Tensor | None = None):
        base = self.base
        if not isinstance(ids_t, torch.Tensor) or ids_t.dim() != 1:
            raise ValueError("step takes one token per batch row: ids_t of shape [batch]")
        if state is None:
            state = base.init_state(ids_t.shape[0], device=ids_t.device)
        base._check_ids(ids_t, state.pos)
        x, new = self._run(
            base._embed(ids_t, state.pos),
            state.layers,
            lambda b, x, s, m: b.step(x, s, mask if m.supports_mask else None),
        )
        return self._logits(x), ModelState(new, state.pos + 1)


def hrbd_train_config(**overrides):
    """The original HRBD recipe as a :class:`~kvfree.train.trainer.TrainConfig`."""
    from kvfree.train.trainer import TrainConfig

    cfg = dict(
        steps=5000,
        lr=1e-3,
        warmup_steps=200,
        min_lr_ratio=0.1,
        weight_decay=0.1,
        beta1=0.9,
        beta2=0.95,
        eval_every=500,
    )
    return TrainConfig(**{**cfg, **overrides})
