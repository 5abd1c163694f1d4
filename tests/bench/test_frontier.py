"""``bench frontier`` on a tiny budget: one point per model spec with its measured bytes and
accuracy, the smallest-state table, the information floor, and the report regenerates it."""

import json

import pytest

from kvfree.bench import frontier as F
from kvfree.bench.recall import run
from kvfree.bench.recall_grid import grid


def test_frontier_points_table_and_plot(tmp_path, monkeypatch):
    fams = {
        "attention (KV cache)": ["recall-attention[attention.num_kv_heads=1]"],
        "Gated DeltaNet": ["recall-gdn[d_model=32]", "recall-gdn"],
    }
    g = grid("cpu", steps=2, eval_every=0, n_test=4, n_val=4, patience=0,
             cells=[{"num_kv_pairs": 4, "gap": 8}, {"num_kv_pairs": 8, "gap": 16}],
             train_cells=[{"num_kv_pairs": 4, "gap": 8}])  # fmt: skip
    post = {
        "int8 KV": [("recall-attention[attention.num_kv_heads=1]",
                     "recall-attention[attention.num_kv_heads=1,attention.kv_bits=8]", "int8")],
        "decode check": [("recall-attention[attention.num_kv_heads=1]",
                          "recall-attention[attention.num_kv_heads=1]", "decode")],
    }  # fmt: skip
    specs = F.models_to_train(fams, post)
    assert specs == [s for ss in fams.values() for s in ss]  # the base is trained once
    run(g, specs, [0, 1], tmp_path, device="cpu", progress=False, plots=False)
    res = F.write(tmp_path, fams, post)
    pts = {p["model"]: p for p in res["points"]}
    assert set(pts) == set(specs) | {"int8", "decode"}
    base = pts["recall-attention[attention.num_kv_heads=1]"]
    # the decode path of the trained model reproduces its parallel test accuracy and bytes
    assert pts["decode"]["accuracy"] == pytest.approx(base["accuracy"], abs=1e-9)
    assert pts["decode"]["state_bytes"] < base["state_bytes"]  # one token fewer cached
    assert pts["int8"]["state_bytes"] < pts["decode"]["state_bytes"] / 2  # codes + scales
    specs = [s for ss in fams.values() for s in ss]
    rows = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    for spec in specs:
        p = pts[spec]
        longest = [r for r in rows if r["model"] == spec and r["seq_len"] == p["longest_seq_len"]]
        assert p["state_bytes"] == longest[0]["state_bytes"] and p["seeds"] == 2
        accs = [r["test_acc"] for r in rows if r["model"] == spec]
        assert p["accuracy"] == pytest.approx(sum(accs) / len(accs))
        assert p["acc_min"] <= p["accuracy"] <= p["acc_max"]
    assert pts["recall-gdn[d_model=32]"]["state_bytes"] < pts["recall-gdn"]["state_bytes"]
    assert res["floor_bytes"] == pytest.approx(8 * 6 / 8)  # 8 pairs · log2(64 values) bits
    assert (
        "smallest state ≥ 0.99" in res["markdown"] and (tmp_path / "recall_per_byte.png").exists()
    )
    again = F.markdown(json.loads((tmp_path / "recall_per_byte.json").read_text()))
    assert again == res["markdown"]
    # the post-training evaluations are cached per (variant, grid, weights): a rerun reuses them
    from kvfree.bench import frontier_decode

    assert len(list((tmp_path / "post").glob("*.json"))) == 4  # 2 variants × 2 seeds
    real = frontier_decode.decode_accuracy

    def refuse(*a, **k):
        raise AssertionError("re-evaluated a cached variant")

    monkeypatch.setattr(frontier_decode, "decode_accuracy", refuse)
    assert F.write(tmp_path, fams, post)["markdown"] == res["markdown"]
    weights = sorted((tmp_path / "jobs").glob("*attention*seed0*.weights.pt"))[0]
    import torch

    sd = torch.load(weights, weights_only=True)
    torch.save({k: v * 0 for k, v in sd.items()}, weights)  # "retrained": evaluated afresh
    with pytest.raises(AssertionError, match="re-evaluated"):
        F.write(tmp_path, fams, post)
    monkeypatch.setattr(frontier_decode, "decode_accuracy", real)
    F.write(tmp_path, fams, post)
    assert len(list((tmp_path / "post").glob("*.json"))) == 6


