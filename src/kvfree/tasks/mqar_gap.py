"""Echo's MQAR-with-gap: M key–value pairs, a distractor gap, then the queries (docs/tasks.md §2).

[project definition] — the paper publishes no token format:

    tokens   keys [0, 64), values [64, 128), filler [128, 192); V = 192
    layout   k₁ v₁ … k_M v_M | G filler tokens (uniform) | k_π(1) v_π(1) … k_π(M) v_π(M)
             (π a uniform permutation; keys distinct, values distinct per example)
    length   L = 4M + G
    labels   at each query key (index 2M + G + 2i) its value; −100 elsewhere (M scored;
             chance 1/64). The value after each query key is given (teacher forcing).
    masks    prefix = 1 for t < 2M + G (context and gap), 0 from the first query on

Paper grid (§2): M ∈ {4, 8, 16, 32} × G ∈ {64, 128, …, 4096}, each cell trained on its own.
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

N_KEYS = N_VALUES = N_FILLER = 64
KEY_LO, VALUE_LO, FILLER_LO = 0, 64, 128
VOCAB = 192
PAIRS = (4, 8, 16, 32)
GAPS = (64, 128, 256, 512, 1024, 2048, 4096)


@dataclass
class Config:
    num_examples: int = 1000
    num_kv_pairs: int = 8  # M
    gap: int = 64  # G


def seq_len(num_kv_pairs: int, gap: int) -> int:
    return 4 * num_kv_pairs + gap


def generate(cfg: Config, seed: int):
    seed = check_seed(seed)
    n, M, G = cfg.num_examples, cfg.num_kv_pairs, cfg.gap
    if not 1 <= M <= N_KEYS:
        raise ValueError(f"num_kv_pairs must be in [1, {N_KEYS}] (distinct keys), got {M}")
    if G < 0:
        raise ValueError(f"gap must be ≥ 0, got {G}")
    rng = make_rng(seed)
    keys = distinct_draws(rng, n, M, KEY_LO, KEY_LO + N_KEYS)  # [n, M]
    values = distinct_draws(rng, n, M, VALUE_LO, VALUE_LO + N_VALUES)  # [n, M]
    gap = rng.integers(FILLER_LO, FILLER_LO + N_FILLER, (n, G))  # [n, G]
    perm = random_permutations(rng, n, M)  # [n, M]
    qk, qv = np.take_along_axis(keys, perm, 1), np.take_along_axis(values, perm, 1)
    ctx = np.stack([keys, values], -1).reshape(n, 2 * M)
    queries = np.stack([qk, qv], -1).reshape(n, 2 * M)
    inputs = np.concatenate([ctx, gap, queries], 1)  # [n, 4M + G]
    L = inputs.shape[1]
    labels = np.full((n, L), IGNORE, np.int64)
    q0 = 2 * M + G
    labels[:, q0::2] = qv
    prefix = np.zeros((n, L), np.uint8)
    prefix[:, :q0] = 1
    slices = {"num_kv_pairs": M, "gap": G, "seq_len": L}
    return finish(
        "mqar_gap", cfg, seed, inputs, labels, slices, {"prefix": prefix}, vocab_size=VOCAB
    )
