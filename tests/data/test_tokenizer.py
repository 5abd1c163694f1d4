"""Tokenizers: lossless round trips, byte counts for bits per byte, specs, caching."""

import importlib.util

import numpy as np
import pytest

from kvfree.data.tokenizer import (
    BPETokenizer,
    ByteTokenizer,
    build_tokenizer,
    bytes_to_unicode,
    check_spec,
    from_spec,
)

needs_text = pytest.mark.skipif(
    importlib.util.find_spec("tokenizers") is None,
    reason="needs the text extra: pip install 'kvfree[text]'",
)

TEXT = (
    "It was the best of times, it was the worst of times; café — naïve 東京 🙂\n\n"
    "  indented\tline with  double  spaces and numbers 12345.\n"
)
TRAIN = [
    f"The {w} of the {v} was seen in the {w}s of {v}." * 3
    for w in ("king", "queen", "city", "river", "house")
    for v in ("north", "south")
] * 4


@pytest.fixture(scope="module")
def bpe():
    return BPETokenizer.train(TRAIN, 300)


def test_byte_tokenizer_round_trip_and_bytes():
    tok = ByteTokenizer()
    ids = tok.encode(TEXT)
    assert ids == list(TEXT.encode()) and tok.decode(ids) == TEXT
    assert tok.token_bytes[ids].sum() == len(TEXT.encode())
    assert np.array_equal(tok.encode_array(TEXT), np.array(ids))


def test_bytes_to_unicode_is_a_bijection_onto_printables():
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    assert all(c.isprintable() and not c.isspace() for c in table.values())
    assert table[ord("A")] == "A"


@needs_text
def test_bpe_is_lossless_and_compresses(bpe):
    assert bpe.vocab_size == 300
    ids = bpe.encode(TEXT)
    assert bpe.decode(ids) == TEXT  # unseen characters fall back to bytes
    seen = TRAIN[0]
    assert len(bpe.encode(seen)) < len(seen.encode()) / 2  # merges learnt on the corpus


@needs_text
def test_bpe_token_bytes_sum_to_utf8_length(bpe):
    for text in (TEXT, TRAIN[3], "ü" * 7):
        ids = bpe.encode(text)
        assert int(bpe.token_bytes[ids].sum()) == len(text.encode())


@needs_text
def test_spec_round_trip_rebuilds_the_same_tokenizer(bpe):
    again = from_spec(bpe.spec())
    assert again.encode(TEXT) == bpe.encode(TEXT)
    assert isinstance(from_spec(ByteTokenizer().spec()), ByteTokenizer)
    with pytest.raises(ValueError, match="unknown tokenizer spec"):
        from_spec({"kind": "sentencepiece"})


@needs_text
def test_build_tokenizer_caches_bpe(tmp_path):
    a = build_tokenizer("bpe:280", TRAIN, cache=tmp_path)
    files = list(tmp_path.glob("bpe-280-*.json"))
    assert len(files) == 1
    b = build_tokenizer("bpe:280", TRAIN, cache=tmp_path)
    assert b.spec() == a.spec()
    with pytest.raises(ValueError, match="unknown tokenizer"):
        build_tokenizer("wordpiece")
    with pytest.raises(ValueError, match="> 256"):
        build_tokenizer("bpe:100", TRAIN)


@pytest.mark.skipif(importlib.util.find_spec("tiktoken") is None, reason="tiktoken not installed")
def test_cl100k_when_installed():
    try:
        tok = build_tokenizer("cl100k")
    except RuntimeError as e:  # tiktoken without the offline ranks and no network
        pytest.skip(str(e))
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT and tok.vocab_size >= 100_000
    assert int(tok.token_bytes[ids].sum()) == len(TEXT.encode())


@pytest.mark.parametrize("name", ["bpe4096", "bpe:abc", "bpe:", "bpe", "bpe:-5", "bytes"])
def test_tokenizer_spec_is_strict(name):
    with pytest.raises(ValueError, match="bpe:N|unknown tokenizer"):
        check_spec(name)
    assert check_spec("bpe:4096") == ("bpe", 4096) and check_spec("byte") == ("byte", None)


def test_missing_text_extra_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import tokenizers -> ImportError
    with pytest.raises(ImportError, match=r"pip install 'kvfree\[text\]'"):
        BPETokenizer.train(TRAIN, 300)
    monkeypatch.setitem(sys.modules, "tiktoken", None)
    with pytest.raises(ImportError, match=r"pip install 'kvfree\[text\]'"):
        build_tokenizer("cl100k")
