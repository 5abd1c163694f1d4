"""The repository explains itself: CPU install instructions, CI checks formatting, every mixer
class has a docstring, and ``kvfree info``'s formulas are arithmetic that holds."""

import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch.nn as nn

from kvfree.mixers import available, build_mixer

ROOT = Path(__file__).resolve().parents[2]
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def test_readme_and_makefile_install_the_cpu_wheel():
    """Item 8: the README says how to get torch's CPU wheel; make falls back to it."""
    readme = (ROOT / "README.md").read_text()
    assert f"pip install torch --index-url {CPU_INDEX}" in readme
    make = (ROOT / "Makefile").read_text()
    assert f"TORCH_INDEX ?= {CPU_INDEX}" in make
    rule = make.split("$(STAMP): pyproject.toml", 1)[1].split("\n\n", 1)[0]
    assert "--no-index" in rule and '--index-url "$(TORCH_INDEX)"' in rule


def test_ci_checks_formatting():
    """Item 11: `make test` (what CI runs) fails on unformatted code."""
    make = (ROOT / "Makefile").read_text()
    test_rule = make.split("\ntest:", 1)[1].split("\n\n", 1)[0]
    assert "ruff format --check ." in test_rule and "ruff check ." in test_rule


def mixer_classes():
    import importlib
    import pkgutil

    import kvfree.mixers as M

    for info in pkgutil.iter_modules(M.__path__):
        mod = importlib.import_module(f"kvfree.mixers.{info.name}")
        for name, obj in vars(mod).items():
            if (
                inspect.isclass(obj)
                and obj.__module__ == mod.__name__
                and issubclass(obj, nn.Module)
            ):
                yield f"{info.name}.{name}", obj


def test_every_mixer_class_has_a_docstring():
    missing = [n for n, cls in mixer_classes() if not (cls.__dict__.get("__doc__") or "").strip()]
    assert not missing, f"classes without a docstring: {missing}"
    from kvfree.mixers.ska import SKA

    assert "docs/ska.md" in SKA.__doc__


def _evaluate(numbers: str, T: int) -> int:
    expr = numbers.replace("·", "*").replace("²", "**2").replace("−", "-").replace("T", str(T))
    expr = re.sub(r"(\d|\))\(", r"\1*(", expr)  # implicit products: 2(…), (…)(…)
    assert re.fullmatch(r"[\d\s*+\-(),min]+", expr), expr
    return eval(expr, {"__builtins__": {}, "min": min})  # noqa: S307 - digits and operators only


@pytest.mark.parametrize("name", available())
def test_state_formula_numbers_equal_state_size(name):
    """Item 11: the filled-in side of every formula evaluates to state_size (at T = 1024 for
    the growing KV cache), so "symbols = numbers" reads correctly."""
    m = build_mixer(name, 64)
    from kvfree.commands.info import split_formula

    text = m.state_formula()
    assert text.count(" = ") == 1, text
    symbols, numbers, _ = split_formula(text)
    assert symbols and numbers
    assert _evaluate(numbers, 1024) == m.state_size(1024), text


def test_info_prints_symbols_and_numbers_separately():
    res = subprocess.run(
        [sys.executable, "-m", "kvfree", "info"], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    i = next(i for i, ln in enumerate(lines) if ln.split()[:1] == ["attention"])
    assert lines[i].rstrip().endswith("2·T·n_kv·d_h")
    assert re.search(r"= 2·T·\d+·\d+ = [\d,]+ elements at T = 1024", lines[i + 1])
