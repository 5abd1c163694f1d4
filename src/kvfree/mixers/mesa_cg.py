"""MesaNet's per-token ridge solves by conjugate gradients, without forming H^kk per token
(docs/baselines.md §6; the role of fla's ``naive_mesa_net_CG``, written for kvfree).

Inside chunk c (rows i, j of C tokens, notation of mesanet.py) the system of token i is

    (H^kk_i + Λ) x_i = q_i,    H^kk_i = Γ_i H^kk_{c−1} + Σ_{j≤i} A_ij k_j k_jᵀ,  A_ij = β_j Γ_i/Γ_j

and the matrix never needs to exist: for all C tokens of a chunk at once

    (H^kk + Λ) X = Γ ⊙ (X H^kk_{c−1}) + (A ⊙ X Kᵀ) K + λ ⊙ X        X [C, d_k]

(two C×C and one d_k×d_k matmul per chunk, instead of C matrices of d_k² and C Cholesky
factorisations). CG runs on every token's system in parallel until the largest relative
residual is below ``tol`` or ``max_iters`` is reached (d_k iterations are exact in exact
arithmetic; the matrices are SPD with eigenvalues ≥ λ_min).

Gradients by implicit differentiation, not through the iterations: for x = M⁻¹q and an
upstream gradient g_x, the backward solves M g = g_x with the same CG (M is symmetric) and
returns ∂L/∂q = g and, for every tensor θ that builds M, ∂L/∂θ = −∂(gᵀ M(θ) x)/∂θ — one extra
CG solve and one matvec's autograd, so memory does not grow with the iteration count.
"""

from __future__ import annotations

import torch


def chunk_matvec(X, Hc, K, A, Gam, lam):
    """(H^kk_i + Λ) x_i for every token: X, K [..., C, d_k], Hc [..., d_k, d_k] (the state
    entering the chunk), A [..., C, C] (β_j Γ_i/Γ_j, lower-triangular), Gam [..., C], lam
    broadcastable to X."""
    return Gam.unsqueeze(-1) * (X @ Hc) + (A * (X @ K.transpose(-1, -2))) @ K + lam * X


def _dot(U, V):
    return torch.linalg.vecdot(U, V).unsqueeze(-1)


@torch.no_grad()
def cg_solve(matvec, B, *, tol: float, max_iters: int):
    """Solve matvec(X) = B row-wise (B [..., d]) by conjugate gradients from X = 0, until every
    row's relative residual is ≤ ``tol`` or ``max_iters``; returns X and the iterations used."""
    tiny = torch.finfo(B.dtype).tiny
    X = torch.zeros_like(B)
    R = B.clone()
    P = R.clone()
    rs = _dot(R, R)
    limit = (tol * tol) * _dot(B, B).clamp_min(tiny)
    it = 0
    for it in range(1, max_iters + 1):  # noqa: B007  (it is returned)
        AP = matvec(P)
        alpha = rs / _dot(P, AP).clamp_min(tiny)
        X.addcmul_(alpha, P)
        R.addcmul_(alpha, AP, value=-1.0)
        rs_new = _dot(R, R)
        if bool((rs_new <= limit).all()):
            break
        P.mul_(rs_new / rs.clamp_min(tiny)).add_(R)
        rs = rs_new
    return X, it


class _CGSolve(torch.autograd.Function):
    @staticmethod
    def forward(ctx, Q, Hc, K, A, Gam, lam, tol, max_iters):
        mv = lambda X: chunk_matvec(X, Hc, K, A, Gam, lam)  # noqa: E731
        X, _ = cg_solve(mv, Q, tol=tol, max_iters=max_iters)
        ctx.save_for_backward(X, Hc, K, A, Gam, lam)
        ctx.tol, ctx.max_iters = tol, max_iters
        return X

    @staticmethod
    def backward(ctx, gX):
        X, Hc, K, A, Gam, lam = ctx.saved_tensors
        mv = lambda Y: chunk_matvec(Y, Hc, K, A, Gam, lam)  # noqa: E731
        G, _ = cg_solve(mv, gX.contiguous(), tol=ctx.tol, max_iters=ctx.max_iters)
        inputs = [
            t.detach().requires_grad_(need)
            for t, need in zip((Hc, K, A, Gam, lam), ctx.needs_input_grad[1:6], strict=True)
        ]
        wanted = [t for t in inputs if t.requires_grad]
        grads = iter(())
        if wanted:
            with torch.enable_grad():
                inner = -(G * chunk_matvec(X, *inputs)).sum()
                grads = iter(torch.autograd.grad(inner, wanted))
        out = [next(grads) if t.requires_grad else None for t in inputs]
        return (G, *out, None, None)


def cg_chunk_solve(Q, Hc, K, A, Gam, lam, *, tol: float = 1e-6, max_iters: int = 32):
    """X with (H^kk_i + Λ) x_i = q_i for every token of every chunk (module docstring):
    Q, K [..., C, d_k], Hc [..., d_k, d_k], A [..., C, C], Gam [..., C], lam broadcastable to
    Q. Differentiable in every argument (implicit differentiation). Only the symmetric part of
    H_c is read, so its gradient is symmetric — the Cholesky path's convention."""
    Hs = 0.5 * (Hc + Hc.transpose(-1, -2))
    return _CGSolve.apply(Q, Hs, K, A, Gam, lam, tol, max_iters)
