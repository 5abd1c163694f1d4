"""Fan scan: the wave component of the Fan Duality Model (arXiv 2604.07716; docs/fdm.md §2).

Glossary (token t, 0-based; D = d_model; docs/fdm.md section in brackets):
    x̂_t   [D]    input of the score path (LN_x(x_t) inside the FDM block, x_t standalone)
    c_t    [D]    CausalConv(x̂_{t-k+1..t}), kernel k = 4, groups D/64, bias      [§2.1.2]
    β_t    ℝ      MLP_β(tanh c_t): D → D/4 → SiLU → D/8 → SiLU → 1               [§2.1.3]
    π_t    ℝ      W_pos·[sin(πt/(T_train−1)), cos(πt/(T_train−1))] + b_pos, T_train fixed
                  (1024) so an output never depends on the total length          [§2.1.4, §4.1]
    s_t    ℝ      s_eff = π_t + β_t·ln(t + 2)  (also the cache's landmark score)   [§2.1.5]
    p_t    ℝ      write rate ½σ(s_t + μ) + 1e-4 ∈ (1e-4, 0.5001)                   [§2.1.6]
    x̃_t   [D]    input of the scan (LN_1(x_t) inside the FDM block, x_t standalone)
    θ_t    [D]    Rot(W_θ x̃_t + b_θ; φ_t), φ_t = W_φ x̃_t + b_φ ∈ ℝ⁴ (``givens_t``)   [§2.2]
    u_t    ℂ^D    (W_r x̃_t + b_r) + i(W_i x̃_t + b_i)                              [§2.3]
    A_t    ℂ^D    (1 − p_t)·e^{iθ_t}
    h¹_t   ℂ^D    A_t ⊙ h¹_{t−1} + p_t u_t                          (pass 1)
    δ_t    [D]    Rot′(Re h¹_t; φ′_t) − Re h¹_t, φ′_t from ``givens_h``; ≠ 0 in coords < 8
    h²_t   ℂ^D    A_t ⊙ h²_{t−1} + p_t (u_t + σ(g) δ_t)             (pass 2; g = ``delta_gate``)
    y_t    [D]    Re h²_t                                            (the wave output)

Score modes (``score``):
    "fdm"        the LM's s_eff / p_t above;
    "mean_p"     the MQAR FDM (docs/fdm.md §8.2): p_t = mean_c σ(W_p x̂_t)_c (bias −2), s_t = p_t;
    "channel_p"  the MQAR "scan only" network: per-channel p_t = σ(W_p x̂_t) ∈ ℝ^D, s_t = mean.
``passes=1`` drops pass 2 (y = Re h¹); ``givens_planes=0`` makes θ = W_θ x̃ directly.

Parallel form: two chunked complex scans (``fdm_scan.complex_scan``, log space inside a chunk,
log-depth scan across chunks); pass 2 needs pass 1's output, so they run one after the other.
Recurrent form: both complex states plus the conv buffer. State per layer (real elements):
4D (two complex states; 2D with one pass) + (k−1)·D (conv buffer, score "fdm" only).

Parameter names match the original's ``--freeze_wave`` list (docs/fdm.md §6): ``W_theta``, ``W_r``,
``W_i``, ``W_beta``, ``givens_t``, ``givens_h``, ``delta_gate``, ``causal_conv``. The position
term and μ live in ``shared`` (one per model: the FDM block ties it across layers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kvfree.mixers.base import Mixer, formula, grow_padding
from kvfree.mixers.fdm_scan import (
    GivensRotation,
    GroupedCausalConv,
    complex_scan,
    complex_step,
    position_features,
    real_dtype,
)
from kvfree.state import RowInts, State

SCORES = ("fdm", "mean_p", "channel_p")
P_FLOOR = 1e-4  # docs/fdm.md §2.1.6
P_CEIL = 1 - 1e-6  # keeps log(1 − p) finite in the MQAR modes (σ can round to 1)


@dataclass
class FanState(State):
    h1: torch.Tensor  # [B, 2, D] pass-1 state (real, imag)
    h2: torch.Tensor | None  # [B, 2, D] pass-2 state, None with one pass
    conv: torch.Tensor | None  # [B, k-1, D] last k-1 score inputs, None without the conv
    pos: int = 0  # tokens seen, padding included (metadata)
    pad: RowInts | None = None  # leading padding per row (metadata): positions are per row


def _linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` in x's dtype (the score path runs in fp32 even for a bf16 model)."""
    return F.linear(x, layer.weight.to(x.dtype), layer.bias.to(x.dtype))


