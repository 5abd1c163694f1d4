"""Spectral Koopman Attention: statistics, operator and readout as plain functions
(docs/ska.md §5–§8). :mod:`kvfree.mixers.ska` wraps them in the mixer contract.

Shapes: B batch, T tokens, H heads, r key rank, P value dim, N chunks, S chunk size, n queries
per operator. Every function here runs inside the caller's fp32 island (fp64 in tests).

Write vectors (docs/ska.md §4; β ≡ 1 without gate and mask, m the binary write mask):
    x_t = √(β_t m_t) ẑ_t           G += x xᵀ            (= β m ẑ ẑᵀ)
    u_t = √(β_t m_t) v_t           C += u xᵀ            (= β m v ẑᵀ)
    sqrt: l_t = p_t = x_t          M += l_t p_{t−1}ᵀ    (ω_t = √(β_t β_{t−1}))
    asym: l_t = β_t √m_t ẑ_t, p_t = √m_t ẑ_t            (ω_t = β_t)
The mask always acts in "sqrt" fashion, so masked lag pairs (m_t m_{t−1} = 0) drop out.

Readout (docs/ska.md §6–§8), per operator with G̃ = G + εI = L Lᵀ:
    A_w = L⁻¹ M L⁻ᵀ,  c = γ / max(1, σ̂(A_w))  (σ̂ detached power iteration),
    y = η · C L⁻ᵀ (c A_w)^K L⁻¹ q̂  =  η c^K C (G̃⁻¹ M)^K G̃⁻¹ q̂        (closed form)
using B_v L w_f = C G̃⁻¹ L w_f = C L⁻ᵀ w_f, so no separate solve for B_v is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvfree.linalg import (
    JITTERS,
    FallbackCounter,
    factor_inverse,
    l2norm,
    power_iteration_sigma,
    robust_factor,
)

L2_EPS = 1e-12  # ẑ = z / √(‖z‖² + 1e-12)  (docs/ska.md §3)
SEQMAX_FLOOR = 1e-6  # m = max(max_s ‖z_s‖, 1e-6)


def l2_normalize(z: torch.Tensor) -> torch.Tensor:
    """Per-token ℓ2 normalisation of the last dim (the project default, causal)."""
    return l2norm(z, L2_EPS)


def write_vectors(
    zh: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor | None,
    mask: torch.Tensor | None,
    beta_mode: str = "sqrt",
):
    """(x, u, l, p) for keys zh [B, T, H, r] (or [B, H, r]), values v [..., P], gate β and
    write mask m [B, T, H] (or [B, H]), either optional. See the module docstring."""
    if beta is None and mask is None:
        return zh, v, zh, zh
    sm = None if mask is None else mask.detach().clamp_min(0).sqrt()  # √m, no gradient
    sb = beta.sqrt() if beta is not None else None
    w = sb if sm is None else (sm if sb is None else sb * sm)  # √(β m)
    x, u = w.unsqueeze(-1) * zh, w.unsqueeze(-1) * v
    if beta_mode == "sqrt" or beta is None:
        return x, u, x, x
    p = zh if sm is None else sm.unsqueeze(-1) * zh
    return x, u, beta.unsqueeze(-1) * p, p


def shift_prev(p: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """p_{t−1} for every t: p [B, T, H, r] shifted right by one, ``prev`` [B, H, r] first."""
    return torch.cat([prev.unsqueeze(1), p[:, :-1]], dim=1)


def outer(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [..., i], b [..., j] -> a bᵀ [..., i, j]."""
    return a.unsqueeze(-1) * b.unsqueeze(-2)


