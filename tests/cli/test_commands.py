"""Properties of every command: nothing writes README.md unless asked; the CPU-heavy commands
take --threads; the default thread count follows the machine."""

import os
import subprocess
import sys

import pytest
import torch

import kvfree.commands  # noqa: F401  (registers the commands)
from kvfree import utils
from kvfree.cli import app


def all_commands():
    """(name, click command) of every leaf command, e.g. ("report decode", cmd)."""
    import typer

    out = []

    def walk(cmd, path):
        subs = getattr(cmd, "commands", None)
        if subs:
            for name, sub in subs.items():
                walk(sub, path + [name])
        else:
            out.append((" ".join(path), cmd))

    walk(typer.main.get_command(app), [])
    return out


def test_no_command_writes_the_readme_by_default():
    """Item 4: every --readme option defaults to None (write only when a path is given)."""
    seen = []
    for name, cmd in all_commands():
        for p in cmd.params:
            if p.name == "readme":
                seen.append(name)
                assert p.default in (None, ""), f"kvfree {name} --readme defaults to {p.default!r}"
    assert "report decode" in seen and "bench kernels" in seen


def test_report_decode_without_readme_leaves_it(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# mine\n")
    res = subprocess.run(
        [sys.executable, "-m", "kvfree", "report", "decode", "missing-folder"],
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert readme.read_text() == "# mine\n"


@pytest.mark.parametrize(
    "name",
    [
        "train",
        "eval",
        "generate",
        "bench capacity",
        "bench decode",
        "bench fdm-mqar",
        "bench kernels",
    ],
)
def test_cpu_heavy_commands_take_threads(name):
    """Item 7: --threads on train, eval, generate and the benches (bench recall: its own)."""
    cmd = dict(all_commands())[name]
    opt = next(p for p in cmd.params if p.name == "threads")
    assert opt.default is None


def test_default_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("KVFREE_THREADS", raising=False)
    cpus = utils.usable_cpus()
    assert 1 <= cpus <= (os.cpu_count() or 1)
    monkeypatch.setattr(utils, "busy_cpus", lambda: 0)
    assert utils.default_threads() == cpus
    assert utils.default_threads(workers=cpus) == 1  # one per process with a worker per core
    monkeypatch.setattr(utils, "busy_cpus", lambda: 10**6)  # a busy machine: never below 1
    assert utils.default_threads() == 1
    monkeypatch.setenv("KVFREE_THREADS", "3")
    assert utils.default_threads() == 3
    monkeypatch.delenv("KVFREE_THREADS")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert utils.default_threads() == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "two")
    with pytest.raises(ValueError, match="OMP_NUM_THREADS"):
        utils.default_threads()


def test_set_threads_sets_and_records():
    old = torch.get_num_threads()
    try:
        assert utils.set_threads(1) == 1 == torch.get_num_threads()
        assert utils.environment("cpu")["threads"] == 1
        with pytest.raises(ValueError):
            utils.set_threads(0)
    finally:
        torch.set_num_threads(old)
