"""The recall recipes' choices that matter (presets_recall.py, docs/ska.md §19), pinned by
training on one small mqar_gap cell (M = 4, gap 32, batch 32, 300 steps): with the recipe the
model leaves the no-binding plateau, with the paper's / fla's choice it does not.

    SKA K = 1 (recipe) vs K = 2 (paper):   converged 0.95 at step 200 | 0.12 after 400 steps
    MesaNet forget bias 5 vs nn.Linear's:  converged 0.97 at step 250 | chance after 400 steps

(measured once by hand, with two other training processes on the 2 cores; the test asserts
the 0.9 / 0.5 bars, not these numbers). Each run takes 20–60 s on one
thread."""

import pytest
import torch

from kvfree.bench.recall import plan, run_job
from kvfree.bench.recall_grid import RecallGrid

STEPS = 300
GRID = RecallGrid(
    name="recipe-pin",
    task="mqar_gap",
    cells=[{"num_kv_pairs": 4, "gap": 32}],
    axes=("num_kv_pairs", "gap"),
    steps=STEPS,
    eval_every=50,
    target=0.95,
    batch_size=32,
    lrs=[3e-3],
    warmup_steps=50,
    min_lr_ratio=1.0,
    n_val=100,
    n_test=200,
    eval_batch=100,
)


def _train(spec: str, tmp_path) -> dict:
    torch.set_num_threads(1)
    return run_job(GRID, plan(GRID, [spec], [0])[0], tmp_path)["rows"][0]


@pytest.mark.parametrize(
    "spec, learns",
    [
        ("recall-mamba2-ska", True),
        ("recall-mamba2-ska[ska.K=2]", False),
        ("recall-mesanet", True),
        ("recall-mesanet[mesanet.forget_bias_init=null]", False),
    ],
    ids=["ska-K1", "ska-K2", "mesanet-open-gate", "mesanet-fla-init"],
)
def test_recipe_binds_within_budget_and_the_original_does_not(spec, learns, tmp_path):
    row = _train(spec, tmp_path)
    if learns:
        assert row["examples_to_0.9"] is not None and row["test_acc"] >= 0.9, row["curve"]
    else:  # H_M/M = 0.52 at M = 4: K = 2 has not even reached the no-binding plateau
        assert row["examples_to_0.9"] is None and row["test_acc"] < 0.5, row["curve"]
