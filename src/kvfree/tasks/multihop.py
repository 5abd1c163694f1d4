"""Two-hop (and h-hop) retrieval (docs/tasks.md §4.5) [project format, §4.1].

    chains   n chains a_i → b_i → v_i (h = 2): a_i distinct from set A, b_i distinct from
             set B, v_i distinct values; h hops use h − 1 intermediate B keys per chain
             (a → b → b′ → v for h = 3), all distinct
    layout   the h·n records (a b), (b v), … shuffled together (a later hop may precede an
             earlier one), filler between; then ``HOP a_j v_j`` (h = 2) or
             ``HOP (8+h) a_j v_j`` (h ≥ 3: the reserved id 8 + h counts the hops)
    labels   v_j on a_j (1 scored position); minimum length 2hn + 3 (+1 for h ≥ 3)
    masks    prefix = 1 before HOP

Fig. 1b grid: n ∈ {3, 4, 8} × L ∈ {16, 32, 64, 128, 256} (n = 4 at 16 and n = 8 at 16, 32
are infeasible).
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
    B_LO,
    HOP,
    RESERVED,
    SET_SIZE,
    VAL_LO,
    VOCAB,
    place_records,
    prefix_before,
)

FIG1B_COUNTS = (3, 4, 8)
FIG1B_LENGTHS = (16, 32, 64, 128, 256)


@dataclass
class Config:
    num_examples: int = 500
    seq_len: int = 64  # L
    n: int = 3  # chains
    hops: int = 2  # h


def min_length(n: int, hops: int = 2) -> int:
    return 2 * hops * n + 3 + (hops >= 3)


def generate(cfg: Config, seed: int):
    seed = check_seed(seed)
    N, L, n, h = cfg.num_examples, cfg.seq_len, cfg.n, cfg.hops
    if h < 2 or h > 7:
        raise ValueError(f"hops must be in [2, 7] (hop-count token 8 + h ≤ 15), got {h}")
    if n < 1 or n * (h - 1) > SET_SIZE or n > SET_SIZE:
        raise ValueError(
            f"n={n} chains of {h} hops need n ≤ 32 and n·(h−1) ≤ 32 distinct intermediate keys"
        )
    if min_length(n, h) > L:
        raise ValueError(
            f"multihop with n={n}, hops={h} needs seq_len ≥ {min_length(n, h)}, "
            f"got {L} (infeasible)"
        )
    rng = make_rng(seed)
    a = distinct_draws(rng, N, n, A_LO, A_LO + SET_SIZE)
    mids = distinct_draws(rng, N, n * (h - 1), B_LO, B_LO + SET_SIZE).reshape(N, n, h - 1)
    v = distinct_draws(rng, N, n, VAL_LO, VAL_LO + SET_SIZE)
    chain = np.concatenate([a[:, :, None], mids, v[:, :, None]], 2)  # [N, n, h + 1]
    records = np.stack([chain[:, :, :-1], chain[:, :, 1:]], -1).reshape(N, n * h, 2)
    records = np.take_along_axis(records, random_permutations(rng, N, n * h)[:, :, None], 1)
    j = rng.integers(0, n, N)
    rows = np.arange(N)
    marker = [np.full(N, HOP)] + ([np.full(N, RESERVED + h)] if h >= 3 else [])
    tail = np.stack(marker + [a[rows, j], v[rows, j]], 1)
    inputs, _ = place_records(rng, records, np.full((N, n * h), 2), tail, np.full(N, L))
    labels = np.full((N, L), IGNORE, np.int64)
    labels[:, L - 2] = v[rows, j]
    return finish(
        "multihop",
        cfg,
        seed,
        inputs,
        labels,
        {"seq_len": L, "n": n, "hops": h},
        {"prefix": prefix_before(np.full(N, L - tail.shape[1]), L)},
        vocab_size=VOCAB,
    )
