"""Token streams: the batch function is a pure function of the step; evaluation windows."""

import importlib.util

import numpy as np
import pytest
import torch

from kvfree.data.corpus import Corpus
from kvfree.data.stream import TokenBatches, encode_docs, encoded_split, eval_windows
from kvfree.data.tokenizer import BPETokenizer, ByteTokenizer

TOKENS = np.arange(1000) % 251


def test_batches_are_a_pure_function_of_the_step():
    a = TokenBatches(TOKENS, seq_len=16, batch_size=4, seed=3)
    b = TokenBatches(TOKENS.copy(), seq_len=16, batch_size=4, seed=3)
    for step in (5, 0, 61, 5):  # any order, fresh instance: same batch
        x, y = a(step), b(step)
        assert torch.equal(x["inputs"], y["inputs"]) and torch.equal(x["labels"], y["labels"])
    assert not torch.equal(a(0)["inputs"], a(1)["inputs"])
    assert not torch.equal(a(0)["inputs"], TokenBatches(TOKENS, 16, 4, seed=4)(0)["inputs"])


def test_labels_are_next_tokens_from_the_stream():
    batch = TokenBatches(TOKENS, seq_len=16, batch_size=8)(2)
    assert batch["inputs"].shape == batch["labels"].shape == (8, 16)
    assert torch.equal(batch["inputs"][:, 1:], batch["labels"][:, :-1])
    t = torch.as_tensor(TOKENS)
    for row_in, row_lab in zip(batch["inputs"], batch["labels"]):
        start = int(torch.nonzero(t == row_in[0])[0])  # TOKENS is periodic; check the contiguity
        assert torch.equal(row_lab, (torch.arange(start + 1, start + 17) % 251))


def test_an_epoch_visits_distinct_windows():
    tb = TokenBatches(TOKENS, seq_len=10, batch_size=3, seed=0)
    w = tb.windows_per_epoch()
    firsts = []
    for step in range((w - 1) // 3):
        firsts += tb(step)["inputs"][:, 0].tolist()
    stream = torch.arange(1000)
    starts = TokenBatches(stream.numpy(), 10, 3, seed=0)
    seen = [int(x) for s in range((w - 1) // 3) for x in starts(s)["inputs"][:, 0]]
    assert len(seen) == len(set(seen))  # no window twice within the first epoch
    assert all((s - seen[0]) % 10 == 0 for s in seen)  # one grid of non-overlapping windows


def test_too_short_stream_is_refused():
    with pytest.raises(ValueError, match="too short"):
        TokenBatches(np.arange(20), seq_len=16, batch_size=2)


def test_eval_windows_cover_the_stream_once():
    x, y = eval_windows(TOKENS, 64)
    n = (len(TOKENS) - 1) // 64
    assert x.shape == (n, 64)
    assert torch.equal(y.flatten(), torch.as_tensor(TOKENS[1 : 1 + n * 64], dtype=torch.long))
    xs, ys = eval_windows(TOKENS, 64, max_windows=3)
    assert xs.shape == (3, 64) and torch.equal(xs[0], x[0]) and torch.equal(xs[-1], x[-1])
    with pytest.raises(ValueError, match="shorter than seq_len"):
        eval_windows(TOKENS[:10], 64)


@pytest.mark.skipif(
    importlib.util.find_spec("tokenizers") is None,
    reason="needs the text extra: pip install 'kvfree[text]'",
)
def test_encode_docs_joins_documents_losslessly():
    docs = ["first document", "second — ü", "third"]
    byte = ByteTokenizer()
    assert bytes(encode_docs(byte, docs).astype(np.uint8)).decode() == "\n\n".join(docs)
    bpe = BPETokenizer.train(docs * 20, 270)
    ids = encode_docs(bpe, docs)
    assert bpe.decode(ids.tolist()) == "\n\n".join(docs)
    assert int(bpe.token_bytes[ids].sum()) == len("\n\n".join(docs).encode())


def test_encoded_split_is_cached_for_built_corpora(tmp_path):
    (tmp_path / "manifest.json").write_text("{}")
    c = Corpus("t", {"train": ["abc", "def"], "val": ["x"]}, {}, tmp_path)
    first = encoded_split(c, "train", ByteTokenizer())
    cached = list((tmp_path / "tokens").rglob("*.npy"))
    assert len(cached) == 1 and np.array_equal(np.load(cached[0]), first)
    c.splits["train"] = ["changed"]  # new content → new fingerprint → re-encoded
    assert bytes(encoded_split(c, "train", ByteTokenizer()).astype(np.uint8)) == b"changed"
