"""Spectral Koopman Attention (Sridhar & Johansen, *Echo*, arXiv 2605.06997; docs/ska.md).

Glossary (per head h; paper notation → code):
    z_t, q_t  [r]      W_K h_t, W_Q h_t (orthogonal init, own projections, §3.2.1)   ``k_proj``
    v_t       [P]      W_V h_t (Xavier)                                              ``v_proj``
    ẑ_t, q̂_t          ℓ2-normalised (default, causal) or divided by the sequence max m (paper
                       App. E, non-causal: only in ``prefix``/``masked`` modes)
    conv               optional short causal depthwise conv (kernel ``conv_size``, SiLU) on the
                       z, q, v projections — *not in the paper*; GDN and MesaNet have one (the
                       ridge study, docs/ska.md §19): a shift before the memory, off in the recipe
    β_t                optional write gate σ(w_β·h_t + b_β) (w zero init, b = ``beta_bias_init``:
                       0 → 0.5), times the mask
    G̃ = εI + Σ β ẑẑᵀ   key Gram (eq. 4), state ``G`` holds the sum without εI
    M = Σ ω_t ẑ_t ẑ_{t−1}ᵀ   lag-one cross-covariance (eq. 5)
    C = Σ β v ẑᵀ       value–key covariance C_v (eq. 6) [P, r]
    A_w = L⁻¹ M L⁻ᵀ    whitened Koopman operator, G̃ = L Lᵀ (fp32 Cholesky, jitter fallback)
    c = γ / max(1, σ̂)  spectral normalisation, σ̂ = detached 6-step power iteration (App. D);
                       γ = clamp(γ_raw, 1, γ_max) the SSN gain (App. D.3)
    ŷ = η C L⁻ᵀ (c A_w)^K L⁻¹ q̂ = η c^K C (G̃⁻¹M)^K G̃⁻¹ q̂   (§3.2, K = 2; K = 0 is ridge)
    out = W_O concat_h ŷ   (W_O zero-initialised, §3.2.3)

Modes (docs/ska.md §5, §11); every mode has a parallel and a recurrent form that agree:
    ``token``   position t reads the statistics of tokens ≤ t (one Cholesky per token).
    ``chunk``   position t reads everything in strictly earlier chunks of S tokens (paper eqs.
                7–10); chunk 0 outputs 0. Decoder: committed + pending statistics, committed at
                chunk boundaries.
    ``prefix`` / ``masked``  one operator per sequence from the tokens the mask selects, applied
                to every position (eqs. 4–6). Non-causal: parallel = recurrent only after the last
                mask = 1 token. Without a mask the decoder only reads (frozen operator).
In ``token``/``chunk`` modes a mask is a causal binary write gate (β in sqrt mode).

State per head (floats): ``token``/``prefix``/``masked`` 2r² + Pr + r + 1 (G, M, C, the previous
write key, and one scalar: the position, or m under ``seqmax``); ``chunk`` adds the pending
G, M, C of the open chunk: 2(2r² + Pr) + r + 1; a conv adds its buffer (k−1)(2r + P). Decode
costs O(r³ + Pr) per head and token (the operator is refactorised every step; no cache is
carried beyond the counted state).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kvfree.blocks import CausalConv1d
from kvfree.linalg import FallbackCounter, fp32_island, upcast
from kvfree.mixers import ska_core as core
from kvfree.mixers.base import Mixer, head_width
from kvfree.state import State
from kvfree.utils import unknown_keys_error

MODES = ("token", "chunk", "prefix", "masked")
_ALIASES = {"token_causal": "token", "chunk_causal": "chunk"}
CAUSAL_MODES = ("token", "chunk")

#: Option sets for the ablations the benchmarks use (merged into the SKA options).
ABLATIONS: dict[str, dict] = {
    "full": {},
    "ridge": {"K": 0},  # K = 0: pure ridge readout η C G̃⁻¹ q̂
    "no_specnorm": {"spectral_norm": False},
    "no_gain": {"use_gain": False},  # γ ≡ 1
    "no_mask": {"mode": "chunk"},  # the headline, causal
    "no_mask_token": {"mode": "token"},
    "prefix_mask": {"mode": "prefix"},  # the oracle (needs the task's prefix mask)
    "beta_gate": {"beta_gate": True},
    "no_beta_gate": {"beta_gate": False},
}


def ablation(name: str, **base) -> dict:
    """SKA options for ablation ``name`` on top of ``base`` options."""
    if name not in ABLATIONS:
        raise unknown_keys_error("SKA ablation", [name], ABLATIONS)
    return {**base, **ABLATIONS[name]}


@dataclass
class SKAPending(State):
    """Sums of the open chunk (``chunk`` mode): G, M [B, H, r, r], C [B, H, P, r]."""

    G: torch.Tensor
    M: torch.Tensor
    C: torch.Tensor


@dataclass
class SKAState(State):
    G: torch.Tensor  # [B, H, r, r]  Σ β ẑẑᵀ (committed in chunk mode; ε not included)
    M: torch.Tensor  # [B, H, r, r]  Σ ω ẑ_t ẑ_{t−1}ᵀ
    C: torch.Tensor  # [B, H, P, r]  Σ β v ẑᵀ
    prev: torch.Tensor  # [B, H, r]  p_{t−1}, the right factor of the next lag pair
    scalar: torch.Tensor  # [B, H]  tokens seen (position), or the seqmax normaliser m
    pending: SKAPending | None = None  # chunk mode only
    conv: torch.Tensor | None = None  # [B, k-1, H(2r+P)] conv history of z, q, v (conv_size > 0)


class SKA(Mixer):
    """Spectral Koopman Attention (Echo): per head, ŷ = η c^K C (G̃⁻¹M)^K G̃⁻¹ q̂ from the key Gram
    G̃ = εI + Σ β ẑẑᵀ (eq. 4), the lag-one covariance M = Σ ω ẑ_t ẑ_{t−1}ᵀ (eq. 5) and the
    value–key covariance C = Σ β v ẑᵀ (eq. 6), with spectral normalisation c = γ/max(1, σ̂)
    (docs/ska.md §2–§8); modes token, chunk, prefix, masked (docs/ska.md §5, §11). Full glossary
    in the module docstring."""

    name = "ska"
    supports_mask = True
    supports_padding = True

    def __init__(
        self,
        d_model: int,
        *,
        num_heads: int = 4,
        rank: int = 24,
        head_dim: int | None = None,
        mode: str = "chunk",
        chunk_size: int = 64,
        K: int = 2,
        eps: float = 1e-3,
        norm: str = "l2",
        seqmax_scope: str = "mask",
        spectral_norm: bool = True,
        power_iters: int = 6,
        use_gain: bool = True,
        gamma_max: float = 1.5,
        gamma_init: float = 1.0,
        eta_init: float = 1.5,
        learn_eta: bool = True,
        beta_gate: bool = False,
        beta_mode: str = "sqrt",
        boundary: str = "exclusive",
        out_init: str = "zero",
        layerscale_init: float = 1e-4,
        conv_size: int = 0,
        beta_bias_init: float = 0.0,
    ):
        super().__init__(d_model)
        mode = _ALIASES.get(mode, mode)
        for what, val, ok in (
            ("mode", mode, MODES),
            ("norm", norm, ("l2", "seqmax")),
            ("seqmax_scope", seqmax_scope, ("mask", "all")),
            ("beta_mode", beta_mode, ("sqrt", "asym")),
            ("boundary", boundary, ("exclusive", "inclusive")),
            ("out_init", out_init, ("zero", "layerscale")),
        ):
            if val not in ok:
                raise unknown_keys_error(f"SKA {what}", [val], ok)
        if norm == "seqmax" and mode in CAUSAL_MODES:
            raise ValueError(
                f"norm='seqmax' divides by the maximum key norm of the whole sequence, which "
                f"leaks future tokens into mode={mode!r} (docs/ska.md §3); use norm='l2' for "
                "causal modes, or mode='prefix'/'masked' with seqmax"
            )
        head_dim = head_width(d_model, num_heads, head_dim)
        for what, val in (
            ("num_heads", num_heads),
            ("rank", rank),
            ("head_dim", head_dim),
            ("chunk_size", chunk_size),
            ("power_iters", power_iters),
        ):
            if val < 1:
                raise ValueError(f"SKA {what} must be >= 1, got {val}")
        if beta_bias_init != 0 and not beta_gate:
            raise ValueError("beta_bias_init sets the β gate's bias: it needs beta_gate=True")
        if conv_size < 0:
            raise ValueError(f"SKA conv_size must be >= 0 (0 = no conv), got {conv_size}")
        if K < 0 or eps < 0:
            raise ValueError(f"SKA needs K >= 0 and eps >= 0, got K={K}, eps={eps}")
        if gamma_max < 1.0:
            raise ValueError(f"gamma_max must be >= 1 (γ ∈ [1, gamma_max]), got {gamma_max}")
        self.H, self.r, self.P = num_heads, rank, head_dim
        self.mode, self.chunk_size, self.norm, self.seqmax_scope = (
            mode,
            chunk_size,
            norm,
            seqmax_scope,
        )
        self.beta_mode, self.inclusive = beta_mode, boundary == "inclusive"
        self.gamma_max, self.use_gain = gamma_max, use_gain
        self.cfg = core.ReadoutConfig(
            eps=eps, K=K, spectral_norm=spectral_norm, power_iters=power_iters
        )
        self.k_proj = nn.Linear(d_model, self.H * rank, bias=False)
        self.q_proj = nn.Linear(d_model, self.H * rank, bias=False)
        self.v_proj = nn.Linear(d_model, self.H * head_dim, bias=False)
        self.out_proj = nn.Linear(self.H * head_dim, d_model, bias=False)
        for proj in (self.k_proj, self.q_proj):  # orthogonal per head
            with torch.no_grad():
                for w in proj.weight.view(self.H, rank, d_model):
                    nn.init.orthogonal_(w)
        nn.init.xavier_uniform_(self.v_proj.weight)
        self.conv = (
            CausalConv1d(self.H * (2 * rank + head_dim), conv_size, bias=False)
            if conv_size
            else None
        )
        self.layerscale = None
        if out_init == "zero":
            nn.init.zeros_(self.out_proj.weight)
        else:
            self.layerscale = nn.Parameter(torch.tensor(float(layerscale_init)))
            self.layerscale._no_weight_decay = True
        self.eta = nn.Parameter(torch.tensor(float(eta_init)), requires_grad=learn_eta)
        self.eta._no_weight_decay = True
        self.gamma_raw = None
        if use_gain:
            self.gamma_raw = nn.Parameter(torch.tensor(float(gamma_init)))
            self.gamma_raw._no_weight_decay = True  # decayed below 1 it would never recover
        self.beta_proj = None
        if beta_gate:
            self.beta_proj = nn.Linear(d_model, self.H)
            nn.init.zeros_(self.beta_proj.weight)
            nn.init.constant_(self.beta_proj.bias, float(beta_bias_init))
        self.fallbacks = FallbackCounter()
        self.diagnostics: dict[str, torch.Tensor] = {}

    @property
    def causal(self) -> bool:  # prefix/masked: one operator per sequence (non-causal)
        return self.mode in ("token", "chunk")

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, heads={self.H}, rank={self.r}, head_dim={self.P}, "
            f"mode={self.mode}, K={self.cfg.K}, S={self.chunk_size}, norm={self.norm}"
            + (f", conv={self.conv.kernel_size}" if self.conv is not None else "")
        )

    # ----- state ---------------------------------------------------------------------------
    def init_state(self, batch, *, device=None, dtype=None):
        dt = upcast(torch.empty(0, dtype=dtype)).dtype  # statistics never below fp32
        z = lambda *s: torch.zeros(batch, self.H, *s, device=device, dtype=dt)
        pending = (
            SKAPending(z(self.r, self.r), z(self.r, self.r), z(self.P, self.r))
            if self.mode == "chunk"
            else None
        )
        conv = self.conv.init_buffer(batch, device, dtype) if self.conv is not None else None
        return SKAState(
            z(self.r, self.r), z(self.r, self.r), z(self.P, self.r), z(self.r), z(), pending, conv
        )

    def _per_head(self) -> int:
        return 2 * self.r * self.r + self.P * self.r

    def _conv_size(self) -> int:
        return 0 if self.conv is None else (self.conv.kernel_size - 1) * self.conv.channels

    def state_formula(self) -> str:
        r, P, H = self.r, self.P, self.H
        conv = ""
        if self.conv is not None:
            k = self.conv.kernel_size
            conv = f" + (k−1)·H·(2r+P) = {k - 1}·{H}·(2·{r}+{P}) (conv buffer)"
        if self.mode == "chunk":
            return (
                f"H·(2(2r²+Pr)+r+1) = {H}·(2(2·{r}²+{P}·{r})+{r}+1) "
                f"(committed + pending G, M, C; previous key; position){conv}"
            )
        one = "m" if self.norm == "seqmax" else "position"
        return f"H·(2r²+Pr+r+1) = {H}·(2·{r}²+{P}·{r}+{r}+1) (G, M, C; previous key; {one}){conv}"

    def state_size(self, seq_len: int) -> int:
        per = self._per_head() * (2 if self.mode == "chunk" else 1) + self.r + 1
        return self.H * per + self._conv_size()

    def state_nbytes(self, seq_len: int, dtype: torch.dtype = torch.float32) -> int:
        """Statistics are kept in fp32 (fp64 for a float64 model) whatever the model dtype;
        the conv buffer in the model dtype."""
        conv = self._conv_size()
        stat_bytes = upcast(torch.empty(0, dtype=dtype)).element_size()
        return (self.state_size(seq_len) - conv) * stat_bytes + conv * dtype.itemsize

    # ----- helpers -------------------------------------------------------------------------
    def gamma(self, like: torch.Tensor) -> torch.Tensor:
        if self.gamma_raw is None:
            return torch.ones((), dtype=like.dtype, device=like.device)
        return self.gamma_raw.to(like.dtype).clamp(1.0, self.gamma_max)

    def _project(self, x, conv_buf, pad=None):
        """z, q [..., H, r], v [..., H, P], β [..., H] (or None), all in projection dtype, and
        the new conv buffer (None without a conv)."""
        shape = x.shape[:-1]
        z, q, v = self.k_proj(x), self.q_proj(x), self.v_proj(x)
        if self.conv is not None:
            zqv = torch.cat([z, q, v], -1)
            if x.dim() == 2:
                zqv, conv_buf = self.conv.step(zqv, conv_buf)
            else:
                zqv, conv_buf = self.conv(zqv, conv_buf, pad)
            z, q, v = zqv.split([self.H * self.r, self.H * self.r, self.H * self.P], -1)
        z = z.reshape(*shape, self.H, self.r)
        q = q.reshape(*shape, self.H, self.r)
        v = v.reshape(*shape, self.H, self.P)
        beta = torch.sigmoid(self.beta_proj(x)) if self.beta_proj is not None else None
        return z, q, v, beta, conv_buf

    def _out(self, y, dtype):
        out = self.out_proj(y.to(dtype).flatten(-2))
        return out * self.layerscale if self.layerscale is not None else out

    def _record(self, info: core.ReadoutInfo) -> None:
        with torch.no_grad():
            d = {"lambda_min": info.lam_min.min()}
            if info.sigma is not None:
                d["sigma_max"] = info.sigma.max()
                d["frac_clamped"] = (info.sigma > 1).float().mean()
            self.diagnostics = d

    def _normalize(self, z, q, mask, state, cdt, pad=None):
        """ẑ, q̂ and the new scalar, plus the rescaled carried statistics under seqmax."""
        if self.norm == "l2":
            return core.l2_normalize(z), core.l2_normalize(q), state, None
        norms = z.norm(dim=-1)  # [B, (T,) H]
        if pad is not None:  # padding does not count towards the sequence maximum
            norms = pad.zero(norms)
        if self.seqmax_scope == "mask" and mask is not None:
            norms = norms * (mask > 0).to(cdt).unsqueeze(-1)
        elif self.seqmax_scope == "mask":  # mask None = nothing written
            norms = torch.zeros_like(norms)
        if norms.dim() == 3:
            norms = norms.amax(1)
        m_old = state.scalar
        m = torch.maximum(m_old, norms).clamp_min(core.SEQMAX_FLOOR)  # [B, H]
        ratio = (m_old / m).unsqueeze(-1)  # statistics were normalised by m_old
        rescaled = SKAState(
            state.G * ratio.unsqueeze(-1) ** 2,
            state.M * ratio.unsqueeze(-1) ** 2,
            state.C * ratio.unsqueeze(-1),
            state.prev * ratio,
            m,
        )
        mm = m.unsqueeze(1).unsqueeze(-1) if z.dim() == 4 else m.unsqueeze(-1)
        return z / mm, q / mm, rescaled, m

    def _inputs(self, x, state, mask, pad=None):
        """Projections upcast into the statistics dtype; the write mask per head (0 at
        padding); the activation dtype ŷ is cast back to before the output projection
        (docs/ska.md §9)."""
        z, q, v, beta, conv = self._project(x, state.conv, pad)
        act, cdt = v.dtype, state.G.dtype  # activation dtype (bf16 under autocast), statistics
        z, q, v = z.to(cdt), q.to(cdt), v.to(cdt)
        beta = beta.to(cdt) if beta is not None else None
        m = None
        if mask is not None:
            m = mask.to(cdt).unsqueeze(-1).expand(*mask.shape, self.H)
        elif self.mode in ("prefix", "masked"):  # no mask while decoding: read only
            m = torch.zeros(*x.shape[:-1], self.H, dtype=cdt, device=x.device)
        if pad is not None:  # padding writes nothing (and its zero key starts no lag pair)
            m = pad.zero(
                torch.ones(*x.shape[:-1], self.H, dtype=cdt, device=x.device) if m is None else m
            )
        return z, q, v, beta, m, mask, cdt, act, conv

    def forward(self, x, state=None, mask=None, *, left_pad=None):
        if self.mode in ("prefix", "masked") and mask is None and state is None:
            raise ValueError(
                f"SKA in mode={self.mode!r} fits its operator on the tokens a mask selects: pass "
                "mask [B, T] (1 = the token writes, e.g. the task's prefix mask), or use "
                "mode='token'/'chunk' for mask-free causal SKA"
            )
        if (
            self.mode == "prefix"
            and mask is not None
            and mask.dim() == 2
            and mask.shape[1] > 1
            and bool((mask[:, 1:] > mask[:, :-1]).any())
        ):
            raise ValueError(
                "mode='prefix' needs a prefix mask (1…1 0…0 per row); use "
                "mode='masked' for arbitrary write masks"
            )
        return super().forward(x, state, mask, left_pad=left_pad)

    # ----- parallel --------------------------------------------------------------------------
    def _forward(self, x, state, mask, pad=None):
        z, q, v, beta, m, raw_mask, cdt, out_dtype, conv = self._inputs(x, state, mask, pad)
        with fp32_island(x.device.type):
            zh, qh, state, m_new = self._normalize(z, q, raw_mask, state, cdt, pad)
            xw, u, l, p = core.write_vectors(zh, v, beta, m, self.beta_mode)
            g, eta = self.gamma(zh), self.eta.to(cdt)
            T = x.shape[1]
            pending = None
            if self.mode == "token":
                y, (G, M, C, prev), info = core.token_causal(
                    state.G,
                    state.M,
                    state.C,
                    state.prev,
                    xw,
                    u,
                    l,
                    p,
                    qh,
                    g,
                    eta,
                    self.cfg,
                    self.fallbacks,
                )
            elif self.mode == "chunk":
                y, (G, M, C), pend_new, prev, info = self._chunk_rows(
                    state, pad, xw, u, l, p, qh, g, eta
                )
                pending = SKAPending(*pend_new)
            else:
                y, (G, M, C, prev), info = core.full_sequence(
                    state.G,
                    state.M,
                    state.C,
                    state.prev,
                    xw,
                    u,
                    l,
                    p,
                    qh,
                    g,
                    eta,
                    self.cfg,
                    self.fallbacks,
                )
            n = T if pad is None else (T - pad.counts).to(state.scalar.dtype)[:, None]
            scalar = m_new if m_new is not None else state.scalar + n
            self._record(info)
        return self._out(y, out_dtype), SKAState(G, M, C, prev, scalar, pending, conv)

    def _chunk_rows(self, state, pad, x, u, l, p, q, g, eta):
        """``chunk_causal`` with chunks aligned to each row's own position: rows are grouped by
        the position of the chunk's first slot (tokens seen minus the row's padding, which
        writes nothing), one call per group; an unpadded batch of one length is one group."""
        first = state.scalar[:, 0].to(torch.int64)
        if pad is not None:
            first = first - pad.counts

        def run(rows, p0):
            take = (lambda t: t) if rows is None else (lambda t: t[rows])  # noqa: E731
            pend = state.pending
            return core.chunk_causal(
                (take(state.G), take(state.M), take(state.C)),
                (take(pend.G), take(pend.M), take(pend.C)),
                p0,
                self.chunk_size,
                self.inclusive,
                take(state.prev),
                *(take(t) for t in (x, u, l, p, q)),
                g,
                eta,
                self.cfg,
                self.fallbacks,
            )

        starts = first.unique().tolist()
        if len(starts) == 1:
            return run(None, starts[0])
        groups = [(first == p0).nonzero().squeeze(1) for p0 in starts]
        outs = [run(rows, p0) for rows, p0 in zip(groups, starts)]
        inverse = torch.cat(groups).argsort()
        merge = lambda *ts: torch.cat(ts)[inverse]  # noqa: E731
        y, committed, pending, prev, _ = zip(*outs)
        return (
            merge(*y),
            tuple(merge(*ts) for ts in zip(*committed)),
            tuple(merge(*ts) for ts in zip(*pending)),
            merge(*prev),
            outs[-1][4],
        )

    # ----- recurrent -------------------------------------------------------------------------
    def _step(self, x_t, state, mask):
        z, q, v, beta, m, raw_mask, cdt, out_dtype, conv = self._inputs(x_t, state, mask)
        with fp32_island(x_t.device.type):
            zh, qh, state, m_new = self._normalize(z, q, raw_mask, state, cdt)
            xw, u, l, p = core.write_vectors(zh, v, beta, m, self.beta_mode)
            g, eta = self.gamma(zh), self.eta.to(cdt)
            dG, dC, dM = core.outer(xw, xw), core.outer(u, xw), core.outer(l, state.prev)
            pending = None
            if self.mode == "chunk":
                n = state.scalar.unsqueeze(-1).unsqueeze(-1)  # position of this token
                at_boundary = (n > 0) & (torch.remainder(n, self.chunk_size) == 0)
                pd = state.pending
                G = torch.where(at_boundary, state.G + pd.G, state.G)  # commit the full chunk
                M = torch.where(at_boundary, state.M + pd.M, state.M)
                C = torch.where(at_boundary, state.C + pd.C, state.C)
                Gp, Mp, Cp = (
                    torch.where(at_boundary, torch.zeros_like(t), t) for t in (pd.G, pd.M, pd.C)
                )
                if self.inclusive:  # the lag pair crossing the boundary is read at once
                    M = torch.where(at_boundary, M + dM, M)
                    dM = torch.where(at_boundary, torch.zeros_like(dM), dM)
                y, info = core.readout(G, M, C, qh.unsqueeze(-2), g, eta, self.cfg, self.fallbacks)
                pending = SKAPending(Gp + dG, Mp + dM, Cp + dC)
            else:
                G, M, C = state.G + dG, state.M + dM, state.C + dC
                y, info = core.readout(G, M, C, qh.unsqueeze(-2), g, eta, self.cfg, self.fallbacks)
            scalar = m_new if m_new is not None else state.scalar + 1
            self._record(info)
        return self._out(y.squeeze(-2), out_dtype), SKAState(G, M, C, p, scalar, pending, conv)
