"""FDM's MQAR format (docs/tasks.md §3; the original ``mqar.py``).

    tokens   keys 0–127 (distinct within a sequence), values 128–255, SEP = 256, PAD = 257;
             model vocabulary 522 as in the original (ids ≥ 258 never occur)
    layout   k₁ v₁ … k_n v_n | SEP k_q1  SEP k_q2 … (q = 4 queries) | PAD … up to seq_len
    labels   at each query's **key** position the value stored with that key (the value is
             not appended); −100 everywhere else, PAD included. q positions are scored.

[project] choices the spec leaves open: values are i.i.d. uniform over the 128 values
(chance ≈ 1/128); the q queried keys are distinct, uniform among the n stored keys.

Settings (``SETTINGS``): Easy 64 / 8 pairs (16 KV tokens + 8 query tokens = 24 real tokens),
Medium 128 / 16, Hard 256 / 32. The paper's protocol draws 10 000 sequences from seed 42 and
uses the first 10 % as the test set (``kvfree.bench.fdm_mqar``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvfree.tasks.base import IGNORE, check_seed, distinct_draws, finish, make_rng

N_KEYS, N_VALUES = 128, 128
KEY_LO, VALUE_LO = 0, 128
SEP, PAD = 256, 257
VOCAB = 522
SETTINGS = {"easy": (64, 8), "medium": (128, 16), "hard": (256, 32)}  # (seq_len, pairs)


@dataclass
class Config:
    num_examples: int = 10_000
    seq_len: int = 64
    num_kv_pairs: int = 8
    num_queries: int = 4


def generate(cfg: Config, seed: int):
    seed = check_seed(seed)
    N, L, n, q = cfg.num_examples, cfg.seq_len, cfg.num_kv_pairs, cfg.num_queries
    if not 1 <= n <= N_KEYS:
        raise ValueError(f"num_kv_pairs must be in [1, {N_KEYS}] (keys are distinct), got {n}")
    if not 1 <= q <= n:
        raise ValueError(
            f"num_queries must be in [1, num_kv_pairs={n}] (queried keys are distinct), got {q}"
        )
    if 2 * n + 2 * q > L:
        raise ValueError(
            f"seq_len={L} is too short for {n} pairs and {q} queries: need at "
            f"least 2·{n} + 2·{q} = {2 * n + 2 * q}"
        )
    if N < 0:
        raise ValueError(f"num_examples must be >= 0, got {N}")
    rng = make_rng(seed)
    keys = distinct_draws(rng, N, n, KEY_LO, KEY_LO + N_KEYS)  # [N, n]
    values = rng.integers(VALUE_LO, VALUE_LO + N_VALUES, (N, n)).astype(np.int64)
    pick = distinct_draws(rng, N, q, 0, n)  # which pairs are queried, [N, q]
    qk, qv = np.take_along_axis(keys, pick, 1), np.take_along_axis(values, pick, 1)
    ctx = np.stack([keys, values], -1).reshape(N, 2 * n)
    queries = np.stack([np.full_like(qk, SEP), qk], -1).reshape(N, 2 * q)
    pad = np.full((N, L - 2 * n - 2 * q), PAD, np.int64)
    inputs = np.concatenate([ctx, queries, pad], 1)
    labels = np.full((N, L), IGNORE, np.int64)
    labels[:, 2 * n + 1 : 2 * n + 2 * q : 2] = qv
    slices = {"seq_len": L, "num_kv_pairs": n, "num_queries": q}
    return finish("fdm_mqar", cfg, seed, inputs, labels, slices, vocab_size=VOCAB)
