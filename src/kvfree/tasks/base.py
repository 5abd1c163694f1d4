"""Shared conventions for every synthetic task (docs/tasks.md §0).

A task is one module ``kvfree/tasks/<name>.py`` exposing

    @dataclass
    class Config: ...                                   # every knob, with defaults
    def generate(cfg: Config, seed: int) -> TaskData     # pure function of (cfg, seed)

and an entry in :data:`_REGISTRY` below. ``make(name, seed, **options)`` builds the config
strictly (an unknown option raises, naming the valid ones) and calls ``generate``.

Data contract (docs/tasks.md §0):

- ``inputs`` [N, L] int64 and ``labels`` [N, L] int64, where ``labels[:, t]`` is the token to
  predict from ``inputs[:, ≤ t]`` and −100 (:data:`IGNORE`) means "not scored";
- ``masks``: optional {"prefix", "action"} → [N, L] uint8 {0, 1} (used only by SKA oracle runs);
- ``slices``: per-example metadata columns, name → [N] array (task, L, n, tier, depth, …), so
  accuracy can be reported per slice; ``meta``: task name, vocab size, seed, config.

Seeds: train seeds lie in [0, 2³¹), test seeds in [2³¹, 2³²) (zoology's convention);
generators draw from ``numpy.random.Generator(PCG64(seed))`` (:func:`make_rng`).

Scoring: a scored position is correct iff the argmax over the **full** vocabulary equals the
label; per-example accuracy is the mean over its scored positions; task accuracy is the mean
over examples (:func:`example_accuracy`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvfree.config import from_dict
from kvfree.utils import unknown_keys_error

IGNORE = -100
TRAIN_SEEDS = (0, 2**31)
TEST_SEEDS = (2**31, 2**32)
_SPLITS = {"train": TRAIN_SEEDS, "test": TEST_SEEDS}

# ----------------------------------------------------------------------------- seeds


def seed_split(seed: int) -> str:
    """``"train"`` for seeds in [0, 2³¹), ``"test"`` for [2³¹, 2³²); anything else raises."""
    seed = int(seed)
    for name, (lo, hi) in _SPLITS.items():
        if lo <= seed < hi:
            return name
    raise ValueError(
        f"seed {seed} is outside [0, 2**32): train seeds are in [0, 2**31), "
        "test seeds in [2**31, 2**32)"
    )


def check_seed(seed: int, split: str | None = None) -> int:
    """Return ``seed`` as an int, raising if it is not in ``split``'s range (when given)."""
    got = seed_split(seed)
    if split is not None and split not in _SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if split is not None and got != split:
        lo, hi = _SPLITS[split]
        raise ValueError(
            f"seed {seed} is a {got} seed but a {split} seed was asked for: "
            f"{split} seeds lie in [{lo}, {hi})"
        )
    return int(seed)


