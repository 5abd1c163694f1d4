"""Numerics shared by the mixers: the one ``segsum`` (stable log-space segment sums of the
chunked scans: Mamba-2, FDM, MesaNet), the one ``l2norm`` (keys and queries of DeltaNet, Gated
DeltaNet, MesaNet, SKA), and for the ridge-type mixers (SKA, MesaNet) fp32 islands, Cholesky
with a jitter/eigen fallback that never yields NaN silently, SPD solves, power iteration.

All functions work on batched [..., n, n] matrices and keep the caller's dtype, except that
:func:`fp32_island` promotes half precision to fp32 (float64 stays float64, as in tests).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

#: Jitters tried, in order, on the slices whose Cholesky failed (docs/ska.md §9).
JITTERS = (1e-4, 1e-3, 1e-2)


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / sqrt(‖x‖² + eps)`` over the last dim (fla's l2norm; SKA passes eps = 1e-12)."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def segsum(x: torch.Tensor) -> torch.Tensor:
    """Stable segment sum: x [..., l] -> [..., l, l], out[i, j] = Σ_{j<k≤i} x_k for i ≥ j and
    −∞ for i < j. Built as a cumsum over i of x_i repeated along j and masked to i > j, so
    every entry is a sum of the relevant terms only (never ℓ_i − ℓ_j of two long cumsums)."""
    l = x.shape[-1]
    ones = torch.ones(l, l, dtype=torch.bool, device=x.device)
    rep = x.unsqueeze(-1).expand(*x.shape, l)  # rep[..., i, j] = x_i
    seg = rep.masked_fill(~ones.tril(-1), 0.0).cumsum(-2)
    return seg.masked_fill(~ones.tril(), float("-inf"))


def upcast(t: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32; fp32/fp64 unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


@contextmanager
def fp32_island(device_type: str = "cpu"):
    """Disable autocast locally so statistics, solves and iterations run in fp32 (or fp64)."""
    with torch.autocast(device_type, enabled=False):
        yield


class FallbackCounter:
    """Counts Cholesky repairs so they are never silent (jitter and eigen paths separately)."""

    def __init__(self):
        self.jitter = 0
        self.eigen = 0

    def total(self) -> int:
        return self.jitter + self.eigen

    def as_dict(self) -> dict:
        return {"jitter": self.jitter, "eigen": self.eigen}


def robust_cholesky(
    A: torch.Tensor,
    counter: FallbackCounter | None = None,
    jitters=JITTERS,
    eig_floor: float = 1e-6,
) -> torch.Tensor:
    """A factor F with F Fᵀ ≈ A for symmetric A [..., n, n].

    1. ``cholesky_ex`` on the symmetrised matrix;
    2. only the failing slices are retried with A + δI for δ in ``jitters``;
    3. slices that still fail get the eigen factor F = Q diag(√max(λ, eig_floor)).
    Every repaired slice is counted in ``counter``. The result is always finite for finite A.
    """
    return robust_factor(A, counter, jitters, eig_floor)[0]


def robust_factor(
    A: torch.Tensor,
    counter: FallbackCounter | None = None,
    jitters=JITTERS,
    eig_floor: float = 1e-6,
) -> tuple[torch.Tensor, bool]:
    """:func:`robust_cholesky` that also says whether every slice is lower-triangular (no eigen
    fallback was needed), so callers can use triangular solves without scanning the factor."""
    A = 0.5 * (A + A.transpose(-1, -2))
    L, info = torch.linalg.cholesky_ex(A)
    bad = info != 0
    if not bad.any():
        return L, True
    L = L.clone()
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    for delta in jitters:
        idx = bad.nonzero(as_tuple=True)
        Lj, info_j = torch.linalg.cholesky_ex(A[idx] + delta * eye)
        ok = info_j == 0
        if ok.any():
            L[tuple(i[ok] for i in idx)] = Lj[ok]
            if counter is not None:
                counter.jitter += int(ok.sum())
            bad = bad.clone()
            bad[tuple(i[ok] for i in idx)] = False
        if not bad.any():
            return L, True
    idx = bad.nonzero(as_tuple=True)
    evals, evecs = torch.linalg.eigh(A[idx])
    L[idx] = evecs * evals.clamp_min(eig_floor).sqrt().unsqueeze(-2)
    if counter is not None:
        counter.eigen += int(bad.sum())
    return L, False


def spd_solve(
    A: torch.Tensor, B: torch.Tensor, counter: FallbackCounter | None = None, **kw
) -> torch.Tensor:
    """X with A X = B for symmetric positive (semi-)definite A, via :func:`robust_cholesky`.

    With an eigen factor F = Q diag(√λ) the solve F Fᵀ X = B is still exact for the clamped
    matrix, so the same code path serves both factor kinds.
    """
    F = robust_cholesky(A, counter, **kw)
    return factor_solve(F, B)


def factor_solve(F: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Solve (F Fᵀ) X = B for a factor F (lower-triangular Cholesky or an eigen factor)."""
    if is_lower_triangular(F):
        return torch.cholesky_solve(B, F)
    return torch.linalg.solve(F.transpose(-1, -2), torch.linalg.solve(F, B))


def factor_inverse(F: torch.Tensor, triangular: bool) -> torch.Tensor:
    """F⁻¹ for a batch of factors [..., n, n]: one triangular solve for Cholesky factors, a
    general solve when some slices are eigen factors."""
    eye = torch.eye(F.shape[-1], dtype=F.dtype, device=F.device).expand_as(F)
    if triangular:
        return torch.linalg.solve_triangular(F, eye, upper=False)
    return torch.linalg.solve(F, eye)


def is_lower_triangular(F: torch.Tensor) -> bool:
    """True when every slice of F [..., n, n] is lower-triangular (a Cholesky factor rather
    than an eigen factor from the fallback), so triangular solves apply."""
    return bool((torch.triu(F, diagonal=1) == 0).all())


@torch.no_grad()
def power_iteration_sigma(A: torch.Tensor, iters: int = 6) -> torch.Tensor:
    """Detached estimate of σ_max(A) for A [..., n, n] by power iteration on (A, Aᵀ) from the
    fixed start vector 𝟏/√n (docs/ska.md §7): u = Av/‖Av‖, v = Aᵀu/‖Aᵀu‖, σ̂ = ‖Av‖."""
    n = A.shape[-1]
    v = torch.full((*A.shape[:-2], n, 1), n**-0.5, dtype=A.dtype, device=A.device)
    tiny = torch.finfo(A.dtype).tiny
    for _ in range(iters):
        u = A @ v
        u = u / u.norm(dim=-2, keepdim=True).clamp_min(tiny)
        v = A.transpose(-1, -2) @ u
        v = v / v.norm(dim=-2, keepdim=True).clamp_min(tiny)
    return (A @ v).norm(dim=(-2, -1))
