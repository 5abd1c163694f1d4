"""Softmax attention with a real KV cache (Vaswani et al. 2017, arXiv 1706.03762, eq. 1;
docs/baselines.md §1 and §8). The baseline of every decode-memory comparison.

Glossary (query head h; n_kv KV heads, each shared by g = n_h/n_kv query heads, GQA):
    q_t [d_h]        W_q x_t, rotated by RoPE at position t (``positions="rope"``, see rope.py)
    k_t, v_t [d_h]   W_k x_t (rotated like q_t), W_v x_t, of KV head ⌊h/g⌋
    V(t)             visible keys: full causal {0..t}; ``window=W``: [t−W+1, t] (W keys, self
                     included); ``sinks=s`` + window (StreamingLLM): {0..s−1} ∪ [t−W+1, t]
    o_t [d_h]        Σ_{j∈V(t)} softmax_j(q_t·k_j / √d_h) v_j
    y_t [D]          W_o concat_h(o_t)

Parallel form: ``F.scaled_dot_product_attention`` on blocks of ``q_block`` queries, each against
only the keys the block can see plus an explicit visibility mask, so memory is O(q_block·T) and
no T×T matrix is ever built. It continues from a cache (chunked prefill).

Decode: :class:`KVCache` holds K, V [B, n_kv, capacity, d_h]. Full attention appends into
spare capacity (grown geometrically ×2, or preallocated with ``max_len``): amortised O(1) per
token, ``filled = T``. Window variants use ``s`` sink slots plus a ring buffer of W slots:
constant memory, ``filled = min(T, s+W)``. Carried bytes are exactly 2·filled·n_kv·d_h·b per
batch row (``KVCache.carried_bytes``; ``allocated_bytes`` adds the spare capacity).

Quantised cache (``kv_bits=8|4|2``, full attention only): the cache stores b-bit codes of every
key (after RoPE) and value vector, coded alone per group of ``kv_group`` channels, with fp16
scales and minima (:mod:`kvfree.mixers.kv_quant`); the parallel form reads the same dequantised
x̂ as decode.
With ``kv_residual=R`` it is KIVI's cache instead (:mod:`kvfree.mixers.kv_kivi`): keys coded per
channel over blocks of R tokens, values per token, the unfinished block exact.

Sink position policies (window + sinks):
- ``"absolute"``: keys keep their original RoPE positions; the parallel form applies the same
  visibility mask, so forward and step are exact twins.
- ``"rolling"`` (StreamingLLM, Xiao et al., arXiv 2309.17453): positions are cache slots, not text
  positions. Keys are cached *before* RoPE; each decode step rotates the cached keys by their
  slot rank (sinks 0..s−1, window keys s, s+1, … oldest first) and the query by the last slot.
  While T ≤ s+W the slots are the text positions, so it equals ``"absolute"`` exactly.
  The spec calls this policy decode-only with no parallel twin. RoPE scores depend only on
  position differences, so the window keys keep their true offset t−j to the query; only the
  sink scores change (the query sits at slot min(t, s+W−1)). ``forward`` therefore computes the
  rolling policy *exactly*: each query gets two rotations, at t for window keys and at
  min(t, s+W−1) for sink keys, concatenated along the head dimension against zero-padded keys
  (2·d_h features, scale still 1/√d_h). Prefill + decode thus reproduce ``forward`` for every
  policy. Beyond the training length, ``"rolling"`` keeps positions bounded by s+W.
  With ``positions="none"`` the two policies coincide.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from kvfree.mixers.attention_kv import QuantizedKV
from kvfree.mixers.base import (
    Mixer,
    grow_padding,
    head_width,
    key_padding_mask,
    row_positions,
)
from kvfree.mixers.rope import apply_rope
from kvfree.state import State
from kvfree.utils import unknown_keys_error

_MIN_CAPACITY = 16


@dataclass
class KVCache(State):
    """Per-layer KV cache. Slots [0, filled) of ``k``/``v`` are in use.

    Full attention: slot i holds token i. Window: slots [0, s) hold the sinks (tokens 0..s−1),
    slots [s, s+W) a ring; slot s+start holds the oldest window token. ``k`` holds RoPE'd keys,
    or raw keys for ``sink_positions="rolling"``.
    """

    k: torch.Tensor  # [B, n_kv, capacity, d_h]
    v: torch.Tensor  # [B, n_kv, capacity, d_h]
    length: int = 0  # tokens seen = absolute position of the next token
    filled: int = 0  # slots in use: T (full) or min(T, s+W) (window)
    start: int = 0  # ring offset (window only; 0 until the ring is full)
    sinks: int = 0  # s
    window: int = 0  # W; 0 = full causal attention
    pad: tuple[int, ...] | None = None  # leading padding slots per row (left-padded prompts)

    def carried_bytes(self) -> int:
        """Bytes of the filled entries: 2·filled·B·n_kv·d_h·b (spare capacity not counted)."""
        B, n_kv, _, dh = self.k.shape
        return self.filled * B * n_kv * dh * (self.k.element_size() + self.v.element_size())

    def allocated_bytes(self) -> int:
        """Bytes of the buffers including spare capacity."""
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()

    def chronological(self, t: torch.Tensor) -> torch.Tensor:
        """The filled slots of ``t`` (``k`` or ``v``) oldest first: sinks, then the window.
        Returns ``t`` itself when it is already compact and in order."""
        f = self.filled
        if self.start == 0:
            return t if t.shape[2] == f else t[:, :, :f]
        s, W, r = self.sinks, self.window, self.start  # ring is full here: f == s + W
        return torch.cat([t[:, :, :s], t[:, :, s + r : s + W], t[:, :, s : s + r]], dim=2)

    def canonical(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Trimmed, chronologically ordered (K, V) for comparisons."""
        return self.chronological(self.k), self.chronological(self.v)


