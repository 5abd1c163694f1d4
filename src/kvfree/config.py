"""Strict dataclass configs: unknown keys raise an error naming the closest valid key."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, TypeVar

from kvfree.utils import unknown_keys_error

T = TypeVar("T")


def from_dict(cls: type[T], data: dict[str, Any], kind: str | None = None) -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys raise ``ValueError``."""
    if not isinstance(data, dict):
        raise TypeError(f"{cls.__name__} config must be a dict, got {type(data).__name__}")
    valid = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = set(data) - valid
    if unknown:
        raise unknown_keys_error(kind or f"{cls.__name__} key", unknown, valid)
    return cls(**data)


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def load_json(cls: type[T], path: str | Path) -> T:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); fix or regenerate the file") from e
    return from_dict(cls, data, kind=f"{cls.__name__} key in {path}")
