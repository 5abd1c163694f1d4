"""Small baseline presets (CPU-sized, d=64, 2 layers) for demos, tests and the recall bench."""

from __future__ import annotations

from kvfree.models.config import ModelConfig


def _tiny(layers: list[str], **kw) -> ModelConfig:
    return ModelConfig(
        vocab_size=kw.pop("vocab_size", 256), d_model=kw.pop("d_model", 64), layers=layers, **kw
    )


PRESETS = {
    "tiny-attention": lambda: _tiny(["attention", "attention"]),
    "tiny-linear": lambda: _tiny(["shortconv", "linear_attention"]),
    "tiny-mamba2": lambda: _tiny(["mamba2", "mamba2"]),
    "tiny-deltanet": lambda: _tiny(["shortconv", "deltanet"]),
    "tiny-gdn": lambda: _tiny(["gated_deltanet", "gated_deltanet"]),
    "tiny-mesanet": lambda: _tiny(["shortconv", "mesanet"]),
}
