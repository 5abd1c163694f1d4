"""Token mixers, one file each, all implementing :class:`kvfree.mixers.base.Mixer`.

The registry maps a layer name to ``module:Class``; modules are imported on first use, so a
missing optional piece never breaks ``import kvfree``.
"""

from __future__ import annotations

import importlib

from kvfree.mixers.base import Mixer
from kvfree.utils import call_with_options, unknown_keys_error

_REGISTRY: dict[str, str] = {
    "shortconv": "kvfree.mixers.shortconv:ShortConv",
    "linear_attention": "kvfree.mixers.linear_attention:LinearAttention",
    "attention": "kvfree.mixers.attention:Attention",
    "mla": "kvfree.mixers.mla:MLA",
    "attention_h2o": "kvfree.mixers.kv_evict:H2OAttention",
    "attention_snapkv": "kvfree.mixers.kv_evict:SnapKVAttention",
    "mamba2": "kvfree.mixers.mamba2:Mamba2",
    "mamba3": "kvfree.mixers.mamba3:Mamba3",
    "deltanet": "kvfree.mixers.deltanet:DeltaNet",
    "gated_deltanet": "kvfree.mixers.gated_deltanet:GatedDeltaNet",
    "kda": "kvfree.mixers.kda:KimiDeltaAttention",
    "gdn2": "kvfree.mixers.gdn2:GatedDeltaNet2",
    "mesanet": "kvfree.mixers.mesanet:MesaNet",
    "ska": "kvfree.mixers.ska:SKA",
    "fan": "kvfree.mixers.fan:FanScan",
    "lgcache": "kvfree.mixers.lgcache:LocalGlobalCache",
    "fdm": "kvfree.mixers.fdm_block:FDMBlock",
}

__all__ = ["Mixer", "available", "build_mixer", "get_mixer_class", "names"]


def names() -> list[str]:
    """Every registered mixer name (whether or not its module imports)."""
    return list(_REGISTRY)


def get_mixer_class(name: str) -> type[Mixer]:
    if name not in _REGISTRY:
        raise unknown_keys_error("mixer name", [name], _REGISTRY)
    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def available() -> list[str]:
    """Mixer names whose module imports on this installation."""
    out = []
    for name in _REGISTRY:
        try:
            get_mixer_class(name)
        except ImportError:
            continue
        out.append(name)
    return out


def build_mixer(name: str, d_model: int, **options) -> Mixer:
    """Construct mixer ``name``; unknown options raise a ValueError listing the valid ones."""
    cls = get_mixer_class(name)
    return call_with_options(cls, f"option for mixer {name!r}", d_model, **options)
