"""Gated DeltaNet-2 (GDN-2; arXiv 2605.22791, "Decoupling Erase and Write in Linear Attention";
docs/frontier.md §3): KDA with its scalar β split into two channel-wise gates — an erase gate on
the key axis and a write gate on the value axis.

Glossary (per head h; everything else as :mod:`kvfree.mixers.kda`):
    b_t [d_k] ∈ (0,1)   σ(in_proj x_t): erase gate, one per key channel
    w_t [d_v] ∈ (0,1)   σ(in_proj x_t): write gate, one per value channel
    g_t [d_k] ≤ 0       −exp(A_log_h) · softplus(a_t + dt_bias)  (KDA's per-channel decay)
    S_t [d_k, d_v]      (I − k_t (b_t ⊙ k_t)ᵀ) Diag(exp g_t) S_{t−1} + k_t (w_t ⊙ v_t)ᵀ
    o_t [d_v]           scale · S_tᵀ q_t
    y_t [D]             o_proj concat_h(RMSNorm(o_t) ⊙ σ(r_t))   (sigmoid output gate, as the
                        paper's reference layer; KDA and Gated DeltaNet use SiLU)
With b_t = w_t = β_t (a scalar broadcast) it is KDA, with equal channel decays Gated DeltaNet
(tests/mixers/test_gdn2.py).

Chunked form: :func:`kvfree.mixers.delta_rule.delta_rule_chunked` with erase vectors
e_t = b_t ⊙ k_t and written values u_t = w_t ⊙ v_t in place of β_t k_t and β_t v_t (the WY/UT
form only ever uses those two products; docstring there).

Deviation [project]: the reference layer computes the decay and output-gate inputs through
low-rank projections and runs separate short convs on q, k and v; here every gate is a slice of
the one fused in_proj and one depthwise conv covers q, k, v (the same per-channel operation).
State per layer: S (H·d_k·d_v) + conv buffer ((k−1)·H·(2·d_k + d_v)), constant in T.
"""

from __future__ import annotations

import torch

from kvfree.mixers.kda import KimiDeltaAttention


class GatedDeltaNet2(KimiDeltaAttention):
    """GDN-2: S_t = (I − k_t (b_t ⊙ k_t)ᵀ) Diag(α_t) S_{t−1} + k_t (w_t ⊙ v_t)ᵀ with a
    per-key-channel erase gate b_t, a per-value-channel write gate w_t and KDA's per-channel
    decay α_t; glossary in the module docstring."""

    name = "gdn2"

    def _in_split(self) -> list[int]:  # qkv | b (erase) | a (decay) | r (gate) | w (write)
        return [
            self.qkv_dim,
            self.H * self.dk,
            self.H * self.dk,
            self.H * self.dv,
            self.H * self.dv,
        ]

    def _beta(self, b, cdt):
        """The erase gate b [..., H, d_k] in the compute dtype."""
        return torch.sigmoid(b.to(cdt)).unflatten(-1, (self.H, self.dk))

    def _write(self, rest, cdt):
        """The write gate w [..., H, d_v] in the compute dtype."""
        return torch.sigmoid(rest[2].to(cdt)).unflatten(-1, (self.H, self.dv))

    def _gate(self, o, rest):
        return o * torch.sigmoid(rest[1].to(o.dtype).reshape(*o.shape))

    def extra_repr(self) -> str:
        return super().extra_repr() + ", erase/write gates=per-channel"
