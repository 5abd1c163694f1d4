"""``kvfree bench prefill-speed``: plumbing on a tiny budget, the exactness column, refusals."""

import json

import pytest

from kvfree.bench.prefill_speed import render, run


def test_whole_and_segmented_prefill_side_by_side(tmp_path):
    res = run(["decode-gdn"], tmp_path, lengths=[40, 96], segment=32, repeats=2, progress=False)
    rows = res["rows"]
    assert [(r["n"], r["segments"]) for r in rows] == [(40, 2), (96, 3)]
    for r in rows:
        assert len(r["whole_tok_s_runs"]) == len(r["segmented_tok_s_runs"]) == 2
        assert r["ratio_min"] <= r["ratio"] <= r["ratio_max"] and r["ratio"] > 0
        assert r["max_abs_logit_diff"] < 1e-4  # the chunked-prefill invariant, fp32 round-off
    saved = json.loads((tmp_path / "prefill_speed.json").read_text())
    assert saved["config"] == {"lengths": [40, 96], "segment": 32, "repeats": 2, "threads": 1}
    md = (tmp_path / "prefill_speed.md").read_text()
    assert md.strip() == render(saved) and "| decode-gdn | 96 |" in md


@pytest.mark.parametrize(
    "models, kw, match",
    [
        (["decode-attention"], {}, "not a fixed-memory"),
        (["decode-gdn"], {"lengths": [16]}, "nothing to compare"),
        ([], {}, "no models"),
        (["decode-gdn"], {"repeats": 0}, ">= 1"),
    ],
)
def test_refusals(tmp_path, models, kw, match):
    kw = {"lengths": [64], "segment": 32, **kw}
    with pytest.raises(ValueError, match=match):
        run(models, tmp_path, progress=False, **kw)
    assert not (tmp_path / "prefill_speed.json").exists()
