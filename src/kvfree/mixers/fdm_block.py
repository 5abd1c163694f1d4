"""One layer of the Fan Duality Model (arXiv 2604.07716; docs/fdm.md §2–§5, §8): wave + FFN +
gated local–global cache read, with its own norms and residuals (``is_block = True``).

Glossary (layer input x_t; docs/fdm.md sections in brackets):
    x̂_t = LN_x(x_t)                          score input and the cached vector     [§2.1, §3.2]
    s_t, p_t                                  FanScan score path (s_eff, write rate) [§2.1]
    x̃_t = LN_1(x_t);  y_t = Re h²_t         two-pass complex recurrence (FanScan)  [§2.2–2.3]
    z_t = x_t + y_t;  h_t = z_t + FFN(LN_2 z_t)   SwiGLU (LM) or GELU (MQAR), width 4D
    V_t                                       window W ∪ top-K by s over j < t       [§3.1]
    c_t = Σ_{j∈V_t} softmax(q_t·k_j/√D) v_j,  q_t = W_q LN_h(h_t) + b_q,
          k_j = W_k x̂_j + b_k,  v_j = W_v x̂_j + b_v;  c_t = 0 if V_t = ∅           [§3.2]
    out_t = h_t + σ(W_g h_t + b_g) ⊙ c_t                                              [§3.2]

Variants (``variant``; every default below can be overridden):
    "lm"         the 137M LM layer: score "fdm", W = 256, K = 16, SwiGLU, b_g = 0 (the
                 released code's effective init; ``init="intended"`` gives b_g = −3, W_pos = 0)
    "mqar"       the d = 64 MQAR FDM (§8.2): p = mean_c σ(W_p x̂), landmarks = global top-K
                 by p, **no window** (W = 0), GELU FFN, b_g = −3
    "scan_only"  the MQAR "K = 0" network (§8.2): per-channel p = σ(W_p LN h),
                 θ = W_θ LN h (no Givens), one pass, no cache, GELU FFN [project
                 reconstruction: the spec gives only this one line]

Position term and μ are shared by all layers of a model: ``LanguageModel`` calls
:meth:`FDMBlock.tie_layers`, which keeps them in layer 0 only (one copy in the state dict).

Decode state per layer: FanScan (4D + 3D) + cache ((W + K)·D + 2K), fixed in the length.
Long inputs are processed in segments of ``segment`` tokens, carrying the state (bounded
O(segment·(K+W+segment)) mask memory; identical results).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import repeat

import torch
from torch import nn

from kvfree.blocks import GeluMLP, SwiGLU
from kvfree.mixers import fdm_cache as fc
from kvfree.mixers.base import Mixer, formula, grow_padding
from kvfree.mixers.fan import FanScan, FanState
from kvfree.state import State

VARIANTS = {
    "lm": dict(
        score="fdm", passes=2, givens_planes=4, ffn="swiglu", window=256, top_k=16, gate_bias=0.0
    ),
    "mqar": dict(
        score="mean_p", passes=2, givens_planes=4, ffn="gelu", window=0, top_k=16, gate_bias=-3.0
    ),
    "scan_only": dict(
        score="channel_p", passes=1, givens_planes=0, ffn="gelu", window=0, top_k=0, gate_bias=-3.0
    ),
}


@dataclass
class FDMState(State):
    wave: FanState
    cache: fc.CacheState | None


class FDMBlock(Mixer):
    """One Fan Duality Model layer (a block with its own norms and residuals): the FanScan wave
    (docs/fdm.md §2), an FFN, and the gated local–global cache read out_t = h_t + σ(W_g h_t +
    b_g) ⊙ c_t over the window W ∪ top-K by score (§3.2, §5). Full glossary in the module
    docstring."""

    name = "fdm"
    supports_padding = True
    is_block = True

    def __init__(
        self,
        d_model: int,
        *,
        variant: str = "lm",
        window: int | None = None,
        top_k: int | None = None,
        ffn: str | None = None,
        d_ff: int | None = None,
        gate_bias: float | None = None,
        givens_planes: int | None = None,
        t_train: int = 1024,
        position_term: bool = True,
        conv_kernel: int = 4,
        conv_group_size: int = 64,
        chunk_size: int = 32,
        segment: int = 512,
        dropout: float = 0.0,
        init: str = "effective",
        init_std: float = 0.02,
    ):
        super().__init__(d_model)
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {list(VARIANTS)}, got {variant!r}")
        v = VARIANTS[variant]
        window = v["window"] if window is None else window
        top_k = v["top_k"] if top_k is None else top_k
        ffn = v["ffn"] if ffn is None else ffn
        if gate_bias is None:
            gate_bias = -3.0 if (variant != "lm" or init == "intended") else v["gate_bias"]
        if window < 0 or top_k < 0:
            raise ValueError(f"window and top_k must be >= 0, got {window}, {top_k}")
        if variant == "scan_only" and window + top_k:
            raise ValueError("variant='scan_only' has no cache: leave window and top_k at 0")
        if ffn not in ("swiglu", "gelu"):
            raise ValueError(f"ffn must be 'swiglu' or 'gelu', got {ffn!r}")
        if segment < 1:
            raise ValueError(f"segment must be >= 1, got {segment}")
        D = d_model
        self.variant, self.window, self.top_k, self.segment = variant, window, top_k, segment
        self.has_cache = window + top_k > 0
        self.scale = D**-0.5
        self.ln_1 = nn.LayerNorm(D)
        self.ln_x = nn.LayerNorm(D) if variant != "scan_only" else None  # scan_only: one LN
        self.wave = FanScan(
            D,
            score=v["score"],
            passes=v["passes"],
            givens_planes=v["givens_planes"] if givens_planes is None else givens_planes,
            conv_kernel=conv_kernel,
            conv_group_size=conv_group_size,
            t_train=t_train,
            position_term=position_term,
            chunk_size=chunk_size,
            init=init,
            init_std=init_std,
        )
        self.ln_2 = nn.LayerNorm(D)
        d_ff = d_ff or 4 * D
        self.ffn = SwiGLU(D, d_ff) if ffn == "swiglu" else GeluMLP(D, d_ff)
        self.drop = nn.Dropout(dropout)
        if self.has_cache:
            self.ln_h = nn.LayerNorm(D)
            self.W_q, self.W_k, self.W_v, self.W_g = (nn.Linear(D, D) for _ in range(4))
        cache_lins = [self.W_q, self.W_k, self.W_v, self.W_g] if self.has_cache else []
        for lin in [*self.ffn.modules(), *cache_lins]:  # docs/fdm.md §8.1: N(0, 0.02), biases 0
            if isinstance(lin, nn.Linear):
                nn.init.normal_(lin.weight, std=init_std)
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
        if self.has_cache:
            nn.init.constant_(self.W_g.bias, gate_bias)

    # ----- sharing of the position term and μ across layers ------------------------------------
    @staticmethod
    def tie_layers(blocks: list[FDMBlock]) -> None:
        """Make every block use the first block's ``W_pos`` and ``μ`` (docs/fdm.md §2.1: one
        Linear(2→1) and one μ shared by all layers). The others keep a plain reference, so
        the parameters appear once in ``parameters()`` and the state dict."""
        owners = [b for b in blocks if b.wave.shared is not None]
        for b in owners[1:]:
            b.wave.share(owners[0].wave.shared)

    # ----- state -------------------------------------------------------------------------------
    def init_state(self, batch, *, device=None, dtype=None):
        cache = (
            fc.init_cache(batch, self.d_model, self.window, self.top_k, device=device, dtype=dtype)
            if self.has_cache
            else None
        )
        return FDMState(self.wave.init_state(batch, device=device, dtype=dtype), cache)

    def state_formula(self) -> str:
        terms = self.wave.formula_terms()
        if self.has_cache:
            W, K, D = self.window, self.top_k, self.d_model
            terms.append(("(W+K)·D + 2K", f"({W}+{K})·{D} + 2·{K}", "cache, K int64 indices"))
        return formula(*terms)

    def state_size(self, seq_len: int) -> int:
        n = self.wave.state_size(seq_len)
        if self.has_cache:
            n += fc.cache_size(self.d_model, self.window, self.top_k)
        return n

    def state_nbytes(self, seq_len: int, dtype: torch.dtype = torch.float32) -> int:
        n = self.wave.state_nbytes(seq_len, dtype)
        if self.has_cache:
            n += fc.cache_nbytes(self.d_model, self.window, self.top_k, dtype)
        return n

    # ----- pieces --------------------------------------------------------------------------------
    def _score_input(self, x):
        return self.ln_x(x) if self.ln_x is not None else self.ln_1(x)

    def _wave_ffn(self, x, y):
        z = x + self.drop(y)
        return z + self.drop(self.ffn(self.ln_2(z)))

    def _read(self, h, keys, vis):
        c = fc.masked_read(self.W_q(self.ln_h(h)), self.W_k(keys), self.W_v(keys), vis, self.scale)
        return h + torch.sigmoid(self.W_g(h)) * c

    # ----- parallel ------------------------------------------------------------------------------
    def _forward(self, x, state, mask, pad=None):
        ys = []
        pads = pad.segments(self.segment) if pad is not None else repeat(None)
        for x_seg, pad_seg in zip(x.split(self.segment, dim=1), pads):
            y, state = self._forward_segment(x_seg, state, pad_seg)
            ys.append(y)
        return torch.cat(ys, dim=1), state

    def _forward_segment(self, x, state, pad=None):
        ws, T = state.wave, x.shape[1]
        rows = grow_padding(ws.pad, ws.pos, pad, type(self).__name__)
        xh = self._score_input(x)
        s, p, conv = self.wave.score_parallel(xh, ws.conv, ws.pos, pad, rows)
        y, h1, h2 = self.wave.mix_parallel(self.ln_1(x), p, ws, pad)
        h = self._wave_ffn(x, y)
        cache = state.cache
        if self.has_cache:
            vis = fc.chunk_visibility(cache, s, self.window, self.top_k, rows)
            keys = torch.cat([cache.heap_x.to(xh.dtype), cache.ring.to(xh.dtype), xh], dim=1)
            h = self._read(h, keys, vis)
            cache = fc.update_chunk(cache, xh, s, self.window, self.top_k, rows)
        return h, FDMState(FanState(h1, h2, conv, ws.pos + T, rows), cache)

    # ----- recurrent -----------------------------------------------------------------------------
    def _step(self, x_t, state, mask):
        ws = state.wave
        xh = self._score_input(x_t)
        s, p, conv = self.wave.score_step(xh, ws.conv, ws.pos, ws.pad)
        y, h1, h2 = self.wave.mix_step(self.ln_1(x_t), p, ws)
        h = self._wave_ffn(x_t, y)
        cache = state.cache
        if self.has_cache:
            vis = fc.step_visibility(cache, self.window)[:, None]
            keys = torch.cat([cache.heap_x.to(xh.dtype), cache.ring.to(xh.dtype)], dim=1)
            h = self._read(h[:, None], keys, vis)[:, 0]
            cache = fc.insert_step(cache, xh, s, self.window, self.top_k)  # after the read
        return h, FDMState(FanState(h1, h2, conv, ws.pos + 1, ws.pad), cache)
