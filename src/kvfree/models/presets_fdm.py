"""Fan Duality Model presets (docs/fdm.md §8) and their Transformer comparisons.

| preset                       | what                                                           |
|------------------------------|----------------------------------------------------------------|
| fdm-137m                     | the paper's LM: d 576, 12 FDM layers (W 256, K 16), SwiGLU 2304, |
|                              | cl100k vocab 100 277 tied, learned positions (1 040 slots)     |
| fdm-137m-transformer         | [project] KV-cached pre-LN Transformer, d 576, 8 heads, GELU   |
|                              | 2304, learned positions; 20 layers = 138.09M (+0.75 %)          |
| fdm-mqar-k0/-k4/-k8/-k16     | the d = 64, 2-layer MQAR networks (§8.2; K = 0 is "scan only")  |
| fdm-mqar-transformer         | 2-layer pre-LN Transformer, 4 heads, GELU 256, no positions     |
| fdm-mqar-transformer-rope    | the same with RoPE (the positional control)                     |
| fdm-tiny                     | CPU LM: d 128, 4 layers, W 64, K 8, vocab 256 (1.57M params)    |
| fdm-debug                    | the original ``debug`` config: d 128, 2 layers, K 8, W 64       |

The MQAR networks embed as the original ``mqar.py`` does: nn.Embedding's default N(0, 1) init
and an untied output head (``MQAR_INIT``). With the LM default (0.02, tied) the Transformer sat
at 0.11 on Easy after 40 epochs while FDM K = 16 reached 0.999.

Override anything with ``preset(name, vocab_size=..., max_len=...)``. Every FDM preset keeps
one W for training and evaluation (docs/fdm.md §4.4).
"""

from __future__ import annotations

from kvfree.models.config import ModelConfig

CL100K = 100_277
MQAR_VOCAB = 522  # the original mqar.py's embedding/output size (ids ≥ 258 unused)
#: mqar.py: nn.Embedding (N(0, 1)) and an nn.Linear head (U(±1/√d): std 1/√(3·64))
MQAR_INIT = dict(init_std=1.0, tie_embeddings=False, head_init_std=(3 * 64) ** -0.5)

PAPER_PARAMS = {
    "fdm-137m": 137_063_356,
}


def _fdm_lm(
    d: int,
    layers: int,
    window: int,
    top_k: int,
    *,
    vocab: int,
    max_len: int,
    dropout: float = 0.0,
    **opts,
) -> ModelConfig:
    return ModelConfig(
        vocab_size=vocab,
        d_model=d,
        layers=["fdm"] * layers,
        mixer_options={
            "fdm": {"variant": "lm", "window": window, "top_k": top_k, "dropout": dropout, **opts}
        },
        norm="layer",
        pos_emb="learned",
        max_len=max_len,
        dropout=dropout,
    )


def _mqar_fdm(k: int) -> ModelConfig:
    opts = {"variant": "scan_only"} if k == 0 else {"variant": "mqar", "top_k": k}
    return ModelConfig(
        vocab_size=MQAR_VOCAB,
        d_model=64,
        layers=["fdm", "fdm"],
        mixer_options={"fdm": opts},
        norm="layer",
        **MQAR_INIT,
    )


def _mqar_transformer(positions: str) -> ModelConfig:
    return ModelConfig(
        vocab_size=MQAR_VOCAB,
        d_model=64,
        layers=["attention", "attention"],
        mixer_options={"attention": {"num_heads": 4, "positions": positions}},
        mlp="gelu",
        d_ff=256,
        norm="layer",
        **MQAR_INIT,
    )


PRESETS = {
    "fdm-137m": lambda: _fdm_lm(576, 12, 256, 16, vocab=CL100K, max_len=1040, dropout=0.1),
    "fdm-137m-transformer": lambda: ModelConfig(
        vocab_size=CL100K,
        d_model=576,
        layers=["attention"] * 20,
        mixer_options={"attention": {"num_heads": 8, "positions": "none"}},
        mlp="gelu",
        d_ff=2304,
        norm="layer",
        pos_emb="learned",
        max_len=1040,
        dropout=0.1,
    ),
    "fdm-mqar-k0": lambda: _mqar_fdm(0),
    "fdm-mqar-k4": lambda: _mqar_fdm(4),
    "fdm-mqar-k8": lambda: _mqar_fdm(8),
    "fdm-mqar-k16": lambda: _mqar_fdm(16),
    "fdm-mqar-transformer": lambda: _mqar_transformer("none"),
    "fdm-mqar-transformer-rope": lambda: _mqar_transformer("rope"),
    "fdm-tiny": lambda: _fdm_lm(128, 4, 64, 8, vocab=256, max_len=1040),
    "fdm-debug": lambda: _fdm_lm(128, 2, 64, 8, vocab=256, max_len=1040),
}
