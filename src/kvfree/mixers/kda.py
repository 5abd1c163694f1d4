"""Kimi Delta Attention (KDA; Kimi Linear, arXiv 2510.26692 §3; docs/frontier.md §3): the gated
delta rule with a **per-channel** decay — Gated DeltaNet's scalar α_t becomes a diagonal D_t.

Glossary (per head h; everything else as :mod:`kvfree.mixers.gated_deltanet`):
    a_t [d_k]           in_proj x_t: decay logits, one per key channel
    g_t [d_k] ≤ 0       −exp(A_log_h) · softplus(a_t + dt_bias)  (dt_bias per channel)
    D_t                 Diag(exp(g_t))
    S_t [d_k, d_v]      (I − β_t k_t k_tᵀ) D_t S_{t−1} + β_t k_t v_tᵀ
    o_t, y_t            as Gated DeltaNet (scale · S_tᵀ q_t, RMSNorm ⊙ SiLU gate, o_proj)

Chunked form: :func:`kvfree.mixers.delta_rule.delta_rule_chunked` with a [.., H, d_k] decay (the
per-channel ratios e^{ℓ_ic − ℓ_jc} inside each product; the module docstring there). With all
channels' decays equal it is Gated DeltaNet (tests/mixers/test_kda.py).

Deviation [project]: the paper computes the decay logits through a low-rank projection and the
output gate through another; here both are slices of the one fused in_proj, like Gated DeltaNet's.
State per layer: S (H·d_k·d_v) + conv buffer ((k−1)·H·(2·d_k + d_v)), constant in T.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from kvfree.mixers.gated_deltanet import GatedDeltaNet
from kvfree.mixers.mamba2 import dt_bias_init


class KimiDeltaAttention(GatedDeltaNet):
    """KDA: S_t = (I − β_t k_t k_tᵀ) Diag(α_t) S_{t−1} + β_t k_t v_tᵀ with a per-channel decay
    α_t = exp(−exp(A_log)·softplus(a_t + dt_bias)) ∈ (0, 1]^{d_k}; glossary in the module
    docstring."""

    name = "kda"

    def __init__(self, d_model: int, *, dt_min: float = 1e-3, dt_max: float = 1e-1,
                 dt_floor: float = 1e-4, **options):  # fmt: skip
        super().__init__(d_model, dt_min=dt_min, dt_max=dt_max, dt_floor=dt_floor, **options)
        self.dt_bias = nn.Parameter(dt_bias_init(self.H * self.dk, dt_min, dt_max, dt_floor))
        self.dt_bias._no_weight_decay = True  # per channel; in_proj's rows follow _in_split

    def _in_split(self) -> list[int]:
        return [self.qkv_dim, self.H, self.H * self.dk, self.H * self.dv]  # qkv | β | a | r

    def _decay(self, rest, cdt):
        """g_t = −exp(A_log_h)·softplus(a_t + dt_bias) [..., H, d_k] in the compute dtype."""
        a = rest[0].to(cdt)
        g = -self.A_log.to(cdt).exp().repeat_interleave(self.dk) * F.softplus(
            a + self.dt_bias.to(cdt)
        )
        return g.unflatten(-1, (self.H, self.dk))

    def extra_repr(self) -> str:
        return super().extra_repr() + ", decay=per-channel"
