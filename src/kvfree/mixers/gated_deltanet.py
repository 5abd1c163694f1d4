"""Gated DeltaNet (Yang, Kautz, Hatamizadeh; ICLR 2025, arXiv 2412.06464; docs/baselines.md §5).

Glossary (per head h; the layer follows fla's ``GatedDeltaNet``): everything of
:mod:`kvfree.mixers.deltanet`, plus
    a_t, r_t            in_proj x_t: a [H] decay logits, r [H·d_v] output-gate input
    g_t ≤ 0             −exp(A_log) · softplus(a_t + dt_bias)          (Mamba-2-style decay)
    α_t ∈ (0,1]         exp(g_t)
    S_t [d_k, d_v]      α_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ        (gated delta rule)
    o_t [d_v]           scale · S_tᵀ q_t
    y_t [D]             o_proj concat_h( RMSNorm(o_t) ⊙ SiLU(r_t) )        (fused gated norm)

Chunked form: :func:`kvfree.mixers.delta_rule.delta_rule_chunked` with g, all decay ratios as
exp of differences of within-chunk cumulative log-decays (docs/baselines.md §5 steps 1-4).
With α ≡ 1 the core is DeltaNet's.

State per layer: S (H·d_k·d_v) + conv buffer ((k−1)·H·(2·d_k + d_v)), constant in T.
Defaults at d_model = 64: 2 heads, d_k = d_v = 32 (``expand_v=1``; fla's default is 2), conv 4,
chunk 64; A = exp(A_log) ~ U[1, 16] (fla draws U[0, 16]), Δ = softplus(dt_bias) log-uniform in
[1e-3, 1e-1] at init (floor 1e-4). A_log and dt_bias are excluded from weight decay.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvfree.mixers.deltanet import DeltaNet
from kvfree.mixers.mamba2 import dt_bias_init


class GatedDeltaNet(DeltaNet):
    """Gated DeltaNet layer: S_t = α_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ with the decay
    α_t = exp(g_t), g_t = −exp(A_log)·softplus(a_t + dt_bias), and the output gate
    y_t = o_proj concat_h(RMSNorm(o_t) ⊙ SiLU(r_t)) (docs/baselines.md §5). Full glossary in the
    module docstring."""

    name = "gated_deltanet"

    def __init__(
        self,
        d_model: int,
        *,
        num_heads: int = 2,
        head_dim: int | None = None,
        expand_v: float = 1.0,
        conv_size: int = 4,
        chunk_size: int = 64,
        norm_eps: float = 1e-5,
        A_init_range: tuple[float, float] = (1.0, 16.0),
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_floor: float = 1e-4,
    ):
        super().__init__(
            d_model,
            num_heads=num_heads,
            head_dim=head_dim,
            expand_v=expand_v,
            conv_size=conv_size,
            chunk_size=chunk_size,
            norm_eps=norm_eps,
        )
        lo, hi = A_init_range
        if not 0 < lo <= hi:
            raise ValueError(f"A_init_range must satisfy 0 < lo <= hi, got {A_init_range}")
        self.A_log = nn.Parameter(torch.log(torch.empty(self.H).uniform_(lo, hi)))  # A ~ U[lo, hi]
        self.dt_bias = nn.Parameter(dt_bias_init(self.H, dt_min, dt_max, dt_floor))
        for p in (self.A_log, self.dt_bias):
            p._no_weight_decay = True

    def _in_split(self) -> list[int]:
        return [self.qkv_dim, self.H, self.H, self.H * self.dv]  # q, k, v | β | a | r

    def _decay(self, rest, cdt):
        """g_t = −exp(A_log)·softplus(a_t + dt_bias) [..., H] in the compute dtype."""
        a = rest[0].to(cdt)
        return -self.A_log.to(cdt).exp() * F.softplus(a + self.dt_bias.to(cdt))

    def _gate(self, o, rest):
        r = rest[1].to(o.dtype).reshape(*o.shape)  # [..., H, d_v]
        return o * F.silu(r)
