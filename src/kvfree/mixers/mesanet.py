"""MesaNet with the exact ridge readout (von Oswald et al. 2025, arXiv 2506.05233, the Mesa
rule; docs/baselines.md §6). Layer as fla ``layers/mesa_net.py``, adapted to small d.

Glossary (per head h; "Mesa rule" = the per-token ridge regression of the paper):
    q_t, k_t [d_k]   L2norm(SiLU(conv4(W_q x)))_t, same for k (short causal conv, kernel 4)
    v_t [d_v]        W_v x_t (no conv)
    β_t ∈ (0, 1)     σ(W_b x_t + b_b)                       input strength (``use_gates``)
    γ_t ∈ (0, 1)     exp(logsigmoid(W_a x_t + b_a))         forget strength (``use_gates``);
                     b_a = ``forget_bias_init`` if given (default nn.Linear init, as fla:
                     γ ≈ 0.5 at init, a memory of a few tokens)
    λ [d_k]          softplus(λ_raw) + λ_min, λ_min = 0.25  ridge, per key channel, learned
    H^kk_t [d_k,d_k] γ_t H^kk_{t−1} + β_t k_t k_tᵀ
    H^kv_t [d_k,d_v] γ_t H^kv_{t−1} + β_t k_t v_tᵀ
    o_t [d_v]        (H^kv_t)ᵀ (H^kk_t + diag λ)⁻¹ q_t      exact SPD solve, fp32 (fp64 in tests)
    y_t [D]          W_o concat_h(RMSNorm(o_t))
o_t = W_t q_t with W_t = argmin_W Σ_{i≤t} (Π_{i<m≤t} γ_m) β_i ‖W k_i − v_i‖² + ‖W‖²_Λ.

Chunked parallel form (chunk of C rows, ℓ_i = Σ_{m≤i} log γ_m inside the chunk, Γ_i = e^{ℓ_i}):
    H^kk_i = Γ_i H^kk_{c−1} + Σ_{j≤i} (Γ_i/Γ_j) β_j k_j k_jᵀ      (Γ_i/Γ_j = exp(segsum), stable)
    o_i    = Γ_i (H^kv_{c−1})ᵀ x_i + Σ_{j≤i} (Γ_i/Γ_j) β_j (k_j·x_i) v_j,   x_i = (H^kk_i + Λ)⁻¹ q_i
Chunk states are combined across chunks with the same log-space segment sums over chunk decays
(as in Mamba-2's SSD), so no cumprod over the sequence and no Python loop over time; the
per-token solves are one batched Cholesky solve (``kvfree.linalg.spd_solve``).

Functional core (used by the SKA cross-check: γ ≡ 1, β ≡ 1, λ = ε·𝟏 must equal SKA, K = 0,
token-causal mode)::

    o, (H_kk, H_kv) = mesa_core(q, k, v, beta, gamma, lam, state=None, *, log_gamma=None,
                                chunk_size=64, counter=None)
    q, k [B, T, H, d_k]; v [B, T, H, d_v]    features after projections / conv / L2 norm
    beta, gamma [B, T, H] or None (≡ 1);    log_gamma [B, T, H]: log γ, used instead of gamma
    lam [H, d_k], [d_k], a scalar tensor or a float (> 0)
    state (H_kk [B, H, d_k, d_k], H_kv [B, H, d_k, d_v]) or None (zeros)
    returns o [B, T, H, d_v] in v's dtype and the state after the last token
Statistics and solves run in fp32 (float64 stays float64) even under autocast.
``mesa_step`` is the one-token recurrence with the same arguments on [B, H, ·] tensors.

State per head: d_k² + d_k·d_v (H^kk stored in full, as fla), plus the q/k short-conv buffers
2·(4−1)·H·d_k per layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kvfree.blocks import CausalConv1d
from kvfree.linalg import FallbackCounter, fp32_island, l2norm, segsum, spd_solve, upcast
from kvfree.mixers.base import Mixer, head_width
from kvfree.mixers.mesa_cg import cg_chunk_solve
from kvfree.state import State, carried_dtype, mixed_nbytes

_L2_EPS = 1e-6


@dataclass
class MesaNetState(State):
    H_kk: torch.Tensor  # [B, H, d_k, d_k]
    H_kv: torch.Tensor  # [B, H, d_k, d_v]
    q_conv: torch.Tensor  # [B, k-1, H·d_k]  short-conv history of W_q x
    k_conv: torch.Tensor  # [B, k-1, H·d_k]


def _check_core(q, k, v, beta, gate, lam) -> None:
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"mesa_core expects q, k [B, T, H, d_k] and v [B, T, H, d_v], got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    for what, t in (("beta", beta), ("gamma", gate)):
        if t is not None and t.shape != q.shape[:3]:
            raise ValueError(
                f"mesa_core: {what} must be [B, T, H] = {tuple(q.shape[:3])}, got {tuple(t.shape)}"
            )
    if torch.as_tensor(lam).numel() not in (1, q.shape[-1], q.shape[2] * q.shape[-1]):
        raise ValueError(
            f"mesa_core: lam must be [H, d_k], [d_k] or a scalar, got {tuple(lam.shape)}"
        )


def _lam(lam, H: int, dk: int, like: torch.Tensor) -> torch.Tensor:
    """λ as [H, d_k] from [H, d_k], [d_k] or a scalar."""
    lam = torch.as_tensor(lam).to(device=like.device, dtype=like.dtype)
    return (
        lam.reshape(1, 1).expand(H, dk) if lam.numel() == 1 else lam.reshape(-1, dk).expand(H, dk)
    )


def mesa_core(
    q,
    k,
    v,
    beta,
    gamma,
    lam,
    state=None,
    *,
    log_gamma=None,
    chunk_size: int = 64,
    counter: FallbackCounter | None = None,
    solver: str = "exact",
    cg_tol: float = 1e-6,
    cg_iters: int = 32,
):
    """Chunked Mesa rule on features q, k [B, T, H, d_k], v [B, T, H, d_v] (module
    docstring). Returns ``(o [B, T, H, d_v], (H_kk, H_kv))``. ``solver="exact"``: batched
    Cholesky solves of the per-token matrices; ``"cg"``: conjugate gradients without forming
    them (mesa_cg.py), to relative residual ``cg_tol`` or ``cg_iters`` iterations."""
    gate = log_gamma if log_gamma is not None else gamma
    _check_core(q, k, v, beta, gate, lam)
    B, T, H, dk = q.shape
    dv, out_dtype = v.shape[-1], v.dtype
    cd = carried_dtype(q.dtype)
    with fp32_island(q.device.type):
        q, k, v = q.to(cd), k.to(cd), v.to(cd)
        if log_gamma is not None:
            g = log_gamma.to(cd)
        elif gamma is not None:
            g = gamma.to(cd).log()
        else:
            g = q.new_zeros(B, T, H)
        b = beta.to(cd) if beta is not None else q.new_ones(B, T, H)
        lam = _lam(lam, H, dk, q)
        if state is None:
            Hkk0, Hkv0 = q.new_zeros(B, H, dk, dk), q.new_zeros(B, H, dk, dv)
        else:
            Hkk0, Hkv0 = state
        st_dtype = Hkk0.dtype
        Hkk0, Hkv0 = Hkk0.to(cd), Hkv0.to(cd)
        if T == 0:
            return v.new_zeros(B, 0, H, dv).to(out_dtype), (Hkk0.to(st_dtype), Hkv0.to(st_dtype))
        C = min(chunk_size, T)
        pad = (-T) % C
        N = (T + pad) // C
        # zero-padded rows have β = 0, log γ = 0: they leave the state unchanged
        q, k, v = (
            F.pad(t, (0, 0, 0, 0, 0, pad)).view(B, N, C, H, -1).permute(0, 3, 1, 2, 4)
            for t in (q, k, v)
        )  # [B, H, N, C, d]
        g, b = (F.pad(t, (0, 0, 0, pad)).view(B, N, C, H).permute(0, 3, 1, 2) for t in (g, b))
        ell = g.cumsum(-1)  # [B, H, N, C]: log Γ_i within the chunk
        A = segsum(g).exp() * b.unsqueeze(-2)  # [B, H, N, C, C]: β_j Γ_i/Γ_j, 0 for j > i
        a_last = A[..., -1, :]  # [B, H, N, C]: β_j Γ_C/Γ_j
        S_kk = torch.einsum("bhnc,bhncd,bhnce->bhnde", a_last, k, k)  # chunk-local end states
        S_kv = torch.einsum("bhnc,bhncd,bhnce->bhnde", a_last, k, v)
        decay = segsum(F.pad(ell[..., -1], (1, 0))).exp()  # [B, H, N+1, N+1] across chunks
        Hkk = torch.einsum("bhij,bhjde->bhide", decay, torch.cat([Hkk0.unsqueeze(2), S_kk], 2))
        Hkv = torch.einsum("bhij,bhjde->bhide", decay, torch.cat([Hkv0.unsqueeze(2), S_kv], 2))
        # Hkk[:, :, c] = state entering chunk c; Hkk[:, :, N] = final state
        Gam = ell.exp()  # [B, H, N, C]
        if solver == "cg":
            lam_b = lam[None, :, None, None, :]
            x = cg_chunk_solve(q, Hkk[:, :, :N], k, A, Gam, lam_b, tol=cg_tol, max_iters=cg_iters)
        else:
            kk = (k.unsqueeze(-1) * k.unsqueeze(-2)).flatten(-2)  # [B, H, N, C, d_k²]: k_j k_jᵀ
            H_loc = (A @ kk).unflatten(-1, (dk, dk))  # Σ_{j≤i} β_j Γ_i/Γ_j k_j k_jᵀ
            H_tok = Gam[..., None, None] * Hkk[:, :, :N].unsqueeze(3) + H_loc  # [B,H,N,C,dk,dk]
            M = H_tok + torch.diag_embed(lam)[None, :, None, None]
            x = spd_solve(M, q.unsqueeze(-1), counter).squeeze(-1)  # [B, H, N, C, d_k]
        o = Gam.unsqueeze(-1) * (x @ Hkv[:, :, :N]) + (A * (x @ k.transpose(-1, -2))) @ v
        o = o.permute(0, 2, 3, 1, 4).reshape(B, N * C, H, dv)[:, :T]
        return o.to(out_dtype), (Hkk[:, :, N].to(st_dtype), Hkv[:, :, N].to(st_dtype))


def mesa_step(
    q, k, v, beta, gamma, lam, state=None, *, log_gamma=None, counter: FallbackCounter | None = None
):
    """One token of the Mesa rule: q, k [B, H, d_k], v [B, H, d_v], beta/gamma [B, H] or None.
    Returns ``(o [B, H, d_v], (H_kk, H_kv))``."""
    B, H, dk = q.shape
    dv, out_dtype = v.shape[-1], v.dtype
    cd = carried_dtype(q.dtype)
    with fp32_island(q.device.type):
        q, k, v = q.to(cd), k.to(cd), v.to(cd)
        if state is None:
            Hkk, Hkv = q.new_zeros(B, H, dk, dk), q.new_zeros(B, H, dk, dv)
        else:
            Hkk, Hkv = state
        st_dtype = Hkk.dtype
        Hkk, Hkv = Hkk.to(cd), Hkv.to(cd)
        if log_gamma is not None or gamma is not None:
            gam = (log_gamma.to(cd).exp() if log_gamma is not None else gamma.to(cd))[
                ..., None, None
            ]
            Hkk, Hkv = gam * Hkk, gam * Hkv
        bk = k * beta.to(cd).unsqueeze(-1) if beta is not None else k
        Hkk = Hkk + bk.unsqueeze(-1) * k.unsqueeze(-2)
        Hkv = Hkv + bk.unsqueeze(-1) * v.unsqueeze(-2)
        M = Hkk + torch.diag_embed(_lam(lam, H, dk, q))
        x = spd_solve(M, q.unsqueeze(-1), counter)  # [B, H, d_k, 1]
        o = (x.transpose(-1, -2) @ Hkv).squeeze(-2)
        return o.to(out_dtype), (Hkk.to(st_dtype), Hkv.to(st_dtype))


def _softplus_inv(y: float) -> float:
    return y + math.log(-math.expm1(-y))


class MesaNet(Mixer):
    """MesaNet layer with the exact ridge readout (the Mesa rule): o_t = (H^kv_t)ᵀ (H^kk_t +
    diag λ)⁻¹ q_t with H^kk_t = γ_t H^kk_{t−1} + β_t k_t k_tᵀ and H^kv_t = γ_t H^kv_{t−1} +
    β_t k_t v_tᵀ (von Oswald et al.; docs/baselines.md §6). Full glossary in the module
    docstring."""

    name = "mesanet"
    supports_padding = True

    def __init__(
        self,
        d_model: int,
        *,
        num_heads: int = 2,
        head_dim: int | None = None,
        chunk_size: int = 64,
        use_gates: bool = True,
        lambda_init: float = 1.0,
        lambda_min: float = 0.25,
        conv_size: int = 4,
        norm_eps: float = 1e-5,
        solver: str = "exact",
        cg_tol: float = 1e-6,
        cg_iters: int = 32,
        forget_bias_init: float | None = None,
    ):
        super().__init__(d_model)
        head_dim = head_width(d_model, num_heads, head_dim)
        if chunk_size < 1 or conv_size < 1:
            raise ValueError(
                f"chunk_size and conv_size must be >= 1, got {chunk_size}, {conv_size}"
            )
        if forget_bias_init is not None and not use_gates:
            raise ValueError(
                "forget_bias_init sets the forget gate's bias: it needs use_gates=True"
            )
        if solver not in ("exact", "cg"):
            raise ValueError(f"MesaNet solver must be 'exact' or 'cg', got {solver!r}")
        if cg_iters < 1 or not cg_tol > 0:
            raise ValueError(f"need cg_iters >= 1 and cg_tol > 0, got {cg_iters}, {cg_tol}")
        self.solver, self.cg_tol, self.cg_iters = solver, float(cg_tol), int(cg_iters)
        if not 0 <= lambda_min < lambda_init:
            raise ValueError(
                f"need 0 <= lambda_min < lambda_init (λ = softplus(raw) + "
                f"lambda_min), got lambda_min={lambda_min}, lambda_init={lambda_init}"
            )
        self.H, self.dk, self.dv = num_heads, head_dim, head_dim
        self.chunk_size, self.use_gates, self.conv_size = chunk_size, use_gates, conv_size
        self.lambda_min = float(lambda_min)
        kd = self.H * self.dk
        self.q_proj = nn.Linear(d_model, kd, bias=False)
        self.k_proj = nn.Linear(d_model, kd, bias=False)
        self.v_proj = nn.Linear(d_model, self.H * self.dv, bias=False)
        self.q_conv = CausalConv1d(kd, conv_size, bias=False, activation="silu")
        self.k_conv = CausalConv1d(kd, conv_size, bias=False, activation="silu")
        if use_gates:
            self.a_proj = nn.Linear(d_model, self.H, bias=True)  # forget strength γ
            self.b_proj = nn.Linear(d_model, self.H, bias=True)  # input strength β
            if forget_bias_init is not None:  # γ ≈ σ(b) at init (None: nn.Linear's, γ ≈ 0.5)
                nn.init.constant_(self.a_proj.bias, float(forget_bias_init))
        self.lambda_raw = nn.Parameter(
            torch.full((self.H, self.dk), _softplus_inv(lambda_init - lambda_min))
        )
        self.lambda_raw._no_weight_decay = True
        self.o_norm = nn.RMSNorm(self.dv, eps=norm_eps)
        self.o_proj = nn.Linear(self.H * self.dv, d_model, bias=False)
        self.fallbacks = FallbackCounter()  # Cholesky repairs (never silent)

    def lam(self) -> torch.Tensor:
        """λ [H, d_k] = softplus(λ_raw) + λ_min (fp32 or wider)."""
        return F.softplus(upcast(self.lambda_raw)) + self.lambda_min

    # ----- state -------------------------------------------------------------------------
    def init_state(self, batch, *, device=None, dtype=None):
        z = dict(device=device, dtype=dtype)
        st = dict(device=device, dtype=carried_dtype(dtype))
        return MesaNetState(
            torch.zeros(batch, self.H, self.dk, self.dk, **st),
            torch.zeros(batch, self.H, self.dk, self.dv, **st),
            self.q_conv.init_buffer(batch, **z),
            self.k_conv.init_buffer(batch, **z),
        )

    def state_nbytes(self, seq_len: int, dtype: torch.dtype = torch.float32) -> int:
        """H_kk, H_kv in fp32 (fp64 for a float64 model), the conv buffers in the model dtype."""
        carried = self.H * (self.dk * self.dk + self.dk * self.dv)
        return mixed_nbytes(carried, 2 * (self.conv_size - 1) * self.H * self.dk, dtype)

    def state_formula(self) -> str:
        return (
            f"H·(d_k² + d_k·d_v) + 2·(k−1)·H·d_k = {self.H}·({self.dk}² + "
            f"{self.dk}·{self.dv}) + 2·{self.conv_size - 1}·{self.H}·{self.dk}"
        )

    def state_size(self, seq_len: int) -> int:
        return (
            self.H * (self.dk * self.dk + self.dk * self.dv)
            + 2 * (self.conv_size - 1) * self.H * self.dk
        )

    # ----- features ----------------------------------------------------------------------
    def _features(self, x, state: MesaNetState, step: bool, pad=None):
        """x [..., D] -> q, k [..., H, d_k] (fp32+), v [..., H, d_v], β, log γ [..., H] or
        None, and the new conv buffers (kept in the state's dtype). Padded positions (``pad``)
        get k = 0 and log γ = 0: the statistics pass through them unchanged."""
        conv = (lambda c, u, buf: c.step(u, buf)) if step else (lambda c, u, buf: c(u, buf, pad))
        q, qb = conv(self.q_conv, self.q_proj(x), state.q_conv)
        k, kb = conv(self.k_conv, self.k_proj(x), state.k_conv)
        shape = (*x.shape[:-1], self.H, -1)
        q, k = l2norm(upcast(q.view(shape)), _L2_EPS), l2norm(upcast(k.view(shape)), _L2_EPS)
        v = self.v_proj(x).view(shape)
        beta = log_gamma = None
        if self.use_gates:
            beta = upcast(self.b_proj(x)).sigmoid()
            log_gamma = F.logsigmoid(upcast(self.a_proj(x)))
        if pad is not None:
            k = pad.zero(k)
            log_gamma = None if log_gamma is None else pad.zero(log_gamma)
        return q, k, v, beta, log_gamma, qb.to(state.q_conv.dtype), kb.to(state.k_conv.dtype)

    def _out(self, o):
        o = self.o_norm(o.to(self.o_norm.weight.dtype))  # fp32 norm under autocast
        return self.o_proj(o.reshape(*o.shape[:-2], self.H * self.dv))

    # ----- parallel (chunked) / recurrent ----------------------------------------------------
    def _forward(self, x, state, mask, pad=None):
        q, k, v, beta, lg, qb, kb = self._features(x, state, step=False, pad=pad)
        o, (Hkk, Hkv) = mesa_core(
            q,
            k,
            v,
            beta,
            None,
            self.lam(),
            (state.H_kk, state.H_kv),
            log_gamma=lg,
            chunk_size=self.chunk_size,
            counter=self.fallbacks,
            solver=self.solver,
            cg_tol=self.cg_tol,
            cg_iters=self.cg_iters,
        )
        return self._out(o), MesaNetState(Hkk, Hkv, qb, kb)

    def _step(self, x_t, state, mask):
        q, k, v, beta, lg, qb, kb = self._features(x_t, state, step=True)
        o, (Hkk, Hkv) = mesa_step(
            q,
            k,
            v,
            beta,
            None,
            self.lam(),
            (state.H_kk, state.H_kv),
            log_gamma=lg,
            counter=self.fallbacks,
        )
        return self._out(o), MesaNetState(Hkk, Hkv, qb, kb)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, heads={self.H}, head_dim={self.dk}, "
            f"chunk_size={self.chunk_size}, use_gates={self.use_gates}, solver={self.solver}"
        )
