"""Which README section is generated from which committed result folder (``results/``), and
``kvfree report all``, which regenerates them. A test regenerates every section from the
committed results and checks that the README does not change."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path


def _recall(folder: Path) -> str:
    from kvfree.bench.recall_report import report

    return report(folder, plots=False)["markdown"]


def _json(target: str, file: str) -> Callable[[Path], str]:
    """Markdown from one JSON result file: ``target`` = "module:function" taking the loaded
    record (imported only when the section is regenerated)."""

    def make(folder: Path) -> str:
        import importlib

        module, func = target.split(":")
        render = getattr(importlib.import_module(module), func)
        return render(json.loads((folder / file).read_text()))

    return make


def _decode(folder: Path) -> str:
    """Every ``*/decode.json`` under the folder (``cpu`` first), as one section."""
    from kvfree.bench.decode_report import load_result, readme_section

    files = sorted(folder.glob("*/decode.json"), key=lambda p: (p.parent.name != "cpu", str(p)))
    results = []
    for p in files:
        res = load_result(p)  # named as in the repository, wherever the folder was copied
        res["source"] = f"results/{p.relative_to(folder.parent).as_posix()}"
        results.append(res)
    return readme_section(results)


_FRONTIER = "kvfree.bench.frontier:markdown"

#: README section -> (folder under results/, the file that must exist, markdown from the folder:
#: a function of the folder, or "module:function" of that file's JSON record)
_TABLE: dict[str, tuple[str, str, Callable[[Path], str] | str]] = {
    "main-job": ("demo", "results.jsonl", _recall),
    "zoology-cpu": ("zoology-cpu", "results.jsonl", _recall),
    "text-niah": ("text-niah", "results.jsonl", _recall),
    "text-niah-mk4": ("text-niah-mk4", "results.jsonl", _recall),
    "zoology-cpu-attention": ("zoology-cpu-attention", "results.jsonl", _recall),
    "train-speed": ("train-speed", "train_speed.json", "kvfree.bench.train_speed:render"),
    "kernels": ("kernels", "kernels.json", "kvfree.bench.kernels:kernels_markdown"),
    "capacity": ("capacity", "capacity.json", "kvfree.bench.capacity:capacity_markdown"),
    "fdm-mqar": ("fdm-mqar", "fdm_mqar.json", "kvfree.bench.fdm_mqar:fdm_mqar_markdown"),
    "ridge-study": ("ridge-study", "ridge_study.json", "kvfree.bench.ridge_study:markdown"),
    "corpus": ("corpus", "corpus.json", "kvfree.commands.data:corpus_markdown"),
    "lm": ("lm", "lm.json", "kvfree.commands.report_lm:lm_markdown"),
    "decode": ("decode", "cpu/decode.json", _decode),
    "prefill-speed": (
        "prefill-speed",
        "prefill_speed.json",
        "kvfree.bench.prefill_speed:render",
    ),
    "frontier": ("frontier", "recall_per_byte.json", _FRONTIER),
    "frontier-zoology": ("frontier-zoology", "recall_per_byte.json", _FRONTIER),
    "frontier-cap3600": ("frontier-cap3600", "results.jsonl", _recall),
    "echo-table2": ("echo-suite", "echo_table2.json", "kvfree.bench.echo_report:markdown"),
    "echo-table3": ("echo-suite", "echo_table3.json", "kvfree.bench.echo_report:markdown"),
}
SECTIONS: dict[str, tuple[str, str, Callable[[Path], str]]] = {
    name: (folder, file, _json(make, file) if isinstance(make, str) else make)
    for name, (folder, file, make) in _TABLE.items()
}


def regenerate(results: str | Path, readme: str | Path | None) -> dict[str, str]:
    """Regenerate every section whose results are committed; returns {section: markdown}.
    Sections without results are left as they are (and not returned)."""
    from kvfree.report.tables import update_readme_section

    results = Path(results)
    if not results.is_dir():
        raise FileNotFoundError(f"{results} is not a folder of committed results")
    out = {}
    for section, (folder, required, make) in SECTIONS.items():
        if not (results / folder / required).exists():
            continue
        out[section] = make(results / folder)
        if readme is not None:
            update_readme_section(readme, section, out[section])
    return out
