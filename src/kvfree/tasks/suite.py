"""The Echo sub-million suite's shared vocabulary, layout helper and grid (docs/tasks.md §4.1).

[project definition] One token-level format for SysPrompt, ToolTrace, NIAH, MultiHop,
CommonWord and transfer-MQAR (V = 128), so that zero-shot transfer between them is meaningful:

    0 PAD · 1/2 SYS/END · 3 QRY · 4 HOP · 5 CNT · 6/7 CALL/RET · 8–15 reserved
    16–47 key set A · 48–79 key set B · 80–111 values · 112–117 CoT actions
    118–123 CoT targets · 124–127 plain noise;   filler = uniform over 112–127

A binding is an adjacent (key…, value) group; a query is marker + key tokens, the label sits on
the query's last key token and the answer is appended. ``L`` is the exact total length: filler
goes at random positions *between* records (:func:`place_records`). A cell whose minimum length
exceeds L is infeasible (:func:`feasible`).
"""

from __future__ import annotations

import numpy as np

from kvfree.tasks.base import TaskData, derive_seed, make

PAD, SYS, END, QRY, HOP, CNT, CALL, RET = range(8)
RESERVED = 8
A_LO, B_LO, VAL_LO, ACT_LO, TGT_LO, NOISE_LO = 16, 48, 80, 112, 118, 124
SET_SIZE = 32  # |A| = |B| = |values|
N_ACTIONS = N_TARGETS = 6
FILLER_LO, FILLER_HI = 112, 128
VOCAB = 128

GRID_LENGTHS = (64, 128, 256, 512)
GRID_COUNTS = (1, 2, 4, 8)
GRID_EXAMPLES = 500
SUITE_TASKS = ("mqar_transfer", "sysprompt", "tooltrace", "niah", "multihop", "commonword")


def compositions(rng: np.random.Generator, total: np.ndarray, parts: int) -> np.ndarray:
    """[n, parts] uniform random compositions of ``total`` [n] into ``parts`` non-negative
    integers (stars and bars: ``parts − 1`` distinct cut points among total + parts − 1)."""
    total = np.asarray(total, np.int64)
    n = len(total)
    if parts == 1:
        return total[:, None].copy()
    width = int(total.max()) + parts - 1
    noise = rng.random((n, width))
    noise[np.arange(width)[None, :] >= (total + parts - 1)[:, None]] = 2.0
    cuts = np.sort(np.argpartition(noise, parts - 2, axis=1)[:, : parts - 1], axis=1)
    edges = np.concatenate([np.full((n, 1), -1), cuts, (total + parts - 1)[:, None]], 1)
    return np.diff(edges, axis=1) - 1


def place_records(
    rng: np.random.Generator,
    records: np.ndarray,
    rec_len: np.ndarray,
    tail: np.ndarray,
    lengths: np.ndarray,
    *,
    filler=(FILLER_LO, FILLER_HI),
):
    """Lay out records with random filler between them, then the tail (the query).

    records [n, R, w] (padded), rec_len [n, R] (tokens used per record), tail [n, q],
    lengths [n] total lengths. Filler is split uniformly over the R + 1 slots before each
    record and before the tail. Rows shorter than the longest are right-padded with PAD.
    Returns inputs [n, max L] and starts [n, R] (first position of each record).
    """
    n, R, w = records.shape
    lengths = np.asarray(lengths, np.int64)
    free = lengths - rec_len.sum(1) - tail.shape[1]
    if (free < 0).any():
        raise ValueError("records and query do not fit in the requested length (infeasible)")
    gaps = compositions(rng, free, R + 1)  # [n, R + 1]
    starts = np.cumsum(gaps[:, :R], 1) + np.concatenate(
        [np.zeros((n, 1), np.int64), np.cumsum(rec_len, 1)[:, :-1]], 1
    )  # [n, R]
    L = int(lengths.max())
    inputs = rng.integers(filler[0], filler[1], (n, L))
    inputs[np.arange(L)[None, :] >= lengths[:, None]] = PAD
    rows = np.broadcast_to(np.arange(n)[:, None, None], (n, R, w))
    pos = starts[:, :, None] + np.arange(w)[None, None, :]
    ok = np.arange(w)[None, None, :] < rec_len[:, :, None]
    inputs[rows[ok], pos[ok]] = records[ok]
    tail_pos = lengths[:, None] - tail.shape[1] + np.arange(tail.shape[1])[None, :]
    inputs[np.arange(n)[:, None], tail_pos] = tail
    return inputs.astype(np.int64), starts


def prefix_before(first_query: np.ndarray, L: int) -> np.ndarray:
    """[n, L] uint8: 1 for t < first_query (the oracle SKA prefix mask)."""
    return (np.arange(L)[None, :] < np.asarray(first_query)[:, None]).astype(np.uint8)


def check_count_and_length(task: str, n: int, L: int, needed: int) -> None:
    """Clear errors for a KV count outside [1, SET_SIZE] or a length below the task's minimum."""
    if not 1 <= n <= SET_SIZE:
        raise ValueError(f"{task}: n must be in [1, {SET_SIZE}], got {n}")
    if needed > L:
        raise ValueError(f"{task} with n={n} needs seq_len ≥ {needed}, got {L} (infeasible)")


def min_length(task: str, n: int, **options) -> int:
    """The shortest L at which ``task`` with KV count ``n`` is feasible."""
    from kvfree.tasks.base import task_module

    return task_module(task).min_length(n, **options)


def feasible(task: str, L: int, n: int, **options) -> bool:
    return min_length(task, n, **options) <= L


def grid_cells(task: str, lengths=GRID_LENGTHS, counts=GRID_COUNTS) -> tuple[list, list]:
    """(feasible, infeasible) (L, n) cells of the Table-3 grid for ``task``."""
    ok, bad = [], []
    for L in lengths:
        for n in counts:
            (ok if feasible(task, L, n) else bad).append((L, n))
    return ok, bad


def curriculum(seed: int, num_examples: int, seq_len: int = 64, max_n: int = 8) -> TaskData:
    """Echo's training mix (docs/tasks.md §4.1): 50 % SysPrompt + 50 % ToolTrace at ``seq_len``,
    n uniform in {1, …, max_n} (equal shares per n), shuffled with ``seed``."""
    from kvfree.tasks.base import make_rng

    parts = []
    per = max(1, num_examples // (2 * max_n))
    for task in ("sysprompt", "tooltrace"):
        for n in range(1, max_n + 1):
            if feasible(task, seq_len, n):
                s = derive_seed("train" if seed < 2**31 else "test", seed, task, n)
                parts.append(make(task, s, num_examples=per, seq_len=seq_len, n=n))
    data = TaskData.concat(parts, pad_id=PAD)
    return data.subset(make_rng(seed).permutation(len(data)))
