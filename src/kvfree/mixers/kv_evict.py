"""KV-cache eviction on softmax attention: H2O and SnapKV (docs/baselines.md §9, docs/frontier.md
§2). Both keep a budget of B cached tokens per KV head; which tokens differs.

Glossary (KV head k; its g query heads; p_{t,j} the attention probability of query t on key j):
    A_j        accumulated attention mass of cached key j: Σ over every query so far and the g heads
               of p_{t,j} (fp32; H2O's "heavy hitter" score)                          ``score``
    H2O        (Zhang et al., arXiv 2306.14048) keep the ``recent`` newest tokens plus the
               B − recent others with the largest A_j; after each decode token that overflows the
               budget the lowest is evicted. A prompt longer than B is scored by the column sums of
               its own (full, exact) prefill attention and cut once to the budget (kvpress's
               ``ObservedAttentionPress`` protocol)
    SnapKV     (Li et al., arXiv 2404.14469) at the end of the first prefill, if the prompt is
               longer than B: the last w = ``obs_window`` prompt queries score every earlier
               key (their probabilities summed over the window and the g heads, then
               average-pooled over positions with ``pool`` taps, same padding); keep the top
               B − w of those plus the window. Later tokens are appended, nothing is evicted
Cached keys carry RoPE at their true positions, so nothing is re-rotated after eviction.

Decode is the reference (eviction makes it differ from a full-attention parallel forward by
design): ``step`` is exactly H2O's per-token rule; ``forward`` is exact full attention over what the
cache holds plus the new tokens, followed by the one-shot cut. With a budget no sequence reaches,
both equal plain attention (tests/mixers/test_kv_evict.py).

Bytes: 2·S·n_kv·d_h·b for K and V, S = min(T, B) (SnapKV: plus every decoded token), and for H2O
n_kv·S fp32 scores.

Padded batches (``left_pad``): a padding slot is hidden from real queries, its queries add no
attention mass, it ranks below every token when the cache is cut, and RoPE uses each row's own
positions — so each row keeps the tokens, and computes what, its prompt alone would. While a
padding slot is still cached the state carries one bool per slot and KV head saying which.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvfree.mixers.attention import Attention
from kvfree.mixers.base import grow_padding, row_positions
from kvfree.state import RowInts, State, carried_dtype


@dataclass
class EvictingKVCache(State):
    """K, V [B, n_kv, S, d_h] of the kept tokens, oldest first (RoPE applied); ``score``
    [B, n_kv, S] their accumulated attention mass (H2O; [B, n_kv, 0] for SnapKV)."""

    k: torch.Tensor
    v: torch.Tensor
    score: torch.Tensor
    length: int = 0
    #: [B, n_kv, S] bool, False for a padding slot (a batch of prompts of different lengths:
    #: padding is never read and evicted first); None while nothing was padded
    real: torch.Tensor | None = None
    pad: RowInts | None = None  # leading padding per row (metadata)

    @property
    def filled(self) -> int:
        return self.k.shape[2]


class _Evicting(Attention):
    """Full causal attention over a cache that keeps at most ``budget`` tokens per KV head."""

    fixed_memory = True
    keeps_score = True

    def __init__(self, d_model: int, *, budget: int = 64, **options):
        for bad in ("window", "sinks", "kv_bits", "sink_positions"):
            if bad in options:
                raise ValueError(f"{self.name} evicts from a full cache; it takes no {bad!r}")
        super().__init__(d_model, **options)
        if budget < 1:
            raise ValueError(f"budget must be >= 1 cached token, got {budget}")
        self.budget = budget

    # ----- state ---------------------------------------------------------------------------
    def init_state(self, batch, *, device=None, dtype=None) -> EvictingKVCache:
        k = torch.zeros(batch, self.n_kv, 0, self.dh, device=device, dtype=dtype)
        # one score per kept token (H2O, filled as tokens arrive) or none (SnapKV)
        score = torch.zeros(batch, self.n_kv, 0, device=device, dtype=carried_dtype(k.dtype))
        return EvictingKVCache(k, torch.zeros_like(k), score)

    def _kept(self, seq_len: int) -> int:
        return min(seq_len, self.budget)

    def state_size(self, seq_len: int) -> int:
        S = self._kept(seq_len)
        return 2 * S * self.n_kv * self.dh + (S * self.n_kv if self.keeps_score else 0)

    def state_nbytes(self, seq_len: int, dtype: torch.dtype = torch.float32) -> int:
        S = self._kept(seq_len)
        kv = 2 * S * self.n_kv * self.dh * dtype.itemsize
        return kv + (S * self.n_kv * carried_dtype(dtype).itemsize if self.keeps_score else 0)

    def _check_state(self, state, batch: int) -> None:
        if not isinstance(state, EvictingKVCache):
            raise TypeError(
                f"{type(self).__name__} expects an EvictingKVCache state, got "
                f"{type(state).__name__}; use init_state(batch) or a state it returned"
            )
        if state.k.shape[0] != batch or state.k.shape[1] != self.n_kv:
            raise ValueError(
                f"EvictingKVCache has [batch, n_kv] = {list(state.k.shape[:2])}, expected "
                f"{[batch, self.n_kv]}"
            )

    # ----- attention with its probabilities --------------------------------------------------
    def _attend(self, q, K, V, n_old: int, real=None, real_q=None):
        """q [B, H, T, d_h] (the T new tokens), K, V [B, n_kv, n_old + T, d_h]: the old keys
        are visible to every new query, the new ones causally. → o [B, H, T, d_h] and the
        probability mass per key, summed over the queries and the g heads [B, n_kv, S] fp32.
        With padding, ``real`` [B, n_kv, S] / ``real_q`` [B, T]: padding keys are hidden from
        real queries and padding queries add no mass."""
        B, _, T, d = q.shape
        S = K.shape[2]
        dev = q.device
        outs, mass = [], torch.zeros(B, self.n_kv, S, device=dev, dtype=carried_dtype(q.dtype))
        for b0 in range(0, T, self.q_block):
            b1 = min(T, b0 + self.q_block)
            qg = q[:, :, b0:b1].reshape(B, self.n_kv, self.g, b1 - b0, d)
            s = torch.einsum("bkgnd,bksd->bkgns", qg, K) * self.dh**-0.5
            qpos = torch.arange(n_old + b0, n_old + b1, device=dev).unsqueeze(1)
            vis = torch.arange(S, device=dev).unsqueeze(0) <= qpos  # [n, S]
            if real is not None:  # [B, n_kv, 1, n, S]
                rq = real_q[:, b0:b1]
                vis = vis & (real[:, :, None, None, :] | ~rq[:, None, None, :, None])
            p = torch.softmax(s.masked_fill(~vis, float("-inf")), dim=-1)
            outs.append(torch.einsum("bkgns,bksd->bkgnd", p, V).reshape(B, self.H, b1 - b0, d))
            if real is not None:
                p = p * rq[:, None, None, :, None].to(p.dtype)
            mass = mass + p.sum((2, 3)).to(mass.dtype)
        return torch.cat(outs, 2), mass

    @staticmethod
    def _gather(keep: torch.Tensor, K, V, score):
        """Keep slots ``keep`` [B, n_kv, S'] (sorted: the cache stays oldest first)."""
        idx = keep.unsqueeze(-1).expand(-1, -1, -1, K.shape[-1])
        if score.shape[2]:
            score = torch.gather(score, 2, keep)
        return torch.gather(K, 2, idx), torch.gather(V, 2, idx), score

    def _forward(self, x, state, mask, pad=None):
        B, T, _ = x.shape
        self._check_state(state, B)
        T0, n_old = state.length, state.filled
        rows = grow_padding(state.pad, T0, pad, type(self).__name__)
        q, k, v = self._project(x)
        pos = row_positions(torch.arange(T0, T0 + T, device=x.device), rows)
        q, k = self._rope(q, pos), self._rope(k, pos)
        K = torch.cat([state.k, k.to(state.k.dtype)], 2)
        V = torch.cat([state.v, v.to(state.v.dtype)], 2)
        real = real_q = None
        if state.real is not None or pad is not None:
            real_q = ~pad.mask if pad is not None else x.new_ones(B, T, dtype=torch.bool)
            old = state.real if state.real is not None else real_q.new_ones(B, self.n_kv, n_old)
            real = torch.cat([old, real_q[:, None].expand(B, self.n_kv, T)], 2)
        o, mass = self._attend(q, K, V, n_old, real, real_q)
        y = self.o_proj(o.transpose(1, 2).reshape(B, T, self.H * self.dh).to(x.dtype))
        score, keep = self._select(state, q, K, mass, T, real)
        if keep is not None:
            K, V, score = self._gather(keep, K, V, score)
            real = None if real is None else torch.gather(real, 2, keep)
        if real is not None and bool(real.all()):
            real = None  # every padding slot evicted
        return y, EvictingKVCache(K, V, score, T0 + T, real, rows)

    def _step(self, x_t, state, mask):
        y, new = self._forward(x_t.unsqueeze(1), state, mask)
        return y[:, 0], new

    def _select(self, state, q, K, mass, T, real=None):
        """→ (scores of the cached keys, sorted slots to keep or None for all); ``real``: which
        slots are tokens (padding ranks below every token), None without padding."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, budget={self.budget}"


class H2OAttention(_Evicting):
    """Heavy-hitter oracle (H2O): keep the ``recent`` newest tokens and the budget − recent with
    the largest accumulated attention mass (module docstring)."""

    name = "attention_h2o"

    def __init__(self, d_model: int, *, budget: int = 64, recent: int | None = None, **options):
        super().__init__(d_model, budget=budget, **options)
        self.recent = budget // 2 if recent is None else recent
        if not 0 <= self.recent <= budget:
            raise ValueError(f"recent must be in [0, budget={budget}], got {self.recent}")

    def state_formula(self) -> str:
        return (
            f"2·min(T, B)·n_kv·d_h + n_kv·min(T, B) = 2·min(T, {self.budget})·{self.n_kv}·"
            f"{self.dh} + {self.n_kv}·min(T, {self.budget}) (K, V; fp32 scores)"
        )

    def _select(self, state, q, K, mass, T, real=None):
        score = torch.cat([state.score, mass.new_zeros(*mass.shape[:2], T)], 2) + mass
        S = K.shape[2]
        if self.budget >= S:
            return score, None
        old = S - self.recent  # candidates for eviction: all but the newest `recent`
        rank = score if real is None else score.masked_fill(~real, float("-inf"))
        heavy = rank[:, :, :old].topk(self.budget - self.recent, dim=-1).indices
        recent = torch.arange(old, S, device=K.device).expand(*heavy.shape[:2], -1)
        return score, torch.cat([heavy, recent], -1).sort(-1).values


class SnapKVAttention(_Evicting):
    """SnapKV: a one-shot cut at the end of the first prefill, chosen by the last ``obs_window``
    queries (module docstring); decode appends."""

    name = "attention_snapkv"
    fixed_memory = False  # decoded tokens are appended
    keeps_score = False

    def __init__(self, d_model: int, *, budget: int = 64, obs_window: int = 8, pool: int = 5,
                 **options):  # fmt: skip
        super().__init__(d_model, budget=budget, **options)
        if not 1 <= obs_window < budget:
            raise ValueError(f"obs_window must be in [1, budget={budget}), got {obs_window}")
        if pool < 1 or pool % 2 == 0:
            raise ValueError(f"pool must be an odd number of taps >= 1, got {pool}")
        self.obs_window, self.pool = obs_window, pool

    def state_formula(self) -> str:
        return (
            f"2·min(T_prompt, B)·n_kv·d_h (+ 2·n_kv·d_h per decoded token) = 2·min(T, "
            f"{self.budget})·{self.n_kv}·{self.dh}"
        )

    def _select(self, state, q, K, mass, T, real=None):
        score = state.score  # empty: SnapKV keeps no score
        S, w = K.shape[2], self.obs_window
        if state.length or self.budget >= S:  # not the first prefill, or it fits
            return score, None
        B = q.shape[0]
        qw = q[:, :, -w:].reshape(B, self.n_kv, self.g, w, self.dh)
        s = torch.einsum("bkgnd,bksd->bkgns", qw, K[:, :, : S - w]) * self.dh**-0.5
        logits = _window_logits(s, K, qw, self.dh)
        if real is not None:  # padding keys get no vote (a row's tokens fill its window first)
            logits = logits.masked_fill(~real[:, :, None, None, :], float("-inf"))
        votes = torch.softmax(logits, -1).nan_to_num(0.0)[..., : S - w].sum((2, 3))
        pooled = F.avg_pool1d(
            votes.reshape(B * self.n_kv, 1, S - w), self.pool, 1, self.pool // 2
        ).view(B, self.n_kv, S - w)
        if real is not None:
            pooled = pooled.masked_fill(~real[..., : S - w], float("-inf"))
        top = pooled.topk(self.budget - w, dim=-1).indices
        window = torch.arange(S - w, S, device=K.device).expand(B, self.n_kv, -1)
        return score, torch.cat([top, window], -1).sort(-1).values


def _window_logits(prefix_logits, K, qw, dh):
    """The window queries' logits over every key: the prefix ones, then the window's own keys
    causally (query i of the window sees window keys ≤ i)."""
    w = qw.shape[3]
    own = torch.einsum("bkgnd,bksd->bkgns", qw, K[:, :, -w:]) * dh**-0.5
    causal = torch.ones(w, w, dtype=torch.bool, device=K.device).tril()
    return torch.cat([prefix_logits, own.masked_fill(~causal, float("-inf"))], -1)
