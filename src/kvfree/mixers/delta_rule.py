"""Delta-rule chunk math shared by DeltaNet, Gated DeltaNet, KDA and GDN-2 (docs/baselines.md
§4-§5).

Glossary (per head; Yang et al. arXiv 2406.06484, Yang-Kautz-Hatamizadeh arXiv 2412.06464):
    q_t, k_t [d_k]   L2-normalised query/key;  v_t [d_v] value;  β_t ∈ (0,1) writing strength
    g_t ≤ 0          log-decay, α_t = exp(g_t) (Gated DeltaNet; DeltaNet is g ≡ 0, α ≡ 1); per
                     key channel, g_t [d_k], for KDA (kda.py): D_t = Diag(α_t)
    S_t [d_k, d_v]   S_t = (I − β_t k_t k_tᵀ) D_t S_{t−1} + β_t k_t v_tᵀ   (gated delta rule;
                         D_t = α_t I for a scalar decay) = D_t S_{t−1} + k_t [β_t (v_t − (D_t
                         S_{t−1})ᵀ k_t)]ᵀ
    e_t, u_t         erase vector and written value: β_t k_t, β_t v_t — or GDN-2's (gdn2.py)
                     b_t ⊙ k_t, w_t ⊙ v_t: S_t = (I − k_t e_tᵀ) D_t S_{t−1} + k_t u_tᵀ; every
                     formula below holds with β k → e (erasing) and β v → u (writing)
    o_t [d_v]        scale · S_tᵀ q_t                          (inclusive: write, then read)

Chunked WY/UT form, chunk of C rows (DeltaNet's chunkwise form, with GDN's gated ratios):
    ℓ_i = Σ_{j≤i} g_j inside the chunk, γ_i = exp(ℓ_i); every ratio γ_i/γ_j = exp(ℓ_i − ℓ_j)
    A_ij = (γ_i/γ_j) e_i·k_j  (i > j, strictly lower);   T = (I + A)⁻¹ (triangular solve)
    W = T diag(γ) E,  U = T U_in (rows u_i),  U′ = U − W S_{c−1}
    O = diag(γ) Q S_{c−1} + (Q Kᵀ ⊙ Γ) U′,  Γ_ij = γ_i/γ_j for i ≥ j, else 0
    S_c = γ_C S_{c−1} + (diag(γ_C/γ) K)ᵀ U′
Per-channel decay (KDA): ℓ_i, γ_i ∈ ℝ^{d_k} and every product above carries the ratio inside
the channel sum — A_ij = Σ_c e_ic k_jc e^{ℓ_ic − ℓ_jc}, P_ij = Σ_c q_ic k_jc e^{ℓ_ic − ℓ_jc}
(i ≥ j), W = T (γ ⊙ E), O = (γ ⊙ Q) S_{c−1} + P U′, S_c = Diag(γ_C) S_{c−1} +
((γ_C/γ) ⊙ K)ᵀ U′
(substitute S̃_t = Γ_t⁻¹ S_t: the chunk becomes a delta rule with erase key γ ⊙ k and write key
k / γ); only ratios with j ≤ i appear, so nothing overflows.
Everything except the state-dependent U′ and S_c is batched over chunks; the only Python loop
is over chunks (T/C iterations), never over time steps. Callers pass fp32 (fp64 in tests).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvfree import perf


def erase_write(k, v, beta, w=None):
    """The erase vector e = β k (or b ⊙ k for a per-key-channel ``beta`` b) and the written
    value u = β v (or w ⊙ v for GDN-2's per-value-channel write gate ``w``)."""
    if beta.dim() == k.dim():  # GDN-2: b [..., d_k], w [..., d_v]
        return beta * k, w * v
    return beta.unsqueeze(-1) * k, beta.unsqueeze(-1) * v


def delta_rule_chunked(q, k, v, beta, S0, *, g=None, w=None, scale: float, chunk_size: int = 64):
    """Chunked (gated) delta rule.

    q, k [B, T, H, d_k]; v [B, T, H, d_v]; beta [B, T, H], or GDN-2's erase gate b [B, T, H, d_k]
    with its write gate ``w`` [B, T, H, d_v]; g [B, T, H] log-decay, [B, T, H, d_k] per key
    channel, or None; S0 [B, H, d_k, d_v]. Returns o [B, T, H, d_v] and the final state
    S [B, H, d_k, d_v].
    """
    B, T, H, dk = k.shape
    dv = v.shape[-1]
    e, u = erase_write(k, v, beta, w)  # erase vectors and written values
    C = min(chunk_size, T)
    pad = (-T) % C
    if pad:  # zero e and u: padded rows write nothing (g = 0 keeps γ_C unchanged)
        q, k, e, u = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (q, k, e, u))
        g = None if g is None else F.pad(g, (0, 0) * (g.dim() - 2) + (0, pad))
    N = (T + pad) // C
    # [B, H, N, C, *]
    q, k, e, u = (t.reshape(B, N, C, H, -1).permute(0, 3, 1, 2, 4) for t in (q, k, e, u))
    q = q * scale
    ones = torch.ones(C, C, dtype=torch.bool, device=k.device)
    incl, strict = ones.tril(), ones.tril(-1)

    if g is not None and g.dim() == 4:  # per key channel (KDA, GDN-2)
        A, P, bk, q_in, k_out, decay = _channel_decay_terms(q, k, e, g, incl, strict)
    elif g is None:
        A = (e @ k.transpose(-1, -2)).masked_fill(~strict, 0.0)  # e_i·k_j, i > j
        P = (q @ k.transpose(-1, -2)).masked_fill(~incl, 0.0)  # q_i·k_j, i ≥ j
        bk, q_in, k_out, decay = e, q, k, None
    else:
        ek = e @ k.transpose(-1, -2)  # [B, H, N, C, C]  e_i·k_j
        qk = q @ k.transpose(-1, -2)  # [B, H, N, C, C]  q_i·k_j
        ell = g.reshape(B, N, C, H).permute(0, 3, 1, 2).cumsum(-1)  # [B, H, N, C]
        diff = ell.unsqueeze(-1) - ell.unsqueeze(-2)  # ℓ_i − ℓ_j
        Gam = torch.where(incl, diff, float("-inf")).exp()  # Γ, zero above the diagonal
        A = (ek * Gam).masked_fill(~strict, 0.0)
        P = qk * Gam
        bk = ell.exp().unsqueeze(-1) * e  # diag(γ) E
        q_in = q * ell.exp().unsqueeze(-1)  # diag(γ) Q
        k_out = k * (ell[..., -1:] - ell).exp().unsqueeze(-1)  # diag(γ_C/γ) K
        decay = ell[..., -1].exp()[..., None, None]  # γ_C  [B, H, N, 1, 1]
    eye = torch.eye(C, dtype=k.dtype, device=k.device)
    rhs = torch.cat([bk, u], -1)  # [B, H, N, C, d_k + d_v]
    WU = torch.linalg.solve_triangular(A + eye, rhs, upper=False, unitriangular=True)
    W, U = WU[..., :dk], WU[..., dk:]

    S = S0
    S_prev, U_new = [], []
    Us, Ws, Ks = (perf.unbind(t, 2) for t in (U, W, k_out.transpose(-1, -2)))
    decays = [None] * N if decay is None else perf.unbind(decay, 2)
    for u_n, w_n, kt_n, d_n in zip(Us, Ws, Ks, decays):  # inter-chunk recurrence only
        S_prev.append(S)
        u = u_n - w_n @ S  # U′ [B, H, C, d_v]
        U_new.append(u)
        S = (S if d_n is None else d_n * S) + kt_n @ u
    S_prev_t = torch.stack(S_prev, 2)  # [B, H, N, d_k, d_v]
    o = q_in @ S_prev_t + P @ torch.stack(U_new, 2)  # [B, H, N, C, d_v]
    o = o.permute(0, 2, 3, 1, 4).reshape(B, N * C, H, dv)[:, :T]
    return o, S


