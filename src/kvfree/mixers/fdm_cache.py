"""The local–global cache of FDM (docs/fdm.md §3, §5): which past tokens a query may read.

Visibility (docs/fdm.md §3.1 with the project's deterministic ties, §4.5):

    Mask_{t,j} = 1  ⇔  j < t  and  ( j ≥ t − W   or   j ∈ topK_{j' < t} s_j' )

where topK orders by (s desc, index asc), i.e. on ties the earlier token wins, and the top-K
runs over **all** past tokens, window included. The current token never sees itself.

Decode state (per layer, per batch row; docs/fdm.md §5):
    ring      [B, W, D]   x̂ of the last W tokens; token j lives in slot j mod W
    heap_x    [B, K, D]   x̂ of the K past tokens with the largest s (the "min-heap")
    heap_s    [B, K]      their scores (fp32; selection metadata: never differentiated)
    heap_idx  [B, K]      their indices (int64), −1 = empty slot

The heap arrays are kept sorted by index with empty slots first, so a decode step (drop the
weakest entry, append the new token) and a parallel chunk (sort the candidates) give the same
layout. Ring indices are implied by the position counter, so they are not stored.

Why the streaming form is exact: s_j never changes once computed, so the top-K of {j < t} is
always inside (heap ∪ tokens since the heap was built), and the ring holds exactly
{t − W, …, t − 1}. A chunk of T new tokens therefore reads from K + W + T candidate slots
(heap, ring, chunk) with the mask of :func:`chunk_visibility`; an empty state gives the
training mask (:func:`causal_topk_mask`). State elements: (W + K)·D + 2K
(K of them int64 heap indices: see :func:`cache_nbytes`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvfree import perf
from kvfree.mixers.fdm_scan import real_dtype
from kvfree.state import RowInts, State


@dataclass
class CacheState(State):
    ring: torch.Tensor  # [B, W, D]
    heap_x: torch.Tensor  # [B, K, D]
    heap_s: torch.Tensor  # [B, K]
    heap_idx: torch.Tensor  # [B, K] int64, -1 = empty
    pos: int = 0  # tokens seen, padding included (metadata)
    pad: RowInts | None = None  # leading padding per row (metadata; never read, never kept)


def init_cache(
    batch: int, d: int, window: int, top_k: int, *, device=None, dtype=None
) -> CacheState:
    z = lambda *s: torch.zeros(*s, device=device, dtype=dtype)  # noqa: E731
    scores = torch.zeros(batch, top_k, device=device, dtype=real_dtype(dtype or torch.float32))
    return CacheState(
        z(batch, window, d),
        z(batch, top_k, d),
        scores,
        torch.full((batch, top_k), -1, dtype=torch.int64, device=device),
        0,
    )


def cache_size(d: int, window: int, top_k: int) -> int:
    """Carried elements: ring W·D + heap K·D + K scores + K indices."""
    return (window + top_k) * d + 2 * top_k


def cache_nbytes(d: int, window: int, top_k: int, dtype: torch.dtype) -> int:
    """Carried bytes: ring and heap in ``dtype``, scores in the scan dtype, int64 indices."""
    size = lambda dt: torch.empty((), dtype=dt).element_size()  # noqa: E731
    return (window + top_k) * d * size(dtype) + top_k * (size(real_dtype(dtype)) + 8)


def ring_indices(pos: int, window: int, device=None) -> torch.Tensor:
    """[W] token index held by each ring slot after ``pos`` tokens (−1 if empty)."""
    r = torch.arange(window, device=device)
    j = pos - 1 - torch.remainder(pos - 1 - r, window)
    return torch.where(j >= 0, j, torch.full_like(j, -1))


def beats(s_a, i_a, s_b, i_b) -> torch.Tensor:
    """True where candidate a ranks above b: larger s, or equal s and an earlier index."""
    return (s_a > s_b) | ((s_a == s_b) & (i_a < i_b))


def _real(idx: torch.Tensor, rows: RowInts | None) -> torch.Tensor | None:
    """[B, n] True where token index ``idx`` ([n] or [B, n]) is not padding (None: no padding)."""
    if rows is None:
        return None
    return idx >= torch.tensor(rows, device=idx.device)[:, None]


def _chunk_indices(t: torch.Tensor, B: int, rows: RowInts | None) -> torch.Tensor:
    """[B, T] candidate indices of a chunk's tokens t [T]: −1 (never a candidate) at padding."""
    g = t.expand(B, t.shape[0])
    real = _real(t, rows)
    return g if real is None else torch.where(real, g, torch.full_like(g, -1))


