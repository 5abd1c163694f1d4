"""CommonWord: the most frequent word (docs/tasks.md §4.6) [project definition, after RULER's
common-words extraction; RULER asks for the top 10 of a long list, this for the single top one].

    layout   n distinct words from set A; the target occurs 3 times, every other word once,
             shuffled, filler between; then ``CNT w`` (the target appended)
    labels   w on CNT (1 scored position); minimum length n + 4 (n = 1 is trivial, kept for
             grid completeness)
    masks    prefix = 1 before CNT
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
    CNT,
    SET_SIZE,
    VOCAB,
    check_count_and_length,
    place_records,
    prefix_before,
)

REPEATS = 3


@dataclass
class Config:
    num_examples: int = 500
    seq_len: int = 64  # L
    n: int = 4  # distinct words


def min_length(n: int) -> int:
    return n + 4


def generate(cfg: Config, seed: int):
    seed = check_seed(seed)
    N, L, n = cfg.num_examples, cfg.seq_len, cfg.n
    check_count_and_length("commonword", n, L, min_length(n))
    rng = make_rng(seed)
    words = distinct_draws(rng, N, n, A_LO, A_LO + SET_SIZE)  # words[:, 0] is the target
    bag = np.concatenate([np.repeat(words[:, :1], REPEATS, 1), words[:, 1:]], 1)  # [N, n + 2]
    bag = np.take_along_axis(bag, random_permutations(rng, N, bag.shape[1]), 1)
    tail = np.stack([np.full(N, CNT), words[:, 0]], 1)
    inputs, _ = place_records(
        rng, bag[:, :, None], np.ones(bag.shape, np.int64), tail, np.full(N, L)
    )
    labels = np.full((N, L), IGNORE, np.int64)
    labels[:, L - 2] = words[:, 0]
    return finish(
        "commonword",
        cfg,
        seed,
        inputs,
        labels,
        {"seq_len": L, "n": n},
        {"prefix": prefix_before(np.full(N, L - 2), L)},
        vocab_size=VOCAB,
    )
