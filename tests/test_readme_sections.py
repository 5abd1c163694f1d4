"""Every README section that has committed results (``results/``) is regenerated from them
exactly: ``kvfree report all`` leaves the README unchanged."""

import shutil
from pathlib import Path

import pytest

from kvfree.report.sections import SECTIONS, regenerate

ROOT = Path(__file__).resolve().parents[1]


def test_readme_sections_come_from_committed_results(tmp_path):
    if not (ROOT / "results").is_dir():
        pytest.skip("no results/ folder in this checkout")
    results = tmp_path / "results"
    shutil.copytree(ROOT / "results", results)  # the recall report rewrites its folder
    readme = tmp_path / "README.md"
    shutil.copy(ROOT / "README.md", readme)
    done = regenerate(results, readme)
    assert {"main-job", "train-speed"} <= set(done)
    assert readme.read_text() == (ROOT / "README.md").read_text()
    for section in done:
        assert f"<!-- BEGIN {section} -->" in readme.read_text()


def test_a_missing_results_folder_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="committed results"):
        regenerate(tmp_path / "nope", None)
    assert set(SECTIONS) >= {"main-job", "kernels", "capacity", "train-speed"}
