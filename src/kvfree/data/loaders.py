"""Text sources for language modelling, all returned as a :class:`Corpus` of documents.

``load_corpus(spec)`` accepts:

- ``"en"`` (or any name built by ``kvfree data build --name``): the cached offline corpus;
- a folder holding a built corpus (``manifest.json``);
- a folder with ready-made splits ``train.*``, ``valid.*``/``val.*``, ``test.*`` (e.g. the
  WikiText raw files): used as given, one document per file;
- any other folder: every ``*.txt``/``*.md`` file (recursively) is one document, then a
  seeded document-level split;
- a single text file: cut into documents at blank lines, paragraphs grouped up to
  ``doc_chars`` characters, then a seeded document-level split;
- ``hf:NAME[:CONFIG]`` (e.g. ``hf:wikitext:wikitext-103-raw-v1``): a Hugging Face dataset
  through the optional ``datasets`` package, where a hub is reachable; its ``train``,
  ``validation`` and ``test`` splits become ours, each split's ``text`` column joined.
"""

from __future__ import annotations

import re
from pathlib import Path

from kvfree.data.clean import normalize
from kvfree.data.corpus import DEFAULT_NAME, Corpus, Doc, corpus_dir, load_built, split_documents

TEXT_SUFFIXES = (".txt", ".md", ".text", ".raw", ".tokens")
_SPLIT_NAMES = {
    "train": "train",
    "valid": "val",
    "validation": "val",
    "val": "val",
    "dev": "val",
    "test": "test",
}


def load_corpus(
    spec: str | Path = DEFAULT_NAME,
    *,
    seed: int = 0,
    val_frac: float = 0.05,
    test_frac: float = 0.05,
    doc_chars: int = 4000,
) -> Corpus:
    spec_s = str(spec)
    if spec_s.startswith("hf:"):
        return load_hf(spec_s[3:])
    path = Path(spec_s).expanduser()
    if path.is_dir():
        if (path / "manifest.json").exists():
            return load_built(path)
        presplit = _presplit_files(path)
        if presplit:
            splits = {
                s: [normalize(p.read_text(encoding="utf-8", errors="replace"))]
                for s, p in presplit.items()
            }
            return Corpus(path.name, splits, {"kind": "presplit folder", "path": str(path)}, path)
        files = sorted(
            p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES
        )
        if not files:
            raise FileNotFoundError(f"{path} holds no text files ({', '.join(TEXT_SUFFIXES)})")
        docs = [
            Doc(
                str(p.relative_to(path)),
                "folder",
                normalize(p.read_text(encoding="utf-8", errors="replace")),
            )
            for p in files
        ]
        return _split_corpus(path.name, docs, seed, val_frac, test_frac, "folder", path)
    if path.is_file():
        docs = [
            Doc(f"{path.name}#{i}", "file", d)
            for i, d in enumerate(
                paragraph_docs(path.read_text(encoding="utf-8", errors="replace"), doc_chars)
            )
        ]
        return _split_corpus(path.stem, docs, seed, val_frac, test_frac, "file", path)
    if "/" not in spec_s and "\\" not in spec_s:
        return load_built(corpus_dir(spec_s))
    raise FileNotFoundError(
        f"{spec_s}: no such file or folder; pass a text file, a folder, a "
        "built corpus name (kvfree data build) or hf:NAME[:CONFIG]"
    )


def paragraph_docs(text: str, doc_chars: int = 4000) -> list[str]:
    """Blank-line-separated paragraphs grouped into documents of at most ~``doc_chars``."""
    paras = [p for p in re.split(r"\n\s*\n", normalize(text)) if p.strip()]
    docs, cur, size = [], [], 0
    for p in paras:
        if cur and size + len(p) > doc_chars:
            docs.append("\n\n".join(cur))
            cur, size = [], 0
        cur.append(p)
        size += len(p) + 2
    if cur:
        docs.append("\n\n".join(cur))
    return docs


def load_hf(name: str) -> Corpus:
    """``NAME[:CONFIG]`` from the Hugging Face hub (needs ``datasets`` and network)."""
    try:
        import datasets
    except ImportError as e:
        raise ImportError(
            "hf: corpora need the `datasets` package (pip install datasets) and "
            "access to the Hugging Face hub; offline, use `kvfree data build` "
            "or a text file/folder"
        ) from e
    repo, _, config = name.partition(":")
    ds = datasets.load_dataset(repo, config or None)
    splits = {}
    for hf_split, ours in (("train", "train"), ("validation", "val"), ("test", "test")):
        if hf_split in ds:
            splits[ours] = ["".join(ds[hf_split]["text"])]
    if "train" not in splits:
        raise ValueError(f"hf:{name} has no train split (has {list(ds)})")
    return Corpus(name, splits, {"kind": "huggingface", "name": name})


def _presplit_files(path: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for p in sorted(path.iterdir()):
        if not p.is_file():
            continue
        parts = [x for x in re.split(r"[._\-]", p.name.lower()) if x]
        for part in parts:
            if part in _SPLIT_NAMES and _SPLIT_NAMES[part] not in found:
                found[_SPLIT_NAMES[part]] = p
                break
    return found if {"train", "val"} <= set(found) else {}


def _split_corpus(name, docs, seed, val_frac, test_frac, kind, path) -> Corpus:
    parts = split_documents(docs, seed, val_frac, test_frac)
    if not parts["val"]:
        raise ValueError(
            f"{path}: only {len(docs)} document(s); need at least 3 to make a "
            "validation split — give more text or a folder with train/valid files"
        )
    return Corpus(
        name,
        {s: [d.text for d in v] for s, v in parts.items()},
        {"kind": kind, "path": str(path), "seed": seed},
        path,
    )
