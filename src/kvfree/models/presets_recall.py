"""Presets of the recall benchmark's main job (``kvfree demo``; docs/tasks.md §2): CPU-sized
2-layer models at d = 64 on Echo's MQAR-with-gap vocabulary (V = 192).

| preset                   | layers                   | memory                                   |
|--------------------------|--------------------------|------------------------------------------|
| recall-attention         | attention ×2 (RoPE, 2 h) | KV cache, grows with the length          |
| recall-mamba2            | mamba2 ×2 (N = 16)       | fixed                                    |
| recall-gdn               | gated_deltanet ×2 (2 h)  | fixed                                    |
| recall-mamba2-ska        | mamba2, ska (chunk, β)   | fixed; **no mask** (the headline)        |
| recall-mamba2-ska-prefix | mamba2, ska (prefix)     | fixed; **oracle** prefix mask, seqmax    |
| recall-fdm               | fdm ×2 (MQAR variant)    | fixed: scan + global top-16 cache        |

The causal SKA row uses the β write gate (docs/ska.md §4): with ℓ2-normalised keys every token
writes with unit strength, and without the gate the 2-layer model stayed at the H_M/M plateau
(0.34 at M = 8, gap 64, after 1 750 steps of batch 64) while with it reached 0.82 after 1 500.
The oracle-mask row divides by the sequence max (seqmax) as the paper does for MQAR.

Which presets read the oracle mask is decided by :func:`oracle_mask` (SKA in prefix/masked
mode). ``vocab_size`` is overridden by the bench for other tasks.
"""

from __future__ import annotations

from kvfree.models.config import ModelConfig

D, VOCAB = 64, 192
#: Embedding init std of the recall models. With the LM default 0.02 (tied, d = 64) every model
#: sat on a plateau for most of the CPU budget: 2-layer attention on M = 4, gap 8 stayed at 0.52
#: after 800 steps, 0.3 reached 1.0 by step ~480 (1.0: 0.93); Gated DeltaNet on M = 8, gap 64
#: reached 0.975 in 1200 steps with 0.3. (zoology's and FDM's mqar.py models use nn.Embedding's
#: default, std 1.)
INIT_STD = 0.3
#: chunk 16 (layer default 64): at the recall lengths (T ≤ 288) the intra-chunk work grows with
#: T·C, so smaller chunks train faster with the same math (kvfree bench train-speed)
_MAMBA = dict(expand=2, head_dim=32, d_state=16, chunk_size=16)
_SKA = dict(num_heads=4, rank=16, chunk_size=16)


def _cfg(layers: list[str], **options) -> ModelConfig:
    return ModelConfig(
        vocab_size=VOCAB, d_model=D, layers=layers, mixer_options=options, init_std=INIT_STD
    )


PRESETS = {
    "recall-attention": lambda: _cfg(
        ["attention", "attention"], attention=dict(num_heads=2, positions="rope")
    ),
    "recall-mamba2": lambda: _cfg(["mamba2", "mamba2"], mamba2=_MAMBA),
    "recall-gdn": lambda: _cfg(
        ["gated_deltanet", "gated_deltanet"], gated_deltanet=dict(num_heads=2, chunk_size=16)
    ),
    "recall-mamba2-ska": lambda: _cfg(
        ["mamba2", "ska"], mamba2=_MAMBA, ska=dict(_SKA, mode="chunk", beta_gate=True)
    ),
    "recall-mamba2-ska-token": lambda: _cfg(
        ["mamba2", "ska"], mamba2=_MAMBA, ska=dict(_SKA, mode="token")
    ),
    "recall-mamba2-ska-prefix": lambda: _cfg(
        ["mamba2", "ska"], mamba2=_MAMBA, ska=dict(_SKA, mode="prefix", norm="seqmax")
    ),
    "recall-fdm": lambda: ModelConfig(
        vocab_size=VOCAB,
        d_model=D,
        layers=["fdm", "fdm"],
        mixer_options={"fdm": {"variant": "mqar", "top_k": 16}},
        norm="layer",
        init_std=INIT_STD,
    ),
}


def oracle_mask(cfg: ModelConfig) -> bool:
    """True when a layer is SKA in ``prefix``/``masked`` mode: it must be fed the task's
    oracle prefix mask (reported separately, labelled, docs/ska.md §16)."""
    return any(
        name == "ska" and cfg.options_for(i).get("mode") in ("prefix", "masked")
        for i, name in enumerate(cfg.layers)
    )
