"""Citations of the docs: every ``docs/<page>.md §N`` in src/, tests/ and README.md names a page
that exists and a section it has, and nothing cites the spec files that are not in the repo.

A section ``§N.M`` exists when the page has a heading numbered ``N.M`` (``## 3. …``,
``### 13.4 …``), or when the section ``N`` has a numbered list whose item ``M.`` it is (e.g.
``docs/fdm.md §2.1.6`` = step 6 of §2.1, ``docs/ska.md §17.4`` = pitfall 4 of §17).
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = ("README", "design", "ska", "fdm", "tasks", "baselines", "frontier")

CITE = re.compile(r"docs/(\w+)\.md")
# A citation's text runs to the next closing bracket, semicolon, colon, quote, newline or the
# next docs/ citation; the § numbers inside it (with ranges "§A–B", "§A–§B") belong to it.
END = re.compile(r"[)\];:\n\"'`]|docs/")
SEC = re.compile(r"§\s*(\d+(?:\.\d+)*)(?:\s*[–-]\s*§?\s*(\d+(?:\.\d+)*))?")
HEADING = re.compile(r"^(#{1,6})\s+(\d+(?:\.\d+)*)\.?(?:\s|$)")
ITEM = re.compile(r"^\s*(\d+)\.\s")
# Citations of files that are not part of a clone (the specs the docs were written from).
OUTSIDE = re.compile(
    r"(?<![\w/])(?:ska|fdm|tasks|baselines|frontier|DESIGN)\.md|shared/specs|\.\./shared"
    r"|shared folder"
)


def sources() -> list[Path]:
    files = [ROOT / "README.md"]
    for top in ("src", "tests"):
        files += sorted(p for p in (ROOT / top).rglob("*.py") if ".egg-info" not in str(p))
    return [p for p in files if p.exists()]


@cache
def sections(page: str) -> tuple[set[str], dict[str, set[str]]]:
    """(heading numbers, heading number -> numbered list items in that section)."""
    heads: set[str] = set()
    items: dict[str, set[str]] = {}
    open_: list[tuple[int, str]] = []  # (level, number) of the headings enclosing the line
    fence = False
    for line in (DOCS / f"{page}.md").read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fence = not fence
            continue
        if fence:
            continue
        m = HEADING.match(line)
        if m:
            level, num = len(m.group(1)), m.group(2)
            heads.add(num)
            open_ = [(lv, n) for lv, n in open_ if lv < level] + [(level, num)]
            continue
        m = ITEM.match(line)
        if m:
            for _, num in open_:
                items.setdefault(num, set()).add(m.group(1))
    return heads, items


def resolves(page: str, num: str) -> bool:
    heads, items = sections(page)
    if num in heads:
        return True
    parent, _, last = num.rpartition(".")
    return bool(parent) and last in items.get(parent, set())


def citations(text: str):
    """(page, section or None, line number) for every docs/ citation in ``text``."""
    for m in CITE.finditer(text):
        end = END.search(text, m.end())
        span = text[m.end() : end.start() if end else len(text)]
        line = text.count("\n", 0, m.start()) + 1
        nums = [n for s in SEC.finditer(span) for n in s.groups() if n]
        if not nums:
            yield m.group(1), None, line
        for n in nums:
            yield m.group(1), n, line


def test_every_page_exists():
    for page in PAGES:
        assert (DOCS / f"{page}.md").is_file(), f"docs/{page}.md is missing"


def test_citations_point_at_existing_sections():
    bad, count = [], 0
    for path in sources():
        rel = path.relative_to(ROOT)
        for page, num, line in citations(path.read_text(encoding="utf-8")):
            count += 1
            if page not in PAGES or not (DOCS / f"{page}.md").is_file():
                bad.append(f"{rel}:{line}: docs/{page}.md does not exist")
            elif num is not None and not resolves(page, num):
                bad.append(f"{rel}:{line}: docs/{page}.md has no §{num}")
    assert count > 100, f"only {count} citations found: is the pattern still right?"
    assert not bad, "\n".join(bad)


def test_no_citation_outside_the_repo():
    bad = []
    for path in sources():
        if path.name == "test_docs.py":
            continue
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if OUTSIDE.search(line):
                bad.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not bad, "citations of files outside the repo:\n" + "\n".join(bad)


@pytest.mark.parametrize("page", PAGES)
def test_links_between_pages_resolve(page):
    text = (DOCS / f"{page}.md").read_text(encoding="utf-8")
    for target in re.findall(r"\]\((\w+\.md)\)", text):
        assert (DOCS / target).is_file(), f"docs/{page}.md links to missing {target}"


def test_resolver_understands_headings_and_list_items():
    assert resolves("ska", "13.4") and resolves("ska", "17.16") and resolves("fdm", "2.1.6")
    assert not resolves("ska", "99") and not resolves("fdm", "2.1.60")
