"""Zoology's Multi-Query Associative Recall (docs/tasks.md §1; zoology ``multiquery_ar`` @ dbcb60d).

Glossary (docs/tasks.md §1.1):
    V       vocabulary size; keys in [1, V/2), values in [V/2, V); token 0 = "empty"
    L       input length (even);  K = pairs;  P = num_passes (JRT repetitions)
    space   (L − 2KP)/2 query slots (even offsets of the query region)
    p_i     ∝ a·i^(a−1), i = 1..space: power-law gap weights (a = power_a = 0.01 ≈ 1/i)
    gap_j   slot of pair j's query: K distinct draws by successive weighted sampling
            (Plackett–Luce), gap j belongs to context pair j

Layout of one example (before the one-token shift):
    context  k₁ v₁ … k_K v_K, tiled P times                  (2KP tokens)
    queries  zeros of length L − 2KP + 1, key j at offset 2·gap_j
    labels   value j at index 2KP + 2·gap_j + 1
then inputs = seq[:−1], labels = labels[1:] — the value is predicted *at the query key*.
Mask ``prefix``: 1 before the example's first query key (context and leading fillers), as in
``mqar_gap``; the decode evaluations prefill it (``bench frontier``'s post-training caches).
With ``random_non_queries`` every remaining 0 becomes a uniform draw from [0, V) (fillers can
equal context keys: unscored "fake queries").

Modes (§1.3):
    fast                numpy PCG64; gaps by vectorised Gumbel-top-k (same distribution)
    zoology_compatible  zoology's exact RNG call order: ``np.random.seed(seed)``, per-example
                        ``np.random.choice`` for keys, then values, then gaps; the filler from
                        ``torch.randint`` on a CPU generator seeded with ``torch_seed`` (zoology
                        leaves torch's global RNG unseeded: this equals zoology run right after
                        ``torch.manual_seed(torch_seed)``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvfree.tasks.base import IGNORE, check_seed, distinct_draws, finish, make_rng
from kvfree.tasks.suite import prefix_before


@dataclass
class Config:
    num_examples: int = 1000
    input_seq_len: int = 64  # L
    num_kv_pairs: int = 4  # K
    vocab_size: int = 8192  # V
    power_a: float = 0.01
    num_passes: int = 1  # P
    random_non_queries: bool = True
    mode: str = "fast"  # fast | zoology_compatible
    torch_seed: int | None = None  # zoology_compatible filler seed (default: seed)


def power_law_weights(space: int, a: float) -> np.ndarray:
    """[space] normalised weights p_i ∝ a·i^(a−1), i = 1..space (zoology's gap law)."""
    p = a * np.arange(1, space + 1, dtype=np.float64) ** (a - 1)
    return p / p.sum()


def _check(cfg: Config) -> None:
    L, K, V, P = cfg.input_seq_len, cfg.num_kv_pairs, cfg.vocab_size, cfg.num_passes
    if cfg.mode not in ("fast", "zoology_compatible"):
        raise ValueError(f"mode must be 'fast' or 'zoology_compatible', got {cfg.mode!r}")
    if L % 2:
        raise ValueError(f"input_seq_len must be even (zoology asserts it), got {L}")
    if V <= L:
        raise ValueError(f"vocab_size ({V}) must exceed input_seq_len ({L}), as in zoology")
    if K < 1 or P < 1 or 2 * K * P + 2 * K > L:
        raise ValueError(
            f"need K ≥ 1, P ≥ 1 and 2KP + 2K ≤ L; got K={K}, P={P}, L={L}: "
            "use fewer pairs or a longer sequence"
        )
    if K > V // 2 - 1:
        raise ValueError(f"{K} distinct keys do not fit in [1, {V // 2})")
    if not cfg.power_a > 0:
        raise ValueError(f"power_a must be positive, got {cfg.power_a}")


def _assemble(cfg: Config, keys, values, gaps):
    """Context ‖ query region, shifted by one; keys/values/gaps are [N, K]."""
    n, K, P, L = len(keys), cfg.num_kv_pairs, cfg.num_passes, cfg.input_seq_len
    ctx = 2 * K * P
    kvs = np.zeros((n, 2 * K), np.int64)
    kvs[:, 0::2], kvs[:, 1::2] = keys, values
    queries = np.zeros((n, L - ctx + 1), np.int64)
    np.put_along_axis(queries, 2 * gaps, keys, axis=1)
    seq = np.concatenate([np.tile(kvs, (1, P)), queries], axis=1)  # [N, L + 1]
    labels = np.full((n, L + 1), IGNORE, np.int64)
    np.put_along_axis(labels, ctx + 2 * gaps + 1, values, axis=1)
    prefix = prefix_before(ctx + 2 * gaps.min(1), L)
    return seq[:, :-1].copy(), labels[:, 1:].copy(), prefix


def _zoology_draws(cfg: Config, seed: int):
    """keys, values, gaps with zoology's exact legacy-RNG call order."""
    n, K, V = cfg.num_examples, cfg.num_kv_pairs, cfg.vocab_size
    space = (cfg.input_seq_len - 2 * K * cfg.num_passes) // 2
    p = power_law_weights(space, cfg.power_a)
    legacy = np.random.RandomState(seed)  # same stream as np.random.seed(seed)
    key_choices, value_choices, slots = np.arange(1, V // 2), np.arange(V // 2, V), np.arange(space)
    keys = np.stack([legacy.choice(key_choices, replace=False, size=K) for _ in range(n)])
    values = np.stack([legacy.choice(value_choices, replace=False, size=K) for _ in range(n)])
    gaps = np.stack([legacy.choice(slots, replace=False, p=p, size=K) for _ in range(n)])
    return keys.astype(np.int64), values.astype(np.int64), gaps.astype(np.int64)


def gumbel_top_k(rng: np.random.Generator, log_p: np.ndarray, n: int, k: int) -> np.ndarray:
    """[n, k] successive weighted draws without replacement (Plackett–Luce order) from
    ``log_p`` [S]: the k largest of log p + Gumbel noise, in decreasing order."""
    g = log_p[None, :] - np.log(-np.log(rng.random((n, len(log_p)))))
    top = np.argpartition(-g, k - 1, axis=1)[:, :k] if k < len(log_p) else np.argsort(-g, 1)
    order = np.argsort(-np.take_along_axis(g, top, 1), axis=1)
    return np.take_along_axis(top, order, 1).astype(np.int64)


def generate(cfg: Config, seed: int):
    _check(cfg)
    seed = check_seed(seed)
    n, K, V = cfg.num_examples, cfg.num_kv_pairs, cfg.vocab_size
    space = (cfg.input_seq_len - 2 * K * cfg.num_passes) // 2
    if cfg.mode == "zoology_compatible":
        keys, values, gaps = _zoology_draws(cfg, seed)
    else:
        rng = make_rng(seed)
        keys = distinct_draws(rng, n, K, 1, V // 2)
        values = distinct_draws(rng, n, K, V // 2, V)
        gaps = gumbel_top_k(rng, np.log(power_law_weights(space, cfg.power_a)), n, K)
    inputs, labels, prefix = _assemble(cfg, keys, values, gaps)
    if cfg.random_non_queries:
        empty = inputs == 0
        if cfg.mode == "zoology_compatible":
            import torch

            g = torch.Generator().manual_seed(seed if cfg.torch_seed is None else cfg.torch_seed)
            fill = torch.randint(V, size=inputs.shape, generator=g).numpy()
        else:
            fill = rng.integers(0, V, inputs.shape)
        inputs[empty] = fill[empty]
    slices = {"input_seq_len": cfg.input_seq_len, "num_kv_pairs": K, "num_passes": cfg.num_passes}
    return finish("mqar", cfg, seed, inputs, labels, slices, {"prefix": prefix}, vocab_size=V)


# ----------------------------------------------------------------------------- standard grids
# (L, K, n) segments of docs/tasks.md §1.4. Zoology's test segments hold 1k examples each.

GRIDS = {
    "based": {
        "train": [
            (64, 4, 100_000),
            (128, 8, 20_000),
            (256, 16, 20_000),
            (256, 32, 20_000),
            (256, 64, 20_000),
        ],
        "test": [
            (64, 4, 1000),
            (64, 8, 1000),
            (64, 16, 1000),
            (128, 32, 1000),
            (256, 64, 1000),
            (512, 128, 1000),
            (1024, 256, 1000),
        ],
        "options": {"vocab_size": 8192, "random_non_queries": True},
        "lrs": [1e-3, 10**-2.5, 1e-2, 10**-1.5],
        "recipe": "batch 256 train / 32 test; 32 epochs",
    },
    "fig2": {
        "train": [(64, 4, 100_000), (128, 8, 100_000), (256, 16, 100_000), (512, 64, 100_000)],
        "test": [(64, 4, 3000), (128, 8, 3000), (256, 16, 3000), (512, 64, 3000)],
        "options": {"vocab_size": 8192, "random_non_queries": False},
        "lrs": [1e-4, 10 ** -(10 / 3), 10 ** -(8 / 3), 1e-2],
        "recipe": "batch 512 (L ≤ 128), 256 (256), 128 (512); 64 epochs; one (L, K) per run",
    },
}


def grid_segments(grid: str, split: str) -> list[dict]:
    """The ``split`` ("train" | "test") segments of a standard grid as ``make`` options."""
    if grid not in GRIDS:
        raise ValueError(f"unknown MQAR grid {grid!r}; choose one of {sorted(GRIDS)}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    g = GRIDS[grid]
    return [
        {"input_seq_len": L, "num_kv_pairs": K, "num_examples": n, **g["options"]}
        for L, K, n in g[split]
    ]
