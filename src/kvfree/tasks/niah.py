"""Needle-in-a-haystack with length generalisation (docs/tasks.md §4.4) [project format, §4.1].

    layout   filler haystack with n needles ``k_i v_i`` (keys distinct from set A, values
             distinct from the value range) at uniformly random non-overlapping positions in
             [0, L − 3), then ``QRY k_j v_j`` (j uniform) ending the sequence
    labels   v_j on k_j of the query (1 scored position); minimum length 2n + 3
    slices   seq_len, n, depth (decile 0–9 of the queried needle's start in [0, L − 3))
    masks    prefix = 1 before QRY

Table 2 protocol: n = 1, trained at L = 64 (:data:`TRAIN_LEN`), tested at
L ∈ {64, …, 4096} (:data:`TEST_LENGTHS`, up to 64× the training length).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvfree.tasks.base import IGNORE, check_seed, distinct_draws, finish, make_rng
from kvfree.tasks.suite import (
    A_LO,
    QRY,
    SET_SIZE,
    VAL_LO,
    VOCAB,
    check_count_and_length,
    place_records,
    prefix_before,
)

TRAIN_LEN = 64
TEST_LENGTHS = (64, 128, 256, 512, 1024, 2048, 4096)


@dataclass
class Config:
    num_examples: int = 500
    seq_len: int = 64  # L
    n: int = 1  # needles


def min_length(n: int) -> int:
    return 2 * n + 3


def generate(cfg: Config, seed: int):
    seed = check_seed(seed)
    N, L, n = cfg.num_examples, cfg.seq_len, cfg.n
    check_count_and_length("niah", n, L, min_length(n))
    rng = make_rng(seed)
    keys = distinct_draws(rng, N, n, A_LO, A_LO + SET_SIZE)
    vals = distinct_draws(rng, N, n, VAL_LO, VAL_LO + SET_SIZE)
    j = rng.integers(0, n, N)
    rows = np.arange(N)
    tail = np.stack([np.full(N, QRY), keys[rows, j], vals[rows, j]], 1)
    records = np.stack([keys, vals], -1)  # [N, n, 2]
    inputs, starts = place_records(rng, records, np.full((N, n), 2), tail, np.full(N, L))
    labels = np.full((N, L), IGNORE, np.int64)
    labels[:, L - 2] = vals[rows, j]
    depth = np.minimum(9, (10 * starts[rows, j]) // (L - 3))
    slices = {"seq_len": L, "n": n, "depth": depth}
    return finish(
        "niah",
        cfg,
        seed,
        inputs,
        labels,
        slices,
        {"prefix": prefix_before(np.full(N, L - 3), L)},
        vocab_size=VOCAB,
    )
