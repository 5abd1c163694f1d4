"""Mamba-3, SISO and MIMO (Lahoti, Li, Chen, Wang, Bick, Kolter, Dao & Gu, arXiv 2603.15569).

Mamba-3 changes Mamba-2 in three ways: an exponential-trapezoidal (second-order) discretisation,
so each step writes a blend of the current and the previous token; a complex-valued state,
implemented as a data-dependent rotary embedding (RoPE) of B and C whose angles accumulate over
time scaled by Δ; and an optional MIMO form (``mimo_rank=r``): each token writes a rank-r update
Σ_ρ x̃_ρ k_ρᵀ into the same [P, N] state and reads it with r queries, so the state does not grow
while the FLOPs per byte of state do. There is no causal conv1d; B and C get an RMSNorm and a
learned per-head bias; A is data dependent.

The recurrence is specified exactly as the public reference code computes it (read, not copied):
state-spaces/mamba @ e9594ce1 ``tests/ops/triton/test_mamba3_siso.py`` (the plain-PyTorch
ground truth: ``mamba3_siso_step_ref``, lines 34-146, for the recurrence; ``mamba3_siso_fwd_ref``,
lines 262-309, for the chunked form), ``mamba_ssm/ops/triton/mamba3/mamba3_siso_step.py`` (decode
kernel, lines 142-207), ``angle_dt.py`` (angle cumsum, mod 2π per chunk, lines 94-117),
``mamba3_siso_fwd.py`` (prefill kernel), the layer wiring in ``mamba_ssm/modules/mamba3.py`` and
fla-org/flash-linear-attention @ bc3b101d ``fla/layers/mamba3.py``; for MIMO,
``tests/ops/tilelang/test_mamba3_mimo.py`` (``mamba3_MIMO_step_ref`` and
``mamba3_MIMO_chunk_ref``), ``mamba3_mimo_rotary_step.py`` (the halved rotary pairing) and the
MIMO branches of ``modules/mamba3.py`` (in_proj widths, ``mimo_x/z/o`` and their init). Paper
equation numbers are not cited: they could not be checked against the paper's text here.

Glossary (per head h of H = d_in/P; groups g = h // (H/G) share B̃ and C̃; paper → reference):
    [z, x, B̃, C̃, dd_Δ, dd_A, trap, φ̃]_t   in_proj u_t, widths [d_in, d_in, G·N, G·N, H, H, H, R]
                           (the reference order [z, x, B, C, dd_dt, dd_A, trap, angles])
    R                      rotary angles per token, ⌊N·rope_fraction⌋ rounded down to even, / 2
                           (``num_rope_angles``; rope_fraction 0.5 → N/4, 1.0 → N/2 for even N)
    Δ_t > 0                softplus(dd_Δ_t + dt_bias)                                  (DT)
    A_t ≤ −A_floor         min(−softplus(dd_A_t), −A_floor), per head and token (data dependent;
                           ``A_act="heavy_tail"``: −f(dd_A), f(u) = 1+u (u ≥ 0), 1/(1−u) (u < 0),
                           the later upstream stabilisation, commit c69aaab)
    α_t                    exp(Δ_t A_t)                                         (exp(ADT))
    λ_t ∈ (0, 1)           σ(trap_t), the trapezoid gate (λ = 1: exponential-Euler, Mamba-2)
    β_t, γ_t               (1 − λ_t) Δ_t α_t,  λ_t Δ_t                       (beta, gamma)
    φ_t [R]                π·tanh(φ̃_t), one set per token shared by all heads       (Angles)
    θ_t [R] per head       (θ_{t−1} + Δ_t φ_t) mod 2π,  θ_{−1} = carried      (Angle_State)
    B̂_t, Ĉ_t [N]           RMSNorm_N(B̃_{t,g}) ⊙ w_B + B_bias[h],  RMSNorm_N(C̃_{t,g}) ⊙ w_C +
                           C_bias[h]  (norm per group with one weight [N], then the per-head bias)
    Rot(θ)                 rotates the channel pairs (2i, 2i+1), i < R, by θ_i:
                           (u_{2i}, u_{2i+1}) → (u_{2i} cos θ_i − u_{2i+1} sin θ_i,
                                                 u_{2i} sin θ_i + u_{2i+1} cos θ_i);
                           channels 2R..N−1 are not rotated (the reference pads cos = 1, sin = 0)
    k_t, q_t [N]           Rot(θ_t) B̂_t,  Rot(θ_t) Ĉ_t                        (k_rot, q_rot)
    h_t [P, N]             α_t h_{t−1} + β_t x_{t−1} k_{t−1}ᵀ + γ_t x_t k_tᵀ          (SSM_State)
                           x_{−1}, k_{−1} = the carried previous token (zero at the start)
    y_t [P]                h_t q_t + D x_t
    out_t [D]              out_proj(y_t ⊙ SiLU(z_t));  ``outproj_norm=True``:
                           out_proj(RMSNorm_P(y_t) ⊙ w ⊙ SiLU(z_t)), the norm per head (the
                           reference's is_outproj_norm, norm_before_gate=True, group = P)

MIMO (rank r = ``mimo_rank``; ρ < r indexes the rank; reference names in brackets):
    B̃_ρ, C̃_ρ [N]           in_proj widths r·G·N each, laid out (ρ, g, n); one RMSNorm weight [N]
                           for all ranks, biases [H, r, N]                       (Q, K, *_bias)
    x̃_ρ, z̃_ρ [P]           x ⊙ W_x[h, ρ],  z ⊙ W_z[h, ρ];  W_x, W_z, W_o [H, r, P] initialised
                           1/r, 1, 1/r                               (mimo_x, mimo_z, mimo_o)
    k_ρ, q_ρ [N]           Rot½(θ_t) B̂_ρ, Rot½(θ_t) Ĉ_ρ: the same angles for every rank, but the
                           halved pairing (n, n + N/2), n < R, of the MIMO kernels (SISO pairs
                           (2i, 2i+1)); the pairing is a fixed channel permutation of B and C
    h_t [P, N]             α_t h_{t−1} + β_t Σ_ρ x̃_{t−1,ρ} k_{t−1,ρ}ᵀ + γ_t Σ_ρ x̃_{t,ρ} k_{t,ρ}ᵀ
    y_{t,ρ} [P]            h_t q_{t,ρ} + D x̃_{t,ρ}, then the optional RMSNorm_P ⊙ w per (ρ, h)
    out_t                  out_proj(Σ_ρ W_o[h, ρ] ⊙ y_{t,ρ} ⊙ SiLU(z̃_{t,ρ}))
The carried previous token is the raw x_{t−1} [P] (as upstream's v_state) and its r rotated keys.
SISO is the same computation with r = 1 and W_x = W_z = W_o = 1 (no such parameters).

So the trapezoid rule writes the previous token's x kᵀ (rotated by its own θ_{t−1}) with weight
(1 − λ_t)Δ_t, decayed by α_t, and the current one with λ_t Δ_t. Since q_t·k_s rotates by θ_t −
θ_s on each pair, this is a complex diagonal SSM with transition α_t e^{iΔ_t φ_t} per pair.

Chunked form (``mamba3_siso_fwd_ref``), chunk of l rows: with σ_s = (1 − λ_{s+1})Δ_{s+1} (0 after
the last token) the contribution of token s to h_t, t ≥ s, is exp(Σ_{s<r≤t} a_r)(γ_s + σ_s·[s<t])
x_s k_sᵀ, a = ΔA. So it is Mamba-2's SSD (``ssd_chunked``, on the shared stable ``segsum``) with
X_s = (γ_s + σ_s) x_s, B = k, C = q, log-decays a and initial state h_{−1} + (1 − λ_0)Δ_0 x_{−1}
k_{−1}ᵀ, minus the diagonal excess σ_t (q_t·k_t) x_t. The chunk states carry h plus the next
token's trapezoid term (which the next chunk decays correctly); σ = 0 after the last token makes
the returned h exact. The angles are a cumsum of Δφ per chunk plus the carried angle, mod 2π,
the carried angle advanced (mod 2π) chunk by chunk (``angle_dt.py``): a short loop over chunks.

MIMO is the same with a rank axis: the SSD's diagonal blocks pair every rank of token s with every
rank of token t ≥ s (``ssd_chunked`` with B, C, X [.., r, ·]; the decays stay per token, as the
reference's kron(segsum, 1_{r×r}) intra-chunk mask), and the same-token excess is σ_t Σ_ρ'
(q_ρ·k_ρ') x̃_ρ'.

Left padding: Δ = 0 at padded positions (no decay, no write, θ does not advance) and the "previous
token" there is the carried one (x, k of padded positions are replaced by the state's), so the
first real token's trapezoid term reads the carried previous token, as the prompt alone does.

Deviations: the previous x and k are carried in fp32 (fp64 for a float64 model) like h and θ
(the reference caches them in the model dtype); the reference's fused Triton/CuTe kernels are
replaced by the chunked PyTorch form above; the upstream decode path
(``apply_rotary_qk_inference_fwd``) omits the mod 2π that the step reference and prefill kernels
apply: here it is always applied (outputs are identical, only the carried angle differs);
the defaults (P = 32, N = 16) follow kvfree's Mamba-2, not upstream's (headdim 64, d_state 128).

State per layer: H·P·N (h) + H·R (θ) + H·r·N (previous k, r = 1 for SISO) + H·P (previous x),
constant in T. Defaults at d_model = 64: expand 2 (d_in = 128), P = 32 (H = 4), N = 16, G = 1,
rope_fraction 0.5 (R = 4), chunk 64 → 2 048 + 16 + 64 + 128 = 2 256 elements (MIMO r = 4: 2 448).
dt_bias and D skip weight decay; so do W_x, W_z, W_o (per-channel scales, like D).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kvfree import perf
from kvfree.mixers.base import Mixer, formula
from kvfree.mixers.mamba2 import dt_bias_init, ssd_chunked, ssm_heads
from kvfree.state import State, carried_dtype, mixed_nbytes

TWO_PI = 2 * math.pi


@dataclass
class Mamba3State(State):
    angle: torch.Tensor  # θ [B, H, R]
    ssm: torch.Tensor  # h [B, H, P, N]
    k: torch.Tensor  # previous rotated k [B, H, N] (MIMO: [B, H, r, N])
    x: torch.Tensor  # previous x [B, H, P]


def wrap_angle(t: torch.Tensor) -> torch.Tensor:
    """t mod 2π in [0, 2π) as the reference writes it (t − 2π⌊t/2π⌋; gradient 1)."""
    return t - TWO_PI * torch.floor(t / TWO_PI)


def rotate_pairs(u: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs (u_{2i}, u_{2i+1}), i < R, of u [..., N] by θ [..., R]; the channels
    from 2R on are unchanged."""
    R = theta.shape[-1]
    pairs = u[..., : 2 * R].unflatten(-1, (R, 2))
    u0, u1 = pairs[..., 0], pairs[..., 1]
    cos, sin = theta.cos(), theta.sin()
    rot = torch.stack((u0 * cos - u1 * sin, u0 * sin + u1 * cos), -1).flatten(-2)
    return torch.cat((rot, u[..., 2 * R :]), -1)


