"""Linear attention (Katharopoulos et al. 2020, arXiv 2006.16236; docs/baselines.md §2).

Glossary (per head h; paper eq. numbers from arXiv 2006.16236):
    q_t, k_t  [d_k]      W_q x_t, W_k x_t;   v_t [d_v] = W_v x_t
    φ                    feature map: ``identity`` (F = d_k) or ``elu`` = elu(·)+1 (eq. 7)
    S_t  [F, d_v]        S_{t-1} + φ(k_t) v_tᵀ            (inclusive: written before read)
    z_t  [F]             z_{t-1} + φ(k_t)                  (normaliser, optional)
    o_t  [d_v]           scale · S_tᵀ φ(q_t)  [ / (φ(q_t)ᵀ z_t + 1e-6) ]   (eqs. 5-6)
    y_t  [D]             W_o concat_h(o_t)

Chunked form (chunk of C rows, M≤ inclusive lower-triangular mask):
    O_c = Φ(Q_c) S_{c-1} + (Φ(Q_c) Φ(K_c)ᵀ ⊙ M≤) V_c,   S_c = S_{c-1} + Φ(K_c)ᵀ V_c
The chunk states are an exclusive prefix sum over chunks (no Python loop over time).

State per layer: H·F·d_v (+ H·F with the normaliser), constant in T.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kvfree.mixers.base import Mixer
from kvfree.state import State, carried_dtype, mixed_nbytes
from kvfree.utils import unknown_keys_error

_EPS = 1e-6


@dataclass
class LinearAttentionState(State):
    S: torch.Tensor  # [B, H, F, d_v]
    z: torch.Tensor | None  # [B, H, F] with the normaliser, else None


def feature_map(kind: str, x: torch.Tensor) -> torch.Tensor:
    if kind == "identity":
        return x
    if kind == "elu":
        return F.elu(x) + 1.0
    raise unknown_keys_error("feature map", [kind], ["identity", "elu"])


class LinearAttention(Mixer):
    """Linear attention: S_t = S_{t−1} + φ(k_t) v_tᵀ, o_t = scale · S_tᵀ φ(q_t) (optionally
    divided by φ(q_t)ᵀ z_t, z_t = Σ φ(k)), φ = identity or elu+1 (Katharopoulos et al. eqs. 5–7;
    docs/baselines.md §2). Full glossary in the module docstring."""

    name = "linear_attention"
    supports_padding = True

    def __init__(
        self,
        d_model: int,
        *,
        num_heads: int = 2,
        head_dim: int | None = None,
        feature_map: str = "elu",
        normalize: bool = True,
        chunk_size: int = 64,
        scale: float | None = None,
    ):
        super().__init__(d_model)
        if feature_map not in ("identity", "elu"):
            raise unknown_keys_error("feature map", [feature_map], ["identity", "elu"])
        if head_dim is None:
            if d_model % num_heads:
                raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}")
            head_dim = d_model // num_heads
        self.H, self.dk, self.dv = num_heads, head_dim, head_dim
        self.fmap, self.normalize, self.chunk_size = feature_map, normalize, chunk_size
        self.scale = head_dim**-0.5 if scale is None else scale
        self.q_proj = nn.Linear(d_model, self.H * self.dk, bias=False)
        self.k_proj = nn.Linear(d_model, self.H * self.dk, bias=False)
        self.v_proj = nn.Linear(d_model, self.H * self.dv, bias=False)
        self.o_proj = nn.Linear(self.H * self.dv, d_model, bias=False)

    # ----- state -------------------------------------------------------------------------
    def init_state(self, batch, *, device=None, dtype=None):
        dtype = carried_dtype(dtype)
        S = torch.zeros(batch, self.H, self.dk, self.dv, device=device, dtype=dtype)
        z = (
            torch.zeros(batch, self.H, self.dk, device=device, dtype=dtype)
            if self.normalize
            else None
        )
        return LinearAttentionState(S, z)

    def state_formula(self) -> str:
        if self.normalize:
            return f"H·F·d_v + H·F = {self.H}·{self.dk}·{self.dv} + {self.H}·{self.dk}"
        return f"H·F·d_v = {self.H}·{self.dk}·{self.dv}"

    def state_size(self, seq_len: int) -> int:
        return self.H * self.dk * (self.dv + (1 if self.normalize else 0))

    def state_nbytes(self, seq_len: int, dtype: torch.dtype = torch.float32) -> int:
        """S (and z) in fp32, or fp64 for a float64 model."""
        return mixed_nbytes(self.state_size(seq_len), 0, dtype)

    # ----- projections -------------------------------------------------------------------
    def _qkv(self, x):
        shape = (*x.shape[:-1], self.H, -1)
        cdt = carried_dtype(x.dtype)  # the state's dtype: fp32 in a bf16 model
        q = feature_map(self.fmap, self.q_proj(x).view(shape).to(cdt))
        k = feature_map(self.fmap, self.k_proj(x).view(shape).to(cdt))
        return q, k, self.v_proj(x).view(shape).to(cdt)

    def _out(self, o):
        return self.o_proj(o.reshape(*o.shape[:-2], self.H * self.dv).to(self.o_proj.weight.dtype))

    # ----- parallel (chunked) --------------------------------------------------------------
    def _forward(self, x, state, mask, pad=None):
        B, T, _ = x.shape
        q, k, v = self._qkv(x)  # [B, T, H, *]
        if pad is not None:  # φ(k) = 0 at padding: nothing written to S or z
            k = pad.zero(k)
        C = min(self.chunk_size, T)
        tail = (-T) % C
        if tail:  # zero rows contribute nothing to S, z; their outputs are dropped
            q, k, v = (F.pad(t, (0, 0, 0, 0, 0, tail)) for t in (q, k, v))
        N = (T + tail) // C
        # [B, H, N, C, *]
        q, k, v = (t.view(B, N, C, self.H, -1).permute(0, 3, 1, 2, 4) for t in (q, k, v))
        kv = torch.einsum("bhncf,bhncv->bhnfv", k, v)
        S_incl = state.S.unsqueeze(2) + kv.cumsum(2)  # state after each chunk
        S_prev = torch.cat([state.S.unsqueeze(2), S_incl[:, :, :-1]], dim=2)
        causal = torch.ones(C, C, dtype=torch.bool, device=x.device).tril()
        scores = torch.einsum("bhncf,bhnsf->bhncs", q, k).masked_fill(~causal, 0.0)
        o = torch.einsum("bhncf,bhnfv->bhncv", q, S_prev) + scores @ v
        z_new = None
        if self.normalize:
            ksum = k.sum(3)  # [B, H, N, F]
            z_incl = state.z.unsqueeze(2) + ksum.cumsum(2)
            z_prev = torch.cat([state.z.unsqueeze(2), z_incl[:, :, :-1]], dim=2)
            den = torch.einsum("bhncf,bhnf->bhnc", q, z_prev) + scores.sum(-1)
            o = o / (den + _EPS).unsqueeze(-1)
            z_new = z_incl[:, :, -1]
        o = self.scale * o
        o = o.permute(0, 2, 3, 1, 4).reshape(B, N * C, self.H, self.dv)[:, :T]
        return self._out(o), LinearAttentionState(S_incl[:, :, -1], z_new)

    # ----- recurrent -------------------------------------------------------------------------
    def _step(self, x_t, state, mask):
        q, k, v = self._qkv(x_t)  # [B, H, *]
        S = state.S + k.unsqueeze(-1) * v.unsqueeze(-2)
        o = self.scale * torch.einsum("bhfv,bhf->bhv", S, q)
        z = None
        if self.normalize:
            z = state.z + k
            o = o / ((q * z).sum(-1, keepdim=True) + _EPS)
        return self._out(o), LinearAttentionState(S, z)
