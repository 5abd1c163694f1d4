"""System-variable retrieval after a noisy chain-of-thought scratchpad (docs/tasks.md §4.2)
[project format, §4.1].

    layout   ``SYS k₁ v₁ … k_n v_n END`` (keys distinct from set A, values distinct), then g
             CoT steps (action 112–117 + target 118–123), then ``QRY k_j v_j`` (j uniform)
    labels   v_j on k_j of the query (1 scored position); minimum length 2n + 5
    masks    prefix = 1 before QRY; action = 1 on the SYS … END block

Tiers (``tier``):
    grid           exact length L: g = ⌊(L − 2n − 5)/2⌋ steps fill it, one odd slot becomes a
                   noise token (124–127) before QRY
    easy / hard    n = 4, g ~ U[10, 30] / U[150, 300] steps (paper App. G.4; the pre-paper code
                   used 100–300); length 2n + 5 + 2g, rows right-padded with PAD
    specific_easy / specific_hard
                   "Specific Recall" [project definition]: n = 6, g ~ U[10, 30] / U[80, 200];
                   each step is, with probability 0.2, a decoy ``k_i v′`` (a system key with a
                   wrong value); the answer is the SYS value
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvfree.tasks.base import IGNORE, check_seed, distinct_draws, finish, make_rng
from kvfree.tasks.suite import (
    A_LO,
    ACT_LO,
    END,
    N_ACTIONS,
    N_TARGETS,
    NOISE_LO,
    PAD,
    QRY,
    SET_SIZE,
    SYS,
    TGT_LO,
    VAL_LO,
    VOCAB,
    prefix_before,
)

TIERS = {  # tier -> (n, gap_lo, gap_hi, decoy_prob)
    "easy": (4, 10, 30, 0.0),
    "hard": (4, 150, 300, 0.0),
    "specific_easy": (6, 10, 30, 0.2),
    "specific_hard": (6, 80, 200, 0.2),
}


@dataclass
class Config:
    num_examples: int = 500
    seq_len: int = 64  # L (grid tier only)
    n: int = 4  # system variables (grid tier only)
    tier: str = "grid"  # grid | easy | hard | specific_easy | specific_hard
    decoy_prob: float | None = None  # default: 0.2 for specific_*, else 0


def min_length(n: int) -> int:
    return 2 * n + 5


def generate(cfg: Config, seed: int):
    seed = check_seed(seed)
    N = cfg.num_examples
    if cfg.tier != "grid" and cfg.tier not in TIERS:
        raise ValueError(f"tier must be 'grid' or one of {sorted(TIERS)}, got {cfg.tier!r}")
    rng = make_rng(seed)
    if cfg.tier == "grid":
        n, decoy = cfg.n, cfg.decoy_prob or 0.0
        if cfg.seq_len < min_length(n):
            raise ValueError(
                f"sysprompt with n={n} needs seq_len ≥ {min_length(n)}, got "
                f"{cfg.seq_len} (infeasible)"
            )
        g = np.full(N, (cfg.seq_len - min_length(n)) // 2)
    else:
        n, lo, hi, decoy = TIERS[cfg.tier]
        decoy = decoy if cfg.decoy_prob is None else cfg.decoy_prob
        g = rng.integers(lo, hi + 1, N)
    if not 1 <= n <= SET_SIZE:
        raise ValueError(f"n must be in [1, {SET_SIZE}], got {n}")
    lengths = min_length(n) + 2 * g + (cfg.seq_len - min_length(n)) % 2 * (cfg.tier == "grid")
    L = int(lengths.max())
    keys = distinct_draws(rng, N, n, A_LO, A_LO + SET_SIZE)
    vals = distinct_draws(rng, N, n, VAL_LO, VAL_LO + SET_SIZE)
    rows = np.arange(N)
    inputs = np.full((N, L), PAD, np.int64)
    inputs[:, 0], inputs[:, 2 * n + 1] = SYS, END
    inputs[:, 1 : 2 * n + 1] = np.stack([keys, vals], -1).reshape(N, 2 * n)
    # CoT scratchpad: G_max steps drawn, each row keeps its first g
    G = int(g.max())
    steps = np.stack(
        [
            rng.integers(ACT_LO, ACT_LO + N_ACTIONS, (N, G)),
            rng.integers(TGT_LO, TGT_LO + N_TARGETS, (N, G)),
        ],
        -1,
    )  # [N, G, 2]
    if decoy > 0:
        is_decoy = rng.random((N, G)) < decoy
        which = rng.integers(0, n, (N, G))
        # a wrong value: shift the true value by 1..31 within the value range
        wrong = (
            VAL_LO
            + (vals[rows[:, None], which] - VAL_LO + rng.integers(1, SET_SIZE, (N, G))) % SET_SIZE
        )
        steps[is_decoy] = np.stack([keys[rows[:, None], which], wrong], -1)[is_decoy]
    body = steps.reshape(N, 2 * G)
    start = 2 * n + 2
    keep = np.arange(2 * G)[None, :] < 2 * g[:, None]
    r, c = np.nonzero(keep)
    inputs[r, start + c] = body[r, c]
    odd = lengths - min_length(n) - 2 * g  # 1 where a noise token precedes QRY
    q = lengths - 3
    inputs[rows[odd > 0], q[odd > 0] - 1] = rng.integers(NOISE_LO, NOISE_LO + 4, int(odd.sum()))
    j = rng.integers(0, n, N)
    inputs[rows, q], inputs[rows, q + 1], inputs[rows, q + 2] = QRY, keys[rows, j], vals[rows, j]
    labels = np.full((N, L), IGNORE, np.int64)
    labels[rows, q + 1] = vals[rows, j]
    action = np.zeros((N, L), np.uint8)
    action[:, : 2 * n + 2] = 1
    slices = {"seq_len": lengths, "n": n, "tier": cfg.tier, "gap": g}
    return finish(
        "sysprompt",
        cfg,
        seed,
        inputs,
        labels,
        slices,
        {"prefix": prefix_before(q, L), "action": action},
        vocab_size=VOCAB,
    )
