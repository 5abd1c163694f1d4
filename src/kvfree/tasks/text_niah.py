"""Needles in real text: RULER-style single- and multi-key needle retrieval whose haystack is
English from the offline corpus (docs/tasks.md §4.4; RULER's ``niah_single`` / ``niah_multikey``).

    haystack  a contiguous byte span of the corpus (``kvfree data build``) starting after a
              whitespace: training examples (train seeds) read the corpus's train documents,
              test examples (test seeds ≥ 2³¹) its test documents — held-out text
    needles   n sentences ``" The special magic number for <key> is <7 digits>."`` with
              distinct keys (English words, :data:`KEYS`) and values (first digit 1–9),
              inserted at whitespace; the queried needle at ``depth`` (fraction of the
              haystack, None = uniform), the others at uniform positions
    question  ``"\\nWhat is the special magic number for <key>? "`` + the 7 digits (teacher
              forcing); labels = the 7 digits (7 scored positions; accuracy = the share of
              digits right, chance 0.1)
    tokens    bytes (vocabulary 256), so any length is exact: ``seq_len`` bytes in total
    slices    seq_len, n, depth (decile of the queried needle's start in the haystack)
    masks     prefix = 1 before the question

No download at run time: the corpus is built once, offline (``kvfree data build``); tests pass
their own text through ``haystack`` (anything :func:`kvfree.data.loaders.load_corpus` reads).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from kvfree.tasks.base import IGNORE, check_seed, finish, make_rng, seed_split

VOCAB = 256
DIGITS = 7
KEYS = [
    "apple",
    "anchor",
    "badger",
    "banjo",
    "candle",
    "cactus",
    "dolphin",
    "drum",
    "ember",
    "falcon",
    "fern",
    "garnet",
    "glacier",
    "harbor",
    "hazel",
    "iris",
    "jasper",
    "kettle",
    "lantern",
    "lemon",
    "maple",
    "marble",
    "meadow",
    "nectar",
    "nickel",
    "oasis",
    "olive",
    "otter",
    "pebble",
    "pepper",
    "quartz",
    "quill",
    "raven",
    "ribbon",
    "saffron",
    "sparrow",
    "thistle",
    "tiger",
    "tulip",
    "umber",
    "velvet",
    "violet",
    "walnut",
    "willow",
    "yarrow",
    "zephyr",
    "acorn",
    "basil",
    "cobalt",
    "cricket",
    "dune",
    "emerald",
    "fjord",
    "ginger",
    "heron",
    "indigo",
    "juniper",
    "lotus",
    "mango",
    "nutmeg",
    "orchid",
    "plum",
]
NEEDLE = " The special magic number for {key} is {value}."
QUESTION = "\nWhat is the special magic number for {key}? "
_WHITESPACE = (9, 10, 32)


@dataclass
class Config:
    num_examples: int = 500
    seq_len: int = 256  # bytes in total
    n: int = 1  # needles (keys); one is queried
    depth: float | None = None  # the queried needle's depth in [0, 1]; None = uniform
    haystack: str = "en"  # a load_corpus spec: the built corpus name, a folder or a file


def _overhead(n: int) -> int:
    longest = max(len(k) for k in KEYS)
    needle = len(NEEDLE.format(key="k" * longest, value="0" * DIGITS))
    return n * needle + len(QUESTION.format(key="k" * longest)) + DIGITS


def min_length(n: int) -> int:
    return _overhead(n) + 16  # at least 16 bytes of haystack


@functools.lru_cache(maxsize=8)
def _text(spec: str, split: str) -> np.ndarray:
    """The split's documents as one byte array (cached per process)."""
    from kvfree.data.loaders import load_corpus

    data = np.frombuffer(load_corpus(spec).text(split).encode("utf-8"), dtype=np.uint8)
    if len(data) < 1024:
        raise ValueError(f"text_niah: the {split} split of {spec!r} has only {len(data)} bytes")
    return data


def _snap(pos: int, span: np.ndarray) -> int:
    """The last whitespace at or before ``pos`` (0 if none): needles go between words."""
    ws = np.nonzero(np.isin(span[: pos + 1], _WHITESPACE))[0]
    return int(ws[-1]) if len(ws) else 0


def generate(cfg: Config, seed: int):
    seed = check_seed(seed)
    N, L, n = cfg.num_examples, cfg.seq_len, cfg.n
    if not 1 <= n <= len(KEYS):
        raise ValueError(f"text_niah: n must be in [1, {len(KEYS)}], got {n}")
    if min_length(n) > L:
        raise ValueError(f"text_niah with n={n} needs seq_len ≥ {min_length(n)}, got {L}")
    if cfg.depth is not None and not 0 <= cfg.depth <= 1:
        raise ValueError(f"text_niah: depth must be in [0, 1] or None, got {cfg.depth}")
    text = _text(cfg.haystack, "train" if seed_split(seed) == "train" else "test")
    rng = make_rng(seed)
    inputs = np.zeros((N, L), np.int64)
    labels = np.full((N, L), IGNORE, np.int64)
    depth = np.zeros(N, np.int64)
    prefix = np.zeros((N, L), np.uint8)
    for i in range(N):
        keys = rng.choice(len(KEYS), n, replace=False)
        values = [str(rng.integers(1, 10)) + "".join(map(str, rng.integers(0, 10, DIGITS - 1)))
                  for _ in range(n)]  # fmt: skip
        needles = [NEEDLE.format(key=KEYS[k], value=v).encode() for k, v in zip(keys, values)]
        tail = QUESTION.format(key=KEYS[keys[0]]).encode() + values[0].encode()
        hay_len = L - len(tail) - sum(map(len, needles))
        start = int(rng.integers(0, len(text) - 64))
        ws = np.nonzero(np.isin(text[start : start + 64], _WHITESPACE))[0]
        start += int(ws[0]) + 1 if len(ws) else 0  # begin at a word
        span = text[start : start + hay_len]
        if len(span) < hay_len:  # wraps around the end of the split (and a short split)
            span = np.resize(np.concatenate([span, text]), hay_len)
        at = [int(round((rng.random() if cfg.depth is None else cfg.depth) * hay_len))]
        at += [int(rng.integers(0, hay_len + 1)) for _ in range(n - 1)]
        at = [_snap(min(a, hay_len - 1), span) if a < hay_len else hay_len for a in at]
        depth[i] = min(9, 10 * at[0] // max(hay_len, 1))
        pieces, prev = [], 0
        for a, needle in sorted(zip(at, needles), key=lambda x: x[0]):
            pieces += [span[prev:a], np.frombuffer(needle, np.uint8)]
            prev = a
        pieces += [span[prev:], np.frombuffer(tail, np.uint8)]
        row = np.concatenate(pieces)
        inputs[i] = row
        labels[i, L - DIGITS - 1 : L - 1] = row[L - DIGITS :]
        prefix[i, : L - len(tail)] = 1
    slices = {"seq_len": L, "n": n, "depth": depth}
    return finish(
        "text_niah", cfg, seed, inputs, labels, slices, {"prefix": prefix}, vocab_size=VOCAB
    )