def _channel_decay_terms(q, k, e, g, incl, strict):
    """A, P, γ ⊙ E, γ ⊙ Q, (γ_C/γ) ⊙ K and Diag(γ_C) for a per-channel log-decay g
    [B, T, H, d_k] (module docstring); q, k and the erase vectors e already [B, H, N, C, d_k]."""
    B, H, N, C, dk = k.shape
    ell = g.reshape(B, N, C, H, dk).permute(0, 3, 1, 2, 4).cumsum(3)  # [B, H, N, C, d_k]
    diff = ell.unsqueeze(-2) - ell.unsqueeze(-3)  # [B, H, N, C_i, C_j, d_k]: ℓ_i − ℓ_j
    R = torch.where(incl[..., None], diff, float("-inf")).exp()  # zero above the diagonal
    A = torch.einsum("...ic,...jc,...ijc->...ij", e, k, R)
    P = torch.einsum("...ic,...jc,...ijc->...ij", q, k, R)
    gam = ell.exp()
    k_out = k * (ell[..., -1:, :] - ell).exp()
    return (
        A.masked_fill(~strict, 0.0),
        P,
        gam * e,
        q * gam,
        k_out,
        (
            gam[..., -1, :].unsqueeze(-1)  # Diag(γ_C) [B, H, N, d_k, 1]
        ),
    )


def delta_rule_step(q, k, v, beta, S, *, g=None, w=None, scale: float):
    """One token: q, k [B, H, d_k]; v [B, H, d_v]; beta [B, H] (or GDN-2's b [B, H, d_k] with
    w [B, H, d_v]); g [B, H] or [B, H, d_k] (per key channel); S [B, H, d_k, d_v]."""
    if g is not None:
        S = (g.exp().unsqueeze(-1) if g.dim() == k.dim() else g.exp()[..., None, None]) * S
    e, u = erase_write(k, v, beta, w)
    u = u - torch.einsum("bhkv,bhk->bhv", S, e)  # S += k (u − Sᵀ e)ᵀ
    S = S + k.unsqueeze(-1) * u.unsqueeze(-2)
    return scale * torch.einsum("bhkv,bhk->bhv", S, q), S
