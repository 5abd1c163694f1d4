"""Local–global cache: the particle component of the Fan Duality Model (arXiv 2604.07716;
docs/fdm.md §3, §5), as a standalone mixer.

Glossary (token t; D = d_model; the FDM block uses the same machinery, fdm_cache.py):
    x_t      [D]   input (the residual block's normed stream)
    s_t      ℝ     landmark score. Inside FDM this is the wave's s_eff; standalone it is a
                   small head s_t = w_s·x_t + b_s  [project design, see below]
    V_t            visible set: {j < t : j ≥ t − W} ∪ topK_{j<t}(s_j), ties → earlier index
    q_t, k_j, v_j  W_q x_t + b_q, W_k x_j + b_k, W_v x_j + b_v   (single head, width D)
    c_t      [D]   Σ_{j∈V_t} softmax_j(q_t·k_j/√D [+ s_j]) v_j;  0 when V_t is empty (t = 0)
    y_t      [D]   σ(W_g x_t + b_g) ⊙ c_t                     (docs/fdm.md §3.2 gated read)

Standalone design [project]: the hard top-K passes no gradient to s (docs/fdm.md §3.3; inside FDM
s learns through p_t). So that a standalone score head learns at all, ``score_bias=True``
adds s_j to the read logits (a learned per-key bias): tokens the head favours are both kept
longer and read more. ``score_bias=False`` gives the bare FDM read with a fixed random
selector.

Training form: one masked softmax over (heap, ring, chunk) slots with the mask of
``fdm_cache.chunk_visibility`` (O(T·(K+W+T)) like the original's dense mask). Decode form:
a ring buffer of W entries and a K-slot top-K store (fdm_cache), reproducing that mask.
State: (W + K)·D + 2K elements (x_j stored, k/v recomputed; the K heap indices are int64),
independent of the length.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import repeat

import torch
import torch.nn.functional as F
from torch import nn

from kvfree.mixers import fdm_cache as fc
from kvfree.mixers.base import Mixer, grow_padding
from kvfree.mixers.fdm_scan import real_dtype
from kvfree.state import State


@dataclass
class LGCacheState(State):
    cache: fc.CacheState


class LocalGlobalCache(Mixer):
    """FDM's local–global cache as a standalone mixer: c_t = Σ_{j∈V_t} softmax_j(q_t·k_j/√D [+ s_j])
    v_j over V_t = the last W tokens ∪ the top-K by landmark score s, y_t = σ(W_g x_t + b_g) ⊙ c_t
    (docs/fdm.md §3, §5); state (W + K)·D + 2K. Full glossary in the module docstring."""

    name = "lgcache"
    supports_padding = True

    def __init__(
        self,
        d_model: int,
        *,
        window: int = 256,
        top_k: int = 16,
        score_bias: bool = True,
        gate_bias: float = 0.0,
        init_std: float = 0.02,
        segment: int = 512,
    ):
        super().__init__(d_model)
        if window < 0 or top_k < 0 or window + top_k == 0:
            raise ValueError(
                f"window and top_k must be >= 0 and not both 0, got window={window}, top_k={top_k}"
            )
        if segment < 1:
            raise ValueError(f"segment must be >= 1, got {segment}")
        self.window, self.top_k, self.score_bias, self.segment = window, top_k, score_bias, segment
        self.W_s = nn.Linear(d_model, 1)
        self.W_q, self.W_k, self.W_v, self.W_g = (nn.Linear(d_model, d_model) for _ in range(4))
        for m in (self.W_s, self.W_q, self.W_k, self.W_v, self.W_g):
            nn.init.normal_(m.weight, std=init_std)
            nn.init.zeros_(m.bias)
        nn.init.constant_(self.W_g.bias, gate_bias)
        self.scale = d_model**-0.5

    def init_state(self, batch, *, device=None, dtype=None):
        return LGCacheState(
            fc.init_cache(batch, self.d_model, self.window, self.top_k, device=device, dtype=dtype)
        )

    def state_formula(self) -> str:
        W, K, D = self.window, self.top_k, self.d_model
        return f"(W+K)·D + 2K = ({W}+{K})·{D} + 2·{K} (K scores, K int64 indices)"

    def state_size(self, seq_len: int) -> int:
        return fc.cache_size(self.d_model, self.window, self.top_k)

    def state_nbytes(self, seq_len: int, dtype: torch.dtype = torch.float32) -> int:
        return fc.cache_nbytes(self.d_model, self.window, self.top_k, dtype)

    def _score(self, x):
        """s = w_s·x + b_s in fp32 (float64 for float64 inputs), even for a bf16 model."""
        with torch.autocast(x.device.type, enabled=False):
            x = x.to(real_dtype(x.dtype))
            return F.linear(x, self.W_s.weight.to(x.dtype), self.W_s.bias.to(x.dtype))[..., 0]

    def _read(self, x_q, keys, vis):
        """x_q [B, T, D], keys [B, S, D] (stored inputs), vis [B, T, S] → y [B, T, D]."""
        bias = self._score(keys) if self.score_bias else None
        c = fc.masked_read(self.W_q(x_q), self.W_k(keys), self.W_v(keys), vis, self.scale, bias)
        return torch.sigmoid(self.W_g(x_q)) * c

    def _forward(self, x, state, mask, pad=None):
        ys, cache = [], state.cache
        pads = pad.segments(self.segment) if pad is not None else repeat(None)
        for x_seg, pad_seg in zip(x.split(self.segment, dim=1), pads):  # O(T·(K+W+T)) memory
            rows = grow_padding(cache.pad, cache.pos, pad_seg, type(self).__name__)
            s = self._score(x_seg)
            vis = fc.chunk_visibility(cache, s, self.window, self.top_k, rows)
            keys = torch.cat([cache.heap_x.to(x.dtype), cache.ring.to(x.dtype), x_seg], dim=1)
            ys.append(self._read(x_seg, keys, vis))
            cache = fc.update_chunk(cache, x_seg, s, self.window, self.top_k, rows)
        return torch.cat(ys, dim=1), LGCacheState(cache)

    def _step(self, x_t, state, mask):
        cache = state.cache
        vis = fc.step_visibility(cache, self.window)[:, None]  # [B, 1, K+W]
        keys = torch.cat([cache.heap_x.to(x_t.dtype), cache.ring.to(x_t.dtype)], dim=1)
        y = self._read(x_t[:, None], keys, vis)[:, 0]
        cache = fc.insert_step(cache, x_t, self._score(x_t), self.window, self.top_k)
        return y, LGCacheState(cache)
