"""Needles in real text (``text_niah``): exact lengths, the answer is the queried needle's
value, depth is controlled, train and test haystacks come from different documents, and the
``text-niah`` recall grid runs end to end with its validation curve on the training length."""

import numpy as np
import pytest

from kvfree.tasks import make
from kvfree.tasks.text_niah import DIGITS, KEYS, NEEDLE, min_length

WORDS = [
    "the",
    "river",
    "ran",
    "past",
    "old",
    "stone",
    "walls",
    "while",
    "birds",
    "sang",
    "over",
    "quiet",
    "fields",
    "of",
    "grain",
]


@pytest.fixture(scope="module")
def haystack(tmp_path_factory):
    """A folder with ready-made splits: train text uses only lower case, test text upper case
    (so a haystack byte says which split it came from)."""
    root = tmp_path_factory.mktemp("hay")
    rng = np.random.default_rng(0)
    for split, case in (("train", str.lower), ("valid", str.lower), ("test", str.upper)):
        paras = [" ".join(rng.choice(WORDS, 40)) + "." for _ in range(60)]
        (root / f"{split}.txt").write_text(case("\n\n".join(paras)))
    return str(root)


def _text(row) -> str:
    return bytes(row.astype(np.uint8)).decode()


@pytest.mark.parametrize("n", [1, 4])
def test_layout_and_answer(haystack, n):
    d = make("text_niah", 3, num_examples=20, seq_len=512, n=n, haystack=haystack)
    assert d.inputs.shape == (20, 512) and d.vocab_size == 256
    for row, lab in zip(d.inputs, d.labels):
        text = _text(row)
        scored = lab != -100
        assert scored.sum() == DIGITS and scored[-DIGITS - 1 : -1].all()
        answer = bytes(lab[scored].astype(np.uint8)).decode()
        key = text.rsplit("special magic number for ", 1)[1].split("?")[0]
        assert key in KEYS and text.endswith(answer) and answer[0] != "0"
        assert text.count(NEEDLE.format(key=key, value=answer)) == 1  # the queried needle
        assert text.count("The special magic number for") == n  # n needles, keys distinct
        assert len({t.split(" is ")[0] for t in text.split("number for ")[1:-1]}) == n


def test_depth_is_controlled(haystack):
    for depth, decile in ((0.0, 0), (1.0, 9)):
        d = make("text_niah", 4, num_examples=16, seq_len=1024, depth=depth, haystack=haystack)
        assert (d.slices["depth"] == decile).all()
    mid = make("text_niah", 4, num_examples=16, seq_len=1024, depth=0.5, haystack=haystack)
    assert set(mid.slices["depth"]) <= {4, 5}


def test_test_seeds_read_held_out_documents(haystack):
    import re

    def hay(d) -> str:  # the haystacks without the needles and the question
        texts = (_text(r).split("\nWhat")[0] for r in d.inputs)
        return "".join(re.sub(r" The special magic number for \w+ is \d+\.", "", t) for t in texts)

    train = hay(make("text_niah", 5, num_examples=8, seq_len=512, haystack=haystack))
    test = hay(make("text_niah", 2**31 + 5, num_examples=8, seq_len=512, haystack=haystack))
    assert any(c.islower() for c in train) and not any(c.isupper() for c in train)
    assert any(c.isupper() for c in test) and not any(c.islower() for c in test)


def test_bad_options(haystack):
    with pytest.raises(ValueError, match="seq_len"):
        make("text_niah", 1, num_examples=2, seq_len=min_length(2) - 1, n=2, haystack=haystack)
    with pytest.raises(ValueError, match="depth"):
        make("text_niah", 1, num_examples=2, depth=1.5, haystack=haystack)


def test_text_niah_grid_runs_with_a_training_length_curve(haystack, tmp_path):
    from kvfree.bench.recall import run
    from kvfree.bench.recall_grid import grid

    cells = [{"seq_len": L, "n": 1, "depth": d} for L in (256, 512) for d in (0.0, 1.0)]
    g = grid("text-niah", steps=4, eval_every=2, n_val=4, n_test=4, cells=cells,
             val_cells=cells[:2], options={"haystack": haystack}, patience=0)  # fmt: skip
    res = run(g, ["recall-mamba2"], [0], tmp_path, device="cpu", progress=False, plots=True)
    rows = [r for r in res["summary"]["recall-mamba2"]["cells"].values()]
    assert len(rows) == 4
    on_curve = [c for c in rows if "examples_to_0.9" in c]
    assert sorted(c["seq_len"] for c in on_curve) == [256, 256]  # validation at 256 only
    assert "validation cell (depth=0.0 L=256, depth=1.0 L=256)" in res["markdown"]
    assert (tmp_path / "heatmap_recall-mamba2.png").exists()


def test_every_text_niah_grid_fits_its_needles_and_a_short_cell_is_refused():
    from kvfree.bench.recall_grid import grid

    for name, n in (("text-niah", 1), ("text-niah-mk4", 4)):
        g = grid(name)
        assert min(c["seq_len"] for c in g.cells) >= min_length(n)
        assert g.training_cells()[0]["seq_len"] == min(c["seq_len"] for c in g.cells)
    with pytest.raises(ValueError, match="too short for 4 needle"):
        grid("text-niah-mk4", cells=[{"seq_len": 256, "n": 4, "depth": 0.0}])
