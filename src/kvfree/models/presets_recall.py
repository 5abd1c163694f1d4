"""Presets of the recall benchmark's main job (``kvfree demo``; tasks.md §2): CPU-sized
2-layer models at d = 64 on Echo's MQAR-with-gap vocabulary (V = 192).

| preset                   | layers                   | memory                                   |
|--------------------------|--------------------------|------------------------------------------|
| recall-attention         | attention ×2 (RoPE, 2 h) | KV cache, grows with the length          |
| recall-mamba2            | mamba2 ×2 (N = 16)       | fixed                                    |
| recall-gdn               | gated_deltanet ×2 (2 h)  | fixed                                    |
| recall-mamba2-ska        | mamba2, ska (chunk mode) | fixed; **no mask** (the headline)        |
| recall-mamba2-ska-prefix | mamba2, ska (prefix)     | fixed; the **oracle** prefix mask        |
| recall-fdm               | fdm ×2 (MQAR variant)    | fixed: scan + global top-16 cache        |

Which presets read the oracle mask is decided by :func:`oracle_mask` (SKA in prefix/masked
mode). ``vocab_size`` is overridden by the bench for other tasks.
"""

from __future__ import annotations

from kvfree.models.config import ModelConfig

D, VOCAB = 64, 192
_MAMBA = dict(expand=2, head_dim=32, d_state=16)
_SKA = dict(num_heads=4, rank=16, chunk_size=16)


def _cfg(layers: list[str], **options) -> ModelConfig:
    return ModelConfig(vocab_size=VOCAB, d_model=D, layers=layers, mixer_options=options)


PRESETS = {
    "recall-attention": lambda: _cfg(["attention", "attention"],
                                     attention=dict(num_heads=2, positions="rope")),
    "recall-mamba2": lambda: _cfg(["mamba2", "mamba2"], mamba2=_MAMBA),
    "recall-gdn": lambda: _cfg(["gated_deltanet", "gated_deltanet"],
                               gated_deltanet=dict(num_heads=2)),
    "recall-mamba2-ska": lambda: _cfg(["mamba2", "ska"], mamba2=_MAMBA,
                                      ska=dict(_SKA, mode="chunk")),
    "recall-mamba2-ska-token": lambda: _cfg(["mamba2", "ska"], mamba2=_MAMBA,
                                            ska=dict(_SKA, mode="token")),
    "recall-mamba2-ska-prefix": lambda: _cfg(["mamba2", "ska"], mamba2=_MAMBA,
                                             ska=dict(_SKA, mode="prefix")),
    "recall-fdm": lambda: ModelConfig(vocab_size=VOCAB, d_model=D, layers=["fdm", "fdm"],
                                      mixer_options={"fdm": {"variant": "mqar", "top_k": 16}},
                                      norm="layer"),
}


def oracle_mask(cfg: ModelConfig) -> bool:
    """True when a layer is SKA in ``prefix``/``masked`` mode: it must be fed the task's
    oracle prefix mask (reported separately, labelled, ska.md §16)."""
    return any(name == "ska" and cfg.options_for(i).get("mode") in ("prefix", "masked")
               for i, name in enumerate(cfg.layers))
