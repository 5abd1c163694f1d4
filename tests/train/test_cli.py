"""The LM commands end to end on a small text file: train, resume, eval, generate, report."""

import json
import re

import pytest
import torch
from typer.testing import CliRunner

import kvfree.commands  # noqa: F401  (registers the commands)
from kvfree.cli import app

runner = CliRunner()


def invoke(*args):
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, f"{args}: {res.output}\n{res.exception!r}"
    return res.output


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lm")
    text = tmp / "text.txt"
    text.write_text(
        "\n\n".join(
            f"Paragraph {i}: the quick brown fox jumps over the lazy dog {i % 7} times."
            for i in range(120)
        )
    )
    cfg = {
        "model": {"d_model": 16, "layers": ["shortconv", "linear_attention"]},
        "data": {
            "corpus": str(text),
            "tokenizer": "byte",
            "seq_len": 16,
            "batch_size": 4,
            "eval_windows": 4,
            "final_eval_windows": 6,
            "decode_windows": 2,
        },
        "train": {
            "steps": 4,
            "warmup_steps": 1,
            "log_every": 1,
            "eval_every": 2,
            "checkpoint_every": 2,
            "progress": False,
        },
    }
    (tmp / "cfg.json").write_text(json.dumps(cfg))
    out = tmp / "lm-tiny"
    invoke("train", "--config", tmp / "cfg.json", "--out", out)
    return tmp, out


def test_train_writes_the_run_folder(run):
    _, out = run
    for name in (
        "config.json",
        "metrics.jsonl",
        "summary.json",
        "checkpoints/last.pt",
        "checkpoints/best.pt",
    ):
        assert (out / name).exists(), name
    s = json.loads((out / "summary.json").read_text())
    assert s["steps"] == 4 and s["tokens_seen"] == 4 * 4 * 16 and s["tokenizer"] == "byte"
    assert 0 < s["val"]["parallel"]["bpb"] < 9
    assert abs(s["val"]["decode"]["bpb_diff"]) < 1e-5


def test_train_refuses_to_overwrite_and_resumes(run):
    tmp, out = run
    res = runner.invoke(app, ["train", "--config", str(tmp / "cfg.json"), "--out", str(out)])
    assert res.exit_code != 0 and "--resume" in str(res.exception)
    invoke("train", "--out", out, "--resume", "--steps", 6)
    s = json.loads((out / "summary.json").read_text())
    assert s["steps"] == 6 and s["steps_this_run"] == 2
    assert s["train_seconds_total"] > s["train_seconds"]  # the first run's time is carried


def test_eval_reports_parallel_and_decode(run):
    _, out = run
    text = invoke("eval", out, "--windows", 5, "--decode-windows", 2, "--prefill", 3)
    assert "decode − parallel" in text and "bpb" in text
    res = json.loads((out / "eval-val.json").read_text())
    assert res["windows"] == 5 and res["decode"]["prefill"] == 3
    assert abs(res["decode"]["bpb_diff"]) < 1e-5


def test_generate_prints_text_and_state_bytes(run):
    _, out = run
    text = invoke("generate", out, "--prompt", "The quick", "--tokens", 12, "--seed", 1)
    assert text.startswith("The quick") and "bytes after the 9-token prompt" in text
    first, second = (int(n.replace(",", "")) for n in re.findall(r"([\d,]+) bytes after", text))
    assert first == second > 0  # fixed-size state: the same after 9 and after 20 tokens


def test_report_lm_table_and_readme_section(run, tmp_path):
    _, out = run
    readme = tmp_path / "README.md"
    readme.write_text("# x\n")
    record = tmp_path / "lm" / "lm.json"
    text = invoke("report", "lm", out, tmp_path / "missing", "--readme", readme, "--json", record)
    assert "| model |" in text and "shortconv+linear_attention ×2" in text
    assert "<!-- BEGIN lm -->" in readme.read_text()
    section = readme.read_text()
    readme.write_text("# x\n")
    again = invoke("report", "lm", record, "--readme", readme)  # from the committed record
    assert readme.read_text() == section and "shortconv+linear_attention ×2" in again


def test_data_info_on_a_text_file(run, tmp_path):
    tmp, _ = run
    readme = tmp_path / "README.md"
    record = tmp_path / "corpus.json"
    text = invoke(
        "data",
        "info",
        tmp / "text.txt",
        "--tokenizer",
        "byte",
        "--readme",
        readme,
        "--json",
        record,
    )
    assert "| train |" in text and "byte tokens" in text
    assert "| train |" in readme.read_text()
    from kvfree.commands.data import corpus_markdown

    assert corpus_markdown(json.loads(record.read_text())).strip() in readme.read_text()


def test_export_hf_loads_with_auto_classes_and_generates_the_same(run, tmp_path):
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    import kvfree.hf  # noqa: F401  (registers the Auto classes)
    from kvfree.train.lm import load_model

    _, out = run
    text = invoke("export-hf", out, tmp_path / "hf")
    assert "wrote" in text and "no tokenizer written" in text  # a byte-tokenizer run
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    model, tok, _ = load_model(out)
    ids = torch.tensor([tok.encode("The quick")])
    assert torch.equal(hf.generate(ids, max_new_tokens=8, do_sample=False), model.generate(ids, 8))
    res = runner.invoke(app, ["export-hf", str(tmp_path / "nope"), str(tmp_path / "hf2")])
    assert res.exit_code == 2 and "does not exist" in re.sub(r"[│╭╮╰╯─\s]+", " ", res.output)
    before = (tmp_path / "hf" / "config.json").read_text()
    res = runner.invoke(app, ["export-hf", str(out), str(tmp_path / "hf")])  # not empty
    assert res.exit_code == 2 and "already holds files" in re.sub(r"[│╭╮╰╯─\s]+", " ", res.output)
    assert (tmp_path / "hf" / "config.json").read_text() == before
    invoke("export-hf", out, tmp_path / "hf", "--force")
