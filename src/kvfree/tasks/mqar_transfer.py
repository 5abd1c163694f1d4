"""MQAR in the suite's shared format, for zero-shot transfer (docs/tasks.md §4.7) [project format].

layout   k₁ v₁ … k_n v_n (keys distinct from set A, values distinct), filler, then n
         queries ``QRY k v`` in a uniformly random order
labels   each query's v on its k (n scored positions); minimum length 5n
masks    prefix = 1 before the first QRY
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvfree.tasks.base import (
    IGNORE,
    check_seed,
    distinct_draws,
    finish,
    make_rng,
    random_permutations,
)
from kvfree.tasks.suite import (
    A_LO,
    FILLER_HI,
    FILLER_LO,
    QRY,
    SET_SIZE,
    VAL_LO,
    VOCAB,
    check_count_and_length,
    prefix_before,
)


@dataclass
class Config:
    num_examples: int = 500
    seq_len: int = 64  # L
    n: int = 4  # pairs


def min_length(n: int) -> int:
    return 5 * n


def generate(cfg: Config, seed: int):
    seed = check_seed(seed)
    N, L, n = cfg.num_examples, cfg.seq_len, cfg.n
    check_count_and_length("mqar_transfer", n, L, min_length(n))
    rng = make_rng(seed)
    keys = distinct_draws(rng, N, n, A_LO, A_LO + SET_SIZE)
    vals = distinct_draws(rng, N, n, VAL_LO, VAL_LO + SET_SIZE)
    perm = random_permutations(rng, N, n)
    qk, qv = np.take_along_axis(keys, perm, 1), np.take_along_axis(vals, perm, 1)
    ctx = np.stack([keys, vals], -1).reshape(N, 2 * n)
    queries = np.stack([np.full((N, n), QRY), qk, qv], -1).reshape(N, 3 * n)
    filler = rng.integers(FILLER_LO, FILLER_HI, (N, L - 5 * n))
    inputs = np.concatenate([ctx, filler, queries], 1)
    q0 = L - 3 * n
    labels = np.full((N, L), IGNORE, np.int64)
    labels[:, q0 + 1 :: 3] = qv
    return finish(
        "mqar_transfer",
        cfg,
        seed,
        inputs,
        labels,
        {"seq_len": L, "n": n},
        {"prefix": prefix_before(np.full(N, q0), L)},
        vocab_size=VOCAB,
    )