class Attention(QuantizedKV, Mixer):
    """Softmax attention over a KV cache: o_t = Σ_{j∈V(t)} softmax_j(q_t·k_j/√d_h) v_j, y_t =
    W_o concat_h o_t (Vaswani et al. eq. 1), with GQA, RoPE, sliding window and sinks; the
    cache carries 2·filled·n_kv·d_h values per row (docs/baselines.md §1, §8). Full glossary in
    the module docstring."""

    name = "attention"
    supports_padding = True
    #: Class default is full attention (grows with T); window variants set True per instance.
    fixed_memory = False

    def __init__(
        self,
        d_model: int,
        *,
        num_heads: int = 2,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        positions: str = "rope",
        rope_base: float = 10000.0,
        window: int | None = None,
        sinks: int = 0,
        sink_positions: str = "absolute",
        q_block: int = 256,
        max_len: int | None = None,
        kv_bits: int | None = None,
        kv_group: int | None = None,
        kv_scale_dtype: str = "auto",
        kv_residual: int | None = None,
    ):
        super().__init__(d_model)
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads < 1 or num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(
                f"num_heads={num_heads} must be a positive multiple of "
                f"num_kv_heads={num_kv_heads} (GQA shares each KV head)"
            )
        head_dim = head_width(d_model, num_heads, head_dim)
        if positions not in ("rope", "none"):
            raise unknown_keys_error("positions option", [positions], ["rope", "none"])
        if sink_positions not in ("absolute", "rolling"):
            raise unknown_keys_error(
                "sink_positions option", [sink_positions], ["absolute", "rolling"]
            )
        if positions == "rope" and head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        if window is not None and window < 1:
            raise ValueError(f"window must be >= 1 (keys visible including self), got {window}")
        if sinks < 0 or (sinks and window is None):
            raise ValueError(
                f"sinks={sinks}: attention sinks need a window (StreamingLLM keeps "
                "s sinks + the W most recent keys); set window=W or sinks=0"
            )
        if sink_positions == "rolling" and window is None:
            raise ValueError(
                "sink_positions='rolling' re-assigns positions by cache slot and "
                "needs a window; set window=W"
            )
        if q_block < 1:
            raise ValueError(f"q_block must be >= 1, got {q_block}")
        if max_len is not None and max_len < 1:
            raise ValueError(f"max_len must be >= 1 or None, got {max_len}")
        self._init_kv_quant(kv_bits, kv_group, kv_scale_dtype, head_dim, window, kv_residual)
        self.H, self.n_kv, self.dh = num_heads, num_kv_heads, head_dim
        self.g = num_heads // num_kv_heads
        self.positions, self.rope_base = positions, float(rope_base)
        self.window, self.sinks, self.sink_positions = window, sinks, sink_positions
        self.q_block, self.max_len = q_block, max_len
        self.rolling = sink_positions == "rolling" and positions == "rope"
        self.fixed_memory = window is not None
        # sinks are each row's first tokens, which padding moves: no padded batches with sinks
        # and a KIVI block's per-channel scales would mix a row's padding into its first block
        self.supports_padding = type(self).supports_padding and not sinks and not kv_residual
        self.q_proj = nn.Linear(d_model, self.H * self.dh, bias=False)
        self.k_proj = nn.Linear(d_model, self.n_kv * self.dh, bias=False)
        self.v_proj = nn.Linear(d_model, self.n_kv * self.dh, bias=False)
        self.o_proj = nn.Linear(self.H * self.dh, d_model, bias=False)

    @property
    def slots(self) -> int | None:
        """Maximum cache slots: s+W with a window, None (unbounded) for full attention."""
        return None if self.window is None else self.sinks + self.window

    # ----- state -------------------------------------------------------------------------
    def init_state(self, batch, *, device=None, dtype=None):
        if self.kv_bits:
            return self._quant_init_state(batch, device, dtype or torch.get_default_dtype())
        cap = 0
        if self.max_len is not None:
            cap = self.max_len if self.slots is None else min(self.max_len, self.slots)
        k = torch.zeros(batch, self.n_kv, cap, self.dh, device=device, dtype=dtype)
        return KVCache(k, torch.zeros_like(k), sinks=self.sinks, window=self.window or 0)

    def state_formula(self) -> str:
        if self.kv_bits:
            return self._quant_formula()
        if self.slots is None:
            return f"2·T·n_kv·d_h = 2·T·{self.n_kv}·{self.dh}"
        return (
            f"2·min(T, s+W)·n_kv·d_h = 2·min(T, {self.sinks}+{self.window})·{self.n_kv}·{self.dh}"
        )

    def state_size(self, seq_len: int) -> int:
        if self.kv_bits:
            return self._quant_size(seq_len)
        n = seq_len if self.slots is None else min(seq_len, self.slots)
        return 2 * n * self.n_kv * self.dh

    def state_nbytes(self, seq_len: int, dtype: torch.dtype = torch.float32) -> int:
        if self.kv_bits:
            return self._quant_nbytes(seq_len, dtype)
        return super().state_nbytes(seq_len, dtype)

    def _check_state(self, state, batch: int) -> None:
        if self.kv_bits:
            return self._check_quant_state(state, batch)
        if not isinstance(state, KVCache):
            raise TypeError(
                f"Attention expects a KVCache state, got {type(state).__name__}; "
                "use init_state(batch) or the state returned by forward/step"
            )
        if (state.sinks, state.window) != (self.sinks, self.window or 0):
            raise ValueError(
                f"KVCache was built for sinks={state.sinks}, window="
                f"{state.window or None}, but this layer has sinks={self.sinks}, "
                f"window={self.window}"
            )
        B, n_kv, _, dh = state.k.shape
        if (B, n_kv, dh) != (batch, self.n_kv, self.dh):
            raise ValueError(
                f"KVCache has [batch, n_kv, d_h] = {[B, n_kv, dh]}, expected "
                f"{[batch, self.n_kv, self.dh]}"
            )

    # ----- helpers -------------------------------------------------------------------------
    def _project(self, x):
        """x [B, T, D] -> q [B, H, T, d_h], k, v [B, n_kv, T, d_h] (before RoPE)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.H, self.dh).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv, self.dh).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.dh).transpose(1, 2)
        return q, k, v

    def _rope(self, t, pos):
        return apply_rope(t, pos, self.rope_base) if self.positions == "rope" else t

    def _sdpa(self, q, k, v, mask):
        """q [B, H, n, e], k [B, n_kv, m, e], v [B, n_kv, m, d_h], mask [n, m] or [B, n, m]
        bool or None.
        GQA without copying K/V: the g query heads of a KV head are stacked along the rows."""
        B, _, n, e = q.shape
        qg = q.reshape(B, self.n_kv, self.g * n, e).to(k.dtype)
        if mask is not None and self.g > 1:
            mask = mask.repeat(*[1] * (mask.dim() - 2), self.g, 1)
        if mask is not None and mask.dim() == 3:  # per row [B, n, m]: shared by the KV heads
            mask = mask.unsqueeze(1)
        o = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=self.dh**-0.5)
        return o.reshape(B, self.H, n, self.dh)

    @staticmethod
    def _writable(buf, new) -> bool:
        """In-place writes are safe unless autograd is tracking the buffers (then copy)."""
        if buf.is_inference() and not torch.is_inference_mode_enabled():
            return False  # a cache built under inference_mode, extended outside it
        return not (torch.is_grad_enabled() and (buf.requires_grad or new.requires_grad))

    # ----- parallel ------------------------------------------------------------------------
    def _forward(self, x, state, mask, pad=None):
        B, T, _ = x.shape
        self._check_state(state, B)
        T0 = state.length
        rows = grow_padding(state.pad, T0, pad, type(self).__name__)
        q, k, v = self._project(x)
        pos = torch.arange(T0, T0 + T, device=x.device)
        q_rot = self._rope(q, row_positions(pos, rows))  # (no rolling policy with padding)
        k_store = k if self.rolling else self._rope(k, row_positions(pos, rows))
        if self.kv_residual:
            o, new_state = self._kivi(q_rot, k_store, v, state)
            y = o.transpose(1, 2).reshape(B, T, self.H * self.dh)
            return self.o_proj(y.to(x.dtype)), new_state
        if self.kv_bits:
            K, V, new_state = self._extend_quantized(state, k_store, v)
            o = self._blocks(q_rot, None, K, V, T0, 0, 0, rows)
            y = o.transpose(1, 2).reshape(B, T, self.H * self.dh)
            return self.o_proj(y.to(x.dtype)), replace(new_state, pad=rows)
        K, V, new_state = self._extend(state, k_store.to(state.k.dtype), v.to(state.v.dtype))
        new_state.pad = rows
        # key index i <-> position i for i < a, else tail0 + (i - a)   (K is chronological)
        a = min(state.filled, self.sinks)
        tail0 = T0 - (state.filled - a)
        q_sink = None
        if self.rolling:
            kpos = torch.cat(
                [
                    torch.arange(a, device=x.device),
                    torch.arange(tail0, tail0 + K.shape[2] - a, device=x.device),
                ]
            )
            K = apply_rope(K, kpos, self.rope_base)
            q_sink = apply_rope(q, pos.clamp_max(self.slots - 1), self.rope_base)
        o = self._blocks(q_rot, q_sink, K, V, T0, a, tail0, rows)  # [B, H, T, d_h]
        y = o.transpose(1, 2).reshape(B, T, self.H * self.dh)
        return self.o_proj(y.to(x.dtype)), new_state

    def _extend(self, state: KVCache, k, v):
        """Append T new keys/values: returns chronological (K, V) over cache + new, and the
        state after them."""
        T = k.shape[2]
        T0, f = state.length, state.filled
        if self.slots is None:  # full attention: append in place when there is room
            if state.k.shape[2] >= f + T and self._writable(state.k, k):
                state.k[:, :, f : f + T] = k
                state.v[:, :, f : f + T] = v
                K, V, kb, vb = state.k[:, :, : f + T], state.v[:, :, : f + T], state.k, state.v
            else:
                K = kb = torch.cat([state.chronological(state.k), k], dim=2)
                V = vb = torch.cat([state.chronological(state.v), v], dim=2)
            return K, V, KVCache(kb, vb, T0 + T, f + T, 0, 0, 0)
        K = torch.cat([state.chronological(state.k), k], dim=2)
        V = torch.cat([state.chronological(state.v), v], dim=2)
        n_sink = min(self.sinks, T0 + T)  # sinks are never evicted: K indices [0, n_sink)
        n_ring = min(K.shape[2] - n_sink, self.window)
        keep = K.shape[2] - n_ring
        if n_sink + n_ring == K.shape[2]:
            kb, vb = K, V
        elif state.k.shape[2] == n_sink + n_ring and self._writable(state.k, k):
            # a full ring (every segment of a long prefill after the first): overwrite it in
            # place from K (a copy), so the old and the new cache are never both alive
            kb, vb = state.k, state.v
            for buf, src in ((kb, K), (vb, V)):
                buf[:, :, :n_sink] = src[:, :, :n_sink]
                buf[:, :, n_sink:] = src[:, :, keep:]
        else:
            kb = torch.cat([K[:, :, :n_sink], K[:, :, keep:]], dim=2)
            vb = torch.cat([V[:, :, :n_sink], V[:, :, keep:]], dim=2)
        return K, V, KVCache(kb, vb, T0 + T, n_sink + n_ring, 0, self.sinks, self.window)

    def _blocks(self, q, q_sink, K, V, T0, a, tail0, rows=None):
        """Blockwise SDPA. q [B, H, T, d_h] at positions T0..T0+T−1; K, V chronological with
        index↔position map (a, tail0); q_sink: queries rotated for sink keys (rolling only);
        ``rows``: leading padding slots per row (hidden keys), None without padding."""
        T, dev = q.shape[2], q.device
        s, W = self.sinks, self.window
        n_sink = min(s, T0 + T)
        outs = []
        for b0 in range(0, T, self.q_block):
            b1 = min(T, b0 + self.q_block)
            p0, p1 = T0 + b0, T0 + b1 - 1
            lo_pos = 0 if W is None else min(max(s, p0 - W + 1), p1 + 1)
            lo, hi = a + lo_pos - tail0, a + p1 + 1 - tail0  # window keys: K[:, :, lo:hi]
            qp = torch.arange(p0, p1 + 1, device=dev).unsqueeze(1)  # [n, 1]
            kp = torch.arange(lo_pos, p1 + 1, device=dev).unsqueeze(0)  # [1, m]
            vis = kp <= qp
            if W is not None:
                vis = vis & (kp > qp - W)
            if rows is not None:  # sinks are refused with padding: keys are kp
                vis = vis & key_padding_mask(rows, kp[0], qp[:, 0])
            Kw, Vw, qb = K[:, :, lo:hi], V[:, :, lo:hi], q[:, :, b0:b1]
            if n_sink:
                sp = torch.arange(n_sink, device=dev).unsqueeze(0)
                vis = torch.cat([sp <= qp, vis], dim=1)
                Ks, Vw = K[:, :, :n_sink], torch.cat([V[:, :, :n_sink], Vw], dim=2)
                if q_sink is not None:  # rolling: [q@t | q@min(t, s+W-1)] · [k | 0], [0 | k_sink]
                    qb = torch.cat([qb, q_sink[:, :, b0:b1].to(qb.dtype)], dim=-1)
                    Ks, Kw = F.pad(Ks, (Ks.shape[-1], 0)), F.pad(Kw, (0, Kw.shape[-1]))
                Kw = torch.cat([Ks, Kw], dim=2)
            outs.append(self._sdpa(qb, Kw, Vw, vis))
        return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]

    # ----- recurrent -----------------------------------------------------------------------
    def _step(self, x_t, state, mask):
        B = x_t.shape[0]
        self._check_state(state, B)
        q, k, v = self._project(x_t.unsqueeze(1))  # [B, H, 1, d_h], [B, n_kv, 1, d_h]
        pos = row_positions(torch.full((1,), state.length, device=x_t.device), state.pad)
        if not self.rolling:
            q, k = self._rope(q, pos), self._rope(k, pos)
        if self.kv_residual:
            o, new = self._kivi(q, k, v, state)
            return self.o_proj(o.reshape(B, self.H * self.dh).to(x_t.dtype)), new
        if self.kv_bits:
            K, V, new = self._extend_quantized(state, k, v)
            keys = torch.arange(new.filled, device=x_t.device)
            o = self._sdpa(q, K, V, key_padding_mask(state.pad, keys))
            out = self.o_proj(o.reshape(B, self.H * self.dh).to(x_t.dtype))
            return out, replace(new, pad=state.pad)
        new = self._append(state, k.to(state.k.dtype), v.to(state.v.dtype))
        K, V = new.k[:, :, : new.filled], new.v[:, :, : new.filled]  # slot order is irrelevant
        vis = None
        if new.pad is not None:  # absolute token index of each slot (no sinks with padding)
            keys = torch.arange(new.filled, device=x_t.device)
            if self.window is not None:
                keys = new.length - new.filled + self._slot_positions(new, x_t.device)
            vis = key_padding_mask(new.pad, keys)
        if self.rolling:  # re-rotate by slot rank (StreamingLLM): query at the last slot
            K = apply_rope(K, self._slot_positions(new, x_t.device), self.rope_base)
            q = apply_rope(q, torch.full((1,), new.filled - 1, device=x_t.device), self.rope_base)
        o = self._sdpa(q, K, V, vis)  # [B, H, 1, d_h]
        return self.o_proj(o.reshape(B, self.H * self.dh).to(x_t.dtype)), new

    def _slot_positions(self, st: KVCache, device) -> torch.Tensor:
        """Rolling policy: position of each filled slot = its rank in the cache, oldest first."""
        i = torch.arange(st.filled, device=device)
        s = self.sinks
        return torch.where(i < s, i, s + (i - s - st.start) % self.window)

    def _append(self, state: KVCache, k, v) -> KVCache:
        """Write one token (k, v [B, n_kv, 1, d_h]) into its slot: amortised O(1) without
        autograd; a functional copy when autograd tracks the state (never writes into tensors
        the caller handed in that require grad)."""
        f, cap, start = state.filled, state.k.shape[2], state.start
        if self.slots is None or f < self.slots:
            slot, f_new = f, f + 1
        else:  # ring full: overwrite the oldest window token
            slot, f_new, start = self.sinks + start, f, (start + 1) % self.window
        inplace = self._writable(state.k, k) and self._writable(state.v, v)
        bufs = []
        for buf, new in ((state.k, k), (state.v, v)):
            if slot < cap and inplace:
                buf[:, :, slot : slot + 1] = new
            elif slot < cap:
                buf = torch.cat([buf[:, :, :slot], new, buf[:, :, slot + 1 :]], dim=2)
            elif inplace:  # grow geometrically (bounded by s+W for windows)
                new_cap = max(_MIN_CAPACITY, 2 * cap)
                if self.slots is not None:
                    new_cap = min(new_cap, self.slots)
                grown = buf.new_empty(buf.shape[0], buf.shape[1], new_cap, buf.shape[3])
                grown[:, :, :f] = buf[:, :, :f]
                grown[:, :, slot : slot + 1] = new
                buf = grown
            else:
                buf = torch.cat([buf[:, :, :f], new], dim=2)
            bufs.append(buf)
        return KVCache(
            bufs[0], bufs[1], state.length + 1, f_new, start, state.sinks, state.window, state.pad
        )

    def extra_repr(self) -> str:
        extra = f", window={self.window}, sinks={self.sinks}" if self.window else ""
        extra += f", kv_bits={self.kv_bits}, kv_group={self.kv_group}" if self.kv_bits else ""
        extra += f", kv_residual={self.kv_residual}" if self.kv_residual else ""
        pol = f", sink_positions={self.sink_positions}" if self.window else ""
        return (
            f"d_model={self.d_model}, heads={self.H}, kv_heads={self.n_kv}, "
            f"head_dim={self.dh}, positions={self.positions}{extra}{pol}"
        )
