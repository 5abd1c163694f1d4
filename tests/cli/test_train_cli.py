"""`kvfree train` as a user runs it (subprocesses): a refused run changes nothing, Ctrl-C saves a
checkpoint and says how to resume, user errors are one line with exit status 2."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

CONFIG = {
    "model": {"d_model": 16, "layers": ["shortconv", "linear_attention"]},
    "data": {
        "tokenizer": "byte",
        "seq_len": 16,
        "batch_size": 4,
        "eval_windows": 2,
        "final_eval_windows": 2,
        "decode_windows": 1,
    },
    "train": {
        "steps": 4,
        "warmup_steps": 1,
        "log_every": 1,
        "eval_every": 2,
        "checkpoint_every": 2,
        "progress": False,
    },
}


def base_env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "KVFREE_DEBUG"}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


DRIVER = """
import contextlib, io, json, sys
from kvfree.cli import main
results = []
for args in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(args)
            rc = 0
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException as e:  # an escaped exception is a failure of main()
            rc, err = -1, io.StringIO(repr(e))
    results.append({"rc": rc, "stdout": out.getvalue(), "stderr": err.getvalue()})
print(json.dumps(results))
"""


def kvfree_many(cases, cwd):
    """Run ``kvfree.cli.main`` on each argument list in one fresh process (one torch import);
    returns CompletedProcess-like results."""
    res = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps([[str(a) for a in c] for c in cases])],
        cwd=cwd,
        env=base_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    return [
        subprocess.CompletedProcess(c, r["rc"], r["stdout"], r["stderr"])
        for c, r in zip(cases, json.loads(res.stdout.strip().splitlines()[-1]))
    ]


def kvfree(*args, cwd, env=None, timeout=120):
    env = base_env(**(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "kvfree", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_user_error(res, *needles):
    """Exit 2, at most a few lines on stderr, no traceback, the message names the problem."""
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr + res.stdout
    err = res.stderr.strip().splitlines()
    assert err and len(err) <= 5, res.stderr
    for n in needles:
        assert n in res.stderr, (n, res.stderr)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train-cli")
    (tmp / "text.txt").write_text(
        "\n\n".join(
            f"Paragraph {i}: the quick brown fox jumps over the lazy dog {i % 7} times."
            for i in range(120)
        )
    )
    cfg = json.loads(json.dumps(CONFIG))
    cfg["data"]["corpus"] = str(tmp / "text.txt")
    (tmp / "cfg.json").write_text(json.dumps(cfg))
    res = kvfree("train", "--config", "cfg.json", "--out", "R", "--threads", 1, cwd=tmp)
    assert res.returncode == 0, res.stderr
    return tmp


def snapshot(run):
    return {p.relative_to(run): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def test_threads_are_recorded(work):
    s = json.loads((work / "R" / "summary.json").read_text())
    assert s["threads"] == 1 and s["environment"]["threads"] == 1


def test_failed_resume_changes_nothing(work):
    """Item 1: a resume refused for a different model or a corrupt checkpoint leaves config.json
    (and every other file) as it was, and the run still resumes afterwards."""
    run = work / "R"
    before = snapshot(run)
    res = kvfree("train", "--out", "R", "--resume", "--set", "model.d_model=32", cwd=work)
    assert_user_error(res, "different model config", "d_model")
    assert snapshot(run) == before
    good = (run / "checkpoints" / "last.pt").read_bytes()
    (run / "checkpoints" / "last.pt").write_bytes(good[:1000])  # truncated
    corrupt = snapshot(run)
    res = kvfree("train", "--out", "R", "--resume", "--steps", 40, cwd=work)
    assert_user_error(res, "corrupt or truncated", "--from best")
    assert snapshot(run) == corrupt  # steps in config.json not rewritten
    (run / "checkpoints" / "last.pt").write_bytes(good)
    res = kvfree("train", "--out", "R", "--resume", "--set", 'model.layers=["mamba2"]', cwd=work)
    assert_user_error(res, "different model config", "mamba2")
    assert snapshot(run) == before


def test_resume_needs_something_to_resume_and_from_best(work, tmp_path):
    """Item 3: --resume on an empty folder says so; --from best resumes from best.pt."""
    res = kvfree(
        "train", "--config", work / "cfg.json", "--out", tmp_path / "E", "--resume", cwd=work
    )
    assert_user_error(res, "nothing to resume")
    assert not (tmp_path / "E").exists()
    run = tmp_path / "B"
    (run / "checkpoints").mkdir(parents=True)
    for name in ("config.json", "metrics.jsonl", "checkpoints/best.pt"):
        (run / name).write_bytes((work / "R" / name).read_bytes())
    res = kvfree("train", "--out", run, "--resume", cwd=work)
    assert_user_error(res, "nothing to resume", "--from best")
    from kvfree.train.checkpoint import load_checkpoint

    best_step = load_checkpoint(run / "checkpoints" / "best.pt")["trainer"]["step"]
    res = kvfree("train", "--out", run, "--from", "best", "--steps", 6, cwd=work)
    assert res.returncode == 0, res.stderr
    s = json.loads((run / "summary.json").read_text())
    assert s["steps"] == 6 and s["steps_this_run"] == 6 - best_step
    assert (run / "checkpoints" / "last.pt").exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_saves_and_prints_the_resume_command(work, tmp_path, sig):
    """Item 2: SIGINT/SIGTERM save checkpoints/last.pt at the current step, print where it is
    and the command that resumes, exit 130; that command continues the run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("KVFREE_DEBUG", None)
    run = tmp_path / "I"
    p = subprocess.Popen(
        [sys.executable, "-m", "kvfree", "train", "--config", work / "cfg.json", "--out", run]
        + ["--steps", "100000", "--set", "train.checkpoint_every=0", "--set", "train.eval_every=0"],
        cwd=work,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and not (
        metrics.exists() and metrics.read_text().count("\n") >= 3
    ):
        time.sleep(0.1)
    p.send_signal(sig)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, (out, err)
    assert "Traceback" not in err
    ckpt = run / "checkpoints" / "last.pt"
    assert f"saved {ckpt}" in err and f"resume with: kvfree train --out {run} --resume" in err
    from kvfree.train.checkpoint import load_checkpoint

    step = load_checkpoint(ckpt)["trainer"]["step"]
    assert step >= 3 and f"at step {step}" in err
    res = kvfree("train", "--out", run, "--resume", "--steps", step + 1, cwd=work)
    assert res.returncode == 0, res.stderr
    assert json.loads((run / "summary.json").read_text())["steps_this_run"] == 1


def test_user_errors_are_one_line_with_exit_2(work, tmp_path):
    """Item 5: the message without a traceback, exit 2; --debug / KVFREE_DEBUG=1 show it."""
    cases = [
        (("train", "--preset", "nope", "--out", tmp_path / "a"), "unknown preset"),
        (
            ("train", "--config", "cfg.json", "--set", "data.splitt=1", "--out", tmp_path / "a"),
            "unknown data config key",
        ),
        (
            (
                "train",
                "--preset",
                "tiny-gdn",
                "--corpus",
                "no-such-corpus",
                "--out",
                tmp_path / "a",
            ),
            "no corpus",
        ),
        (
            (
                "train",
                "--config",
                "cfg.json",
                "--set",
                'model.layers=["nope"]',
                "--out",
                tmp_path / "a",
            ),
            "nope",
        ),
        (("train", "--config", "cfg.json", "--out", "R"), "--resume"),  # existing run
        (("eval", tmp_path / "missing"), "does not exist"),
        (("generate", tmp_path / "missing"), "does not exist"),
        (("eval", "R", "--split", "nope"), "split"),
    ]
    for (_, needle), res in zip(cases, kvfree_many([a for a, _ in cases], work)):
        assert_user_error(res, needle)
    assert not (tmp_path / "a").exists()
    assert_user_error(kvfree("train", "--preset", "nope", cwd=work), "unknown preset")
    res = kvfree("train", "--preset", "nope", "--out", tmp_path / "a", "--debug", cwd=work)
    assert res.returncode == 1 and "Traceback" in res.stderr
    res = kvfree(
        "train", "--preset", "nope", "--out", tmp_path / "a", cwd=work, env={"KVFREE_DEBUG": "1"}
    )
    assert res.returncode == 1 and "Traceback" in res.stderr


def test_checks_come_before_data_and_files(work, tmp_path):
    """Item 5: --seq-len beyond max_len is refused before the corpus is read (this corpus does
    not exist) and before the run folder is created."""
    out = tmp_path / "m"
    res = kvfree(
        "train",
        "--preset",
        "fdm-debug",
        "--seq-len",
        5000,
        "--corpus",
        "missing",
        "--out",
        out,
        cwd=work,
    )
    assert_user_error(res, "max_len=1040")
    assert not out.exists()


def test_nonsense_values_are_refused(work, tmp_path):
    """Item 6: counts ≤ 0 and malformed tokenizer specs exit 2 before anything is written."""
    out = tmp_path / "n"
    train = ("train", "--config", "cfg.json", "--out", out)
    cases = [
        (train + ("--steps", 0), "--steps"),
        (train + ("--steps", -5), "--steps"),
        (train + ("--tokenizer", "bpe4096"), "bpe:N"),
        (train + ("--tokenizer", "bpe:abc"), "bpe:N"),
        (train + ("--set", "train.steps=0"), "train.steps"),
        (train + ("--set", "data.batch_size=-1"), "data.batch_size"),
        (train + ("--threads", 0), "--threads"),
        (("generate", "R", "--tokens", -3), "--tokens"),
        (("generate", "R", "--temperature", -1), "--temperature"),
        (("eval", "R", "--windows", -1), "--windows"),
    ]
    for (_, needle), res in zip(cases, kvfree_many([a for a, _ in cases], work)):
        assert_user_error(res, needle)
    assert not out.exists()


def test_invalid_utf8_prompt(work):
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "kvfree",
            "generate",
            "R",
            "--prompt",
            b"ab\xff\xfe",
            "--tokens",
            "2",
        ],
        cwd=work,
        env={**os.environ, "OMP_NUM_THREADS": "1", "LANG": "C.UTF-8"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert_user_error(res, "not valid UTF-8")
