"""DeltaNet (Yang, Wang, Zhang, Shen, Kim; NeurIPS 2024, arXiv 2406.06484; docs/baselines.md §4).

Glossary (per head h; the layer follows fla's ``DeltaNet`` defaults):
    [q̃, k̃, ṽ, b]_t    in_proj x_t  (one fused projection: q, k [H·d_k], v [H·d_v], b [H])
    q_t, k_t, v_t       SiLU(causal depthwise conv_4(q̃, k̃, ṽ))_t;  q, k ← l2norm(q), l2norm(k)
    β_t ∈ (0,1)         σ(b_t), one per head
    S_t [d_k, d_v]      S_{t−1} + k_t [β_t (v_t − S_{t−1}ᵀ k_t)]ᵀ     (delta rule)
    o_t [d_v]           scale · S_tᵀ q_t,  scale = d_k^{-1/2}
    y_t [D]             o_proj concat_h RMSNorm(o_t)     (RMSNorm over d_v, weight shared by heads)

The chunked WY/UT form (the paper's chunkwise algorithm) lives in
:mod:`kvfree.mixers.delta_rule` and is shared with Gated DeltaNet (this layer with
α_t = exp(g_t) and an output gate).

State per layer: S (H·d_k·d_v) + conv buffer ((k−1)·H·(2·d_k + d_v)), constant in T.
Defaults at d_model = 64: 2 heads of d_k = d_v = 32 (zoology's DeltaNet), conv 4, chunk 64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kvfree import perf
from kvfree.blocks import CausalConv1d
from kvfree.linalg import l2norm
from kvfree.mixers.base import Mixer, head_width
from kvfree.mixers.delta_rule import delta_rule_chunked, delta_rule_step
from kvfree.state import State, carried_dtype, mixed_nbytes


@dataclass
class DeltaNetState(State):
    S: torch.Tensor  # [B, H, d_k, d_v]
    conv: torch.Tensor  # [B, conv_size - 1, H·(2·d_k + d_v)]


class DeltaNet(Mixer):
    """DeltaNet layer: S_t = S_{t−1} + k_t [β_t (v_t − S_{t−1}ᵀ k_t)]ᵀ (the delta rule),
    o_t = d_k^{-1/2} S_tᵀ q_t, y_t = o_proj concat_h RMSNorm(o_t); q, k from SiLU(conv_4) and
    l2-normalised, β_t = σ(b_t) (docs/baselines.md §4). Full glossary in the module docstring."""

    name = "deltanet"
    supports_padding = True

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
    ):
        super().__init__(d_model)
        if num_heads <= 0:
            raise ValueError(f"num_heads must be positive, got {num_heads}")
        head_dim = head_width(d_model, num_heads, head_dim)
        dv = int(head_dim * expand_v)
        if head_dim <= 0 or dv <= 0:
            raise ValueError(
                f"head_dim and head_dim·expand_v must be positive, got "
                f"head_dim={head_dim}, expand_v={expand_v}"
            )
        if chunk_size <= 0 or conv_size <= 0:
            raise ValueError(
                f"chunk_size and conv_size must be positive, got {chunk_size}, {conv_size}"
            )
        self.H, self.dk, self.dv = num_heads, head_dim, dv
        self.conv_size, self.chunk_size = conv_size, chunk_size
        self.scale = head_dim**-0.5
        self.qkv_dim = num_heads * (2 * head_dim + dv)
        self.in_proj = nn.Linear(d_model, self._in_dim(), bias=False)
        self.conv = CausalConv1d(self.qkv_dim, conv_size, bias=False, activation="silu")
        self.o_norm = nn.RMSNorm(dv, eps=norm_eps)
        self.o_proj = nn.Linear(num_heads * dv, d_model, bias=False)

    def _in_dim(self) -> int:
        return sum(self._in_split())

    def _in_split(self) -> list[int]:
        """Widths of in_proj's outputs: q, k, v (conv input), β logits, then :meth:`_decay`'s
        and :meth:`_gate`'s inputs (``rest``), taken apart by one :func:`kvfree.perf.split`."""
        return [self.qkv_dim, self.H]

    # ----- state -------------------------------------------------------------------------
    def init_state(self, batch, *, device=None, dtype=None):
        S = torch.zeros(batch, self.H, self.dk, self.dv, device=device, dtype=carried_dtype(dtype))
        return DeltaNetState(S, self.conv.init_buffer(batch, device, dtype))

    def state_nbytes(self, seq_len: int, dtype: torch.dtype = torch.float32) -> int:
        """S in fp32 (fp64 for a float64 model), the conv buffer in the model dtype."""
        return mixed_nbytes(self.H * self.dk * self.dv, (self.conv_size - 1) * self.qkv_dim, dtype)

    def state_formula(self) -> str:
        return (
            f"H·d_k·d_v + (k−1)·H·(2d_k + d_v) = {self.H}·{self.dk}·{self.dv} + "
            f"{self.conv_size - 1}·{self.H}·{2 * self.dk + self.dv}"
        )

    def state_size(self, seq_len: int) -> int:
        return self.H * self.dk * self.dv + (self.conv_size - 1) * self.qkv_dim

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, heads={self.H}, d_k={self.dk}, d_v={self.dv}, "
            f"chunk_size={self.chunk_size}"
        )

    # ----- shared pieces -------------------------------------------------------------------
    def _features(self, x, buf, step: bool, pad=None):
        """x [..., D] -> q, k [..., H, d_k], v [..., H, d_v], β [..., H] (GDN-2: [..., H, d_k]),
        w (GDN-2's write gate [..., H, d_v]) or None, g or None, rest, buf. q, k, v, β, w, g are
        in the compute dtype (fp32, or fp64 in tests); ``rest`` is the tuple of the remaining
        in_proj outputs (:meth:`_in_split`). Padded positions (``pad``) get β = w = 0 and
        g = 0: S passes through them unchanged."""
        qkv, b, *rest = perf.split(self.in_proj(x), self._in_split())
        qkv, buf = self.conv.step(qkv, buf) if step else self.conv(qkv, buf, pad)
        cdt = carried_dtype(x.dtype)
        H, dk = self.H, self.dk
        lead = qkv.shape[:-1]
        q, k, v = perf.split(qkv.to(cdt), [H * dk, H * dk, H * self.dv])
        q = l2norm(q.reshape(*lead, H, dk))
        k = l2norm(k.reshape(*lead, H, dk))
        v = v.reshape(*lead, H, self.dv)
        beta, w, g = self._beta(b, cdt), self._write(rest, cdt), self._decay(rest, cdt)
        if pad is not None:
            beta, w, g = (None if t is None else pad.zero(t) for t in (beta, w, g))
        return q, k, v, beta, w, g, rest, buf

    def _beta(self, b, cdt):
        return torch.sigmoid(b.to(cdt))  # β [..., H]

    def _write(self, rest, cdt):
        return None  # β also scales the written value (GDN-2 has its own write gate)

    def _decay(self, rest, cdt):
        return None  # DeltaNet: α ≡ 1

    def _norm(self, o):
        """RMSNorm over d_v in the compute dtype (statistics stay fp32 under autocast)."""
        return F.rms_norm(o, (self.dv,), self.o_norm.weight.to(o.dtype), self.o_norm.eps)

    def _gate(self, o, rest):
        return o  # DeltaNet: no output gate

    def _out(self, o, x):
        """o [..., H, d_v] -> y [..., D]."""
        return self.o_proj(o.to(x.dtype).flatten(-2))

    # ----- parallel (chunked) --------------------------------------------------------------
    def _forward(self, x, state, mask, pad=None):
        q, k, v, beta, w, g, rest, buf = self._features(x, state.conv, step=False, pad=pad)
        with torch.autocast(x.device.type, enabled=False):
            o, S = delta_rule_chunked(
                q,
                k,
                v,
                beta,
                state.S.to(q.dtype),
                g=g,
                w=w,
                scale=self.scale,
                chunk_size=self.chunk_size,
            )
            o = self._gate(self._norm(o), rest)
        return self._out(o, x), DeltaNetState(S.to(state.S.dtype), buf.to(state.conv.dtype))

    # ----- recurrent -------------------------------------------------------------------------
    def _step(self, x_t, state, mask):
        q, k, v, beta, w, g, rest, buf = self._features(x_t, state.conv, step=True)
        with torch.autocast(x_t.device.type, enabled=False):
            o, S = delta_rule_step(q, k, v, beta, state.S.to(q.dtype), g=g, w=w, scale=self.scale)
            o = self._gate(self._norm(o), rest)
        return self._out(o, x_t), DeltaNetState(S.to(state.S.dtype), buf.to(state.conv.dtype))
