"""lm-evaluation-harness on an exported kvfree model through its plain ``hf`` model type
(``trust_remote_code=True`` finds the classes through the export's ``auto_map``): the
log-likelihoods it reports are the model's own, and its greedy generation is the model's
``generate``. Local tasks written here; nothing is downloaded."""

import json

import pytest
import torch

pytest.importorskip("transformers")
lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")

from kvfree.data.tokenizer import BPETokenizer  # noqa: E402
from kvfree.hf import export_pretrained  # noqa: E402
from kvfree.models import LanguageModel, ModelConfig  # noqa: E402

TEXT = "the cat sat on the mat.\n\none two three four.\n\nred green blue.\n\n"
MC = [
    {"question": "the cat sat on the", "choices": ["mat", "sky"], "answer": 0},
    {"question": "one two", "choices": ["three", "blue"], "answer": 0},
]
GEN = [
    {"prompt": "the cat sat", "target": " on"},
    {"prompt": "red green", "target": " blue"},
    {"prompt": "one", "target": " two"},  # a shorter prompt: padded in a batch
]


def _task(root, name, rows, body):
    data = root / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        f"test_split: test\n{body}"
    )


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmeval")
    tok = BPETokenizer.train([TEXT * 20], 300)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, layers=["gated_deltanet", "mamba2"])
    model = LanguageModel(cfg).eval()
    note = export_pretrained(model, root / "hf", tok)
    assert "EOS" in note and (root / "hf" / "modeling_kvfree.py").exists()
    mc = (
        'output_type: multiple_choice\ndoc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\nmetric_list:\n'
        "  - metric: acc\n"
    )
    _task(root, "kvfree_mc", MC, mc)
    gen = (
        'output_type: generate_until\ndoc_to_text: "{{prompt}}"\ndoc_to_target: "{{target}}"\n'
        'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 5\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n"
    )
    _task(root, "kvfree_gen", GEN, gen)
    return root, model, tok


@pytest.mark.parametrize("batch_size", [1, 4])
def test_lm_eval_hf_reports_the_models_own_numbers(exported, batch_size):
    """batch_size 4 batches requests of different lengths: lm-eval pads them (left-padded
    prompts with an attention_mask for generation) and still gets each request's own numbers."""
    from lm_eval.tasks import TaskManager

    root, model, tok = exported
    res = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={root / 'hf'},trust_remote_code=True",
        tasks=["kvfree_mc", "kvfree_gen"],
        task_manager=TaskManager(include_path=str(root)),
        batch_size=batch_size,
        device="cpu",
        log_samples=True,
    )
    assert set(res["results"]) == {"kvfree_mc", "kvfree_gen"}
    for s in res["samples"]["kvfree_mc"]:  # log p(" " + choice | question), per choice
        ctx = tok.encode(s["doc"]["question"])
        for choice, resp in zip(s["doc"]["choices"], s["resps"]):
            cont = tok.encode(s["doc"]["question"] + " " + choice)[len(ctx) :]
            ids = torch.tensor([ctx + cont])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids)[0][0, :-1].double(), -1)
            own = sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))
            assert resp[0][0] == pytest.approx(own, abs=1e-4)
    for s in res["samples"]["kvfree_gen"]:  # greedy generation = kvfree's generate
        ids = torch.tensor([tok.encode(s["doc"]["prompt"])])
        with torch.no_grad():
            out = model.generate(ids, 5)[0, ids.shape[1] :].tolist()
        assert s["resps"][0][0] == tok.decode(out).split("\n")[0]


def test_cloze_task_reads_held_out_text(tmp_path):
    from kvfree.data.cloze import cloze_rows, write_task

    docs = [f"document {i} " + " ".join(f"w{i}_{k}" for k in range(200)) for i in range(5)]
    rows = cloze_rows(docs, 4, context=120, answer=30, seed=0)
    assert len(rows) == 4
    for r in rows:
        true, other = r["choices"]
        assert r["answer"] == 0 and len(true) == len(other) == 30
        src = next(d for d in docs if r["context"] in d)
        assert r["context"] + true in src and other not in src  # the distractor: another doc
    yaml = write_task(tmp_path, rows).read_text()
    assert "output_type: multiple_choice" in yaml and str(tmp_path / "cloze.jsonl") in yaml
    with pytest.raises(ValueError, match="context"):
        cloze_rows(docs[:1], 4, context=120, answer=30, seed=0)
