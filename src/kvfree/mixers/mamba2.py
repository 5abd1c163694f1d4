"""Mamba-2 / SSD (Dao & Gu, ICML 2024, arXiv 2405.21060; docs/baselines.md §3).

Glossary (per head h of H = d_in/P; groups g = h // (H/G) share B and C):
    [z, x̃, B̃, C̃, dt]_t   in_proj x_t: z, x̃ [d_in], B̃, C̃ [G·N], dt [H]     (d_in = expand·D)
    x_t, B_t, C_t          SiLU(causal depthwise conv_{d_conv}(x̃, B̃, C̃))_t
    Δ_t > 0                softplus(dt_t + dt_bias)
    A < 0                  −exp(A_log), one scalar per head;   a_t = exp(Δ_t A)
    h_t [P, N]             a_t h_{t−1} + (Δ_t x_t) B_tᵀ                       (SSM recurrence)
    y_t [P]                h_t C_t + D x_t
    out_t [D]              out_proj RMSNorm(y_t ⊙ SiLU(z_t))   (gated norm, norm_before_gate=False,
                           normalised per group of d_in/G channels)

Chunked SSD (the paper's SSD algorithm, ``ssd_minimal_discrete``), chunk of l rows,
X = Δ·x, dA = Δ·A:
    ℓ_i = Σ_{j≤i} dA_j in the chunk;  seg(i, j) = Σ_{j<k≤i} dA_k (i ≥ j), −∞ otherwise, computed
    by the *stable* segment-sum (cumsum of masked repeated values, no difference of cumsums)
    1. Y_diag,i = Σ_{j≤i} (C_i·B_j) exp(seg(i, j)) X_j
    2. S_c = Σ_j exp(seg(last, j)) X_j B_jᵀ                                   (chunk states)
    3. H_c = exp(Λ_c) H_{c−1} + S_c from the initial state, Λ_c = ℓ_last     (loop over chunks)
    4. Y_off,i = exp(ℓ_i) H_{c−1} C_i;   Y = Y_diag + Y_off (+ D x)

State per layer: H·P·N (SSM) + (d_in + 2GN)(d_conv − 1) (conv buffer), constant in T.
Defaults at d_model = 64: expand 2 (d_in = 128), P = 32 (H = 4), N = 16, G = 1, d_conv 4,
chunk 64 → 2 048 + 160·3 = 2 528 elements. A_log, dt_bias and D skip weight decay.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kvfree import perf
from kvfree.blocks import CausalConv1d
from kvfree.linalg import segsum
from kvfree.mixers.base import Mixer
from kvfree.state import State, carried_dtype, mixed_nbytes


@dataclass
class Mamba2State(State):
    ssm: torch.Tensor  # [B, H, P, N]
    conv: torch.Tensor  # [B, d_conv - 1, d_in + 2·G·N]


def dt_bias_init(
    n: int, dt_min: float = 1e-3, dt_max: float = 1e-1, floor: float = 1e-4
) -> torch.Tensor:
    """dt_bias such that softplus(dt_bias) is log-uniform in [dt_min, dt_max] (floored)."""
    if not 0 < dt_min <= dt_max:
        raise ValueError(f"need 0 < dt_min <= dt_max, got {dt_min}, {dt_max}")
    u = torch.rand(n, dtype=torch.float64)
    dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=floor)
    return (dt + torch.log(-torch.expm1(-dt))).float()  # softplus⁻¹(dt)


def ssm_heads(d_model: int, expand: float, head_dim: int, ngroups: int) -> tuple[int, int]:
    """d_in = expand·d_model and the number of heads H = d_in / head_dim (checked: head_dim
    divides d_in, ngroups divides H) of a Mamba layer."""
    d_in = int(expand * d_model)
    if head_dim <= 0 or d_in % head_dim:
        raise ValueError(
            f"d_in = expand·d_model = {d_in} is not divisible by "
            f"head_dim={head_dim}; pick head_dim dividing {d_in}"
        )
    H = d_in // head_dim
    if ngroups <= 0 or H % ngroups:
        raise ValueError(f"ngroups={ngroups} must divide the number of heads H={H}")
    return d_in, H


def ssd_chunked(X, dA, B, C, h0, chunk_size: int):
    """Chunked SSD. X [b, T, H, P] (Δ-scaled), dA [b, T, H] (log-decays Δ·A), B, C [b, T, H, N],
    h0 [b, H, P, N]. Returns Y [b, T, H, P] (without the D skip) and the final state.

    With a rank axis — X [b, T, H, r, P], B, C [b, T, H, r, N] — each token writes Σ_ρ X_ρ B_ρᵀ
    and reads with each C_ρ (Mamba-3 MIMO), Y [b, T, H, r, P]; the decays stay per token."""
    if X.dim() == 4:
        Y, h = ssd_chunked(X.unsqueeze(-2), dA, B.unsqueeze(-2), C.unsqueeze(-2), h0, chunk_size)
        return Y.squeeze(-2), h
    b, T, H, r, P = X.shape
    l = min(chunk_size, T)
    pad = (-T) % l
    if pad:  # X = 0 and dA = 0 on padded rows: nothing written, no decay
        X, B, C = (F.pad(t, (0, 0, 0, 0, 0, 0, 0, pad)) for t in (X, B, C))
        dA = F.pad(dA, (0, 0, 0, pad))
    n = (T + pad) // l
    X, B, C = (t.reshape(b, n, l, H, r, -1) for t in (X, B, C))  # [b, n, l, H, r, *]
    dA = dA.reshape(b, n, l, H).permute(0, 3, 1, 2)  # [b, H, n, l]
    ell = dA.cumsum(-1)  # ℓ  [b, H, n, l]
    L = segsum(dA).exp()  # exp(seg(i, j))  [b, H, n, l, l]
    # 1. diagonal blocks (every rank of token s is seen by every rank of token t ≥ s)
    scores = torch.einsum("bclhrn,bcshqn->bhclrsq", C, B) * L[:, :, :, :, None, :, None]
    Y = torch.einsum("bhclrsq,bcshqp->bclhrp", scores, X)
    # 2. chunk states, with exp(ℓ_last − ℓ_j) read off the stable segsum's last row
    states = torch.einsum("bhcl,bclhrn,bclhrp->bchpn", L[..., -1, :], B, X)  # [b, n, H, P, N]
    # 3. inter-chunk recurrence (a short loop over chunks, none over time)
    chunk_decay = ell[..., -1].exp()  # exp(Λ_c)  [b, H, n]
    h, prev = h0, []
    for d_c, s_c in zip(perf.unbind(chunk_decay, 2), perf.unbind(states, 1)):
        prev.append(h)
        h = d_c[:, :, None, None] * h + s_c
    H_prev = torch.stack(prev, 1)  # H_{c−1}  [b, n, H, P, N]
    # 4. off-diagonal term
    Y = Y + torch.einsum("bclhrn,bchpn,bhcl->bclhrp", C, H_prev, ell.exp())
    return Y.reshape(b, n * l, H, r, P)[:, :T], h


class Mamba2(Mixer):
    """Mamba-2 (SSD) layer: h_t = exp(Δ_t A) h_{t−1} + (Δ_t x_t) B_tᵀ, y_t = h_t C_t + D x_t,
    out_t = out_proj RMSNorm(y_t ⊙ SiLU(z_t)), Δ_t = softplus(dt_t + dt_bias), A = −exp(A_log)
    (Dao & Gu; docs/baselines.md §3); chunked SSD in training. Full glossary in the module
    docstring."""

    name = "mamba2"
    supports_padding = True

    def __init__(
        self,
        d_model: int,
        *,
        expand: int = 2,
        head_dim: int = 32,
        d_state: int = 16,
        ngroups: int = 1,
        d_conv: int = 4,
        chunk_size: int = 64,
        A_init_range: tuple[float, float] = (1.0, 16.0),
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_floor: float = 1e-4,
        norm_eps: float = 1e-5,
    ):
        super().__init__(d_model)
        d_in, H = ssm_heads(d_model, expand, head_dim, ngroups)
        if d_state <= 0 or d_conv <= 0 or chunk_size <= 0:
            raise ValueError(
                f"d_state, d_conv and chunk_size must be positive, got "
                f"{d_state}, {d_conv}, {chunk_size}"
            )
        lo, hi = A_init_range
        if not 0 < lo <= hi:
            raise ValueError(f"A_init_range must satisfy 0 < lo <= hi, got {A_init_range}")
        self.d_in, self.H, self.P, self.N, self.G = d_in, H, head_dim, d_state, ngroups
        self.d_conv, self.chunk_size, self.eps = d_conv, chunk_size, norm_eps
        self.conv_dim = d_in + 2 * ngroups * d_state
        self.in_proj = nn.Linear(d_model, 2 * d_in + 2 * ngroups * d_state + H, bias=False)
        self.conv = CausalConv1d(self.conv_dim, d_conv, bias=True, activation="silu")
        self.dt_bias = nn.Parameter(dt_bias_init(H, dt_min, dt_max, dt_floor))
        self.A_log = nn.Parameter(torch.log(torch.empty(H).uniform_(lo, hi)))
        self.D = nn.Parameter(torch.ones(H))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True
        self.norm_weight = nn.Parameter(torch.ones(d_in))
        self.out_proj = nn.Linear(d_in, d_model, bias=False)

    # ----- state -------------------------------------------------------------------------
    def init_state(self, batch, *, device=None, dtype=None):
        ssm = torch.zeros(batch, self.H, self.P, self.N, device=device, dtype=carried_dtype(dtype))
        return Mamba2State(ssm, self.conv.init_buffer(batch, device, dtype))

    def state_nbytes(self, seq_len: int, dtype: torch.dtype = torch.float32) -> int:
        """h in fp32 (fp64 for a float64 model), the conv buffer in the model dtype."""
        return mixed_nbytes(self.H * self.P * self.N, self.conv_dim * (self.d_conv - 1), dtype)

    def state_formula(self) -> str:
        return (
            f"H·P·N + (d_in + 2GN)(d_conv − 1) = {self.H}·{self.P}·{self.N} + "
            f"({self.d_in} + 2·{self.G}·{self.N})·{self.d_conv - 1}"
        )

    def state_size(self, seq_len: int) -> int:
        return self.H * self.P * self.N + self.conv_dim * (self.d_conv - 1)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, d_in={self.d_in}, heads={self.H}, P={self.P}, "
            f"N={self.N}, G={self.G}, chunk_size={self.chunk_size}"
        )

    # ----- shared pieces -------------------------------------------------------------------
    def _split(self, z, xBC, dt, cdt):
        """-> z [..., d_in], x [..., H, P], B, C [..., H, N], Δ [..., H] in dtype cdt."""
        d_in, GN, H = self.d_in, self.G * self.N, self.H
        lead = xBC.shape[:-1]
        x, B, C = perf.split(xBC.to(cdt), [d_in, GN, GN])
        x = x.reshape(*lead, H, self.P)
        B, C = (t.reshape(*lead, self.G, self.N) for t in (B, C))
        if self.G != H:  # head h reads group h // (H/G)
            B, C = (t.repeat_interleave(H // self.G, dim=-2) for t in (B, C))
        delta = F.softplus(dt.to(cdt) + self.dt_bias.to(cdt))
        return z.to(cdt), x, B, C, delta

    def _project(self, x_in):
        """in_proj x -> z [..., d_in], xBC (conv input) [..., conv_dim], dt logits [..., H]."""
        return perf.split(self.in_proj(x_in), [self.d_in, self.conv_dim, self.H])

    def _finish(self, y, x, z, x_in):
        """D skip and gated RMSNorm per group: y, x [..., H, P]; z [..., d_in] -> [..., d_in]."""
        y = y + self.D.to(y.dtype)[:, None] * x
        y = y.flatten(-2) * F.silu(z)
        y = F.rms_norm(y.unflatten(-1, (self.G, -1)), (self.d_in // self.G,), eps=self.eps)
        y = y.flatten(-2) * self.norm_weight.to(y.dtype)
        return y.to(x_in.dtype)

    # ----- parallel (chunked SSD) ---------------------------------------------------------
    def _forward(self, x_in, state, mask, pad=None):
        z, xBC, dt = self._project(x_in)
        xBC, buf = self.conv(xBC, state.conv, pad)
        cdt = carried_dtype(x_in.dtype)
        with torch.autocast(x_in.device.type, enabled=False):
            z, x, B, C, delta = self._split(z, xBC, dt, cdt)
            if pad is not None:  # Δ = 0 at padding: no write (Δ·x = 0), no decay (Δ·A = 0)
                delta = pad.zero(delta)
            A = -self.A_log.to(cdt).exp()
            y, h = ssd_chunked(
                x * delta.unsqueeze(-1), delta * A, B, C, state.ssm.to(cdt), self.chunk_size
            )
            y = self._finish(y, x, z, x_in)
        return self.out_proj(y), Mamba2State(h.to(state.ssm.dtype), buf.to(state.conv.dtype))

    # ----- recurrent -------------------------------------------------------------------------
    def _step(self, x_t, state, mask):
        z, xBC, dt = self._project(x_t)
        xBC, buf = self.conv.step(xBC, state.conv)
        cdt = carried_dtype(x_t.dtype)
        with torch.autocast(x_t.device.type, enabled=False):
            z, x, B, C, delta = self._split(z, xBC, dt, cdt)  # x [b, H, P], B, C [b, H, N]
            a = (-self.A_log.to(cdt).exp() * delta).exp()  # [b, H]
            h = a[..., None, None] * state.ssm.to(cdt) + (delta.unsqueeze(-1) * x).unsqueeze(
                -1
            ) * B.unsqueeze(-2)
            y = torch.einsum("bhpn,bhn->bhp", h, C)
            y = self._finish(y, x, z, x_t)
        return self.out_proj(y), Mamba2State(h.to(state.ssm.dtype), buf.to(state.conv.dtype))
