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


def _train_speed(folder: Path) -> str:
    from kvfree.bench.train_speed import render

    return render(json.loads((folder / "train_speed.json").read_text()))


def _kernels(folder: Path) -> str:
    from kvfree.bench.kernels import kernels_markdown

    return kernels_markdown(json.loads((folder / "kernels.json").read_text()))


def _fdm_mqar(folder: Path) -> str:
    from kvfree.bench.fdm_mqar import fdm_mqar_markdown

    return fdm_mqar_markdown(json.loads((folder / "fdm_mqar.json").read_text()))


def _capacity(folder: Path) -> str:
    from kvfree.bench.capacity import capacity_markdown

    return capacity_markdown(json.loads((folder / "capacity.json").read_text()))


def _ridge_study(folder: Path) -> str:
    from kvfree.bench.ridge_study import markdown

    return markdown(json.loads((folder / "ridge_study.json").read_text()))


def _corpus(folder: Path) -> str:
    from kvfree.commands.data import corpus_markdown

    return corpus_markdown(json.loads((folder / "corpus.json").read_text()))


def _lm(folder: Path) -> str:
    from kvfree.commands.report_lm import lm_markdown

    return lm_markdown(json.loads((folder / "lm.json").read_text()))


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


#: README section -> (folder under results/, the file that must exist, markdown from the folder)
SECTIONS: dict[str, tuple[str, str, Callable[[Path], str]]] = {
    "main-job": ("demo", "results.jsonl", _recall),
    "zoology-cpu": ("zoology-cpu", "results.jsonl", _recall),
    "zoology-cpu-attention": ("zoology-cpu-attention", "results.jsonl", _recall),
    "train-speed": ("train-speed", "train_speed.json", _train_speed),
    "kernels": ("kernels", "kernels.json", _kernels),
    "capacity": ("capacity", "capacity.json", _capacity),
    "fdm-mqar": ("fdm-mqar", "fdm_mqar.json", _fdm_mqar),
    "ridge-study": ("ridge-study", "ridge_study.json", _ridge_study),
    "corpus": ("corpus", "corpus.json", _corpus),
    "lm": ("lm", "lm.json", _lm),
    "decode": ("decode", "cpu/decode.json", _decode),
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
