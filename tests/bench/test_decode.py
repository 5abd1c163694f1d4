"""``kvfree bench decode``: the measurement code on tiny models (state bytes vs formula, one
subprocess measurement, the RSS probe, skip logic, summaries and the generated files)."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict

import pytest
import torch
from typer.testing import CliRunner

from kvfree.bench import decode as bd
from kvfree.bench import decode_report as rep
from kvfree.bench.decode_memory import CpuRssProbe
from kvfree.bench.decode_worker import PointSpec, measure_point, storage_bytes
from kvfree.mixers import available, build_mixer, get_mixer_class
from kvfree.models import LanguageModel, ModelConfig
from kvfree.state import state_bytes

D, V = 64, 50
MiB = 2**20


def tiny_config(name: str, layers: int = 2) -> dict:
    return ModelConfig(vocab_size=V, d_model=D, layers=[name] * layers).to_dict()


def point(name: str, n: int, **kw) -> dict:
    spec = PointSpec(
        preset=f"tiny-{name}",
        n=n,
        decode_steps=3,
        warmup_steps=1,
        threads=1,
        config=tiny_config(name),
        **kw,
    )
    return measure_point(spec)


MIXERS = available()


@pytest.mark.parametrize("name", MIXERS)
def test_state_bytes_equal_formula_at_every_n(name):
    rows = [point(name, n) for n in (8, 40)]
    for r in rows:
        for layer in r["layers"]:
            assert layer["measured_bytes"] == layer["analytic_bytes"], (name, r["n"], layer)
        assert r["state_bytes"] == r["state_bytes_analytic"] > 0
        assert r["state_bytes_end"] == r["state_bytes_end_analytic"]
        assert r["end_len"] == r["n"] + 8  # two phases of 1 + 3 decode steps
    if get_mixer_class(name).fixed_memory and rows[0]["fixed_memory"]:
        assert rows[0]["state_bytes"] == rows[1]["state_bytes"] == rows[1]["state_bytes_end"]


@pytest.mark.parametrize("n", [8, 40])
def test_transformer_state_is_2_L_N_d_bytes(n):
    r = point("attention", n)
    assert not r["fixed_memory"]
    assert r["state_bytes"] == 2 * 2 * n * D * 4 == rep.kv_cache_formula_bytes(r)
    assert r["state_bytes_end"] == 2 * 2 * (n + 8) * D * 4


@pytest.mark.parametrize("layers", [["attention", "shortconv"], ["gated_deltanet", "mamba2"]])
def test_prefill_last_only_and_segments_equal_one_pass(layers):
    """What the bench and generate use: last-position logits, the prompt in segments."""
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(vocab_size=V, d_model=D, layers=layers)).double().eval()
    ids = torch.randint(0, V, (2, 37))
    full, ref_state = model.prefill(ids, segment=None)
    for segment in ("auto", None, 16, 5):
        seg_full, _ = model.prefill(ids, segment=segment)
        assert torch.allclose(seg_full, full, atol=1e-10, rtol=0)
        last, state = model.prefill(ids, last_only=True, segment=segment)
        assert last.shape == (2, V)
        assert torch.allclose(last, full[:, -1], atol=1e-10, rtol=0)
        assert state.pos == ref_state.pos == 37
        assert state_bytes(state) == state_bytes(ref_state)
        step_ref, _ = model.step(ids[:, 0], ref_state)
        step, _ = model.step(ids[:, 0], state)
        assert torch.allclose(step, step_ref, atol=1e-10, rtol=0)
    fixed = layers[0] != "attention"
    assert model.fixed_memory is fixed
    assert model.prefill_segment(4096) == (512 if fixed else None)
    assert model.prefill_segment(512) is None and model.prefill_segment(100, 16) == 16
    for bad in (0, -3, 2.5, "whole", True):
        with pytest.raises(ValueError, match="segment"):
            model.prefill(ids, segment=bad)


def test_storage_bytes_counts_what_views_keep_alive():
    big = torch.zeros(100, 8)
    state = {"view": big[-1], "own": torch.zeros(3), "same": big[0]}
    assert state_bytes(state) == (8 + 3 + 8) * 4
    assert storage_bytes(state) == (800 + 3) * 4  # the 100x8 buffer once, plus the small one
    assert storage_bytes({"copy": big[-1].clone()}) == 8 * 4


def test_rss_probe_sees_an_allocation_and_resets():
    for probe in (CpuRssProbe(), CpuRssProbe(force_sampling=True)):
        base = probe.reset()
        x = torch.ones(16 * MiB // 4)  # 16 MiB, touched
        held = probe.peak() - base
        del x
        after = probe.reset()
        assert held >= 15 * MiB, probe.method
        assert probe.peak() - after < 4 * MiB, probe.method  # the freed tensor is not counted
        probe.close()


def test_one_subprocess_measurement():
    n = 2048
    spec = PointSpec(
        preset="tiny-attention",
        n=n,
        decode_steps=8,
        warmup_steps=2,
        threads=1,
        config=tiny_config("attention"),
        overrides=bd.kv_prealloc_overrides(
            LanguageModel(ModelConfig(**tiny_config("attention"))), n + 20
        ),
    )
    row, reason = bd.run_isolated(spec, timeout_s=120, max_rss=None)
    assert reason is None, reason
    kv = 2 * 2 * n * D * 4  # 2 MiB of KV cache
    assert row["state_bytes"] == kv
    assert row["state_storage_bytes"] == 2 * 2 * (n + 20) * D * 4  # preallocated capacity
    assert row["prefill_peak_bytes"] >= kv  # the cache is built during prefill
    assert row["decode_peak_bytes"] >= 0.95 * kv  # ... and resident while decoding
    assert row["weight_bytes"] == row["params"] * 4
    assert len(row["decode_ms"]) == 8 and row["decode_ms_median"] > 0
    # the same process's decode from a 16-token context, timed before the prefill
    assert row["ref_ms_median"] > 0
    assert row["decode_vs_ref"] == pytest.approx(row["decode_ms_median"] / row["ref_ms_median"])
    assert row["threads"] == 1 and "MALLOC_MMAP_THRESHOLD_" in row["memory_method"]
    # latency is timed with the allocator's usual threshold, memory with the fixed one
    assert "latency timed with the mmap threshold at 32 MiB" in row["memory_method"]
    assert row["decode_mmap_ms_median"] > 0


def test_predicted_seconds_scale_with_state_kind():
    prev = {
        "n": 1000,
        "prefill_s": 2.0,
        "decode_steps": 10,
        "warmup_steps": 0,
        "decode_ms_median": 100.0,
        "fixed_memory": True,
    }
    assert bd.predicted_seconds(prev, 4000) == pytest.approx(8.0 + 2.0)  # 2 × 10 steps
    prev["fixed_memory"] = False
    assert bd.predicted_seconds(prev, 4000) == pytest.approx(32.0 + 8.0)


def test_prefill_is_chunked_when_its_predicted_peak_does_not_fit():
    cfg = bd.DecodeBenchConfig(models=["m"], retry_prefill_chunk=4096)
    prev = {"n": 8192, "prefill_peak_bytes": 3 * 2**30, "prefill_chunk": None}
    assert bd._needs_chunking(cfg, prev, 32768, None, max_rss=8 * 2**30)  # 12 GiB > 7.2 GiB
    assert not bd._needs_chunking(cfg, prev, 16384, None, max_rss=8 * 2**30)  # 6 GiB fits
    assert not bd._needs_chunking(cfg, prev, 32768, 4096, max_rss=8 * 2**30)  # chunked already
    cfg.retry_prefill_chunk = 0
    assert not bd._needs_chunking(cfg, prev, 32768, None, max_rss=8 * 2**30)  # disabled


def test_points_over_budget_are_skipped_with_reasons():
    cfg = bd.DecodeBenchConfig(
        models=["tiny-attention"],
        lengths=[64, 16],
        isolate=False,
        max_memory_gb=1e-4,
        decode_steps=2,
        warmup_steps=0,
    )
    assert cfg.lengths == [16, 64]
    res = bd.run_grid(cfg, log=lambda *_: None)
    assert res["rows"] == []
    assert [s["n"] for s in res["skipped"]] == [16, 64]
    assert all("memory budget" in s["reason"] for s in res["skipped"])
    with pytest.raises(ValueError, match="lengths"):
        bd.DecodeBenchConfig(lengths=[0])


def test_resume_reuses_rows_measured_with_the_same_settings():
    cfg = bd.DecodeBenchConfig(
        models=["tiny-linear"],
        lengths=[16, 24],
        isolate=False,
        decode_steps=2,
        warmup_steps=0,
        threads=1,
    )
    stored = {**_fake_row("tiny-linear", 16, 1.0, True), "marker": "stored"}
    previous = {"config": asdict(cfg), "rows": [stored]}
    res = bd.run_grid(cfg, log=lambda *_: None, previous=previous)
    assert [r.get("marker") for r in res["rows"]] == ["stored", None]  # 24 measured afresh
    assert res["rows"][1]["n"] == 24 and res["rows"][1]["state_bytes"] > 0
    previous["config"] = {**previous["config"], "decode_steps": 3}  # other settings: no reuse
    assert bd.reusable_rows(cfg, previous) == {}


def test_repeats_measure_every_point_again_and_take_the_median():
    cfg = bd.DecodeBenchConfig(
        models=["tiny-linear"],
        lengths=[8, 16],
        isolate=False,
        decode_steps=3,
        warmup_steps=1,
        threads=1,
        repeats=3,
    )
    logs = []
    res = bd.run_grid(cfg, log=logs.append)
    assert [r["n"] for r in res["rows"]] == [8, 16]
    for r in res["rows"]:
        assert r["repeats"] == 3 and len(r["decode_ms"]) == 9  # 3 runs × 3 timed steps pooled
        for key in bd.LATENCY_KEYS:
            assert len(r[f"{key}_runs"]) == 3
            assert r[key] == statistics.median(r[f"{key}_runs"])
        assert len(r["decode_peak_bytes_runs"]) == 3
    # rounds: every N once, then every N again
    assert [m.split(":")[0] for m in logs if "repeat" in m] == [
        "tiny-linear N=8",
        "tiny-linear N=16",
    ] * 2
    line = rep.summarise(res["rows"])[0]
    assert line["repeats"] == 3
    # a resumed run reuses only rows that got all their repeats
    short = {**res["rows"][0], "repeats": 2}
    previous = {"config": asdict(cfg), "rows": [short, res["rows"][1]]}
    assert list(bd.reusable_rows(cfg, previous)) == [("tiny-linear", 16)]
    with pytest.raises(ValueError, match="repeats"):
        bd.DecodeBenchConfig(repeats=0)


def _fake_row(model: str, n: int, ms: float, fixed: bool) -> dict:
    state = 1000 if fixed else 8 * n
    layer = {
        "layer": 0,
        "mixer": "x",
        "fixed_memory": fixed,
        "formula": "f",
        "analytic_elements": state // 4,
        "analytic_bytes": state,
        "measured_bytes": state,
        "storage_bytes": state,
    }
    return {
        "model": model,
        "n": n,
        "batch": 1,
        "dtype": "float32",
        "layers_config": ["x"],
        "d_model": 2,
        "num_layers": 1,
        "fixed_memory": fixed,
        "params": 10,
        "weight_bytes": 40,
        "state_bytes": state,
        "state_bytes_analytic": state,
        "state_bytes_end": state,
        "state_bytes_end_analytic": state,
        "state_storage_bytes": state,
        "layers": [layer],
        "prefill_peak_bytes": 2 * state,
        "decode_peak_bytes": state + 100,
        "decode_steady_peak_bytes": state + 100,
        "prefill_tok_s": 1e3,
        "decode_ms_median": ms,
        "decode_ms_p10": ms,
        "decode_ms_p90": ms,
        "threads": 1,
        "memory_method": "m",
        "prefill_chunk": None,
        "prefill_s": 0.01,
        "decode_steps": 2,
        "warmup_steps": 0,
    }


def test_summary_ratios_and_latency_acceptance():
    rows = [_fake_row("fixed", n, ms, True) for n, ms in ((128, 1.0), (512, 2.0), (32768, 2.3))]
    rows += [_fake_row("slow", n, ms, True) for n, ms in ((512, 2.0), (32768, 2.5))]
    rows += [_fake_row("kv", n, n / 512, False) for n in (512, 32768)]
    for r, ref in zip(rows[1:3], (2.0, 2.0)):  # 16-token decode in the same processes
        r["decode_vs_ref"] = r["decode_ms_median"] / ref
    s = {x["model"]: x for x in rep.summarise(rows)}
    assert s["fixed"]["paired_growth_512_32768"] == pytest.approx(0.15)
    assert s["slow"]["paired_growth_512_32768"] is None  # rows without a reference
    assert s["fixed"]["state_constant"] and s["fixed"]["state_matches_formula"]
    assert s["fixed"]["latency_ratio"] == pytest.approx(2.3)
    assert s["fixed"]["latency_growth_512_32768"] == pytest.approx(0.15)
    assert s["fixed"]["latency_ok"] is True and s["slow"]["latency_ok"] is False
    assert s["kv"]["latency_ok"] is None and s["kv"]["state_ratio"] == 64
    assert s["kv"]["memory_ratio"] == pytest.approx((8 * 32768 + 100) / (8 * 512 + 100))
    assert "+15.0%" in s["fixed"]["line"] and "NO" in s["slow"]["line"]


def test_prefill_peak_acceptance_from_512_to_the_largest_n():
    rows = [_fake_row("flat", n, 1.0, True) for n in (128, 512, 65536)]
    rows += [_fake_row("grows", n, 1.0, True) for n in (512, 65536)]
    rows += [_fake_row("kv", n, 1.0, False) for n in (512, 65536)]
    rows[0]["prefill_peak_bytes"] = 1  # N = 128 does not count
    rows[2]["prefill_peak_bytes"] = int(1.15 * rows[1]["prefill_peak_bytes"])
    rows[4]["prefill_peak_bytes"] = int(1.3 * rows[3]["prefill_peak_bytes"])
    s = {x["model"]: x for x in rep.summarise(rows)}
    assert s["flat"]["prefill_peak_ratio_512"] == pytest.approx(1.15, abs=1e-3)
    assert s["flat"]["prefill_peak_ok"] is True and s["grows"]["prefill_peak_ok"] is False
    assert s["kv"]["prefill_peak_ok"] is None  # a growing cache is not held to it
    assert "prefill peak N=512→65,536 ×1.15 (≤ ×1.2: yes)" in s["flat"]["line"]
    assert "(≤ ×1.2: NO)" in s["grows"]["line"] and "≤ ×1.2" not in s["kv"]["line"]


def test_outputs_and_readme_section(tmp_path):
    rows = [_fake_row("m", n, 1.0, True) for n in (128, 512)]
    result = {
        "env": {
            "device": "cpu",
            "device_name": "x",
            "torch": "t",
            "dtype": "float32",
            "threads": 1,
        },
        "config": {"batch": 1, "decode_steps": 3, "warmup_steps": 1, "isolate": True},
        "rows": rows,
        "skipped": [{"model": "m", "n": 1024, "reason": "skipped: test"}],
    }
    result["summary"] = rep.summarise(rows)
    paths = rep.write_outputs(result, tmp_path / "run")
    for p in paths.values():
        assert p.exists() and p.stat().st_size > 0
    assert json.loads(paths["json"].read_text())["rows"][0]["n"] == 128
    assert "skipped: test" in paths["markdown"].read_text()
    readme = tmp_path / "README.md"
    readme.write_text("# title\n\nintro\n")
    section = rep.readme_section([rep.load_result(tmp_path / "run")])
    rep.update_readme(readme, section)
    once = readme.read_text()
    rep.update_readme(readme, section)
    assert readme.read_text() == once  # replaced in place, not appended twice
    assert once.startswith("# title\n\nintro\n") and once.count("<!-- BEGIN decode -->") == 1


def test_cli_bench_and_report(tmp_path):
    import kvfree.commands  # noqa: F401
    from kvfree.cli import app

    out = tmp_path / "bd"
    res = CliRunner().invoke(
        app,
        [
            "bench",
            "decode",
            "--model",
            "tiny-linear",
            "--lengths",
            "16,32",
            "--decode-steps",
            "2",
            "--warmup-steps",
            "1",
            "--no-isolate",
            "--threads",
            "1",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "tiny-linear (fixed state; state identical at every N, = formula)" in res.output
    assert (out / "decode.json").exists() and (out / "latency_vs_n.png").exists()
    readme = tmp_path / "README.md"
    res = CliRunner().invoke(app, ["report", "decode", str(out), "--readme", str(readme)])
    assert res.exit_code == 0, res.output
    assert "<!-- BEGIN decode -->" in readme.read_text()
    res = CliRunner().invoke(app, ["bench", "decode", "--suite", "nope"])
    assert res.exit_code != 0 and "unknown suite" in res.output


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("name", MIXERS)
def test_state_nbytes_matches_the_carried_state_in_every_dtype(name, dtype):
    """``state_nbytes`` is exact also where a state mixes dtypes (fp32 scan states or fp32
    statistics in a bf16 model, FDM's int64 heap indices)."""
    torch.manual_seed(0)
    mixer = build_mixer(name, D).to(dtype)
    with torch.no_grad():
        _, state = mixer(torch.randn(2, 24, D, dtype=dtype))
    assert state_bytes(state) == 2 * mixer.state_nbytes(24, dtype), name