def derive_seed(split: str, *key: Any) -> int:
    """A stable seed in ``split``'s range from any printable key (e.g. task, cell, index).

    Uses a BLAKE2 hash of ``repr(key)``, so it does not depend on Python's hash randomisation.
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    lo, hi = _SPLITS[split]
    h = int.from_bytes(hashlib.blake2b(repr(key).encode(), digest_size=8).digest(), "little")
    return lo + h % (hi - lo)


def make_rng(seed: int) -> np.random.Generator:
    """The generator every task draws from: ``numpy.random.Generator(PCG64(seed))``."""
    return np.random.Generator(np.random.PCG64(check_seed(seed)))


# ----------------------------------------------------------------------------- vectorised draws


def distinct_draws(rng: np.random.Generator, n: int, k: int, lo: int, hi: int) -> np.ndarray:
    """[n, k] int64: per row, ``k`` distinct integers uniform in [lo, hi), in random order.

    Vectorised. Sparse draws (k ≪ hi − lo) redraw the rows that repeat a value (i.i.d. draws
    conditioned on being distinct are a uniform ordered sample); dense draws take the k
    smallest of per-row uniform noise, in noise order.
    """
    size = hi - lo
    if k > size:
        raise ValueError(f"cannot draw {k} distinct values from [{lo}, {hi}) ({size} values)")
    if k == 0 or n == 0:
        return np.zeros((n, k), np.int64)
    if size >= 4 * k:
        out = rng.integers(lo, hi, (n, k))
        todo = np.arange(n)
        while True:
            s = np.sort(out[todo], axis=1)
            todo = todo[(s[:, 1:] == s[:, :-1]).any(1)]
            if len(todo) == 0:
                return out.astype(np.int64)
            out[todo] = rng.integers(lo, hi, (len(todo), k))
    noise = rng.random((n, size))
    idx = np.argsort(noise, axis=1)[:, :k]
    return (lo + idx).astype(np.int64)


def random_permutations(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """[n, k] int64: one uniform random permutation of range(k) per row."""
    return np.argsort(rng.random((n, k)), axis=1).astype(np.int64)


def random_slots(rng: np.random.Generator, n_slots: np.ndarray, k: int) -> np.ndarray:
    """[n, k]: per row, ``k`` distinct sorted integers uniform in [0, n_slots[row]).

    ``n_slots`` is [n] (rows may differ); every row needs n_slots ≥ k.
    """
    n_slots = np.asarray(n_slots, np.int64)
    if k == 0:
        return np.zeros((len(n_slots), 0), np.int64)
    if (n_slots < k).any():
        raise ValueError(f"random_slots: a row has fewer than {k} slots")
    width = int(n_slots.max())
    noise = rng.random((len(n_slots), width))
    noise[np.arange(width)[None, :] >= n_slots[:, None]] = 2.0  # never chosen
    idx = np.argpartition(noise, k - 1, axis=1)[:, :k] if k < width else np.argsort(noise, 1)
    return np.sort(idx, axis=1).astype(np.int64)


# ----------------------------------------------------------------------------- the data


@dataclass
class TaskData:
    """One generated data set. Arrays are numpy; :meth:`batch` hands out torch tensors."""

    inputs: np.ndarray  # [N, L] int64
    labels: np.ndarray  # [N, L] int64, IGNORE where unscored
    slices: dict[str, np.ndarray] = field(default_factory=dict)  # name -> [N]
    masks: dict[str, np.ndarray] = field(default_factory=dict)  # name -> [N, L] uint8
    meta: dict[str, Any] = field(default_factory=dict)  # task, vocab_size, seed, config

    def __post_init__(self):
        self.inputs = np.asarray(self.inputs, dtype=np.int64)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if self.inputs.ndim != 2 or self.inputs.shape != self.labels.shape:
            raise ValueError(
                f"inputs and labels must both be [N, L], got {self.inputs.shape} "
                f"and {self.labels.shape}"
            )
        n, length = self.inputs.shape
        for name, col in list(self.slices.items()):
            col = np.asarray(col)
            if col.ndim == 0:
                col = np.full(n, col.item())
            if col.shape != (n,):
                raise ValueError(
                    f"slice {name!r} must have one value per example ({n}), got shape {col.shape}"
                )
            self.slices[name] = col
        for name, m in list(self.masks.items()):
            m = np.asarray(m, dtype=np.uint8)
            if m.shape != (n, length):
                raise ValueError(f"mask {name!r} must be [N, L] = {(n, length)}, got {m.shape}")
            self.masks[name] = m

    # ----- basic facts
    def __len__(self) -> int:
        return self.inputs.shape[0]

    @property
    def seq_len(self) -> int:
        return self.inputs.shape[1]

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    def scored(self) -> np.ndarray:
        """[N, L] bool: the scored positions."""
        return self.labels != IGNORE

    # ----- selection and batching
    def subset(self, idx) -> TaskData:
        idx = np.asarray(idx)
        return TaskData(
            self.inputs[idx],
            self.labels[idx],
            {k: v[idx] for k, v in self.slices.items()},
            {k: v[idx] for k, v in self.masks.items()},
            dict(self.meta),
        )

    def batch(self, idx=None, *, mask: str | None = None, device=None) -> dict:
        """A trainer batch: {"inputs", "labels"[, "mask"]} as torch int64 / float tensors."""
        import torch

        idx = np.arange(len(self)) if idx is None else np.asarray(idx)
        out = {
            "inputs": torch.from_numpy(self.inputs[idx]),
            "labels": torch.from_numpy(self.labels[idx]),
        }
        if mask is not None:
            if mask not in self.masks:
                raise KeyError(
                    f"task {self.meta.get('task')!r} has no {mask!r} mask; it has "
                    f"{sorted(self.masks) or 'none'}"
                )
            out["mask"] = torch.from_numpy(self.masks[mask][idx].astype(np.float32))
        if device is not None:
            out = {k: v.to(device) for k, v in out.items()}
        return out

    def groups(self, by: list[str] | tuple[str, ...]) -> dict[tuple, np.ndarray]:
        """Example indices grouped by the values of slice columns ``by`` (sorted keys)."""
        missing = [b for b in by if b not in self.slices]
        if missing:
            raise unknown_keys_error("slice", missing, self.slices)
        if not by:
            return {(): np.arange(len(self))}
        keys = list(zip(*(self.slices[b].tolist() for b in by)))
        out: dict[tuple, list[int]] = {}
        for i, k in enumerate(keys):
            out.setdefault(k, []).append(i)
        return {k: np.asarray(out[k]) for k in sorted(out, key=repr)}

    @staticmethod
    def concat(parts: list[TaskData], pad_id: int = 0) -> TaskData:
        """Stack data sets; shorter sequences are right-padded with ``pad_id`` (labels
        IGNORE, masks 0), which a causal model never sees before a scored position."""
        if not parts:
            raise ValueError("concat needs at least one TaskData")
        length = max(p.seq_len for p in parts)

        def pad(a, value):
            return np.pad(a, ((0, 0), (0, length - a.shape[1])), constant_values=value)

        names = set(parts[0].slices)
        for p in parts[1:]:
            names &= set(p.slices)
        masks = set(parts[0].masks)
        for p in parts[1:]:
            masks &= set(p.masks)
        meta = dict(parts[0].meta)
        meta["vocab_size"] = max(p.vocab_size for p in parts)
        meta["parts"] = [p.meta.get("config") for p in parts]
        return TaskData(
            np.concatenate([pad(p.inputs, pad_id) for p in parts]),
            np.concatenate([pad(p.labels, IGNORE) for p in parts]),
            {k: np.concatenate([p.slices[k] for p in parts]) for k in sorted(names)},
            {k: np.concatenate([pad(p.masks[k], 0) for p in parts]) for k in sorted(masks)},
            meta,
        )


def example_accuracy(predictions: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """[N] mean correctness over each example's scored positions (NaN if it has none).

    ``predictions`` [N, L] are argmax ids over the full vocabulary.
    """
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.shape != labels.shape:
        raise ValueError(f"predictions {predictions.shape} and labels {labels.shape} differ")
    scored = labels != IGNORE
    correct = ((predictions == labels) & scored).sum(1)
    count = scored.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, correct / np.maximum(count, 1), np.nan)


# ----------------------------------------------------------------------------- registry

_REGISTRY: dict[str, str] = {
    "mqar": "kvfree.tasks.mqar",
    "mqar_gap": "kvfree.tasks.mqar_gap",
    "fdm_mqar": "kvfree.tasks.fdm_mqar",
    "niah": "kvfree.tasks.niah",
    "multihop": "kvfree.tasks.multihop",
    "sysprompt": "kvfree.tasks.sysprompt",
    "tooltrace": "kvfree.tasks.tooltrace",
    "commonword": "kvfree.tasks.commonword",
    "mqar_transfer": "kvfree.tasks.mqar_transfer",
    "text_niah": "kvfree.tasks.text_niah",
}


def task_names() -> list[str]:
    return list(_REGISTRY)


def task_module(name: str):
    if name not in _REGISTRY:
        raise unknown_keys_error("task", [name], _REGISTRY)
    return importlib.import_module(_REGISTRY[name])


def available_tasks() -> list[str]:
    out = []
    for name in _REGISTRY:
        try:
            task_module(name)
        except ImportError:
            continue
        out.append(name)
    return out


def task_config(name: str, **options):
    """The task's ``Config`` built strictly from ``options`` (unknown keys raise)."""
    mod = task_module(name)
    return from_dict(mod.Config, options, kind=f"option for task {name!r}")


def make(name: str, seed: int, **options) -> TaskData:
    """Generate task ``name`` with ``options`` (its ``Config`` fields) and ``seed``."""
    cfg = task_config(name, **options)
    data = task_module(name).generate(cfg, seed)
    data.meta.setdefault("task", name)
    data.meta.setdefault("seed", int(seed))
    data.meta.setdefault("config", dataclasses.asdict(cfg))
    return data


def finish(
    name: str, cfg, seed: int, inputs, labels, slices, masks=None, *, vocab_size: int
) -> TaskData:
    """Helper for generators: wrap arrays into a :class:`TaskData` with standard meta."""
    slices = {"task": np.full(len(inputs), name), **slices}
    return TaskData(
        inputs,
        labels,
        slices,
        masks or {},
        {
            "task": name,
            "vocab_size": int(vocab_size),
            "seed": int(seed),
            "config": dataclasses.asdict(cfg),
        },
    )
