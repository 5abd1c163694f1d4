"""Token streams and the batch functions the Trainer consumes.

A split is encoded once into one token stream (documents joined by ``"\\n\\n"``; for BPE each
document is encoded separately and the ids concatenated, which is still lossless) and cached
as ``.npy`` next to a built corpus.

``TokenBatches(tokens, seq_len, batch_size, seed)(step)`` is a **pure function of the step**
(the Trainer's data contract): the stream is cut into ``W = ⌊(N−1−o_e)/T⌋`` non-overlapping
windows of ``T+1`` tokens starting at an epoch-dependent offset ``o_e``; epoch ``e`` visits
them in the order of a permutation seeded by ``(seed, e)``; step ``s`` takes the global window
indices ``s·B … s·B+B−1``. So every window is seen once per epoch, and resuming at step ``s``
reproduces the same batches.

``eval_windows`` cuts a split into consecutive windows (every token after the first scored
exactly once when all windows are used), optionally an evenly spaced subset of them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kvfree.data.tokenizer import ByteTokenizer

DOC_SEP = "\n\n"


def encode_docs(tokenizer, docs: Sequence[str]) -> np.ndarray:
    """One int32 token stream for ``DOC_SEP.join(docs)``."""
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.encode_array(DOC_SEP.join(docs))
    texts = [d + (DOC_SEP if i + 1 < len(docs) else "") for i, d in enumerate(docs)]
    if hasattr(tokenizer, "encode_batch"):
        parts = tokenizer.encode_batch(texts)
    else:
        parts = [tokenizer.encode(t) for t in texts]
    if not parts:
        return np.zeros(0, dtype=np.int32)
    return np.concatenate([np.asarray(p, dtype=np.int32) for p in parts])


def encoded_split(corpus, split: str, tokenizer, cache: bool = True) -> np.ndarray:
    """The split's token stream, cached under ``<corpus>/tokens/<tokenizer hash>/`` for built
    corpora."""
    folder = None
    if cache and corpus.path is not None and (Path(corpus.path) / "manifest.json").exists():
        key = hashlib.sha256(json.dumps(tokenizer.spec(), sort_keys=True).encode()).hexdigest()
        folder = Path(corpus.path) / "tokens" / f"{tokenizer.name.replace(':', '-')}-{key[:12]}"
        path = folder / f"{split}-{corpus.fingerprint()}.npy"
        if path.exists():
            return np.load(path)
    arr = encode_docs(tokenizer, corpus.docs(split))
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{path.name}.tmp.npy"
        np.save(tmp, arr)
        tmp.replace(path)
    return arr


@dataclass
class TokenBatches:
    """``batches(step) -> {"inputs", "labels"}`` of shape [batch_size, seq_len] (see module)."""

    tokens: np.ndarray | torch.Tensor
    seq_len: int
    batch_size: int
    seed: int = 0
    _perm_cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        self.tokens = torch.as_tensor(np.asarray(self.tokens, dtype=np.int64))
        if self.seq_len < 1 or self.batch_size < 1:
            raise ValueError("seq_len and batch_size must be positive")
        if len(self.tokens) < 2 * (self.seq_len + 1):
            raise ValueError(
                f"token stream of {len(self.tokens)} tokens is too short for "
                f"seq_len={self.seq_len}; use more text or a shorter seq_len"
            )

    def _epoch(self, e: int) -> tuple[int, torch.Tensor]:
        if e not in self._perm_cache:
            g = torch.Generator().manual_seed(hash_seed(self.seed, e))
            offset = int(torch.randint(0, self.seq_len + 1, (1,), generator=g))
            n = (len(self.tokens) - 1 - offset) // self.seq_len
            self._perm_cache.clear()
            self._perm_cache[e] = (offset, torch.randperm(n, generator=g))
        return self._perm_cache[e]

    def windows_per_epoch(self) -> int:
        return len(self._epoch(0)[1])

    def __call__(self, step: int) -> dict[str, torch.Tensor]:
        T = self.seq_len
        starts = []
        for j in range(step * self.batch_size, (step + 1) * self.batch_size):
            # every epoch has at least W_min windows; epochs are indexed by W_min blocks
            w_min = (len(self.tokens) - 1 - T) // T
            e, i = divmod(j, w_min)
            offset, perm = self._epoch(e)
            starts.append(offset + int(perm[i]) * T)
        idx = torch.tensor(starts)[:, None] + torch.arange(T + 1)
        w = self.tokens[idx]
        return {"inputs": w[:, :-1].contiguous(), "labels": w[:, 1:].contiguous()}


def hash_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across runs and platforms)."""
    h = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & (2**63 - 1)


def eval_windows(
    tokens: np.ndarray | torch.Tensor, seq_len: int, max_windows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) [W, T]: consecutive windows; ``max_windows`` keeps an evenly spaced
    subset."""
    t = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
    n = (len(t) - 1) // seq_len
    if n < 1:
        raise ValueError(
            f"evaluation text of {len(t)} tokens is shorter than seq_len+1="
            f"{seq_len + 1}; use a shorter seq_len"
        )
    idx = torch.arange(n)
    if max_windows is not None and max_windows < n:
        idx = torch.linspace(0, n - 1, max_windows).round().long()
    starts = idx[:, None] * seq_len + torch.arange(seq_len + 1)
    w = t[starts]
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()
