"""A local lm-evaluation-harness task from held-out text (``kvfree data cloze-task``): passages
of the corpus's **test** split, and for each the true next characters against those of another
passage (``multiple_choice``, accuracy; chance 0.5). No download: the corpus is built offline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

TASK = "kvfree_corpus_cloze"


def cloze_rows(docs: list[str], n: int, context: int, answer: int, seed: int) -> list[dict]:
    long = [d for d in docs if len(d) > context + answer + 100]
    if len(long) < 2:
        raise ValueError(
            f"the test split has {len(long)} documents longer than {context + answer + 100} "
            "characters; pass a shorter --context"
        )
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(long), min(n, len(long)), replace=False)
    rows = []
    for i, j in enumerate(pick):
        d = long[j]
        a = d.find(" ", int(rng.integers(0, len(d) - context - answer - 50))) + 1
        other = long[pick[(i + 1) % len(pick)]]
        b = int(rng.integers(0, len(other) - answer))
        rows.append({
            "context": d[a : a + context],
            "choices": [d[a + context : a + context + answer], other[b : b + answer]],
            "answer": 0,
        })  # fmt: skip
    return rows


def write_task(out: str | Path, rows: list[dict]) -> Path:
    """``out/cloze.jsonl`` + ``out/cloze.yaml`` (lm-eval: ``--include_path out``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = (out / "cloze.jsonl").resolve()
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    yaml = out / "cloze.yaml"
    yaml.write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        'test_split: test\noutput_type: multiple_choice\ntarget_delimiter: ""\n'
        'doc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    return yaml
