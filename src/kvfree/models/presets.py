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
    """The :class:`ModelConfig` of preset ``name``, with keyword overrides: a config field
    (``vocab_size=…``) or ``<mixer>.<option>`` for the options of every layer of that mixer
    (``**{"ska.K": 1}``; checked against the mixer when the model is built)."""
    table = _all()
    if name not in table:
        raise unknown_keys_error("preset", [name], table)
    cfg = table[name]()
    if not overrides:
        return cfg
    data = cfg.to_dict()
    for key, value in overrides.items():
        if "." not in key:
            data[key] = value
            continue
        mixer, option = key.split(".", 1)
        if mixer not in data["layers"]:
            raise ValueError(
                f"override {key!r}: preset {name!r} has no {mixer!r} layer "
                f"(its layers: {', '.join(data['layers'])})"
            )
        data["mixer_options"] = {**data["mixer_options"]}
        data["mixer_options"][mixer] = {**data["mixer_options"].get(mixer, {}), option: value}
    return ModelConfig.from_dict(data)
