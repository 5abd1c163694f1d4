"""Trainer.fit on SIGINT/SIGTERM: stops after the current step, saves last.pt, raises
TrainingInterrupted, restores the previous handlers; the saved run resumes exactly."""

import os
import signal

import pytest
import torch

from kvfree.train import TrainConfig, Trainer
from kvfree.train.checkpoint import load_checkpoint
from kvfree.train.trainer import TrainingInterrupted
from tests.train.test_resume import batches, make_model


def cfg(**kw):
    base = {"steps": 8, "lr": 3e-3, "warmup_steps": 2, "log_every": 1, "progress": False}
    return TrainConfig(**{**base, "checkpoint_every": 0, "device": "cpu", **kw})


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_a_checkpoint_and_raises(tmp_path, sig):
    def interrupting(step):
        if step == 3:
            os.kill(os.getpid(), sig)  # delivered now; fit stops before step 4
        return batches(step)

    before = signal.getsignal(sig)
    t = Trainer(make_model(), cfg(), interrupting, run_dir=tmp_path)
    with pytest.raises(TrainingInterrupted) as info:
        t.fit()
    assert signal.getsignal(sig) is before  # the handler lives only for the duration of fit
    e = info.value
    assert isinstance(e, KeyboardInterrupt) and e.step == 4 == t.step
    assert e.path == tmp_path / "checkpoints" / "last.pt"
    assert load_checkpoint(e.path)["trainer"]["step"] == 4
    assert signal.Signals(sig).name in str(e)

    # the saved run resumes and ends where an uninterrupted one does
    resumed = Trainer(make_model(), cfg(), batches, run_dir=tmp_path, resume=True)
    resumed.fit()
    straight = Trainer(make_model(), cfg(), batches, run_dir=tmp_path / "straight")
    straight.fit()
    for a, b in zip(resumed.model.parameters(), straight.model.parameters()):
        assert torch.equal(a, b)


def test_no_run_folder_nothing_saved():
    def interrupting(step):
        if step == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return batches(step)

    t = Trainer(make_model(), cfg(), interrupting)
    with pytest.raises(TrainingInterrupted) as info:
        t.fit()
    assert info.value.path is None and info.value.step == 2
