"""Grids of the recall benchmark: which task cells to train on and evaluate, and the recipe.

A :class:`RecallGrid` names a task, its evaluation cells (task options per cell), how the
model is trained (one run on a mixture of the cells, or one run per cell), the recipe, the
learning-rate grid and the two slice keys of the heatmap. Presets:

    cpu            mqar_gap  M ∈ {4, 8} × gap ∈ {64, 256}; one run on an 8-cell mixture, CPU-sized
    echo           mqar_gap  M ∈ {4, 8, 16, 32} × gap ∈ {64, …, 4096} (28 cells, docs/tasks.md §2);
                             each cell from scratch: 10k steps, batch 64, LR 1e-3, warmup 500
    zoology-cpu    mqar      train 64/4 + 128/8, test 64/4, 128/8, 256/16 (V = 8192); CPU-sized
    zoology-based  mqar      7 test slices 64/4 … 1024/256 (docs/tasks.md §1.4); fixed train set of
                             5 segments, 32 epochs, batch 256, LR sweep
    text-niah      text_niah one needle in real English (bytes), trained at 256 bytes, tested at
                             256–4096 × 5 depths (length generalisation, held-out documents)
    text-niah-mk4  text_niah 4 keyed needles, one queried (RULER's multi-key), trained at 512
                             bytes (the needles take 250), tested at 512–8192 × 5 depths
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from kvfree.config import from_dict


@dataclass
class RecallGrid:
    name: str
    task: str
    cells: list[dict]  # evaluation cells: task options (without num_examples)
    axes: tuple[str, str]  # heatmap (rows, columns): slice keys of the task
    train: str = "mixture"  # mixture (one run on all train cells) | per_cell
    train_cells: list[dict] | None = None  # default: the evaluation cells
    val_cells: list[dict] | None = None  # cells of the learning curve and the stopping rule
    #                                      (default: every evaluation cell; e.g. only the
    #                                      training length when the test is length
    #                                      generalisation); every cell gets a final val_acc
    train_examples: list[int] | None = None  # fixed train set sizes per train cell (epochs);
    #                                          None = fresh examples every step (online)
    steps: int = 1000  # optimizer steps per run, the cap (fixed train sets: from epochs)
    eval_every: int = 0  # validation curve every N steps (0: only at the end, no early stop)
    target: float = 0.99  # stop when every cell's validation accuracy reaches this
    patience: int = 0  # stop after N evaluations without improvement (0: never) …
    patience_after: int = 0  # … counted from this step on (recall transitions come late)
    min_delta_acc: float = 0.005  # improvement: mean val accuracy up by this …
    min_delta_loss: float = 0.01  # … or mean val loss down by this fraction of its best
    epochs: int | None = None  # with train_examples: epochs over the fixed set
    batch_size: int = 32
    lrs: list[float] = field(default_factory=lambda: [1e-3])
    model_lrs: dict[str, list[float]] = field(default_factory=dict)  # per-model LR grids
    warmup_steps: int = 50
    weight_decay: float = 0.1
    min_lr_ratio: float = 0.1
    n_val: int = 200  # validation examples per cell (train-seed range, model selection)
    n_test: int = 1000  # test examples per cell (test-seed range, reported)
    eval_batch: int = 200
    options: dict[str, Any] = field(default_factory=dict)  # fixed task options for every cell
    note: str = ""

    def __post_init__(self):
        if self.train not in ("mixture", "per_cell"):
            raise ValueError(f"train must be 'mixture' or 'per_cell', got {self.train!r}")
        if not self.cells:
            raise ValueError("a recall grid needs at least one cell")
        if self.train_examples is not None and len(self.train_examples) != len(
            self.training_cells()
        ):
            raise ValueError("train_examples needs one size per train cell")
        self.axes = tuple(self.axes)
        if self.task == "text_niah":  # a cell too short for its needles fails before training
            from kvfree.tasks.text_niah import min_length

            for c in [*self.cells, *self.training_cells()]:
                if c["seq_len"] < min_length(c.get("n", 1)):
                    raise ValueError(
                        f"grid {self.name!r}: the cell {c} is too short for {c.get('n', 1)} "
                        f"needle(s); text_niah needs seq_len ≥ {min_length(c.get('n', 1))}"
                    )

    def lrs_for(self, model: str) -> list[float]:
        """The LR grid of ``model``: its entry in ``model_lrs`` (by full spec or by preset
        name), else ``lrs``."""
        base = model.split("[", 1)[0]
        return self.model_lrs.get(model) or self.model_lrs.get(base) or self.lrs

    def curve_cells(self, eval_cells: list[dict]) -> list[dict]:
        """The evaluation cells that get a learning curve (``val_cells`` among them)."""
        if self.val_cells is None:
            return eval_cells
        keys = {cell_key(c) for c in self.val_cells}
        cells = [c for c in eval_cells if cell_key(c) in keys]
        if not cells:
            raise ValueError(f"grid {self.name!r}: no val_cells among the evaluation cells")
        return cells

    def training_cells(self) -> list[dict]:
        return self.train_cells if self.train_cells is not None else self.cells

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> RecallGrid:
        return from_dict(cls, data, kind="recall grid key")

    def fingerprint(self) -> str:
        """Hash of everything that changes a run's results (resume only reuses matching runs).
        The LR lists are left out: a run's LR is part of its id, so adding an LR to a sweep
        (or changing one model's) reuses every run already trained."""
        unused = ("note", "eval_batch", "lrs", "model_lrs")
        keep = {k: v for k, v in self.to_dict().items() if k not in unused}
        return hashlib.blake2b(
            json.dumps(keep, sort_keys=True, default=str).encode(), digest_size=6
        ).hexdigest()


def cell_key(cell: dict) -> str:
    return ",".join(f"{k}={cell[k]}" for k in sorted(cell))


#: The main job's training mixture (M, gap): short sequences teach the mechanism cheaply, the
#: longer ones (gap 64, 256) keep every model in the evaluated length range. Five of the eight
#: cells have M = 8 pairs: with M = 1 and 2 warm-up cells in their place Gated DeltaNet (seed 0)
#: reached 0.944 at M = 8, with these 0.983 (runs/ab-mixture).
CPU_TRAIN = ((8, 8), (8, 16), (4, 16), (8, 32), (4, 64), (8, 64), (4, 256), (8, 256))
#: The CPU grid keeps the LR constant after warm-up: recall is learned in a late, sharp
#: transition, and cosine decay starved it (Gated DeltaNet, seed 0: 0.94 at M = 8 with a
#: constant LR against 0.39 with cosine to 0.1; runs/ab-constlr vs runs/ab-init).
#: Per-model learning rates, chosen in short tuning runs by validation accuracy (train-seed
#: range): GDN among 1e-3/3e-3/6e-3, attention, FDM and SKA among 1e-3/3e-3 (README).
CPU_LRS = {"recall-attention": [1e-3], "recall-fdm": [1e-3]}


def _cpu() -> RecallGrid:
    return RecallGrid(
        name="cpu",
        task="mqar_gap",
        cells=[{"num_kv_pairs": m, "gap": g} for m in (4, 8) for g in (64, 256)],
        axes=("num_kv_pairs", "gap"),
        train="mixture",
        train_cells=[{"num_kv_pairs": m, "gap": g} for m, g in CPU_TRAIN],
        steps=1200,
        eval_every=100,
        target=0.99,
        patience=4,
        patience_after=600,
        batch_size=32,
        lrs=[3e-3],
        model_lrs=dict(CPU_LRS),
        warmup_steps=120,
        weight_decay=0.1,
        min_lr_ratio=1.0,
        n_val=100,
        eval_batch=50,
        n_test=500,
        note="CPU-sized: one run per model on a mixture of 8 (M, gap) cells (one cell per "
        "step, round robin; fresh examples every step), evaluated on the 4 cells "
        "M ∈ {4, 8} × gap ∈ {64, 256}",
    )


def _echo() -> RecallGrid:
    return RecallGrid(
        name="echo",
        task="mqar_gap",
        cells=[
            {"num_kv_pairs": m, "gap": g}
            for m in (4, 8, 16, 32)
            for g in (64, 128, 256, 512, 1024, 2048, 4096)
        ],
        axes=("num_kv_pairs", "gap"),
        train="per_cell",
        steps=10_000,
        batch_size=64,
        lrs=[1e-3],
        warmup_steps=500,
        weight_decay=0.1,
        n_val=500,
        n_test=1000,
        note="docs/tasks.md §2: each cell trained from scratch (AdamW, LR 1e-3, batch 64, 10k "
        "steps, warmup 500, wd 0.1; bf16 on GPU), 1000 held-out examples per cell",
    )


def _zoology() -> RecallGrid:
    from kvfree.tasks.mqar import GRIDS

    g = GRIDS["based"]
    return RecallGrid(
        name="zoology-based",
        task="mqar",
        cells=[{"input_seq_len": L, "num_kv_pairs": K} for L, K, _ in g["test"]],
        axes=("num_kv_pairs", "input_seq_len"),
        train="mixture",
        train_cells=[{"input_seq_len": L, "num_kv_pairs": K} for L, K, _ in g["train"]],
        train_examples=[n for _, _, n in g["train"]],
        epochs=32,
        batch_size=256,
        lrs=list(g["lrs"]),
        warmup_steps=0,
        weight_decay=0.1,
        min_lr_ratio=0.0,
        n_val=500,
        n_test=1000,
        eval_batch=32,
        options=dict(g["options"]),
        note="docs/tasks.md §1.4 (Based/'original' grid): fixed train set (5 segments, 180k "
        "examples), 32 epochs, cosine without warmup, batch 256, LR sweep, best LR per "
        "model by validation accuracy; test on 7 slices up to 1024",
    )


def _zoology_cpu() -> RecallGrid:
    return RecallGrid(
        name="zoology-cpu",
        task="mqar",
        cells=[{"input_seq_len": L, "num_kv_pairs": K} for L, K in ((64, 4), (128, 8), (256, 16))],
        axes=("num_kv_pairs", "input_seq_len"),
        train="mixture",
        train_cells=[{"input_seq_len": L, "num_kv_pairs": K} for L, K in ((64, 4), (128, 8))],
        steps=1500,
        eval_every=100,
        target=0.99,
        patience=4,
        patience_after=800,
        batch_size=64,
        lrs=[3e-3],
        # softmax attention stalls at 1e-3 and 3e-3 here and learns at 1e-2 (README, the
        # zoology-cpu-attention sweep); MLA, attention over a latent cache, sweeps both
        model_lrs={"recall-attention": [1e-2], "recall-mla": [3e-3, 1e-2]},
        warmup_steps=100,
        weight_decay=0.1,
        min_lr_ratio=1.0,
        n_val=200,
        n_test=500,
        eval_batch=100,
        options={"vocab_size": 8192, "random_non_queries": True, "mode": "zoology_compatible"},
        note="a CPU-sized slice of zoology's MQAR (docs/tasks.md §1): V = 8192, random "
        "non-query tokens, zoology's RNG order; trained on 64/4 + 128/8 (fresh examples every "
        "step), tested on 64/4, 128/8 and 256/16 (length generalisation)",
    )


#: Needles in real text (docs/tasks.md §4.4), per needle count: test lengths (trained at the
#: first, tested at 1×–16× of it) and depths of the queried needle. Four keyed needles and the
#: question take 250 bytes (one needle: 103), so the four-needle grid starts at 512 bytes.
TEXT_NIAH_LENGTHS = {1: (256, 512, 1024, 2048, 4096), 4: (512, 1024, 2048, 4096, 8192)}
TEXT_NIAH_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def _text_niah(n: int) -> RecallGrid:
    kind = "one needle" if n == 1 else f"{n} needles with distinct keys, one queried"
    lengths = TEXT_NIAH_LENGTHS[n]
    at = [{"seq_len": L, "n": n, "depth": d} for L in lengths for d in TEXT_NIAH_DEPTHS]
    return RecallGrid(
        name="text-niah" if n == 1 else f"text-niah-mk{n}",
        task="text_niah",
        cells=at,
        axes=("depth", "seq_len"),
        train="mixture",
        train_cells=[{"seq_len": lengths[0], "n": n}],  # depth uniform
        val_cells=[c for c in at if c["seq_len"] == lengths[0]],
        steps=3000,
        eval_every=100,
        target=0.99,
        patience=5,
        patience_after=1500,
        batch_size=32,
        lrs=[3e-3],
        model_lrs=dict(CPU_LRS),
        warmup_steps=100,
        weight_decay=0.1,
        min_lr_ratio=1.0,
        n_val=50,
        n_test=50,
        eval_batch=16,
        note=f"needles in real text (bytes, {kind}): haystacks from the offline corpus "
        f"(`kvfree data build`; held-out test documents at test time), trained at {lengths[0]} "
        f"bytes with the {'needle' if n == 1 else 'needles'} at a uniform depth, tested at "
        f"{lengths[0]}–{lengths[-1]} bytes (1×–16×) × 5 depths; "
        "validation curve and stopping rule on the training length",
    )


GRIDS = {
    "cpu": _cpu,
    "echo": _echo,
    "zoology-based": _zoology,
    "zoology-cpu": _zoology_cpu,
    "text-niah": lambda: _text_niah(1),
    "text-niah-mk4": lambda: _text_niah(4),
}


def grid(name: str, **overrides) -> RecallGrid:
    if name not in GRIDS:
        raise ValueError(f"unknown recall grid {name!r}; choose one of {', '.join(GRIDS)}")
    g = GRIDS[name]()
    return RecallGrid.from_dict({**g.to_dict(), **overrides}) if overrides else g