def prefix_sum(t: torch.Tensor, block: int = 16) -> torch.Tensor:
    """Inclusive cumulative sum over dim 1 of t [B, T, ...], blocked: a lower-triangular matmul
    inside blocks of ``block`` steps plus a cumsum over block totals (several times faster than
    ``torch.cumsum`` over T on CPU, and no Python loop over time)."""
    B, T = t.shape[:2]
    S = min(block, T)
    N = -(-T // S)
    flat = t.reshape(B, T, -1)
    if N * S != T:
        flat = F.pad(flat, (0, 0, 0, N * S - T))
    flat = flat.view(B, N, S, -1)
    tri = torch.ones(S, S, dtype=t.dtype, device=t.device).tril()
    within = torch.einsum("ts,bnsx->bntx", tri, flat)  # [B, N, S, X]
    if N > 1:
        tot = within[:, :, -1]
        offs = torch.cat([torch.zeros_like(tot[:, :1]), tot[:, :-1].cumsum(1)], 1)
        within = within + offs.unsqueeze(2)
    return within.reshape(B, N * S, *t.shape[2:])[:, :T]


# ----- readout ------------------------------------------------------------------------------
@dataclass
class ReadoutConfig:
    eps: float = 1e-3
    K: int = 2
    spectral_norm: bool = True
    power_iters: int = 6
    jitters: tuple[float, ...] = JITTERS  # () = straight to the eigen fallback


@dataclass
class ReadoutInfo:
    """Diagnostics of one readout (detached): min diag(L)² (a λ_min(G̃) proxy) and σ̂."""

    lam_min: torch.Tensor
    sigma: torch.Tensor | None


def whitened_operator(Li: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """A_w = L⁻¹ M L⁻ᵀ [..., r, r] from Li = L⁻¹ (docs/ska.md §6.2; never the mixed gauge
    M G̃⁻¹ applied to L⁻¹q, never L⁻ᵀ M L⁻¹)."""
    return Li @ M @ Li.transpose(-1, -2)


def readout(
    G: torch.Tensor,
    M: torch.Tensor,
    C: torch.Tensor,
    q: torch.Tensor,
    gamma: torch.Tensor,
    eta: torch.Tensor,
    cfg: ReadoutConfig,
    counter: FallbackCounter | None = None,
) -> tuple[torch.Tensor, ReadoutInfo]:
    """ŷ [..., n, P] for n queries q̂ [..., n, r] per operator (G, M [..., r, r] raw sums without
    ε; C [..., P, r]). γ and η are scalar tensors (γ already clamped).

    The factor is inverted once (one triangular solve against I); everything after is matrix
    products, which keeps the backward pass cheap for the many small per-token operators.
    """
    r = G.shape[-1]
    eye = torch.eye(r, dtype=G.dtype, device=G.device)
    L, tri = robust_factor(G + cfg.eps * eye, counter, jitters=cfg.jitters)
    Li = factor_inverse(L, tri)  # L⁻¹ (or F⁻¹ for an eigen factor F, same gauge rules)
    w = Li @ q.transpose(-1, -2)  # w_q = L⁻¹ q̂   [..., r, n]
    sigma = None
    if cfg.K > 0:
        Aw = whitened_operator(Li, M)
        c = gamma.expand(Aw.shape[:-2])
        if cfg.spectral_norm:
            sigma = power_iteration_sigma(Aw, cfg.power_iters)  # detached
            c = gamma / sigma.clamp_min(1.0)
        cA = c.unsqueeze(-1).unsqueeze(-1) * Aw
        for _ in range(cfg.K):
            w = cA @ w  # w_f = (c A_w)^K w_q
    y = C @ (Li.transpose(-1, -2) @ w)  # B_v L w_f = C L⁻ᵀ w_f   [..., P, n]
    with torch.no_grad():
        diag = L.diagonal(dim1=-2, dim2=-1)
        lam = (diag * diag).amin(-1) if tri else torch.full_like(diag[..., 0], float("nan"))
    return eta * y.transpose(-1, -2), ReadoutInfo(lam, sigma)


# ----- the three parallel forms -------------------------------------------------------------
def token_causal(G0, M0, C0, prev, x, u, l, p, q, gamma, eta, cfg, counter=None):
    """Token-causal parallel form: the query at t reads the statistics of tokens ≤ t
    (inclusive cumulative sums; one Cholesky per (b, t, h)). Returns y [B, T, H, P] and the
    final (G, M, C, prev)."""
    G = G0.unsqueeze(1) + prefix_sum(outer(x, x))  # [B, T, H, r, r]
    M = M0.unsqueeze(1) + prefix_sum(outer(l, shift_prev(p, prev)))
    C = C0.unsqueeze(1) + prefix_sum(outer(u, x))  # [B, T, H, P, r]
    y, info = readout(G, M, C, q.unsqueeze(-2), gamma, eta, cfg, counter)
    return y.squeeze(-2), (G[:, -1], M[:, -1], C[:, -1], p[:, -1]), info


def full_sequence(G0, M0, C0, prev, x, u, l, p, q, gamma, eta, cfg, counter=None):
    """Prefix/masked form: one operator per (b, h) from all written tokens (plus the carried
    statistics), applied to every position (docs/ska.md eqs. 4–6)."""
    G = G0 + torch.einsum("bthi,bthj->bhij", x, x)
    M = M0 + torch.einsum("bthi,bthj->bhij", l, shift_prev(p, prev))
    C = C0 + torch.einsum("bthi,bthj->bhij", u, x)
    y, info = readout(G, M, C, q.transpose(1, 2), gamma, eta, cfg, counter)  # [B, H, T, P]
    return y.transpose(1, 2), (G, M, C, p[:, -1]), info


def chunk_causal(
    committed,
    pending,
    pos: int,
    S: int,
    inclusive: bool,
    prev,
    x,
    u,
    l,
    p,
    q,
    gamma,
    eta,
    cfg,
    counter=None,
):
    """Chunk-causal parallel form (docs/ska.md §5, paper eqs. 7–10) continuing from a decoder state.

    ``committed`` = (G, M, C) of all closed chunks, ``pending`` = sums of the open chunk, ``pos``
    the absolute position of x's first token. Chunks are aligned to absolute positions: x is
    left-padded by ``pos mod S`` zero contributions so the open chunk is padded chunk 0.
    Chunk j reads committed + Σ_{i<j} T_i (exclusive prefix sum of chunk totals T_i, pending
    folded into T_0); with ``inclusive`` the lag pair crossing into chunk j (b_j) is read by
    chunk j itself and lives in ``committed`` once the chunk is open.
    Returns y [B, T, H, P], new committed, new pending, new prev.
    """
    B, T, H, r = x.shape
    Gc0, Mc0, Cc0 = committed
    Gp, Mp, Cp = pending
    if pos > 0 and pos % S == 0:  # lazy commit of the full chunk the state ended on
        Gc0, Mc0, Cc0 = Gc0 + Gp, Mc0 + Mp, Cc0 + Cp
        Gp, Mp, Cp = torch.zeros_like(Gp), torch.zeros_like(Mp), torch.zeros_like(Cp)
    o = pos % S
    N = -(-(o + T) // S)
    pad = (0, 0, 0, 0, o, N * S - o - T)  # pad along T
    pp = shift_prev(p, prev)
    xs, us, ls, pps, qs = (F.pad(t, pad).view(B, N, S, H, -1) for t in (x, u, l, pp, q))
    TG = torch.einsum("bnshi,bnshj->bnhij", xs, xs)  # chunk totals [B, N, H, r, r]
    TM = torch.einsum("bnshi,bnshj->bnhij", ls, pps)
    TC = torch.einsum("bnshi,bnshj->bnhij", us, xs)  # [B, N, H, P, r]
    TG, TM, TC = (
        torch.cat([t[:, :1] + e.unsqueeze(1), t[:, 1:]], 1)
        for t, e in ((TG, Gp), (TM, Mp), (TC, Cp))
    )
    bsum = None
    if inclusive:  # lag pair of each chunk's first slot (zero for padding and at position 0)
        b = outer(ls[:, :, 0], pps[:, :, 0])  # [B, N, H, r, r]
        TM = TM - b
        bsum = b.cumsum(1)

    def excl(t):  # Σ_{i<j} t_i
        return torch.cat([torch.zeros_like(t[:, :1]), t[:, :-1].cumsum(1)], 1)

    RG, RM, RC = (
        Gc0.unsqueeze(1) + excl(TG),
        Mc0.unsqueeze(1) + excl(TM),
        Cc0.unsqueeze(1) + excl(TC),
    )
    if bsum is not None:
        RM = RM + bsum
    y, info = readout(RG, RM, RC, qs.transpose(2, 3), gamma, eta, cfg, counter)  # [B,N,H,S,P]
    y = y.transpose(2, 3).reshape(B, N * S, H, -1)[:, o : o + T]
    new_committed = (RG[:, -1], RM[:, -1], RC[:, -1])
    new_pending = (TG[:, -1], TM[:, -1], TC[:, -1])
    return y, new_committed, new_pending, p[:, -1], info