def test_a_point_is_the_model_at_its_lr_chosen_by_validation():
    def row(lr, val, test):
        return {"model": "m", "seed": 0, "lr": lr, "val_acc": val, "test_acc": test,
                "seq_len": 8, "state_bytes": 64, "params": 1}  # fmt: skip

    rows = [row(1e-3, 0.9, 0.2), row(1e-2, 0.5, 0.99)]  # the test accuracy never selects
    (p,) = F.points(F.at_selected_lr(rows), {"f": ["m"]})
    assert p["accuracy"] == 0.2 and p["seeds"] == 1


def test_unknown_preset_or_family():
    with pytest.raises(ValueError, match="preset"):
        F.families("huge")
    fams, post = F.families("cpu", ["H2O (token budget)"])
    assert not fams and F.models_to_train(fams, post) == ["recall-attention"]
    with pytest.raises(ValueError, match="families"):
        F.families("cpu", ["transformers"])


def test_every_family_can_be_named_in_families():
    """``--families`` is comma-separated: a family name with a comma could never be selected."""
    from kvfree.bench.frontier import POST_TRAINING, PRESETS, families

    for preset in PRESETS:
        names = [*PRESETS[preset], *POST_TRAINING[preset]]
        assert not [n for n in names if "," in n], preset
        for name in names:
            fams, post = families(preset, [name])
            assert list(fams) + list(post) == [name]


def test_frontier_on_the_zoology_slice(tmp_path):
    """The zoology-style slice (``--grid zoology-cpu``): its floor is N·log₂(V/2) of the largest
    cell, and the post-training variants evaluate through decode, which reproduces the trained
    model's parallel accuracy (mqar's prefix mask ends at the first query)."""
    base = "recall-attention[attention.num_kv_heads=1]"
    fams = {"attention (KV cache)": [base]}
    int8 = "recall-attention[attention.num_kv_heads=1,attention.kv_bits=8]"
    post = {"decode check": [(base, base, "decode")], "int8 KV": [(base, int8, "int8")]}
    cells = [{"input_seq_len": 32, "num_kv_pairs": 4}, {"input_seq_len": 64, "num_kv_pairs": 8}]
    opts = {"vocab_size": 256, "random_non_queries": True}
    g = grid("zoology-cpu", steps=2, eval_every=0, n_test=4, n_val=4, patience=0, cells=cells,
             train_cells=cells[:1], options=opts)  # fmt: skip
    run(g, F.models_to_train(fams, post), [0], tmp_path, device="cpu", progress=False, plots=False)
    res = F.write(tmp_path, fams, post)
    assert res["floor_bytes"] == pytest.approx(8 * 7 / 8)  # 8 pairs · log2(128 values) bits
    pts = {p["model"]: p for p in res["points"]}
    assert pts["decode"]["accuracy"] == pytest.approx(pts[base]["accuracy"], abs=1e-9)
    assert pts["int8"]["state_bytes"] < pts["decode"]["state_bytes"] < pts[base]["state_bytes"]

    from typer.testing import CliRunner

    import kvfree.commands  # noqa: F401
    from kvfree.cli import app

    readme = tmp_path / "README.md"  # its own README section, next to the main grid's
    readme.write_text("<!-- BEGIN frontier -->\nmain grid\n<!-- END frontier -->\n")
    args = ["report", "frontier", str(tmp_path), "--readme", str(readme)]
    out = CliRunner().invoke(app, [*args, "--section", "frontier-zoology"])
    assert out.exit_code == 0, out.output
    text = readme.read_text()
    assert "main grid" in text and f"-->\n{res['markdown']}\n<!-- END frontier-zoology" in text
