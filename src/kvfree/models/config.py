"""``ModelConfig``: everything needed to rebuild a :class:`LanguageModel`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvfree.config import from_dict, to_dict


@dataclass
class ModelConfig:
    """A stack of blocks ``norm → mixer → residual → norm → MLP → residual``.

    ``layers`` names one mixer per layer (``kvfree info`` lists them). ``mixer_options`` maps a
    mixer name to the options of every layer of that kind; ``layer_options`` maps a layer index
    (0-based) to options overriding those for that layer only. Options are checked against the
    mixer's constructor, so a typo raises instead of being ignored.
    """

    vocab_size: int
    d_model: int = 64
    layers: list[str] = field(default_factory=lambda: ["attention", "attention"])
    mixer_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    layer_options: dict[int, dict[str, Any]] = field(default_factory=dict)
    mlp: str = "swiglu"  # swiglu | gelu | koopman | none
    d_ff: int | None = None  # default: ceil(8/3·d / 64)·64 for swiglu, 4·d for gelu
    norm: str = "rms"  # rms | layer
    pos_emb: str = "none"  # none | learned (absolute, max_len slots)
    max_len: int | None = None  # hard limit on positions; required with pos_emb="learned"
    tie_embeddings: bool = True
    dropout: float = 0.0  # embedding dropout
    init_std: float = 0.02  # embeddings (and learned positions)
    head_init_std: float | None = None  # untied output head; None: init_std
    final_norm: bool = True

    def __post_init__(self):
        if self.vocab_size <= 0 or self.d_model <= 0:
            raise ValueError("vocab_size and d_model must be positive")
        if not self.layers:
            raise ValueError("layers is empty: give at least one mixer name, e.g. ['attention']")
        if self.pos_emb not in ("none", "learned"):
            raise ValueError(f"pos_emb must be 'none' or 'learned', got {self.pos_emb!r}")
        if self.pos_emb == "learned" and not self.max_len:
            raise ValueError("pos_emb='learned' needs max_len (the number of position slots)")
        # JSON turns int keys into strings; accept both.
        self.layer_options = {int(k): v for k, v in self.layer_options.items()}
        for i in self.layer_options:
            if not 0 <= i < len(self.layers):
                raise ValueError(
                    f"layer_options has index {i}, but there are {len(self.layers)} layers"
                )

    def options_for(self, i: int) -> dict[str, Any]:
        return {**self.mixer_options.get(self.layers[i], {}), **self.layer_options.get(i, {})}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return from_dict(cls, data, kind="model config key")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)
