"""Linalg fallback counters and SKA diagnostics reach metrics.jsonl and the summary; a fallback
that fires during training warns."""

import json
import warnings

import pytest
import torch

from kvfree.linalg import FallbackCounter, robust_cholesky
from kvfree.models import LanguageModel, ModelConfig
from kvfree.train import TrainConfig, Trainer
from kvfree.train.diagnostics import FallbackWatch, numerics

V = 32


def make_model():
    torch.manual_seed(0)
    return LanguageModel(ModelConfig(vocab_size=V, d_model=32, layers=["mesanet", "ska"]))


def batches(step):
    g = torch.Generator().manual_seed(step)
    x = torch.randint(0, V, (2, 16), generator=g)
    return {"inputs": x, "labels": x.roll(-1, 1)}


def cfg(**kw):
    base = {"steps": 3, "warmup_steps": 1, "log_every": 1, "progress": False, "device": "cpu"}
    return TrainConfig(**{**base, **kw})


def test_metrics_and_summary_carry_the_numerics(tmp_path):
    t = Trainer(make_model(), cfg(), batches, run_dir=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a healthy run does not warn
        summary = t.fit()
    rows = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        assert row["linalg/jitter"] == 0 and row["linalg/eigen"] == 0
        assert row["ska/lambda_min"] > 0 and "ska/sigma_max" in row and "ska/frac_clamped" in row
    saved = json.loads((tmp_path / "summary.json").read_text())
    for key in ("linalg/jitter", "linalg/eigen", "ska/lambda_min", "ska/sigma_max"):
        assert key in summary and key in saved


def test_a_fallback_during_training_warns_and_is_counted(tmp_path):
    model = make_model()
    counter = model.blocks[0].mixer.fallbacks

    def repairing(step):
        if step == 1:  # a singular Gram matrix, repaired through the mixer's own counter
            robust_cholesky(torch.zeros(1, 4, 4), counter)
        return batches(step)

    t = Trainer(model, cfg(), repairing, run_dir=tmp_path)
    with pytest.warns(RuntimeWarning, match="Cholesky fallback"):
        t.fit()
    rows = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["linalg/jitter"] + rows[0]["linalg/eigen"] == 0
    assert rows[-1]["linalg/jitter"] + rows[-1]["linalg/eigen"] == 1


def test_watch_warns_on_first_fallback_then_when_doubled():
    model = make_model()
    c: FallbackCounter = model.blocks[1].mixer.fallbacks
    watch = FallbackWatch(model)
    assert not watch.check(0)
    c.jitter += 1
    with pytest.warns(RuntimeWarning):
        assert watch.check(1)
    c.jitter += 1  # 2 = twice the last warning: quiet
    assert not watch.check(2)
    c.eigen += 1  # 3 > 2·1
    with pytest.warns(RuntimeWarning):
        assert watch.check(3)


def test_models_without_ridge_layers_report_nothing():
    m = LanguageModel(ModelConfig(vocab_size=V, d_model=16, layers=["shortconv"]))
    assert numerics(m) == {}
