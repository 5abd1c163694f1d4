"""Tool-call history retrieval, plain and with a delayed commit (docs/tasks.md §4.3)
[project format, §4.1].

Plain (``delayed=False``):
    records  ``a t v``: agent a ∈ set A, tool t ∈ set B, result v a value; each (a, t) pair
             occurs once per sequence; filler between records
    query    ``QRY a t v`` about a uniform record; label v on t; minimum length 3n + 4

Delayed commit (``delayed=True``) [project definition; the paper names it but never defines it]:
    each call is two events, ``CALL a t`` and later ``RET a t v``. RET i is placed after the
    CALLs of the next d_i calls, d_i ~ U{1, …, 4} (RETs that would fall past the last call
    follow it, in call order). A call is "pending" (no RET before the query) with probability
    0.25 (at least one call commits) and is never queried; the query asks about a committed
    call, so CALL records are key-only distractors. Minimum length 7n + 4 (all committed).

Tiers: ``grid`` (exact length ``seq_len``, ``n`` calls); ``easy`` / ``hard``: 10–30 / 60–120
calls with length ~ U[minimum, T_max], T_max = 400 / 1500 (rows right-padded with PAD).
Masks: prefix = 1 before QRY; action = 1 on RET records (delayed) or on every record (plain).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvfree.tasks.base import IGNORE, check_seed, distinct_draws, finish, make_rng
from kvfree.tasks.suite import (
    A_LO,
    B_LO,
    CALL,
    QRY,
    RET,
    SET_SIZE,
    VAL_LO,
    VOCAB,
    place_records,
    prefix_before,
)

TIERS = {"easy": (10, 30, 400), "hard": (60, 120, 1500)}  # calls lo, hi, T_max


@dataclass
class Config:
    num_examples: int = 500
    seq_len: int = 64  # L (grid tier only)
    n: int = 4  # calls (grid tier only)
    tier: str = "grid"  # grid | easy | hard
    delayed: bool = False
    pending_prob: float = 0.25
    max_delay: int = 4


def min_length(n: int, delayed: bool = False) -> int:
    return (7 if delayed else 3) * n + 4


def _unique_pairs(rng, N: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n distinct (agent, tool) pairs per row, as [N, n] agent and tool ids."""
    idx = distinct_draws(rng, N, n, 0, SET_SIZE * SET_SIZE)
    return A_LO + idx // SET_SIZE, B_LO + idx % SET_SIZE


def generate(cfg: Config, seed: int):
    seed = check_seed(seed)
    N = cfg.num_examples
    if cfg.tier != "grid" and cfg.tier not in TIERS:
        raise ValueError(f"tier must be 'grid' or one of {sorted(TIERS)}, got {cfg.tier!r}")
    rng = make_rng(seed)
    if cfg.tier == "grid":
        if not 1 <= cfg.n <= SET_SIZE * SET_SIZE:
            raise ValueError(f"n must be in [1, {SET_SIZE**2}], got {cfg.n}")
        if cfg.seq_len < min_length(cfg.n, cfg.delayed):
            raise ValueError(
                f"tooltrace with n={cfg.n} (delayed={cfg.delayed}) needs seq_len ≥ "
                f"{min_length(cfg.n, cfg.delayed)}, got {cfg.seq_len} (infeasible)"
            )
        calls = np.full(N, cfg.n)
    else:
        lo, hi, t_max = TIERS[cfg.tier]
        calls = rng.integers(lo, hi + 1, N)
    n = int(calls.max())
    rows = np.arange(N)
    active = np.arange(n)[None, :] < calls[:, None]  # [N, n]
    agents, tools = _unique_pairs(rng, N, n)
    vals = rng.integers(VAL_LO, VAL_LO + SET_SIZE, (N, n))
    if not cfg.delayed:
        records = np.stack([agents, tools, vals], -1)  # [N, n, 3]
        rec_len = np.where(active, 3, 0)
        queryable = active
        is_ret = np.ones_like(active)
    else:
        committed = active & (rng.random((N, n)) >= cfg.pending_prob)
        none = ~committed.any(1)  # force one commit per row
        committed[rows[none], rng.integers(0, calls[none])] = True
        delay = rng.integers(1, cfg.max_delay + 1, (N, n))
        i = np.arange(n)[None, :]
        last = (calls - 1)[:, None]
        call_key = np.where(active, i.astype(float), np.inf)
        ret_key = np.minimum(i + delay, last) + 0.5 + i / (4.0 * n)
        ret_key = np.where(committed, ret_key, np.inf)
        keys = np.concatenate([call_key, ret_key], 1)  # [N, 2n]
        order = np.argsort(keys, axis=1, kind="stable")
        ev = np.zeros((N, 2 * n, 4), np.int64)
        ev[:, :n, 0], ev[:, :n, 1], ev[:, :n, 2] = CALL, agents, tools
        ev[:, n:] = np.stack([np.full((N, n), RET), agents, tools, vals], -1)
        length = np.concatenate([np.where(active, 3, 0), np.where(committed, 4, 0)], 1)
        records = np.take_along_axis(ev, order[:, :, None], 1)
        rec_len = np.take_along_axis(length, order, 1)
        is_ret = np.take_along_axis(np.concatenate([np.zeros_like(active), committed], 1), order, 1)
        queryable = committed
    min_len = rec_len.sum(1) + 4
    if cfg.tier == "grid":
        lengths = np.full(N, cfg.seq_len)
    else:
        lengths = rng.integers(min_len, np.maximum(min_len, t_max) + 1)
    # the queried call: uniform among queryable ones
    score = np.where(queryable, rng.random((N, n)), -1.0)
    j = score.argmax(1)
    tail = np.stack([np.full(N, QRY), agents[rows, j], tools[rows, j], vals[rows, j]], 1)
    inputs, starts = place_records(rng, records, rec_len, tail, lengths)
    L = inputs.shape[1]
    labels = np.full((N, L), IGNORE, np.int64)
    labels[rows, lengths - 2] = vals[rows, j]
    action = np.zeros((N, L), np.uint8)
    w = records.shape[2]
    pos = starts[:, :, None] + np.arange(w)[None, None, :]
    on = (np.arange(w)[None, None, :] < rec_len[:, :, None]) & (is_ret[:, :, None] > 0)
    action[np.broadcast_to(rows[:, None, None], pos.shape)[on], pos[on]] = 1
    slices = {"seq_len": lengths, "n": calls, "tier": cfg.tier, "delayed": cfg.delayed}
    return finish(
        "tooltrace",
        cfg,
        seed,
        inputs,
        labels,
        slices,
        {"prefix": prefix_before(lengths - 4, L), "action": action},
        vocab_size=VOCAB,
    )
