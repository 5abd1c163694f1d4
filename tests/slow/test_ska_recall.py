"""A 2-layer Mamba-2 + SKA model learns Echo's MQAR-with-gap on CPU (docs/tasks.md §2,
docs/ska.md §16).

M = 8 key–value pairs, a 64-token filler gap, then the 8 queries (length 96). SKA is reported
without a mask (causal ``token``/``chunk`` modes: the headline) and with the oracle prefix mask
(labelled as such); Mamba-2 alone at the same width is the comparison.

Run the study by hand (prints accuracy on 1000 held-out examples, the first evaluated step at
which it reached 0.95, and the wall time):

    OMP_NUM_THREADS=1 python -m tests.slow.test_ska_recall ska-prefix ska-chunk-beta mamba2
"""

from __future__ import annotations

import sys
import time

import numpy as np
import pytest
import torch

from kvfree.models import LanguageModel, preset
from kvfree.tasks import TEST_SEEDS, example_accuracy, make
from kvfree.train import TrainConfig, Trainer

M, GAP = 8, 64

#: name -> (preset, uses the oracle prefix mask, extra SKA options)
RUNS = {
    "ska-token": ("echo-recall-ska", False, {}),
    "ska-chunk": ("echo-recall-ska-chunk", False, {}),
    "ska-token-beta": ("echo-recall-ska", False, {"beta_gate": True}),
    "ska-prefix": ("echo-recall-ska-prefix", True, {}),  # seqmax, as the paper
    "ska-prefix-l2": ("echo-recall-ska-prefix", True, {"norm": "l2"}),
    "ska-chunk-k0": ("echo-recall-ska-chunk", False, {"K": 0}),
    "ska-token-k0": ("echo-recall-ska", False, {"K": 0}),
    "ska-prefix-k0": ("echo-recall-ska-prefix", True, {"K": 0}),
    "ska-chunk-beta": ("echo-recall-ska-chunk", False, {"beta_gate": True}),
    "ska-chunk-k0-beta": ("echo-recall-ska-chunk", False, {"K": 0, "beta_gate": True}),
    "ska-chunk-r32": ("echo-recall-ska-chunk", False, {"rank": 32}),
    "ska-chunk-k0-r32": ("echo-recall-ska-chunk", False, {"rank": 32, "K": 0}),
    "mamba2": ("echo-recall-mamba2", False, None),
    "mamba2-attention": ("echo-recall-mamba2", False, "attention"),
}


def data(seed: int, n: int):
    d = make("mqar_gap", seed, num_examples=n, num_kv_pairs=M, gap=GAP)
    return (
        torch.from_numpy(d.inputs),
        torch.from_numpy(d.labels),
        torch.from_numpy(d.masks["prefix"]).double(),
    )


def build(name: str, seed: int, **model_kw) -> tuple[LanguageModel, bool]:
    diag = name.startswith("conv+")  # diagnostic: a short conv instead of Mamba-2 in layer 0
    preset_name, use_mask, extra = RUNS[name[5:] if diag else name]
    cfg = preset(preset_name, **model_kw)
    if diag:
        cfg.layers[0] = "shortconv"
    if cfg.d_model != 64:  # wider study models keep 4 SKA heads (P = d/4)
        cfg.mixer_options["mamba2"]["head_dim"] = cfg.d_model // 2
    if extra == "attention":  # comparison: softmax attention (4 heads) in place of layer 1
        cfg.layers[1] = "attention"
        cfg.mixer_options["attention"] = {"num_heads": 4}
    elif extra:
        cfg.mixer_options["ska"] = {**cfg.mixer_options["ska"], **extra}
    torch.manual_seed(seed)
    return LanguageModel(cfg), use_mask


def predict(model, inputs, mask, use_mask, batch=250) -> torch.Tensor:
    model.eval()
    preds = []
    with torch.no_grad():
        for i in range(0, len(inputs), batch):
            logits, _ = model(
                inputs[i : i + batch],
                mask=mask[i : i + batch].to(torch.float32) if use_mask else None,
            )
            preds.append(logits.argmax(-1))
    return torch.cat(preds)


def accuracy(model, inputs, labels, mask, use_mask) -> float:
    preds = predict(model, inputs, mask, use_mask)
    return float(np.nanmean(example_accuracy(preds.numpy(), labels.numpy())))


