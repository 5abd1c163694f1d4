"""Building blocks of FDM's wave (docs/fdm.md §2): Givens rotations, the grouped causal conv of the
score path, and the chunked diagonal complex scan.

The scan solves, per channel d and batch row,

    h_t = a_t · e^{iθ_t} · h_{t-1} + b_t          a_t = exp(la_t) ∈ (0, 1],  θ_t ∈ ℝ,  b_t ∈ ℂ

(docs/fdm.md §2.3 with a_t = 1 − p_t and b_t = p_t u_t). ``la`` is one log-decay per token
([B, T, 1], the LM and MQAR FDM) or per channel ([B, T, D], the "scan only" network; that
case runs the log-depth scan below directly over tokens, O(T log T) work for small D).

Chunked parallel form (chunk of C tokens; docs/fdm.md §2.4, docs/design.md §3):

    L_t = Σ_{r≤t} la_r,  Θ_t = Σ_{r≤t} θ_r            (inclusive, inside the chunk only)
    h_t = e^{iΘ_t} Σ_{s≤t} exp(L_t − L_s) e^{−iΘ_s} b_s  +  exp(L_t) e^{iΘ_t} h_in

exp(L_t − L_s) comes from a stable segment sum (never a ratio of cumulative products); the
phase is unit-modulus, so factoring it as e^{iΘ_t}·e^{−iΘ_s} cannot overflow. Chunks are
joined by a log-depth (Hillis–Steele) scan over the chunk transitions
(A, E) ∘ (A′, E′) = (A′A, A′E + E′) — no Python loop over time or chunks' tokens.
Everything runs in fp32/complex64 (complex128 for float64 inputs) with autocast off.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kvfree.linalg import segsum


def real_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the scan runs in: float64 stays float64, everything else is fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rotate(re: torch.Tensor, im: torch.Tensor, c: torch.Tensor, s: torch.Tensor):
    """(re + i·im)·(c + i·s) in real arithmetic."""
    return c * re - s * im, s * re + c * im


def _prefix_compose(Ar, Ai, Er, Ei):
    """Inclusive scan of h_n = A_n h_{n-1} + E_n over dim 1 (h_{-1} = 0), log depth; complex
    numbers as (real, imag) pairs. Returns the states (Er, Ei) after every n."""
    N, off = Ar.shape[1], 1
    while off < N:
        pr, pi = rotate(Er[:, :-off], Ei[:, :-off], Ar[:, off:], Ai[:, off:])  # A_n·E_{n-off}
        Er = torch.cat([Er[:, :off], pr + Er[:, off:]], dim=1)
        Ei = torch.cat([Ei[:, :off], pi + Ei[:, off:]], dim=1)
        qr, qi = rotate(Ar[:, :-off], Ai[:, :-off], Ar[:, off:], Ai[:, off:])  # A_n·A_{n-off}
        Ar, Ai = torch.cat([Ar[:, :off], qr], dim=1), torch.cat([Ai[:, :off], qi], dim=1)
        off *= 2
    return Er, Ei


def complex_scan(
    b_re: torch.Tensor,
    b_im: torch.Tensor,
    la: torch.Tensor,
    theta: torch.Tensor,
    h0: torch.Tensor,
    chunk: int = 32,
):
    """Real parts of all states of h_t = exp(la_t) e^{iθ_t} h_{t-1} + b_t, in real arithmetic.

    b_re, b_im, theta [B, T, D]; la [B, T, 1 | D] (≤ 0); h0 [B, 2, D] (real, imag).
    Returns (Re h [B, T, D], h_T [B, 2, D]).
    """
    B, T, D = b_re.shape
    h0r, h0i = h0[:, 0], h0[:, 1]
    if la.shape[-1] != 1:  # per-channel decay: log-depth scan over tokens
        a = la.exp()
        Ar, Ai = a * theta.cos(), a * theta.sin()
        pr, pi = rotate(h0r, h0i, Ar[:, 0], Ai[:, 0])
        Er = torch.cat([b_re[:, :1] + pr[:, None], b_re[:, 1:]], dim=1)
        Ei = torch.cat([b_im[:, :1] + pi[:, None], b_im[:, 1:]], dim=1)
        Hr, Hi = _prefix_compose(Ar, Ai, Er, Ei)
        return Hr, torch.stack([Hr[:, -1], Hi[:, -1]], dim=1)
    C = max(1, min(chunk, T))
    pad = (-T) % C
    if pad:  # a = 1, θ = 0, b = 0: padded steps leave the state unchanged
        b_re, b_im, la, theta = (F.pad(t, (0, 0, 0, pad)) for t in (b_re, b_im, la, theta))
    N = (T + pad) // C
    b_re, b_im, la, theta = (t.reshape(B, N, C, t.shape[-1]) for t in (b_re, b_im, la, theta))
    L = la.cumsum(2)  # [B, N, C, 1|D] inclusive log-decay inside the chunk
    Th = theta.cumsum(2)  # Θ_t
    c, s = Th.cos(), Th.sin()
    v_re, v_im = rotate(b_re, b_im, c, -s)  # e^{-iΘ_s} b_s
    M = segsum(la[..., 0]).exp()  # [B, N, C(t), C(s)]  exp(L_t − L_s), 0 above the diagonal
    g_re, g_im = (M @ torch.cat([v_re, v_im], dim=-1)).split(D, dim=-1)
    # chunk transitions A_n = e^{L_C} e^{iΘ_C} and end states E_n (zero state in)
    eL = L[:, :, -1].exp()
    Ar, Ai = eL * c[:, :, -1], eL * s[:, :, -1]
    Er, Ei = rotate(g_re[:, :, -1], g_im[:, :, -1], c[:, :, -1], s[:, :, -1])
    pr, pi = rotate(h0r, h0i, Ar[:, 0], Ai[:, 0])
    Er = torch.cat([Er[:, :1] + pr[:, None], Er[:, 1:]], dim=1)
    Ei = torch.cat([Ei[:, :1] + pi[:, None], Ei[:, 1:]], dim=1)
    Hr, Hi = _prefix_compose(Ar, Ai, Er, Ei)  # state after each chunk
    Hin_r = torch.cat([h0r[:, None], Hr[:, :-1]], dim=1)[:, :, None]  # entering each chunk
    Hin_i = torch.cat([h0i[:, None], Hi[:, :-1]], dim=1)[:, :, None]
    eLt = L.exp()
    y = c * (g_re + eLt * Hin_r) - s * (g_im + eLt * Hin_i)  # Re e^{iΘ_t}(g_t + e^{L_t} H_in)
    y = y.reshape(B, N * C, D)[:, :T]
    return y, torch.stack([Hr[:, -1], Hi[:, -1]], dim=1)


def complex_step(
    h: torch.Tensor, b_re: torch.Tensor, b_im: torch.Tensor, la: torch.Tensor, theta: torch.Tensor
) -> torch.Tensor:
    """One step on h [B, 2, D]: b_re/b_im/theta [B, D], la [B, 1 | D] → new h [B, 2, D]."""
    a = la.exp()
    re, im = rotate(h[:, 0], h[:, 1], a * theta.cos(), a * theta.sin())
    return torch.stack([re + b_re, im + b_im], dim=1)


class GivensRotation(nn.Module):
    """FDM's "Givens rotation" (docs/fdm.md §2.2): angles φ = W_φ x̃ + b_φ ∈ ℝ^P, and coordinate
    pair (2k, 2k+1) of the argument is rotated by φ_k,
    (a, b) ↦ (a cos φ − b sin φ, a sin φ + b cos φ), for k < P. Other coordinates pass."""

    def __init__(self, d_model: int, planes: int = 4):
        super().__init__()
        if 2 * planes > d_model:
            raise ValueError(f"{planes} Givens planes need d_model >= {2 * planes}, got {d_model}")
        self.planes = planes
        self.proj = nn.Linear(d_model, planes)

    def angles(self, xt: torch.Tensor) -> torch.Tensor:
        """φ = W_φ x̃ + b_φ  [..., P]."""
        return self.proj(xt)

    def rotate(self, a: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
        """Rotate coordinate pairs (2k, 2k+1) of ``a`` [..., D] by ``phi`` [..., P]."""
        P = self.planes
        phi = phi.to(a.dtype)
        pairs = a[..., : 2 * P].unflatten(-1, (P, 2))
        c, s = phi.cos(), phi.sin()
        x0, x1 = pairs[..., 0], pairs[..., 1]
        rot = torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], -1).flatten(-2)
        return torch.cat([rot, a[..., 2 * P :]], dim=-1)

    def forward(self, a: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
        """Rotate ``a`` [..., D] by the angles computed from ``xt`` [..., D]."""
        return self.rotate(a, self.angles(xt))


class GroupedCausalConv(nn.Module):
    """Conv1d over time with kernel k, ``groups`` channel groups and a bias, left zero
    padding, and a carried buffer of the last k−1 inputs (docs/fdm.md §2.1 step 2).

    ``forward(x [B,T,D], buf [B,k-1,D]) -> (c [B,T,D], buf')``; ``step(x_t [B,D], buf)``.
    """

    def __init__(self, d_model: int, kernel_size: int = 4, group_size: int = 64):
        super().__init__()
        groups = max(1, d_model // group_size)
        if d_model % groups:
            raise ValueError(
                f"d_model={d_model} is not divisible into {groups} conv groups "
                f"of {group_size}; pick conv_group_size dividing d_model"
            )
        self.kernel_size, self.groups = kernel_size, groups
        self.conv = nn.Conv1d(d_model, d_model, kernel_size, groups=groups, bias=True)

    def _conv(self, xx: torch.Tensor) -> torch.Tensor:  # [B, k-1+T, D] -> [B, T, D]
        w, bias = self.conv.weight.to(xx.dtype), self.conv.bias.to(xx.dtype)
        return F.conv1d(xx.transpose(1, 2), w, bias, groups=self.groups).transpose(1, 2)

    def forward(self, x, buf):
        xx = torch.cat([buf.to(x.dtype), x], dim=1)
        return self._conv(xx), xx[:, xx.shape[1] - (self.kernel_size - 1) :]

    def step(self, x_t, buf):
        xx = torch.cat([buf.to(x_t.dtype), x_t.unsqueeze(1)], dim=1)  # [B, k, D]
        return self._conv(xx)[:, 0], xx[:, 1:]


def position_features(t: torch.Tensor, t_train: int) -> torch.Tensor:
    """[sin(πt/(T_train−1)), cos(πt/(T_train−1))] with the fixed T_train (docs/fdm.md §4.1)."""
    a = math.pi * t / (t_train - 1)
    return torch.stack([a.sin(), a.cos()], dim=-1)
