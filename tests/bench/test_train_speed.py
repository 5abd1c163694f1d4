"""``kvfree bench train-speed``: the GEMM share it reports counts matrix products and nothing
else, and a tiny run measures both code paths and writes the table with its bound column."""

import json

import torch

from kvfree.bench import train_speed as ts


class _Steps:
    """Stands in for the Trainer: ``train_step`` runs ``fn``."""

    def __init__(self, fn):
        self.fn = fn

    def train_step(self, batch):
        self.fn(batch)


def test_gemm_share_counts_matrix_products_only():
    a = torch.randn(256, 256)
    assert ts._gemm_share(_Steps(lambda b: a @ a @ a), [0, 1]) > 0.9
    assert ts._gemm_share(_Steps(lambda b: (a * a + a).exp()), [0, 1]) == 0
    half = ts._gemm_share(_Steps(lambda b: (a @ a, (a * a).exp().sin())), [0, 1])
    assert 0 < half < 1


def test_tiny_run_reports_ratio_share_and_bound(tmp_path):
    res = ts.run(["recall-attention"], tmp_path, steps=2, warmup=1, rounds=1, progress=False)
    (row,) = res["rows"]
    assert {x["mode"] for x in res["runs"]} == {"fast", "reference"}
    assert [x["gemm_share"] for x in res["runs"] if x["mode"] == "reference"] == [None]
    assert 0 < row["gemm_share_fast"] < 1 and row["ratio"] > 0
    saved = json.loads((tmp_path / "train_speed.json").read_text())
    assert saved["rows"][0]["gemm_share_fast"] == row["gemm_share_fast"]
    assert "| GEMM share | bound |" in res["markdown"]
    assert f"{row['ratio'] / row['gemm_share_fast']:.1f}×" in res["markdown"]
