"""CPU language-model presets of similar size (≈2M parameters at a 2048-token BPE vocab) for
the corpus runs of ``kvfree train`` (README "Language modelling"): the same width (d = 192),
depth (4 blocks) and SwiGLU MLP, differing only in the token mixer.

| preset          | layers                         | mixer options                              |
|-----------------|--------------------------------|--------------------------------------------|
| lm-transformer  | attention ×4                   | 3 heads × 64, RoPE, KV cache               |
| lm-mamba2       | mamba2 ×4                      | expand 2, head_dim 64, d_state 16, conv 4  |
| lm-echo         | mamba2, ska, mamba2, ska       | SKA: 4 heads, r 24, chunk 16, K 2      |

The FDM run uses the FDM engineer's ``fdm-tiny`` (d 128, 4 layers, W 64, K 8) with the vocab
overridden. ``vocab_size`` defaults to 256 (bytes); ``kvfree train`` sets it from the
tokenizer.
"""

from __future__ import annotations

from kvfree.models.config import ModelConfig

_D, _N = 192, 4
_MAMBA = dict(expand=2, head_dim=64, d_state=16, d_conv=4)
_SKA = dict(num_heads=4, rank=24, chunk_size=16, K=2, eps=1e-3, mode="chunk")


def _lm(layers: list[str], **options) -> ModelConfig:
    return ModelConfig(
        vocab_size=256,
        d_model=_D,
        layers=layers,
        mixer_options=options,
        mlp="swiglu",
        tie_embeddings=True,
    )


PRESETS = {
    "lm-transformer": lambda: _lm(
        ["attention"] * _N, attention=dict(num_heads=3, positions="rope")
    ),
    "lm-mamba2": lambda: _lm(["mamba2"] * _N, mamba2=_MAMBA),
    "lm-echo": lambda: _lm(["mamba2", "ska"] * (_N // 2), mamba2=_MAMBA, ska=_SKA),
}