def rotate_halves(u: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs (u_n, u_{n+N/2}), n < R, of u [..., N] (N even) by θ [..., R]: the MIMO
    kernels' pairing; the other channels are unchanged."""
    R, half = theta.shape[-1], u.shape[-1] // 2
    u0, u1 = u[..., :R], u[..., half : half + R]
    cos, sin = theta.cos(), theta.sin()
    return torch.cat(
        (u0 * cos - u1 * sin, u[..., R:half], u0 * sin + u1 * cos, u[..., half + R :]), -1
    )


def rotary_angles(dphi: torch.Tensor, theta0: torch.Tensor, chunk_size: int):
    """θ_t = (θ_{t−1} + Δ_t φ_t) mod 2π for increments dphi [b, T, H, R] from θ0 [b, H, R]:
    a cumsum inside each chunk plus the carried angle, wrapped, the carried angle wrapped after
    each chunk (a short loop over chunks). Returns θ [b, T, H, R] and the final angle."""
    T = dphi.shape[1]
    outs, theta = [], theta0
    for s in range(0, T, chunk_size):
        local = dphi[:, s : s + chunk_size].cumsum(1)
        outs.append(wrap_angle(theta.unsqueeze(1) + local))
        theta = wrap_angle(theta + local[:, -1])
    return torch.cat(outs, 1), theta


def mamba3_scan(x, k, q, a, delta, lam, h0, x_prev, k_prev, chunk_size: int):
    """The recurrence h_t = α_t h_{t−1} + (1−λ_t)Δ_t α_t x_{t−1} k_{t−1}ᵀ + λ_t Δ_t x_t k_tᵀ,
    y_t = h_t q_t, in chunked form. SISO: x [b, T, H, P]; k, q [b, T, H, N] (rotated, biased);
    x_prev [b, H, P] and k_prev [b, H, N] the token before x[:, 0]. MIMO: a rank axis r before
    the last (x [b, T, H, r, P], k, q [b, T, H, r, N], x_prev [b, H, r, P], k_prev [b, H, r,
    N]); every x kᵀ is then Σ_ρ x_ρ k_ρᵀ and y_ρ = h q_ρ. a [b, T, H] log-decays Δ·A; delta,
    lam [b, T, H]; h0 [b, H, P, N]. Returns y (x's shape, without the D skip) and h_T."""
    if x.dim() == 4:  # SISO: a rank axis of one
        ranked = (t.unsqueeze(-2) for t in (x, k, q, x_prev, k_prev))
        x1, k1, q1, xp1, kp1 = ranked
        y, h = mamba3_scan(x1, k1, q1, a, delta, lam, h0, xp1, kp1, chunk_size)
        return y.squeeze(-2), h
    gamma = lam * delta
    prev_w = (1 - lam) * delta  # weight of the previous token's x kᵀ written at t (before α_t)
    sigma = F.pad(prev_w[:, 1:], (0, 0, 0, 1))  # σ_s = prev_w_{s+1}, 0 after the last token
    h0 = h0 + prev_w[:, 0, :, None, None] * torch.einsum("bhrp,bhrn->bhpn", x_prev, k_prev)
    y, h = ssd_chunked(x * (gamma + sigma)[..., None, None], a, k, q, h0, chunk_size)
    # the same token's r × r block carries γ_t only: remove its σ_t part
    same = torch.einsum("bthrn,bthsn->bthrs", q, k) * sigma[..., None, None]
    return y - torch.einsum("bthrs,bthsp->bthrp", same, x), h


def heavy_tail(u: torch.Tensor) -> torch.Tensor:
    """f(u) = 1 + u for u ≥ 0, 1/(1 − u) for u < 0 (positive, C¹ at 0)."""
    return u.clamp_min(0) + torch.reciprocal(1 - u.clamp_max(0))


class Mamba3(Mixer):
    """Mamba-3 layer: h_t = α_t h_{t−1} + (1−λ_t)Δ_t α_t x_{t−1} k_{t−1}ᵀ + λ_t Δ_t x_t k_tᵀ,
    y_t = h_t q_t + D x_t, out_t = out_proj(y_t ⊙ SiLU(z_t)), with k, q = data-dependent RoPE
    (angles Σ Δ·π tanh(φ̃)) of RMSNorm'd, biased B and C, α_t = exp(Δ_t A_t), A_t =
    min(−softplus(dd_A), −A_floor), λ_t = σ(trap_t). ``mimo_rank=r``: the MIMO form, r keys,
    values and queries per token (rank-r writes and reads of the same state). Full glossary in
    the module docstring."""

    name = "mamba3"
    supports_padding = True

    def __init__(
        self,
        d_model: int,
        *,
        expand: int = 2,
        head_dim: int = 32,
        d_state: int = 16,
        ngroups: int = 1,
        rope_fraction: float = 0.5,
        chunk_size: int = 64,
        A_floor: float = 1e-4,
        A_act: str = "softplus",
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_floor: float = 1e-4,
        outproj_norm: bool = False,
        norm_eps: float = 1e-5,
        mimo_rank: int | None = None,
    ):
        super().__init__(d_model)
        d_in, H = ssm_heads(d_model, expand, head_dim, ngroups)
        if d_state <= 0 or chunk_size <= 0:
            raise ValueError(
                f"d_state and chunk_size must be positive, got {d_state}, {chunk_size}"
            )
        if rope_fraction not in (0.5, 1.0):
            raise ValueError(f"rope_fraction must be 0.5 or 1.0, got {rope_fraction}")
        rotary = int(d_state * rope_fraction)
        rotary -= rotary % 2
        if rotary < 2:
            raise ValueError(
                f"d_state·rope_fraction = {d_state}·{rope_fraction} gives no rotary pair; "
                "raise d_state"
            )
        if A_act not in ("softplus", "heavy_tail"):
            raise ValueError(f"A_act must be 'softplus' or 'heavy_tail', got {A_act!r}")
        if A_floor < 0:
            raise ValueError(f"A_floor must be >= 0, got {A_floor}")
        if mimo_rank is not None and (
            not isinstance(mimo_rank, int) or mimo_rank < 1 or d_state % 2
        ):
            raise ValueError(
                f"mimo_rank must be a positive integer (None: SISO) with an even d_state, got "
                f"mimo_rank={mimo_rank!r}, d_state={d_state}"
            )
        self.d_in, self.H, self.P, self.N, self.G = d_in, H, head_dim, d_state, ngroups
        self.R = rotary // 2
        self.mimo_rank, self.r = mimo_rank, mimo_rank or 1
        self.rotate = rotate_pairs if mimo_rank is None else rotate_halves
        self.rope_fraction, self.chunk_size, self.eps = rope_fraction, chunk_size, norm_eps
        self.A_floor, self.A_act, self.outproj_norm = A_floor, A_act, outproj_norm
        GN = self.r * ngroups * d_state
        self.split_sizes = [d_in, d_in, GN, GN, H, H, H, self.R]
        self.in_proj = nn.Linear(d_model, sum(self.split_sizes), bias=False)
        self.dt_bias = nn.Parameter(dt_bias_init(H, dt_min, dt_max, dt_floor))
        self.D = nn.Parameter(torch.ones(H))
        no_decay = [self.dt_bias, self.D]
        self.B_norm_weight = nn.Parameter(torch.ones(d_state))
        self.C_norm_weight = nn.Parameter(torch.ones(d_state))
        bias_shape = (H, d_state) if mimo_rank is None else (H, mimo_rank, d_state)
        self.B_bias = nn.Parameter(torch.ones(bias_shape))
        self.C_bias = nn.Parameter(torch.ones(bias_shape))
        if mimo_rank is not None:
            self.mimo_x = nn.Parameter(torch.full((H, mimo_rank, head_dim), 1 / mimo_rank))
            self.mimo_z = nn.Parameter(torch.ones(H, mimo_rank, head_dim))
            self.mimo_o = nn.Parameter(torch.full((H, mimo_rank, head_dim), 1 / mimo_rank))
            no_decay += [self.mimo_x, self.mimo_z, self.mimo_o]
        for p in no_decay:
            p._no_weight_decay = True
        if outproj_norm:
            self.norm_weight = nn.Parameter(torch.ones(d_in))
        self.out_proj = nn.Linear(d_in, d_model, bias=False)

    # ----- state -------------------------------------------------------------------------
    def init_state(self, batch, *, device=None, dtype=None):
        z = dict(device=device, dtype=carried_dtype(dtype))
        H, k = self.H, (self.N,) if self.mimo_rank is None else (self.r, self.N)
        return Mamba3State(
            torch.zeros(batch, H, self.R, **z),
            torch.zeros(batch, H, self.P, self.N, **z),
            torch.zeros(batch, H, *k, **z),
            torch.zeros(batch, H, self.P, **z),
        )

    def _carried(self) -> int:
        H, P, N = self.H, self.P, self.N
        return H * P * N + H * self.R + H * self.r * N + H * P

    def state_nbytes(self, seq_len: int, dtype: torch.dtype = torch.float32) -> int:
        """All four tensors in fp32 (fp64 for a float64 model)."""
        return mixed_nbytes(self._carried(), 0, dtype)

    def state_formula(self) -> str:
        H, P, N, R, r = self.H, self.P, self.N, self.R, self.r
        k = ("H·N", f"{H}·{N}") if self.mimo_rank is None else ("H·r·N", f"{H}·{r}·{N}")
        return formula(
            ("H·P·N", f"{H}·{P}·{N}", "SSM state h"),
            ("H·R", f"{H}·{R}", "rotary angles θ"),
            (*k, "previous rotated B"),
            ("H·P", f"{H}·{P}", "previous x, for the trapezoid"),
        )

    def state_size(self, seq_len: int) -> int:
        return self._carried()

    def extra_repr(self) -> str:
        mimo = "" if self.mimo_rank is None else f", mimo_rank={self.mimo_rank}"
        return (
            f"d_model={self.d_model}, d_in={self.d_in}, heads={self.H}, P={self.P}, "
            f"N={self.N}, G={self.G}, rope_angles={self.R}, chunk_size={self.chunk_size}{mimo}"
        )

    # ----- shared pieces (a rank axis r throughout; r = 1 for SISO) -------------------------
    def _inputs(self, proj, cdt):
        """in_proj output [..., d_proj] -> z [..., d_in], x [..., H, P], B̂, Ĉ [..., H, r, N]
        (normed, biased, not rotated), Δ, A, λ [..., H], φ [..., R] (π tanh), all in cdt."""
        z, x, B, C, dd_dt, dd_A, trap, ang = (t.to(cdt) for t in perf.split(proj, self.split_sizes))
        lead = x.shape[:-1]
        x = x.reshape(*lead, self.H, self.P)
        B, C = (t.reshape(*lead, self.r, self.G, self.N) for t in (B, C))
        B = F.rms_norm(B, (self.N,), self.B_norm_weight.to(cdt), self.eps)
        C = F.rms_norm(C, (self.N,), self.C_norm_weight.to(cdt), self.eps)
        if self.G != self.H:  # head h reads group h // (H/G)
            B, C = (t.repeat_interleave(self.H // self.G, dim=-2) for t in (B, C))
        B, C = B.transpose(-3, -2), C.transpose(-3, -2)  # [..., H, r, N]
        B = B + self.B_bias.to(cdt).view(self.H, self.r, self.N)
        C = C + self.C_bias.to(cdt).view(self.H, self.r, self.N)
        delta = F.softplus(dd_dt + self.dt_bias.to(cdt))
        act = F.softplus(dd_A) if self.A_act == "softplus" else heavy_tail(dd_A)
        A = (-act).clamp(max=-self.A_floor)
        return z, x, B, C, delta, A, torch.sigmoid(trap), math.pi * torch.tanh(ang)

    def _up(self, x, W):
        """x [..., H, P] -> the rank copies [..., H, r, P] (x ⊙ W[h, ρ]; SISO: x itself)."""
        return x.unsqueeze(-2) if self.mimo_rank is None else x.unsqueeze(-2) * W.to(x.dtype)

    def _finish(self, y, xr, z, x_in):
        """D skip, optional per-head RMSNorm, SiLU(z̃) gate, sum over the ranks (⊙ W_o):
        y, xr [..., H, r, P] -> [..., d_in]."""
        y = y + self.D.to(y.dtype)[:, None, None] * xr
        if self.outproj_norm:
            w = self.norm_weight.to(y.dtype).view(self.H, 1, self.P)
            y = F.rms_norm(y, (self.P,), eps=self.eps) * w
        zr = self._up(z.unflatten(-1, (self.H, self.P)), getattr(self, "mimo_z", None))
        y = y * F.silu(zr)
        y = y.squeeze(-2) if self.mimo_rank is None else (y * self.mimo_o.to(y.dtype)).sum(-2)
        return y.flatten(-2).to(x_in.dtype)

    def _k_state(self, k):
        """Rotated keys [..., H, r, N] as the state keeps them (SISO: [..., H, N])."""
        return k.squeeze(-2) if self.mimo_rank is None else k

    # ----- parallel (chunked) ---------------------------------------------------------------
    def _forward(self, x_in, state, mask, pad=None):
        proj = self.in_proj(x_in)
        cdt = carried_dtype(x_in.dtype)
        W_x = getattr(self, "mimo_x", None)
        with torch.autocast(x_in.device.type, enabled=False):
            z, x, B, C, delta, A, lam, phi = self._inputs(proj, cdt)
            if pad is not None:  # Δ = 0 at padding: no decay, no write, θ stays
                delta = pad.zero(delta)
            dphi = delta.unsqueeze(-1) * phi.unsqueeze(-2)  # [b, T, H, R]
            theta, theta_T = rotary_angles(dphi, state.angle.to(cdt), self.chunk_size)
            k = self.rotate(B, theta.unsqueeze(-2))
            q = self.rotate(C, theta.unsqueeze(-2))
            x_prev = state.x.to(cdt)
            k_prev = state.k.to(cdt).view(*state.k.shape[:2], self.r, self.N)
            if pad is not None:  # a padded position passes the carried previous token on
                m = pad.mask[:, :, None, None]
                x = torch.where(m, x_prev.unsqueeze(1), x)
                k = torch.where(m[..., None], k_prev.unsqueeze(1), k)
            xr = self._up(x, W_x)
            y, h = mamba3_scan(
                xr, k, q, delta * A, delta, lam, state.ssm.to(cdt), self._up(x_prev, W_x),
                k_prev, self.chunk_size,
            )  # fmt: skip
            y = self._finish(y, xr, z, x_in)
        return self.out_proj(y), self._state(state, theta_T, h, self._k_state(k[:, -1]), x[:, -1])

    # ----- recurrent -------------------------------------------------------------------------
    def _step(self, x_t, state, mask):
        proj = self.in_proj(x_t)
        cdt = carried_dtype(x_t.dtype)
        W_x = getattr(self, "mimo_x", None)
        with torch.autocast(x_t.device.type, enabled=False):
            z, x, B, C, delta, A, lam, phi = self._inputs(proj, cdt)  # x [b, H, P], B [b, H, r, N]
            theta = wrap_angle(state.angle.to(cdt) + delta.unsqueeze(-1) * phi.unsqueeze(-2))
            k, q = self.rotate(B, theta.unsqueeze(-2)), self.rotate(C, theta.unsqueeze(-2))
            k_prev = state.k.to(cdt).view(*state.k.shape[:2], self.r, self.N)
            alpha = (delta * A).exp()
            beta = (1 - lam) * delta * alpha
            gamma = lam * delta
            xr = self._up(x, W_x)
            h = (
                alpha[..., None, None] * state.ssm.to(cdt)
                + torch.einsum("bh,bhrp,bhrn->bhpn", beta, self._up(state.x.to(cdt), W_x), k_prev)
                + torch.einsum("bh,bhrp,bhrn->bhpn", gamma, xr, k)
            )
            y = torch.einsum("bhpn,bhrn->bhrp", h, q)
            y = self._finish(y, xr, z, x_t)
        return self.out_proj(y), self._state(state, theta, h, self._k_state(k), x)

    @staticmethod
    def _state(old, angle, ssm, k, x):
        """The new state, in the dtypes of the old one."""
        return Mamba3State(
            angle.to(old.angle.dtype), ssm.to(old.ssm.dtype), k.to(old.k.dtype), x.to(old.x.dtype)
        )
