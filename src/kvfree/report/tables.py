"""Markdown/CSV tables from lists of result records, and atomic result files."""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != v:  # NaN
            return "—"
        if v == 0 or 1e-3 <= abs(v) < 1e5:
            return f"{v:.4g}" if abs(v) < 1 else f"{v:,.3f}".rstrip("0").rstrip(".")
        return f"{v:.3g}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return "—" if v is None else str(v)


def markdown_table(
    rows: Sequence[dict], columns: Sequence[str] | None = None, headers: Sequence[str] | None = None
) -> str:
    columns = list(columns or (rows[0].keys() if rows else []))
    headers = list(headers or columns)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def csv_text(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    columns = list(columns or (rows[0].keys() if rows else []))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` via a temp file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_json(path: str | Path, obj: Any, compact: bool = False) -> Path:
    """``obj`` as JSON, indented, or with no whitespace at all (``compact``: for files that
    hold curves, where indentation would put every number on its own line)."""
    text = json.dumps(
        obj, default=str, **({"separators": (",", ":")} if compact else {"indent": 2})
    )
    return atomic_write(path, text + "\n")


def write_result(out_dir: str | Path, stem: str, result: dict) -> None:
    """A bench's ``stem.json`` (the record without its ``markdown``) and ``stem.md``."""
    out_dir = Path(out_dir)
    write_json(out_dir / f"{stem}.json", {k: v for k, v in result.items() if k != "markdown"})
    atomic_write(out_dir / f"{stem}.md", result["markdown"] + "\n")


def update_readme_section(readme: str | Path, name: str, markdown: str) -> Path:
    """Replace the text between ``<!-- BEGIN name -->`` and ``<!-- END name -->`` in the README
    (appending the marked section at the end if absent). Tables in the README are written only
    this way, by ``kvfree report …`` commands reading result files."""
    readme = Path(readme)
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    text = readme.read_text() if readme.exists() else ""
    block = f"{begin}\n{markdown.rstrip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    return atomic_write(readme, text)
