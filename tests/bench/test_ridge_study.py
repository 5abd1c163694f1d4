"""The ridge study: model specs with mixer-option overrides, SKA's training probe, and the study's
summary / table / report on a few real (tiny-budget) runs."""

import json
import math
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

import kvfree.commands  # noqa: F401  (registers the commands)
from kvfree.bench import ridge_study as rs
from kvfree.bench.recall import parse_model, split_top
from kvfree.bench.ska_probe import probe, ska_layers
from kvfree.cli import app
from kvfree.models import LanguageModel, preset
from kvfree.tasks import make


def test_mixer_option_overrides():
    cfg = preset("recall-mamba2-ska", **{"ska.K": 0, "ska.conv_size": 4, "d_model": 32})
    assert cfg.mixer_options["ska"]["K"] == 0 and cfg.mixer_options["ska"]["conv_size"] == 4
    assert cfg.mixer_options["ska"]["beta_gate"] is True  # the rest of the preset kept
    assert cfg.d_model == 32
    assert preset("recall-mamba2-ska").mixer_options["ska"]["K"] == 1  # preset not mutated
    with pytest.raises(ValueError, match="has no 'attention' layer"):
        preset("recall-mamba2-ska", **{"attention.num_heads": 2})
    with pytest.raises(ValueError, match="typo_option"):  # checked against the mixer
        LanguageModel(preset("recall-mamba2-ska", **{"ska.typo_option": 1}))


def test_model_spec_parsing_keeps_json_commas():
    name, over = parse_model('recall-mamba2-ska[ska.K=1,layers=["shortconv","ska"],ska.mode=token]')
    assert name == "recall-mamba2-ska"
    assert over == {"ska.K": 1, "layers": ["shortconv", "ska"], "ska.mode": "token"}
    assert split_top("a[x=1,y=2],b,c[z=[1,2]]") == ["a[x=1,y=2]", "b", "c[z=[1,2]]"]


def _batch(M=2, gap=30, n=4):  # T = 38 > one SKA chunk (chunk 0 reads nothing)
    d = make("mqar_gap", 3, num_examples=n, num_kv_pairs=M, gap=gap)
    return d.batch(range(n)), M, gap


def test_probe_measures_gradients_and_write_mass():
    torch.manual_seed(0)
    model = LanguageModel(preset("recall-mamba2-ska", d_model=32))
    batch, M, gap = _batch()
    zero = probe(model, batch, num_kv_pairs=M, gap=gap)
    # the out-projection starts at zero: nothing reaches the memory's projections yet
    assert zero["grad_k"] == zero["grad_q"] == zero["grad_beta"] == 0.0
    # β = σ(0) = 0.5 on every token and unit keys: the filler share is the token share
    assert zero["beta_key"] == zero["beta_filler"] == pytest.approx(0.5)
    assert zero["filler_share"] == pytest.approx(gap / (2 * M + gap))
    assert zero["cond_G"] >= 1.0
    (layer,) = ska_layers(model)
    with torch.no_grad():
        layer.out_proj.weight.normal_(0, 0.1)
        layer.beta_proj.bias.fill_(2.0)
    before = [p.grad for p in model.parameters()]
    live = probe(model, batch, num_kv_pairs=M, gap=gap)
    assert live["grad_k"] > 0 and live["grad_q"] > 0 and live["grad_beta"] > 0
    assert live["beta_value"] == pytest.approx(1 / (1 + math.exp(-2.0)))
    assert [p.grad for p in model.parameters()] == before  # the optimiser's grads untouched


def test_probe_of_a_model_without_ska_is_empty():
    batch, M, gap = _batch()
    assert (
        probe(LanguageModel(preset("recall-gdn", d_model=32)), batch, num_kv_pairs=M, gap=gap) == {}
    )


def test_study_runs_summarises_and_reports(tmp_path):
    """Two variants for 4 steps: every curve point carries the probe; the summary, table, plot
    and the report command's regeneration from the JSON agree."""
    from kvfree.bench.recall import run

    chosen = rs.select(["recipe", "prefix"])
    g = rs.study_grid(chosen, steps=4, eval_every=2, n_val=4, n_test=4, eval_batch=4)
    run(g, [v.model for v in chosen], [0], tmp_path, workers=1, threads=1, progress=False)
    res = rs.write(tmp_path)
    rows = res["summary"]["rows"]
    assert [r["variant"] for r in rows] == ["recipe", "prefix"]
    for r in rows:
        assert set(r["diag_final"]) >= {"grad_k", "cond_G", "filler_share", "beta_filler"}
        assert 0 <= r["acc"]["mean"] <= 1 and r["cap_examples"] == 4 * g.batch_size
    assert rows[1]["diag_final"]["beta_filler"] == 1.0  # oracle prefix: the gap writes too
    table = res["markdown"].splitlines()
    assert sum(line.startswith("| ") for line in table) == 1 + len(rows)
    assert (tmp_path / "ridge_study.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "ridge_study.json").read_text())
    out = CliRunner().invoke(app, ["report", "ridge-study", str(tmp_path)])
    assert out.exit_code == 0, out.output
    assert (tmp_path / "ridge_study.md").read_text() == rs.markdown(saved) + "\n"


def test_unknown_variant_is_one_clear_error():
    with pytest.raises(ValueError, match="ridge-study variant"):
        rs.select(["recipe", "nope"])
    res = subprocess.run(
        [sys.executable, "-m", "kvfree", "bench", "ridge-study", "--variants", "nope"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2 and "unknown ridge-study variant" in res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) <= 2


def test_variants_list_names_every_change():
    out = CliRunner().invoke(app, ["bench", "ridge-study", "--list"])
    assert out.exit_code == 0
    assert [line.split()[0] for line in out.output.splitlines()] == [v.name for v in rs.VARIANTS]
