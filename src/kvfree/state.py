"""Decode states: small dataclasses of tensors, and how their size is counted.

A mixer's state is a ``@dataclass`` (conventionally subclassing :class:`State`). Tensor fields
are carried between steps; plain Python ints/floats/bools (position counters, flags) are
metadata and are not counted. Nested dataclasses, lists, tuples and dicts are walked.
A state class may define ``carried_bytes()`` to override the count (the KV cache does this:
it preallocates capacity but carries only the filled ``2·T·d`` entries).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch


@dataclasses.dataclass
class State:
    """Base class for mixer states (optional; any dataclass of tensors works)."""


class RowInts(tuple):
    """Per-row integers kept as metadata in a state (e.g. each row's leading padding slots):
    not counted as carried bytes, reordered with the rows by :func:`select_rows`."""


def carried_dtype(dtype: torch.dtype | None = None) -> torch.dtype:
    """The dtype recurrent states and statistics are carried in for a model in ``dtype``
    (default: torch's default dtype): float64 stays float64, everything else — fp32, bf16,
    fp16 — is fp32, as fla does, so a bf16 model does not run a recurrence over 64k steps in
    bf16 (docs/design.md §3). Buffers of past inputs (conv windows, KV caches) keep the model
    dtype."""
    dtype = dtype or torch.get_default_dtype()
    return torch.float64 if dtype == torch.float64 else torch.float32


def mixed_nbytes(carried: int, buffered: int, dtype: torch.dtype) -> int:
    """Bytes of a state with ``carried`` elements in :func:`carried_dtype` and ``buffered``
    elements (conv windows, caches) in the model ``dtype``."""
    return carried * carried_dtype(dtype).itemsize + buffered * dtype.itemsize


def state_bytes(state: Any) -> int:
    """Bytes of the tensors carried between decode steps (weights excluded)."""
    if state is None:
        return 0
    if hasattr(state, "carried_bytes"):
        return int(state.carried_bytes())
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if dataclasses.is_dataclass(state) and not isinstance(state, type):
        return sum(state_bytes(getattr(state, f.name)) for f in dataclasses.fields(state))
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(s) for s in state)
    if isinstance(state, dict):
        return sum(state_bytes(s) for s in state.values())
    return 0


def map_tensors(state: Any, fn) -> Any:
    """Apply ``fn`` to every tensor in a (nested) state, returning a new state."""
    if isinstance(state, torch.Tensor):
        return fn(state)
    if isinstance(state, RowInts):
        return state
    if dataclasses.is_dataclass(state) and not isinstance(state, type):
        return dataclasses.replace(
            state,
            **{f.name: map_tensors(getattr(state, f.name), fn) for f in dataclasses.fields(state)},
        )
    if isinstance(state, list):
        return [map_tensors(s, fn) for s in state]
    if isinstance(state, tuple):
        return tuple(map_tensors(s, fn) for s in state)
    if isinstance(state, dict):
        return {k: map_tensors(v, fn) for k, v in state.items()}
    return state


def clone_state(state: Any) -> Any:
    """Deep copy of a state (tensors cloned), so the original can be reused after ``step``."""
    return map_tensors(state, lambda t: t.clone())


def iter_tensors(state: Any):
    """Yield every tensor of a (nested) state, in field order."""
    out: list[torch.Tensor] = []
    map_tensors(state, lambda t: out.append(t) or t)
    yield from out


def select_rows(state: Any, rows: torch.Tensor) -> Any:
    """The state of batch rows ``rows`` (indices [n], repeats allowed): every tensor is indexed
    along its first (batch) dimension, per-row metadata (:class:`RowInts`) likewise — what beam
    search does to the state when it reorders its beams."""
    order = rows.tolist()

    def pick(t):
        return t.index_select(0, rows.to(t.device)) if t.dim() else t

    def walk(s):
        if isinstance(s, RowInts):
            return RowInts(s[i] for i in order)
        if isinstance(s, torch.Tensor):
            return pick(s)
        if dataclasses.is_dataclass(s) and not isinstance(s, type):
            return dataclasses.replace(
                s, **{f.name: walk(getattr(s, f.name)) for f in dataclasses.fields(s)}
            )
        if isinstance(s, (list, tuple)):
            return type(s)(walk(x) for x in s)
        if isinstance(s, dict):
            return {k: walk(v) for k, v in s.items()}
        return s

    return walk(state)