def chunk_visibility(
    state: CacheState, s: torch.Tensor, window: int, top_k: int, rows: RowInts | None = None
) -> torch.Tensor:
    """[B, T, K + W + T] bool: which of (heap, ring, chunk) slots query pos+i may read.

    ``s`` [B, T] are the chunk's scores. Heap slots are shown only outside the window (the ring
    holds the window, so every visible token is counted once). ``rows``: leading padding per
    row counting this chunk's (default: the state's) — padding is never read and never ranked.
    """
    B, T = s.shape
    dev, pos, W, K = s.device, state.pos, window, top_k
    rows = state.pad if rows is None else rows
    t = torch.arange(pos, pos + T, device=dev)  # query indices [T]
    lo = (t - W)[:, None]  # window start per query
    ridx = ring_indices(pos, W, dev)  # [W]
    vis_ring = (ridx[None, :] >= 0) & (ridx[None, :] >= lo)  # [T, W]
    vis_chunk = (t[None, :] < t[:, None]) & (t[None, :] >= lo)  # [T(query), T(key)]
    vis_ring = vis_ring.expand(B, T, W)
    vis_chunk = vis_chunk.expand(B, T, T)
    if rows is not None:
        vis_ring = vis_ring & _real(ridx, rows)[:, None]
        vis_chunk = vis_chunk & _real(t, rows)[:, None]
    if K == 0:
        return torch.cat([vis_ring, vis_chunk], dim=-1)
    # global candidates: heap (always present) + chunk tokens before the query
    with torch.no_grad():
        g_s = torch.cat([state.heap_s.to(s.dtype), s], dim=1).detach()  # [B, K+T]
        g_i = torch.cat([state.heap_idx, _chunk_indices(t, B, rows)], dim=1)  # [B, K+T]
        valid = g_i >= 0
        bt = valid[:, :, None] & beats(
            g_s[:, :, None], g_i[:, :, None], g_s[:, None, :], g_i[:, None, :]
        )  # [B, a, b]
        rank_heap = bt[:, :K].sum(1, dtype=torch.int32)  # [B, K+T] beaten by heap entries
        chunk_rows = bt[:, K:].to(torch.int32)  # [B, T, K+T]
        rank = rank_heap[:, None, :] + chunk_rows.cumsum(1, dtype=torch.int32) - chunk_rows
        present = valid[:, None, :] & (g_i[:, None, :] < t[None, :, None])
        top = present & (rank < K)  # [B, T, K+T]
    vis_heap = top[..., :K] & (state.heap_idx[:, None, :] < lo[None])
    return torch.cat([vis_heap, vis_ring, vis_chunk | top[..., K:]], dim=-1)


def causal_topk_mask(s: torch.Tensor, window: int, top_k: int) -> torch.Tensor:
    """The training mask [B, T, T] of a fresh sequence with scores ``s`` [B, T] (docs/fdm.md §3.1
    with (s desc, index asc) ties)."""
    B, _ = s.shape
    empty = init_cache(B, 1, window, top_k, device=s.device, dtype=s.dtype)
    return chunk_visibility(empty, s, window, top_k)[..., top_k + window :]


def update_chunk(
    state: CacheState,
    xh: torch.Tensor,
    s: torch.Tensor,
    window: int,
    top_k: int,
    rows: RowInts | None = None,
) -> CacheState:
    """The cache after appending a chunk x̂ [B, T, D] with scores s [B, T] (``rows``: as in
    :func:`chunk_visibility`; padding enters the ring, where it is never read, not the heap)."""
    B, T, D = xh.shape
    dev, pos, W, K = xh.device, state.pos, window, top_k
    rows = state.pad if rows is None else rows
    new_pos = pos + T
    ring = state.ring
    if W:
        j = ring_indices(new_pos, W, dev)  # [W] token now in each slot
        src = (j - pos).clamp(0, T - 1)
        ring = torch.where((j >= pos)[None, :, None], xh[:, src], ring.to(xh.dtype))
        ring = ring * (j >= 0).to(ring.dtype)[None, :, None]
    heap_x, heap_s, heap_i = state.heap_x, state.heap_s, state.heap_idx
    if K:
        t = torch.arange(pos, new_pos, device=dev)
        g_x = torch.cat([heap_x.to(xh.dtype), xh], dim=1)  # index-ascending candidates
        g_s = torch.cat([heap_s.to(s.dtype), s], dim=1).detach()
        g_i = torch.cat([heap_i, _chunk_indices(t, B, rows)], dim=1)
        key = g_s.masked_fill(g_i < 0, float("-inf"))
        top = torch.sort(key, dim=1, descending=True, stable=True).indices[:, :K]
        sel_i = g_i.gather(1, top)  # (s desc, index asc) winners
        order = top.gather(1, torch.sort(sel_i, dim=1, stable=True).indices)  # by index
        heap_i = g_i.gather(1, order)
        valid = heap_i >= 0
        heap_x = g_x.gather(1, order[..., None].expand(B, K, D)) * valid[..., None].to(xh.dtype)
        heap_s = g_s.gather(1, order) * valid.to(g_s.dtype)
    return CacheState(ring, heap_x, heap_s, heap_i, new_pos, rows)


