"""Loaders: text file, folder, pre-split folder, built corpus, Hugging Face (faked)."""

import sys
import types

import pytest

from kvfree.data.loaders import load_corpus, paragraph_docs


def test_single_file_is_cut_into_paragraph_documents(tmp_path):
    paras = [f"Paragraph {i} " + "word " * 30 for i in range(40)]
    path = tmp_path / "book.txt"
    path.write_text("\n\n".join(paras) + "\n")
    c = load_corpus(path, doc_chars=400, val_frac=0.1, test_frac=0.1)
    docs = c.docs("train") + c.docs("val") + c.docs("test")
    assert sorted(docs) == sorted(paragraph_docs(path.read_text(), 400))
    assert all(len(d) <= 400 or "\n\n" not in d for d in docs)
    assert len(c.docs("val")) == len(c.docs("test")) == 2  # 10% of 20 documents each
    joined = "\n\n".join(paragraph_docs(path.read_text(), 400))
    assert joined == "\n\n".join(p.strip() for p in paras)  # nothing lost, nothing added


def test_folder_of_files_one_document_each(tmp_path):
    for i in range(10):
        (tmp_path / f"d{i}.txt").write_text(f"document {i}\r\n\r\n\r\n\r\nend  {i}")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    c = load_corpus(tmp_path, val_frac=0.2, test_frac=0.1)
    all_docs = sorted(c.docs("train") + c.docs("val") + c.docs("test"))
    assert all_docs == sorted(f"document {i}\n\nend {i}" for i in range(10))
    assert (len(c.docs("val")), len(c.docs("test"))) == (2, 1)
    again = load_corpus(tmp_path, val_frac=0.2, test_frac=0.1)
    assert again.splits == c.splits


def test_presplit_folder_like_wikitext(tmp_path):
    for name, text in (
        ("wiki.train.raw", "train text"),
        ("wiki.valid.raw", "valid text"),
        ("wiki.test.raw", "test text"),
    ):
        (tmp_path / name).write_text(text)
    c = load_corpus(tmp_path)
    assert c.splits == {"train": ["train text"], "val": ["valid text"], "test": ["test text"]}


def test_hf_dataset_through_datasets(monkeypatch):
    calls = []

    def load_dataset(repo, config):
        calls.append((repo, config))
        return {
            "train": {"text": [" = A = \n", "a line\n"]},
            "validation": {"text": ["v\n"]},
            "test": {"text": ["t\n"]},
        }

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    c = load_corpus("hf:wikitext:wikitext-103-raw-v1")
    assert calls == [("wikitext", "wikitext-103-raw-v1")]
    assert c.splits == {"train": [" = A = \na line\n"], "val": ["v\n"], "test": ["t\n"]}


def test_hf_without_datasets_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match="pip install datasets"):
        load_corpus("hf:wikitext")


def test_bad_inputs_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_corpus(tmp_path / "missing" / "x.txt")
    (tmp_path / "tiny.txt").write_text("one paragraph only")
    with pytest.raises(ValueError, match="at least 3"):
        load_corpus(tmp_path / "tiny.txt")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no text files"):
        load_corpus(empty)
