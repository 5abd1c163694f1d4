"""Multi-head latent attention (MLA; DeepSeek-V2, arXiv 2405.04434 §2.1, eqs. 9–19): softmax
attention whose cache holds one low-rank latent per token instead of per-head keys and values
(docs/frontier.md §2).

Glossary (head h of H, head width d_h, latent width d_c, decoupled RoPE width d_r):
    c_t   [d_c]   W_DKV x_t — the cached latent (eq. 9)                        ``kv_down``
    k^C   [d_h]   W_UK^h c_j, v [d_h] = W_UV^h c_j: keys and values are up-projections of the
                  latent (eqs. 10–11)                                          ``k_up``, ``v_up``
    k^R_t [d_r]   RoPE(W_KR x_t), one per token shared by every head, cached (eq. 14) ``k_rope``
    q     [d_h]   W_Q^C x_t per head; q^R [d_r] = RoPE(W_QR x_t) per head (eqs. 12–13, without the
                  paper's low-rank query compression, which changes no cached byte)
    o_t           Σ_{j ≤ t} softmax_j((q·k^C_j + q^R·k^R_j)/√(d_h + d_r)) v_j; y = W_O concat_h o
Decode uses the absorbed form (§2.1.2): q̃ = W_UK^hᵀ q ∈ ℝ^{d_c}, scores q̃·c_j + q^R·k^R_j,
u = Σ_j w_j c_j, o = W_UV^h u — the same numbers as the parallel form, never materialising keys.

With ``positions="none"`` there is no RoPE part (d_r = 0). State per token: d_c + d_r values
(vs 2·n_kv·d_h for attention): bytes (d_c + d_r)·T·b. Chunked prefill continues from the cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kvfree.mixers.base import Mixer, grow_padding, head_width, key_padding_mask, row_positions
from kvfree.mixers.rope import apply_rope
from kvfree.state import State
from kvfree.utils import unknown_keys_error


@dataclass
class LatentKVCache(State):
    c: torch.Tensor  # [B, T, d_c] latents
    k_rope: torch.Tensor  # [B, T, d_r] RoPE'd shared keys (d_r = 0 without positions)
    length: int = 0
    pad: tuple[int, ...] | None = None  # leading padding slots per row (left-padded prompts)


class MLA(Mixer):
    """Multi-head latent attention (DeepSeek-V2 eqs. 9–19): a cache of one d_c latent plus one
    d_r RoPE key per token; glossary in the module docstring."""

    name = "mla"
    fixed_memory = False
    supports_padding = True

    def __init__(
        self,
        d_model: int,
        *,
        num_heads: int = 2,
        head_dim: int | None = None,
        latent_dim: int | None = None,
        rope_dim: int | None = None,
        positions: str = "rope",
        rope_base: float = 10000.0,
    ):
        super().__init__(d_model)
        head_dim = head_width(d_model, num_heads, head_dim)
        if positions not in ("rope", "none"):
            raise unknown_keys_error("positions option", [positions], ["rope", "none"])
        rope_dim = 0 if positions == "none" else (rope_dim or max(2, head_dim // 2))
        if rope_dim % 2:
            raise ValueError(f"RoPE needs an even rope_dim, got {rope_dim}")
        latent_dim = latent_dim or head_dim
        if num_heads < 1 or latent_dim < 1:
            raise ValueError(
                f"num_heads and latent_dim must be >= 1, got {num_heads}, {latent_dim}"
            )
        self.H, self.dh, self.dc, self.dr = num_heads, head_dim, latent_dim, rope_dim
        self.positions, self.rope_base = positions, float(rope_base)
        self.q_proj = nn.Linear(d_model, num_heads * (head_dim + rope_dim), bias=False)
        self.kv_down = nn.Linear(d_model, latent_dim, bias=False)
        self.k_rope = nn.Linear(d_model, rope_dim, bias=False) if rope_dim else None
        self.k_up = nn.Linear(latent_dim, num_heads * head_dim, bias=False)
        self.v_up = nn.Linear(latent_dim, num_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, d_model, bias=False)
        self.scale = (head_dim + rope_dim) ** -0.5

    # ----- state ---------------------------------------------------------------------------
    def init_state(self, batch, *, device=None, dtype=None) -> LatentKVCache:
        c = torch.zeros(batch, 0, self.dc, device=device, dtype=dtype)
        return LatentKVCache(c, torch.zeros(batch, 0, self.dr, device=device, dtype=dtype))

    def state_formula(self) -> str:
        return f"T·(d_c + d_r) = T·({self.dc} + {self.dr})"

    def state_size(self, seq_len: int) -> int:
        return seq_len * (self.dc + self.dr)

    def _check_state(self, state, batch: int) -> None:
        if not isinstance(state, LatentKVCache):
            raise TypeError(
                f"MLA expects a LatentKVCache state, got {type(state).__name__}; use "
                "init_state(batch) or the state returned by forward/step"
            )
        B, _, dc = state.c.shape
        if (B, dc, state.k_rope.shape[-1]) != (batch, self.dc, self.dr):
            raise ValueError(
                f"LatentKVCache has [batch, d_c, d_r] = {[B, dc, state.k_rope.shape[-1]]}, "
                f"expected {[batch, self.dc, self.dr]}"
            )

    # ----- shared pieces -----------------------------------------------------------------------
    def _queries(self, x, pos):
        """x [B, T, D] → q [B, H, T, d_h], q^R [B, H, T, d_r] (rotated)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.H, self.dh + self.dr).transpose(1, 2)
        q, q_r = q.split([self.dh, self.dr], dim=-1)
        return q, self._rope(q_r, pos)

    def _rope(self, t, pos):
        return apply_rope(t, pos, self.rope_base) if self.dr else t

    def _extend(self, state: LatentKVCache, x, pos, rows) -> LatentKVCache:
        c = self.kv_down(x)
        k_r = x.new_zeros(*x.shape[:2], 0)
        if self.dr:  # per-row positions [B, 1, T] → [B, T] for the head-less shared key
            p = pos if rows is None else pos[:, 0]
            k_r = self._rope(self.k_rope(x), p)
        return LatentKVCache(
            torch.cat([state.c, c.to(state.c.dtype)], 1),
            torch.cat([state.k_rope, k_r.to(state.k_rope.dtype)], 1),
            state.length + x.shape[1],
            rows,
        )

    # ----- parallel (keys and values materialised) ---------------------------------------------
    def _forward(self, x, state, mask, pad=None):
        B, T, _ = x.shape
        self._check_state(state, B)
        T0 = state.length
        rows = grow_padding(state.pad, T0, pad, type(self).__name__)
        pos = torch.arange(T0, T0 + T, device=x.device)
        q, q_r = self._queries(x, row_positions(pos, rows))
        new = self._extend(state, x, row_positions(pos, rows), rows)
        n = new.c.shape[1]
        k = self.k_up(new.c).view(B, n, self.H, self.dh).transpose(1, 2)
        v = self.v_up(new.c).view(B, n, self.H, self.dh).transpose(1, 2)
        k_r = new.k_rope.unsqueeze(1).expand(B, self.H, n, self.dr)
        qp = pos.unsqueeze(1)
        keys = torch.arange(n, device=x.device)
        vis = keys.unsqueeze(0) <= qp  # [T, n] causal
        if rows is not None:  # [B, 1, T, n]: padding hidden from real queries
            vis = (vis & key_padding_mask(rows, keys, pos)).unsqueeze(1)
        o = F.scaled_dot_product_attention(
            torch.cat([q, q_r], -1), torch.cat([k, k_r], -1), v, attn_mask=vis, scale=self.scale
        )
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.H * self.dh)), new

    # ----- decode (absorbed) -------------------------------------------------------------------
    def _step(self, x_t, state, mask):
        B = x_t.shape[0]
        self._check_state(state, B)
        pos = row_positions(torch.full((1,), state.length, device=x_t.device), state.pad)
        q, q_r = self._queries(x_t.unsqueeze(1), pos)  # [B, H, 1, d_h], [B, H, 1, d_r]
        new = self._extend(state, x_t.unsqueeze(1), pos, state.pad)
        w_uk = self.k_up.weight.view(self.H, self.dh, self.dc)
        w_uv = self.v_up.weight.view(self.H, self.dh, self.dc)
        q_lat = torch.einsum("bhd,hdc->bhc", q[:, :, 0], w_uk)  # q̃ = W_UKᵀ q
        scores = torch.einsum("bhc,btc->bht", q_lat, new.c)
        if self.dr:
            scores = scores + torch.einsum("bhr,btr->bht", q_r[:, :, 0], new.k_rope)
        if state.pad is not None:
            hidden = ~key_padding_mask(state.pad, torch.arange(new.c.shape[1], device=x_t.device))
            scores = scores.masked_fill(hidden, float("-inf"))
        w = torch.softmax(scores * self.scale, dim=-1)
        u = torch.einsum("bht,btc->bhc", w, new.c)  # Σ w_j c_j
        o = torch.einsum("bhc,hdc->bhd", u, w_uv)  # W_UV u
        return self.o_proj(o.reshape(B, self.H * self.dh)), new

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, heads={self.H}, head_dim={self.dh}, latent_dim={self.dc}, "
            f"rope_dim={self.dr}"
        )
