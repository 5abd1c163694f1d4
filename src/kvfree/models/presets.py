"""Named model presets.

Each preset module exposes ``PRESETS: dict[str, Callable[[], ModelConfig]]`` and optionally
``PAPER_PARAMS: dict[str, int]`` (the parameter count its paper quotes). Modules are imported
on first use; ``preset(name, **overrides)`` applies keyword overrides (e.g. ``vocab_size``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from kvfree.models.config import ModelConfig
from kvfree.utils import unknown_keys_error

_PRESET_MODULES = (
    "kvfree.models.presets_base",
    "kvfree.models.presets_recall",
    "kvfree.models.presets_echo",
    "kvfree.models.presets_decode",
    "kvfree.models.presets_fdm",
    "kvfree.models.presets_lm",
)


def _all() -> dict[str, Callable[..., ModelConfig]]:
    out: dict[str, Callable[..., ModelConfig]] = {}
    for mod in _PRESET_MODULES:
        out.update(importlib.import_module(mod).PRESETS)
    return out


def paper_params(name: str) -> int | None:
    """The parameter count a paper quotes for preset ``name`` (``PAPER_PARAMS`` in its module)."""
    for mod in _PRESET_MODULES:
        table = getattr(importlib.import_module(mod), "PAPER_PARAMS", {})
        if name in table:
            return table[name]
    return None


def preset_names() -> list[str]:
    return sorted(_all())


def preset(name: str, **overrides) -> ModelConfig:
    """The :class:`ModelConfig` of preset ``name``, with keyword overrides."""
    table = _all()
    if name not in table:
        raise unknown_keys_error("preset", [name], table)
    cfg = table[name]()
    if overrides:
        cfg = ModelConfig.from_dict({**cfg.to_dict(), **overrides})
    return cfg
