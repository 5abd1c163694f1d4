"""Delta-rule chunk math shared by DeltaNet and Gated DeltaNet (docs/baselines.md §4-§5).

Glossary (per head; Yang et al. arXiv 2406.06484, Yang-Kautz-Hatamizadeh arXiv 2412.06464):
    q_t, k_t [d_k]   L2-normalised query/key;  v_t [d_v] value;  β_t ∈ (0,1) writing strength
    g_t ≤ 0          log-decay, α_t = exp(g_t) (Gated DeltaNet; DeltaNet is g ≡ 0, α ≡ 1); per
                     key channel, g_t [d_k], for KDA (kda.py): D_t = Diag(α_t)
    S_t [d_k, d_v]   S_t = (I − β_t k_t k_tᵀ) D_t S_{t−1} + β_t k_t v_tᵀ   (gated delta rule;
                         D_t = α_t I for a scalar decay) = D_t S_{t−1} + k_t [β_t (v_t − (D_t
                         S_{t−1})ᵀ k_t)]ᵀ
    o_t [d_v]        scale · S_tᵀ q_t                          (inclusive: write, then read)

Chunked WY/UT form, chunk of C rows (DeltaNet's chunkwise form, with GDN's gated ratios):
    ℓ_i = Σ_{j≤i} g_j inside the chunk, γ_i = exp(ℓ_i); every ratio γ_i/γ_j = exp(ℓ_i − ℓ_j)
    A_ij = β_i (γ_i/γ_j) k_i·k_j  (i > j, strictly lower);   T = (I + A)⁻¹ (triangular solve)
    W = T diag(βγ) K,  U = T diag(β) V,  U′ = U − W S_{c−1}
    O = diag(γ) Q S_{c−1} + (Q Kᵀ ⊙ Γ) U′,  Γ_ij = γ_i/γ_j for i ≥ j, else 0
    S_c = γ_C S_{c−1} + (diag(γ_C/γ) K)ᵀ U′
Per-channel decay (KDA): ℓ_i, γ_i ∈ ℝ^{d_k} and every product above carries the ratio inside
the channel sum — A_ij = β_i Σ_c k_ic k_jc e^{ℓ_ic − ℓ_jc}, P_ij = Σ_c q_ic k_jc e^{ℓ_ic − ℓ_jc}
(i ≥ j), W = T diag(β)(γ ⊙ K), O = (γ ⊙ Q) S_{c−1} + P U′, S_c = Diag(γ_C) S_{c−1} +
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


def delta_rule_chunked(q, k, v, beta, S0, *, g=None, scale: float, chunk_size: int = 64):
    """Chunked (gated) delta rule.

    q, k [B, T, H, d_k]; v [B, T, H, d_v]; beta [B, T, H]; g [B, T, H] log-decay, [B, T, H, d_k]
    per key channel, or None; S0 [B, H, d_k, d_v]. Returns o [B, T, H, d_v] and the final state
    S [B, H, d_k, d_v].
    """
    B, T, H, dk = k.shape
    dv = v.shape[-1]
    C = min(chunk_size, T)
    pad = (-T) % C
    if pad:  # zero k and β: padded rows write nothing (g = 0 keeps γ_C unchanged)
        q, k, v = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (q, k, v))
        beta = F.pad(beta, (0, 0, 0, pad))
        g = None if g is None else F.pad(g, (0, 0) * (g.dim() - 2) + (0, pad))
    N = (T + pad) // C
    # [B, H, N, C, *] and [B, H, N, C]
    q, k, v = (t.reshape(B, N, C, H, -1).permute(0, 3, 1, 2, 4) for t in (q, k, v))
    beta = beta.reshape(B, N, C, H).permute(0, 3, 1, 2)
    q = q * scale
    ones = torch.ones(C, C, dtype=torch.bool, device=k.device)
    incl, strict = ones.tril(), ones.tril(-1)

    if g is not None and g.dim() == 4:  # per key channel (KDA)
        A, P, bk, q_in, k_out, decay = _channel_decay_terms(q, k, beta, g, incl, strict)
    elif g is None:
        A = (beta.unsqueeze(-1) * (k @ k.transpose(-1, -2))).masked_fill(~strict, 0.0)
        P = (q @ k.transpose(-1, -2)).masked_fill(~incl, 0.0)  # q_i·k_j, i ≥ j
        bk, q_in, k_out, decay = beta.unsqueeze(-1) * k, q, k, None
    else:
        kk = k @ k.transpose(-1, -2)  # [B, H, N, C, C]  k_i·k_j
        qk = q @ k.transpose(-1, -2)  # [B, H, N, C, C]  q_i·k_j
        ell = g.reshape(B, N, C, H).permute(0, 3, 1, 2).cumsum(-1)  # [B, H, N, C]
        diff = ell.unsqueeze(-1) - ell.unsqueeze(-2)  # ℓ_i − ℓ_j
        Gam = torch.where(incl, diff, float("-inf")).exp()  # Γ, zero above the diagonal
        A = (beta.unsqueeze(-1) * kk * Gam).masked_fill(~strict, 0.0)
        P = qk * Gam
        bk = (beta * ell.exp()).unsqueeze(-1) * k  # diag(βγ) K
        q_in = q * ell.exp().unsqueeze(-1)  # diag(γ) Q
        k_out = k * (ell[..., -1:] - ell).exp().unsqueeze(-1)  # diag(γ_C/γ) K
        decay = ell[..., -1].exp()[..., None, None]  # γ_C  [B, H, N, 1, 1]
    eye = torch.eye(C, dtype=k.dtype, device=k.device)
    rhs = torch.cat([bk, beta.unsqueeze(-1) * v], -1)  # [B, H, N, C, d_k + d_v]
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


def _channel_decay_terms(q, k, beta, g, incl, strict):
    """A, P, diag(β)(γ ⊙ K), γ ⊙ Q, (γ_C/γ) ⊙ K and Diag(γ_C) for a per-channel log-decay g
    [B, T, H, d_k] (module docstring); q, k already [B, H, N, C, d_k]."""
    B, H, N, C, dk = k.shape
    ell = g.reshape(B, N, C, H, dk).permute(0, 3, 1, 2, 4).cumsum(3)  # [B, H, N, C, d_k]
    diff = ell.unsqueeze(-2) - ell.unsqueeze(-3)  # [B, H, N, C_i, C_j, d_k]: ℓ_i − ℓ_j
    R = torch.where(incl[..., None], diff, float("-inf")).exp()  # zero above the diagonal
    A = beta.unsqueeze(-1) * torch.einsum("...ic,...jc,...ijc->...ij", k, k, R)
    P = torch.einsum("...ic,...jc,...ijc->...ij", q, k, R)
    gam = ell.exp()
    k_out = k * (ell[..., -1:, :] - ell).exp()
    return (
        A.masked_fill(~strict, 0.0),
        P,
        beta.unsqueeze(-1) * gam * k,
        q * gam,
        k_out,
        (
            gam[..., -1, :].unsqueeze(-1)  # Diag(γ_C) [B, H, N, d_k, 1]
        ),
    )


def delta_rule_step(q, k, v, beta, S, *, g=None, scale: float):
    """One token: q, k [B, H, d_k]; v [B, H, d_v]; beta [B, H]; g [B, H] or [B, H, d_k] (per
    key channel); S [B, H, d_k, d_v]."""
    if g is not None:
        S = (g.exp().unsqueeze(-1) if g.dim() == k.dim() else g.exp()[..., None, None]) * S
    u = beta.unsqueeze(-1) * (v - torch.einsum("bhkv,bhk->bhv", S, k))
    S = S + k.unsqueeze(-1) * u.unsqueeze(-2)
    return scale * torch.einsum("bhkv,bhk->bhv", S, q), S
