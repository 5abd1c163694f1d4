"""Exact resume: interrupt at step k, resume, and match an uninterrupted run bit for bit."""

import json

import pytest
import torch

from kvfree.models import LanguageModel, ModelConfig
from kvfree.train import Schedule, TrainConfig, Trainer
from kvfree.train.checkpoint import CheckpointError, load_checkpoint

V = 32


def make_model(seed=0, d_model=16):
    torch.manual_seed(seed)
    return LanguageModel(
        ModelConfig(
            vocab_size=V, d_model=d_model, dropout=0.1, layers=["shortconv", "linear_attention"]
        )
    )


def batches(step):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randint(0, V, (4, 12), generator=g)
    return {"inputs": x, "labels": x.roll(-1, 1)}


class FreezeEmbedAt(Schedule):
    """Freezes the embedding at step 4 (rebuilding the optimizer) and counts its calls."""

    def __init__(self):
        self.calls = 0

    def on_step(self, trainer):
        self.calls += 1
        if trainer.step == 4:
            trainer.model.embed.weight.requires_grad_(False)
            trainer.rebuild_optimizer()

    def lr_at(self, step):
        return 5e-3 if step >= 4 else None

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = state["calls"]


def cfg(**kw):
    return TrainConfig(
        **{
            "steps": 9,
            "lr": 3e-3,
            "warmup_steps": 2,
            "log_every": 1,
            "eval_every": 2,
            "checkpoint_every": 3,
            "progress": False,
            **kw,
        }
    )


def eval_fn(model):
    b = batches(10**6)
    logits, _ = model(b["inputs"])
    return {
        "loss": torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), b["labels"].flatten()
        ).item()
    }


def metric_lines(path):
    return [
        {k: v for k, v in json.loads(ln).items() if k != "elapsed_s"}
        for ln in path.read_text().splitlines()
    ]


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path):
    ref_sched = FreezeEmbedAt()
    ref = Trainer(
        make_model(), cfg(), batches, run_dir=tmp_path / "a", eval_fn=eval_fn, schedule=ref_sched
    )
    ref.fit()

    def crashing(step):
        if step == 7:
            raise KeyboardInterrupt("simulated kill at step 7")
        return batches(step)

    first = Trainer(
        make_model(),
        cfg(),
        crashing,
        run_dir=tmp_path / "b",
        eval_fn=eval_fn,
        schedule=FreezeEmbedAt(),
    )
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    assert first.step == 7  # steps 6→7 ran after the checkpoint at 6 and are lost

    sched = FreezeEmbedAt()
    resumed = Trainer(
        make_model(seed=123),
        cfg(),
        batches,
        run_dir=tmp_path / "b",
        eval_fn=eval_fn,
        schedule=sched,
        resume=True,
    )
    assert resumed.step == 6 and sched.calls == 6
    assert not resumed.model.embed.weight.requires_grad  # the frozen phase is restored
    resumed.fit()
    for (name, p), q in zip(ref.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), f"{name} differs after resume"
    assert sched.calls == ref_sched.calls == 9
    assert metric_lines(tmp_path / "a" / "metrics.jsonl") == metric_lines(
        tmp_path / "b" / "metrics.jsonl"
    )
    assert (tmp_path / "b" / "checkpoints" / "best.pt").exists()
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["steps"] == 9


def test_rng_state_matters(tmp_path):
    """Resuming without restoring the RNG changes the dropout masks, and the parameters: the
    equality above really depends on the saved RNG states."""
    a = Trainer(make_model(), cfg(steps=6), batches, run_dir=tmp_path / "a")
    a.fit()
    b = Trainer(
        make_model(), cfg(steps=6), lambda s: batches(s) if s < 4 else 1 / 0, run_dir=tmp_path / "b"
    )
    with pytest.raises(ZeroDivisionError):
        b.fit()
    c = Trainer(make_model(), cfg(steps=6), batches, run_dir=tmp_path / "b", resume=True)
    assert c.step == 3 and c._pending_rng is not None
    c._pending_rng = None  # drop the saved RNG: the torch RNG is wherever it happens to be
    c.fit()
    assert not all(torch.equal(p, q) for p, q in zip(a.model.parameters(), c.model.parameters()))


def _saved_run(tmp_path):
    t = Trainer(make_model(), cfg(steps=3, eval_every=0), batches, run_dir=tmp_path)
    t.fit()
    return tmp_path / "checkpoints" / "last.pt"


def test_truncated_or_altered_checkpoint_is_refused(tmp_path):
    path = _saved_run(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        Trainer(make_model(), cfg(), batches, run_dir=tmp_path, resume=True)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(path)
    path.write_bytes(b"not a checkpoint at all, just text" * 4)
    with pytest.raises(CheckpointError, match="not a kvfree checkpoint"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_checkpoint_for_another_model_is_refused(tmp_path):
    path = _saved_run(tmp_path)
    with pytest.raises(CheckpointError, match="different model config") as e:
        Trainer(make_model(d_model=24), cfg(), batches, resume=path)
    assert "d_model: checkpoint 16 vs model 24" in str(e.value)


def test_checkpoint_is_written_atomically(tmp_path, monkeypatch):
    path = _saved_run(tmp_path)
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    t = Trainer(make_model(), cfg(steps=3), batches, run_dir=tmp_path, resume=True)
    monkeypatch.setattr("os.fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        t.save_checkpoint(path)
    assert path.read_bytes() == before  # the old checkpoint is intact, no temp file left
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_schedule_is_pluggable_by_name():
    from kvfree.train.lm import build_schedule

    sched = build_schedule("tests.train.test_resume:FreezeEmbedAt", {})
    assert isinstance(sched, FreezeEmbedAt)
    assert build_schedule(None, {}) is None
    with pytest.raises(ValueError, match="module:Class"):
        build_schedule("freeze_scan", {})


def test_tensorboard_logging_or_clear_error(tmp_path):
    import importlib.util

    t = Trainer(
        make_model(),
        cfg(steps=2, eval_every=0, checkpoint_every=0, tensorboard=True),
        batches,
        run_dir=tmp_path,
    )
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(ImportError, match="kvfree\\[tensorboard\\]"):
            t.fit()
    else:
        t.fit()
        assert list((tmp_path / "tb").iterdir())