def accuracy_by_pair(model, inputs, labels, mask, use_mask) -> list[float]:
    """Accuracy per context slot i of the queried pair (0 = first pair of the context)."""
    preds = predict(model, inputs, mask, use_mask)
    q0 = 2 * M + GAP
    qkeys = inputs[:, q0::2]  # [N, M]
    slot = (qkeys[:, :, None] == inputs[:, None, 0 : 2 * M : 2]).float().argmax(-1)  # [N, M]
    ok = (preds[:, q0::2] == labels[:, q0::2]).float()
    return [round(ok[slot == i].mean().item(), 3) for i in range(M)]


def train_recall(
    name: str,
    *,
    steps: int = 2000,
    lr: float = 3e-3,
    batch: int = 64,
    seed: int = 0,
    eval_every: int = 100,
    n_eval: int = 1000,
    weight_decay: float = 0.1,
    grad_clip: float = 1.0,
    min_lr_ratio: float = 0.1,
    verbose: bool = False,
    **model_kw,
) -> dict:
    """Train ``name`` from scratch; returns final accuracy on ``n_eval`` held-out examples and
    the first evaluated step whose accuracy reached 0.95 (None if never; evaluations during
    training use the first 250 held-out examples)."""
    model, use_mask = build(name, seed, **model_kw)
    test = data(TEST_SEEDS[0] + 17, n_eval)
    quick = tuple(t[:250] for t in test)  # during training; the final number uses all n_eval

    def batches(step):
        inputs, labels, mask = data(1_000_003 * seed + step, batch)
        out = {"inputs": inputs, "labels": labels}
        if use_mask:
            out["mask"] = mask.to(torch.float32)
        return out

    cfg = TrainConfig(
        steps=steps,
        lr=lr,
        warmup_steps=min(100, steps // 10),
        weight_decay=weight_decay,
        grad_clip=grad_clip,
        min_lr_ratio=min_lr_ratio,
        eval_every=eval_every,
        log_every=eval_every,
        seed=seed,
        device="cpu",
        amp="none",
        progress=False,
    )
    t0 = time.time()

    def evaluate(m):
        acc = accuracy(m, *(test if trainer.step >= steps else quick), use_mask)
        if verbose:
            print(
                f"  {name} step {trainer.step}: held-out acc {acc:.3f} ({time.time() - t0:.0f} s)",
                flush=True,
            )
        return {"acc": acc}

    trainer = Trainer(model, cfg, batches, eval_fn=evaluate)
    trainer.fit()
    evals = [(r["step"], r["eval/acc"]) for r in trainer.history if "eval/acc" in r]
    reached = next((s for s, a in evals if a >= 0.95), None)
    return {
        "name": name,
        "seed": seed,
        "steps": steps,
        "lr": lr,
        "batch": batch,
        "acc": evals[-1][1],
        "steps_to_0.95": reached,
        "wall_s": round(time.time() - t0, 1),
        "curve": evals,
        "params": model.num_parameters(),
        "acc_by_pair": accuracy_by_pair(model, *test, use_mask),
    }


#: name -> training budget of the slow test (the causal model binds later than the oracle one)
SLOW_RUNS = {
    # oracle prefix mask, seqmax (the paper's MQAR setting): 0.98 by step 1500, 0.99 at 2000
    "ska-prefix": dict(steps=2000),
    # causal chunk mode + β write gate, no mask: 0.93 at 2000, 0.96 by 2250 of a 3000-step
    # cosine schedule (a 2000-step schedule ended at 0.875; a constant LR stayed at 0.34)
    "ska-chunk-beta": dict(steps=3000),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SLOW_RUNS))
def test_ska_learns_mqar_gap(name):
    torch.set_num_threads(1)
    res = train_recall(name, eval_every=250, **SLOW_RUNS[name])
    assert res["acc"] >= 0.95, res


if __name__ == "__main__":
    torch.set_num_threads(1)
    kw = {}
    names = []
    for a in sys.argv[1:]:
        if "=" in a:
            k, v = a.split("=")
            if k in (
                "steps",
                "batch",
                "seed",
                "eval_every",
                "n_eval",
                "d_model",
                "tie_embeddings",
                "final_norm",
            ):
                kw[k] = int(v)
            elif k in ("mlp", "norm"):
                kw[k] = v
            else:
                kw[k] = float(v)
        else:
            names.append(a)
    from kvfree.report.tables import write_json

    for n in names:
        r = train_recall(n, verbose=True, **kw)
        print({k: v for k, v in r.items() if k != "curve"})
        print("  curve:", " ".join(f"{s}:{a:.3f}" for s, a in r["curve"]), flush=True)
        print("wrote", write_json(f"runs/ska-recall/{n}.json", {**r, "options": kw}))