def step_visibility(state: CacheState, window: int) -> torch.Tensor:
    """[B, K + W] bool: the (heap, ring) slots the query at ``state.pos`` reads."""
    t = state.pos
    ridx = ring_indices(t, window, state.ring.device)
    vis_ring = (ridx >= 0).expand(state.ring.shape[0], window)
    if state.pad is not None:
        vis_ring = vis_ring & _real(ridx, state.pad)
    vis_heap = (state.heap_idx >= 0) & (state.heap_idx < t - window)
    return torch.cat([vis_heap, vis_ring], dim=-1)


def insert_step(
    state: CacheState, xh_t: torch.Tensor, s_t: torch.Tensor, window: int, top_k: int
) -> CacheState:
    """Write token ``state.pos`` (x̂_t [B, D], s_t [B]) **after** its read (docs/fdm.md §5.5):
    into ring slot pos mod W, and into the heap if a slot is empty or s_t > s_min (the strict
    comparison makes the earlier index win ties)."""
    t, W, K = state.pos, window, top_k
    B, D = xh_t.shape
    ring = state.ring
    if W:
        slot = t % W
        ring = torch.cat([ring[:, :slot], xh_t[:, None].to(ring.dtype), ring[:, slot + 1 :]], dim=1)
    heap_x, heap_s, heap_i = state.heap_x, state.heap_s, state.heap_idx
    if K:
        s_t = s_t.detach().to(heap_s.dtype)
        empty = heap_i < 0
        key = heap_s.masked_fill(empty, float("-inf"))
        weakest = key.min(1, keepdim=True).values
        tied = key == weakest  # among the weakest score, the latest index is dropped
        w = torch.where(tied, heap_i, torch.full_like(heap_i, -2)).argmax(1, keepdim=True)
        insert = empty.any(1, keepdim=True) | (s_t[:, None] > key.gather(1, w))
        k = torch.arange(K, device=heap_i.device)[None]
        src = torch.where(insert, k + (k >= w).long(), k)  # drop slot w, append the new token
        g_x = torch.cat([heap_x, xh_t[:, None].to(heap_x.dtype)], dim=1)
        g_s = torch.cat([heap_s.detach(), s_t[:, None]], dim=1)  # scores: never differentiated
        g_i = torch.cat([heap_i, torch.full_like(heap_i[:, :1], t)], dim=1)
        heap_i = g_i.gather(1, src)
        valid = heap_i >= 0
        heap_x = g_x.gather(1, src[..., None].expand(B, K, D)) * valid[..., None].to(g_x.dtype)
        heap_s = g_s.gather(1, src) * valid.to(g_s.dtype)
    return CacheState(ring, heap_x, heap_s, heap_i, t + 1, state.pad)


def masked_read(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    vis: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax read Σ_j softmax_j(q·k_j·scale [+ bias_j]) v_j over visible slots; rows that
    see nothing give 0. q [B, T, D], k/v [B, S, D], vis [B, T, S], bias [B, S] → [B, T, D].

    Fast path (perf.py; without a bias): PyTorch's fused attention with ``vis`` as its mask,
    where a row that sees nothing is shown slot 0 and its output then zeroed (no gradient
    reaches slot 0 from it) — 1.7× faster forward + backward at [32, 288, 304] than the
    masked softmax below, which it equals to round-off."""
    any_vis = vis.any(-1, keepdim=True)
    if perf.fast() and bias is None and q.dtype != torch.bfloat16:
        shown = vis.clone()
        shown[..., 0] |= ~any_vis[..., 0]
        o = F.scaled_dot_product_attention(
            q[:, None], k[:, None], v[:, None], attn_mask=shown[:, None], scale=scale
        )[:, 0]
        return o * any_vis.to(o.dtype)
    logits = torch.einsum("btd,bsd->bts", q, k) * scale
    if bias is not None:
        logits = logits + bias[:, None, :].to(logits.dtype)
    logits = logits.masked_fill(~vis, float("-inf")).masked_fill(~any_vis, 0.0)
    attn = torch.softmax(logits.float() if logits.dtype == torch.bfloat16 else logits, -1)
    attn = (attn * any_vis).to(v.dtype)
    return attn @ v