class ScoreBias(nn.Module):
    """The parts of s_eff / p shared by all layers of one model: the position term
    ``W_pos`` (Linear(2→1)) and the global offset ``mu`` (docs/fdm.md §2.1.4, §2.1.6)."""

    def __init__(self):
        super().__init__()
        self.W_pos = nn.Linear(2, 1)
        self.mu = nn.Parameter(torch.tensor(-2.0))


class FanScan(Mixer):
    """FDM's wave component: a two-pass complex recurrence h_t = A_t ⊙ h_{t−1} + p_t u_t with
    A_t = (1 − p_t) e^{iθ_t}, write rate p_t = ½σ(s_t + μ) + 1e-4 from the score s_eff, Givens
    phases θ_t, output y_t = Re h²_t (docs/fdm.md §2.1–§2.3). Full glossary in the module
    docstring."""

    name = "fan"
    supports_padding = True

    def __init__(
        self,
        d_model: int,
        *,
        score: str = "fdm",
        passes: int = 2,
        givens_planes: int = 4,
        conv_kernel: int = 4,
        conv_group_size: int = 64,
        t_train: int = 1024,
        position_term: bool = True,
        chunk_size: int = 32,
        init: str = "effective",
        init_std: float = 0.02,
    ):
        super().__init__(d_model)
        if score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {score!r}")
        if passes not in (1, 2):
            raise ValueError(f"passes must be 1 or 2, got {passes}")
        if init not in ("effective", "intended"):
            raise ValueError(
                f"init must be 'effective' (the released code's) or 'intended' "
                f"(W_pos = 0), got {init!r}"
            )
        if t_train < 2 or chunk_size < 1:
            raise ValueError("t_train must be >= 2 and chunk_size >= 1")
        D = d_model
        self.score_mode, self.passes, self.chunk_size = score, passes, chunk_size
        self.t_train, self.position_term = t_train, position_term
        self.W_theta = nn.Linear(D, D)
        self.W_r = nn.Linear(D, D)
        self.W_i = nn.Linear(D, D)
        self.givens_t = GivensRotation(D, givens_planes) if givens_planes else None
        self.givens_h = GivensRotation(D, givens_planes) if givens_planes and passes == 2 else None
        self.delta_gate = nn.Parameter(torch.zeros(())) if passes == 2 else None
        self.causal_conv = self.W_beta = self.shared = self.W_p = None
        if score == "fdm":
            self.causal_conv = GroupedCausalConv(D, conv_kernel, conv_group_size)
            h1, h2 = max(1, D // 4), max(1, D // 8)
            self.W_beta = nn.Sequential(
                nn.Linear(D, h1), nn.SiLU(), nn.Linear(h1, h2), nn.SiLU(), nn.Linear(h2, 1)
            )
            self.shared = ScoreBias()
        else:
            self.W_p = nn.Linear(D, D)
        self._init(init, init_std)

    def _init(self, init: str, std: float) -> None:
        """docs/fdm.md §8.1: Linear weights N(0, std), biases 0, μ = −2, g = 0; W_p bias −2.
        ``intended`` also zeroes W_pos (the released code's global init overwrote that)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
                nn.init.zeros_(m.bias)
        if self.W_p is not None:
            nn.init.constant_(self.W_p.bias, -2.0)
        if self.shared is not None and init == "intended":
            nn.init.zeros_(self.shared.W_pos.weight)

    def share(self, shared: ScoreBias) -> None:
        """Use another layer's position term and μ (kept as a plain reference, so it is not
        registered twice; see ``FDMBlock.tie_layers``)."""
        if self.shared is None:
            raise ValueError("only score='fdm' has a position term and μ to share")
        del self._modules["shared"]
        object.__setattr__(self, "shared", shared)

    # ----- state -------------------------------------------------------------------------
    @property
    def conv_len(self) -> int:
        return self.causal_conv.kernel_size - 1 if self.causal_conv is not None else 0

    def init_state(self, batch, *, device=None, dtype=None):
        rdt = real_dtype(dtype or torch.float32)
        D = self.d_model
        h = lambda: torch.zeros(batch, 2, D, device=device, dtype=rdt)  # noqa: E731
        conv = (
            torch.zeros(batch, self.conv_len, D, device=device, dtype=rdt)
            if self.causal_conv is not None
            else None
        )  # the score path runs in fp32
        return FanState(h(), h() if self.passes == 2 else None, conv, 0)

    def state_formula(self) -> str:
        return formula(*self.formula_terms())

    def formula_terms(self) -> list[tuple[str, str, str]]:
        D, k1, n = self.d_model, self.conv_len, 2 * self.passes
        terms = [(f"{n}·D", f"{n}·{D}", "complex states")]
        return terms + ([("(k−1)·D", f"{k1}·{D}", "conv buffer")] if k1 else [])

    def state_size(self, seq_len: int) -> int:
        return (2 * self.passes + self.conv_len) * self.d_model

    def state_nbytes(self, seq_len: int, dtype: torch.dtype = torch.float32) -> int:
        """The scan state is kept in fp32 (fp64 for a float64 model) whatever the model dtype."""
        return self.state_size(seq_len) * torch.empty((), dtype=real_dtype(dtype)).element_size()

    # ----- score path: s_t and p_t ---------------------------------------------------------
    def _positions(self, pos: int, T: int, device, dtype, rows=None) -> torch.Tensor:
        """Text positions [T] (or [B, T]: each row's own, its leading padding ``rows`` not
        counted; padding itself reads position 0)."""
        t = torch.arange(pos, pos + T, device=device, dtype=dtype)
        if rows is None:
            return t
        return (t - torch.tensor(rows, device=device, dtype=dtype)[:, None]).clamp_min(0)

    def score_parallel(self, xh, conv, pos: int, pad=None, rows=None):
        """x̂ [B, T, D] → (s [B, T], p [B, T, 1 | D], conv buffer'). fp32 with autocast off
        (the score decides a discrete selection; bf16 would make it unstable). ``pad`` (this
        chunk's :class:`~kvfree.mixers.base.Padding`): p = 0 there and the conv reads zeros;
        ``rows``: leading padding per row so far (positions)."""
        rdt = real_dtype(xh.dtype)
        with torch.autocast(xh.device.type, enabled=False):
            xh = xh.to(rdt) if pad is None else pad.zero(xh.to(rdt))
            if self.score_mode == "fdm":
                c, conv = self.causal_conv(xh, conv)
                s = self._s_eff(c, self._positions(pos, xh.shape[1], xh.device, rdt, rows))
                p = self._p_of(s).unsqueeze(-1)
            else:
                s, p = self._p_mqar(xh)
        return s, p if pad is None else pad.zero(p), conv

    def score_step(self, xh_t: torch.Tensor, conv: torch.Tensor | None, pos: int, rows=None):
        """x̂_t [B, D] → (s [B], p [B, 1 | D], conv buffer')."""
        rdt = real_dtype(xh_t.dtype)
        with torch.autocast(xh_t.device.type, enabled=False):
            xh_t = xh_t.to(rdt)
            if self.score_mode == "fdm":
                c, conv = self.causal_conv.step(xh_t, conv)
                s = self._s_eff(c, self._positions(pos, 1, xh_t.device, rdt, rows)[..., 0])
                p = self._p_of(s).unsqueeze(-1)
            else:
                s, p = self._p_mqar(xh_t)
        return s, p, conv

    def _s_eff(self, c: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(c)
        for layer in self.W_beta:
            h = _linear(layer, h) if isinstance(layer, nn.Linear) else layer(h)
        s = h.squeeze(-1) * torch.log(t + 2.0)  # β_t·ln(t + 2), [B, T] or [B]
        if self.position_term:
            s = s + _linear(self.shared.W_pos, position_features(t, self.t_train)).squeeze(-1)
        return s

    def _p_of(self, s: torch.Tensor) -> torch.Tensor:
        return 0.5 * torch.sigmoid(s + self.shared.mu.to(s.dtype)) + P_FLOOR

    def _p_mqar(self, xh: torch.Tensor):
        g = torch.sigmoid(_linear(self.W_p, xh)).clamp(max=P_CEIL)  # [..., D]
        if self.score_mode == "mean_p":
            p = g.mean(-1, keepdim=True)
            return p[..., 0], p
        return g.mean(-1), g

    # ----- the two-pass complex recurrence ------------------------------------------------------
    def _drive(self, xt: torch.Tensor, p: torch.Tensor):
        """θ, u = (u_re, u_im), log(1 − p) and the pass-2 angles φ′ from x̃ (any leading
        shape), in the scan dtype (projections may run under autocast; the scan does not)."""
        rdt = real_dtype(xt.dtype)
        a = self.W_theta(xt)
        theta = (self.givens_t(a, xt) if self.givens_t is not None else a).to(rdt)
        u = (self.W_r(xt).to(rdt), self.W_i(xt).to(rdt))
        la = torch.log1p(-p.to(rdt))  # log(1 − p_t)
        phi_h = self.givens_h.angles(xt).to(rdt) if self.passes == 2 else None
        return theta, u, la, phi_h

    def _delta(self, y1: torch.Tensor, phi_h: torch.Tensor) -> torch.Tensor:
        """σ(g)·(Rot′(y¹; φ′) − y¹), non-zero only in the first 2P coordinates."""
        P2 = 2 * self.givens_h.planes
        rot = self.givens_h.rotate(y1[..., :P2], phi_h)
        d = torch.cat([rot - y1[..., :P2], torch.zeros_like(y1[..., P2:])], dim=-1)
        return torch.sigmoid(self.delta_gate).to(d.dtype) * d

    def mix_parallel(self, xt: torch.Tensor, p: torch.Tensor, state: FanState, pad=None):
        """x̃ [B, T, D], p [B, T, 1 | D] → (y [B, T, D] = Re h², new h¹, new h²). At padding
        (``pad``; p = 0 from the score path) θ = 0 too: A = 1, nothing written."""
        rdt = real_dtype(xt.dtype)
        theta, (u_re, u_im), la, phi_h = self._drive(xt, p)
        if pad is not None:
            theta = pad.zero(theta)
        with torch.autocast(xt.device.type, enabled=False):
            pr = p.to(rdt)
            b_im = pr * u_im
            y, h1 = complex_scan(pr * u_re, b_im, la, theta, state.h1.to(rdt), self.chunk_size)
            h2 = None
            if self.passes == 2:
                d = self._delta(y, phi_h)
                y, h2 = complex_scan(
                    pr * (u_re + d), b_im, la, theta, state.h2.to(rdt), self.chunk_size
                )
        return y.to(xt.dtype), h1, h2

    def mix_step(self, xt: torch.Tensor, p: torch.Tensor, state: FanState):
        """x̃_t [B, D], p [B, 1 | D] → (y_t [B, D], new h¹, new h²)."""
        rdt = real_dtype(xt.dtype)
        theta, (u_re, u_im), la, phi_h = self._drive(xt, p)
        with torch.autocast(xt.device.type, enabled=False):
            pr = p.to(rdt)
            b_im = pr * u_im
            h1 = complex_step(state.h1.to(rdt), pr * u_re, b_im, la, theta)
            y, h2 = h1[:, 0], None
            if self.passes == 2:
                d = self._delta(y, phi_h)
                h2 = complex_step(state.h2.to(rdt), pr * (u_re + d), b_im, la, theta)
                y = h2[:, 0]
        return y.to(xt.dtype), h1, h2

    # ----- the mixer contract (standalone: x̂ = x̃ = the block's normed input) -------------------
    def _forward(self, x, state, mask, pad=None):
        rows = grow_padding(state.pad, state.pos, pad, type(self).__name__)
        _, p, conv = self.score_parallel(x, state.conv, state.pos, pad, rows)
        y, h1, h2 = self.mix_parallel(x, p, state, pad)
        return y, FanState(h1, h2, conv, state.pos + x.shape[1], rows)

    def _step(self, x_t, state, mask):
        _, p, conv = self.score_step(x_t, state.conv, state.pos, state.pad)
        y, h1, h2 = self.mix_step(x_t, p, state)
        return y, FanState(h1, h2, conv, state.pos + 1, state.pad)
