"""The corpus builder on fixture archives (no network): extraction, cleaning, splits, cache."""

import json
import subprocess

import pytest

from kvfree.data import clean
from kvfree.data.corpus import Doc, build_corpus, load_built, split_documents
from kvfree.data.sources import SOURCES

from .fixtures import KJV, PLAY, make_downloads


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError(f"tried to run {a[0] if a else k}: tests must not download")

    monkeypatch.setattr(subprocess, "run", refuse)


@pytest.fixture
def built(tmp_path, no_network):
    root = tmp_path / "corpus"
    make_downloads(root / "downloads")
    build_corpus("t", root=root, seed=0, val_frac=0.2, test_frac=0.2, log=lambda *_: None)
    return root


def test_normalize_whitespace_and_unicode():
    raw = "  Cafe\u0301\t bar \r\n\r\n\r\n\n x\x07y  \n"
    assert clean.normalize(raw) == "Café bar\n\nx y"


def test_brown_tags_removed_and_punctuation_attached():
    out = clean.brown_detag(
        "\n\n\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' ./.\n"
        "\n\tIt/pps (/( briefly/rb )/) ended/vbd ,/, said/vbd 1/2/cd ./."
    )
    assert out == 'The jury said "no evidence". It (briefly) ended, said 1/2.'


def test_kjv_chapters_drop_verse_numbers_and_brackets():
    docs = clean.kjv_chapters(KJV)
    assert docs == [
        "In the beginning God created the heaven. And the earth was was void.",
        "Thus the heavens were finished.",
        "Now the serpent was subtil.",
    ]
    with pytest.raises(ValueError, match="Bible"):
        clean.kjv_chapters("print('no bible here')")


def test_shakespeare_split_into_acts():
    acts = clean.shakespeare_acts(PLAY)
    assert len(acts) == 2
    assert acts[0].startswith("HAMLET") and "ACT I." in acts[0] and "Who's there?" in acts[0]
    assert acts[1].startswith("ACT II.") and "Give him this money." in acts[1]
    assert clean.shakespeare_acts("A poem\n\nwith no acts") == ["A poem\n\nwith no acts"]


def test_wiki_extracts_skip_empty_and_clean():
    docs = clean.wiki_extracts(
        '{"B": {"extract": "b  text"}, "A": {"extract": "a"}, "C": {"extract": " "}}'
    )
    assert docs == ["A\n\na", "B\n\nb text"]


def test_build_writes_manifest_splits_and_licences(built):
    manifest = json.loads((built / "manifest.json").read_text())
    assert set(manifest["sources"]) == set(SOURCES)
    for name, s in manifest["sources"].items():
        assert s["package"] == SOURCES[name].package and s["version"] == SOURCES[name].version
        assert s["package_license"] and s["text_license"] and len(s["archive_sha256"]) == 64
        assert s["archive_bytes"] == (built / "downloads" / s["archive"]).stat().st_size
        assert sum(s[sp]["docs"] for sp in ("train", "val", "test")) > 0
    # brown: 6 samples (README excluded); wiki: 12 (1 empty skipped); shakespeare: 2 plays × 2
    # acts + sonnets (the _gut_f folio excluded, a copied play's 2 acts dropped); kjv: 3
    counts = {
        n: sum(s[sp]["docs"] for sp in ("train", "val", "test"))
        for n, s in manifest["sources"].items()
    }
    assert counts == {"brown": 6, "wiki": 12, "shakespeare": 5, "kjv": 3}
    assert manifest["duplicates_dropped"] == 2
    corpus = load_built(built)
    texts = {s: set(corpus.docs(s)) for s in ("train", "val", "test")}
    assert not (texts["train"] & texts["val"]) and not (texts["train"] & texts["test"])
    assert all(len(v) > 0 for v in texts.values())
    assert not any("FOLIO" in d or "/nn" in d for d in corpus.docs("train"))
    for sp in ("train", "val", "test"):
        assert manifest["splits"][sp]["bytes"] == sum(len(d.encode()) for d in corpus.docs(sp))


def test_build_is_cached_and_deterministic(built, tmp_path):
    before = (built / "train.jsonl").read_text()
    build_corpus("t", root=built, seed=0, val_frac=0.2, test_frac=0.2, log=lambda *_: None)
    assert (built / "train.jsonl").read_text() == before  # not rebuilt without force
    again = tmp_path / "again"
    make_downloads(again / "downloads")
    build_corpus("t", root=again, seed=0, val_frac=0.2, test_frac=0.2, log=lambda *_: None)
    assert (again / "val.jsonl").read_text() == (built / "val.jsonl").read_text()


def test_split_is_document_level_stratified_and_seeded():
    docs = [Doc(f"{s}/{i}", s, f"{s} doc {i}") for s in ("a", "b") for i in range(40)]
    one = split_documents(docs, 0, 0.1, 0.1)
    assert {d.source for d in one["val"]} == {"a", "b"}
    assert [len(one[s]) for s in ("train", "val", "test")] == [64, 8, 8]
    assert split_documents(docs, 0, 0.1, 0.1) == one
    assert split_documents(docs, 1, 0.1, 0.1)["val"] != one["val"]
    with pytest.raises(ValueError, match="sum to less than 1"):
        split_documents(docs, 0, 0.6, 0.5)


def test_unknown_source_and_missing_corpus_are_clear(tmp_path):
    with pytest.raises(ValueError, match="unknown corpus source"):
        build_corpus("t", ["gutenberg"], root=tmp_path)
    with pytest.raises(FileNotFoundError, match="kvfree data build"):
        load_built(tmp_path / "nothing")


def test_data_build_command_uses_kvfree_cache(tmp_path, monkeypatch, no_network):
    from typer.testing import CliRunner

    import kvfree.commands  # noqa: F401
    from kvfree.cli import app

    monkeypatch.setenv("KVFREE_CACHE", str(tmp_path / "cache"))
    make_downloads(tmp_path / "cache" / "corpus" / "mini" / "downloads")
    res = CliRunner().invoke(
        app, ["data", "build", "--name", "mini", "--val-frac", "0.2", "--test-frac", "0.2"]
    )
    assert res.exit_code == 0, res.output
    assert "| **total** |" in res.output and "CC BY-SA" in res.output
    assert (tmp_path / "cache" / "corpus" / "mini" / "manifest.json").exists()
    info = CliRunner().invoke(app, ["data", "info", "mini"])
    assert info.exit_code == 0 and "| val |" in info.output
