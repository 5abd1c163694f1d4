"""The FDM MQAR protocol runner on a tiny budget: outputs, metrics, resume, and that the
runner's shortcuts (trailing PAD dropped, LM head only on query positions) are exact."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from kvfree.bench import fdm_mqar as bench
from kvfree.bench import fdm_mqar_train as train
from kvfree.models import LanguageModel, preset
from kvfree.tasks import IGNORE, make
from kvfree.train.checkpoint import CheckpointError, load_checkpoint


def test_splits_are_disjoint_and_sized():
    sp = bench.splits(10_000, bench.Protocol())
    assert [len(sp[k]) for k in ("test", "val", "train")] == [1000, 900, 8100]
    assert sp["test"][0] == 0 and sp["test"][-1] == 999  # the paper: first 10 % is test
    allidx = np.concatenate(list(sp.values()))
    assert len(np.unique(allidx)) == 10_000


@pytest.mark.parametrize("name", ["fdm-mqar-k16", "fdm-mqar-k0", "fdm-mqar-transformer-rope"])
def test_truncation_and_scored_logits_are_exact(name):
    torch.manual_seed(0)
    model = LanguageModel(preset(name)).double().eval()
    d = make("fdm_mqar", 42, num_examples=6)
    cut = bench.scored_length(d.labels)
    assert cut == 24
    ids, labels = torch.from_numpy(d.inputs), torch.from_numpy(d.labels)
    with torch.no_grad():
        full, _ = model(ids)
        logits, lab = bench.scored_logits(model, ids[:, :cut], labels[:, :cut])
    sel = labels != IGNORE
    assert (logits - full[sel]).abs().max() < 1e-10
    assert torch.equal(lab, labels[sel])


def test_tiny_protocol_run(tmp_path):
    p = bench.Protocol(epochs=2, num_examples=150, batch_size=64)
    res = bench.run(
        tmp_path,
        models=("fdm-k16", "transformer"),
        settings=("easy",),
        seeds=(0, 1),
        protocol=p,
        device="cpu",
        progress=False,
    )
    assert (tmp_path / "fdm_mqar.json").exists() and (tmp_path / "fdm_mqar.md").exists()
    saved = json.loads((tmp_path / "fdm_mqar.json").read_text())
    assert len(saved["runs"]) == 4 and saved["protocol"]["epochs"] == 2
    for r in res["runs"]:
        assert 0 <= r["final_test_acc"] <= 1 and r["trained_len"] == 24
        assert r["test_acc_at_best_val"] <= r["max_test_acc_over_epochs"]
        assert r["final_test_acc"] <= r["max_test_acc_over_epochs"]
    md = (tmp_path / "fdm_mqar.md").read_text()
    assert "0.966" in md and "fdm-k16" in md  # the paper's number is shown next to ours
    first = json.loads((tmp_path / "runs" / "fdm-k16-easy-s0.json").read_text())
    assert len(first["curve"]) == 2
    # resume: a second call reuses the finished runs (same numbers, no retraining)
    again = bench.run(
        tmp_path,
        models=("fdm-k16",),
        settings=("easy",),
        seeds=(0,),
        protocol=p,
        device="cpu",
        progress=False,
    )
    assert again["runs"][0]["seconds"] == first["seconds"]


def test_unknown_model_or_setting():
    with pytest.raises(ValueError, match="unknown model"):
        bench.run_one("mamba", "easy", 0, bench.Protocol(epochs=1))
    with pytest.raises(ValueError, match="unknown setting"):
        bench.run_one("fdm-k0", "extreme", 0, bench.Protocol(epochs=1))


def test_finished_only_aggregates_without_training(tmp_path):
    """The table of a sweep that is still running: finished runs in, the others listed."""
    p = bench.Protocol(epochs=1, num_examples=150, batch_size=64)
    kw = dict(settings=("easy",), protocol=p, device="cpu", progress=False)
    bench.run(tmp_path, models=("transformer",), seeds=(0, 1), **kw)
    part = bench.run(
        tmp_path, models=("transformer", "fdm-k0"), seeds=(0, 1, 2), train_missing=False, **kw
    )
    assert sorted(r["seed"] for r in part["runs"]) == [0, 1]
    assert part["missing"] == [
        "transformer-easy-s2",
        "fdm-k0-easy-s0",
        "fdm-k0-easy-s1",
        "fdm-k0-easy-s2",
    ]
    assert not (tmp_path / "runs" / "fdm-k0-easy-s0.json").exists()
    row = part["summary"][0]
    assert row["seeds"] == 2 and "–" in row["final_test"]  # mean (min–max) over the seeds
    assert "Not finished yet (4 runs)" in part["markdown"]


TINY = bench.Protocol(epochs=3, num_examples=300, batch_size=64)  # 4 training batches per epoch


def _interrupt_at_training_call(monkeypatch, n):
    """SIGINT this process during the n-th training forward (as Ctrl-C would)."""
    real, calls = train.scored_logits, [0]

    def wrapped(model, inputs, labels):
        if model.training:
            calls[0] += 1
            if calls[0] == n:
                os.kill(os.getpid(), signal.SIGINT)
        return real(model, inputs, labels)

    monkeypatch.setattr(train, "scored_logits", wrapped)


def test_interrupted_run_resumes_mid_epoch_with_the_same_curve(tmp_path, monkeypatch):
    whole = bench.run_one("fdm-k16", "easy", 0, TINY, "cpu")
    ckpt = tmp_path / "run.partial.pt"
    with monkeypatch.context() as m:
        _interrupt_at_training_call(m, 6)  # epoch 2, second batch
        with pytest.raises(KeyboardInterrupt, match="stopped in epoch 2 of 3"):
            bench.run_one("fdm-k16", "easy", 0, TINY, "cpu", checkpoint=ckpt)
    saved = load_checkpoint(ckpt)
    assert len(saved["curve"]) == 1 and saved["next_batch"] == 2 * TINY.batch_size
    epochs = []
    resumed = bench.run_one(
        "fdm-k16", "easy", 0, TINY, "cpu", checkpoint=ckpt, on_epoch=epochs.append
    )
    assert epochs == [1, 1, 1]  # the epoch already done, then the two trained now
    assert resumed["curve"] == whole["curve"]  # bit for bit: losses and accuracies


def test_sweep_resumes_from_checkpoints_and_removes_them(tmp_path, monkeypatch):
    kw = dict(models=("fdm-k0",), settings=("easy",), seeds=(0,), protocol=TINY, device="cpu")
    with monkeypatch.context() as m:
        _interrupt_at_training_call(m, 9)  # the first batch of epoch 3
        with pytest.raises(KeyboardInterrupt):
            bench.run(tmp_path, progress=False, **kw)
    partial = tmp_path / "runs" / "fdm-k0-easy-s0.partial.pt"
    assert partial.exists() and not (tmp_path / "runs" / "fdm-k0-easy-s0.json").exists()
    res = bench.run(tmp_path, progress=False, **kw)
    assert not partial.exists() and len(res["runs"]) == 1
    rec = json.loads((tmp_path / "runs" / "fdm-k0-easy-s0.json").read_text())
    assert rec["curve"] == bench.run_one("fdm-k0", "easy", 0, TINY, "cpu")["curve"]


def test_corrupt_or_foreign_checkpoint_stops_with_one_line_and_is_kept(tmp_path):
    ckpt = tmp_path / "run.partial.pt"
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a kvfree checkpoint"):
        bench.run_one("fdm-k0", "easy", 0, TINY, "cpu", checkpoint=ckpt)
    assert ckpt.read_bytes() == b"not a checkpoint"
    one = bench.Protocol(epochs=1, num_examples=300, batch_size=64)
    bench.run_one("fdm-k0", "easy", 0, one, "cpu", checkpoint=ckpt, resume=False)
    before = ckpt.read_bytes()
    with pytest.raises(CheckpointError, match="another run .*epochs.*--no-resume"):
        bench.run_one("fdm-k0", "easy", 0, TINY, "cpu", checkpoint=ckpt)
    assert ckpt.read_bytes() == before


def test_a_finished_run_of_another_protocol_is_not_overwritten(tmp_path):
    one = bench.Protocol(epochs=1, num_examples=300, batch_size=64)
    kw = dict(models=("fdm-k0",), settings=("easy",), seeds=(0,), device="cpu", progress=False)
    bench.run(tmp_path, protocol=one, **kw)
    path = tmp_path / "runs" / "fdm-k0-easy-s0.json"
    before = path.read_text()
    with pytest.raises(ValueError, match="another protocol .*epochs 1 vs 3.*--no-resume"):
        bench.run(tmp_path, protocol=TINY, **kw)
    assert path.read_text() == before


def test_two_workers_train_runs_in_parallel(tmp_path):
    one = bench.Protocol(epochs=1, num_examples=300, batch_size=64)
    res = bench.run(
        tmp_path,
        models=("fdm-k0",),
        settings=("easy",),
        seeds=(0, 1),
        protocol=one,
        device="cpu",
        progress=False,
        workers=2,
        threads=1,
    )
    assert [r["seed"] for r in res["runs"]] == [0, 1]
    assert all(r["threads"] == 1 for r in res["runs"]) and res["env"]["workers"] == 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        serial = bench.run_one("fdm-k0", "easy", 1, one, "cpu")
    finally:
        torch.set_num_threads(threads)
    saved = json.loads((tmp_path / "runs" / "fdm-k0-easy-s1.json").read_text())
    assert saved["curve"] == serial["curve"]  # a worker trains exactly what one process does


def test_ctrl_c_stops_a_parallel_sweep_and_keeps_the_runs_in_progress(tmp_path):
    """Ctrl-C (SIGINT to the process group) in ``bench fdm-mqar --workers 2``: both running
    runs save a checkpoint, once each, the runs still queued do not start, and the command exits
    130 saying how to resume."""
    cmd = [sys.executable, "-m", "kvfree", "bench", "fdm-mqar", "--workers", "2", "--threads",
           "1", "--epochs", "400", "--num-examples", "300", "--models", "fdm-k0", "--settings",
           "easy", "--seeds", "0,1,2,3", "--out", str(tmp_path)]  # fmt: skip
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    runs, deadline = tmp_path / "runs", time.time() + 180
    while len(list(runs.glob("*.partial.pt"))) < 2 and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C in a terminal: the whole process group
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:  # a hung sweep must not outlive the test
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    assert "Run the same command again to resume" in err and "Traceback" not in err
    assert err.count("saving a checkpoint after this step") == 2 and "again to abort" in err
    assert sorted(p.name for p in runs.glob("*.partial.pt")) == [
        "fdm-k0-easy-s0.partial.pt",
        "fdm-k0-easy-s1.partial.pt",
    ]
    assert not list(runs.glob("*.json"))
