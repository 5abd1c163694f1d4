"""The one contract every token mixer implements (docs/design.md §1).

    y, state   = mixer(x, state=None, mask=None, *, left_pad=None)  # parallel: [B, T, D]
    state      = mixer.init_state(batch, device=..., dtype=...)
    y_t, state = mixer.step(x_t, state, mask=None)  # recurrent: x_t [B, D]

``forward`` accepts an initial state and returns the state after ``x``, so chunked prefill
(``mixer(x[:, :a])`` then ``mixer(x[:, a:], state)``) equals ``mixer(x)``. A mixer may update
state tensors in place: callers that need the old state keep a ``kvfree.clone_state`` copy.

``mask`` ([B, T] or [B], 1 = the token writes to memory) is only accepted by mixers with
``supports_mask = True`` (SKA's oracle prefix mask); others raise a clear error.

``left_pad`` ([B] integers, keyword of ``forward`` only) says that the first ``left_pad[b]``
positions of row b are padding, so that prompts of different lengths share a batch: padded
positions neither write to memory nor move positions, and their outputs are zero, so every row
gives exactly what its prompt gives alone. Padding may only come before a row's first token
(left padding; ``LanguageModel`` turns right padding into left padding); a chunk that is all
padding for a row leaves that row's state as it was. Mixers with ``supports_padding = True``
accept it; the others raise a clear error.

Every mixer documents its state size: ``state_formula()`` (a human-readable formula with the
numbers filled in) and ``state_size(seq_len)`` (carried elements after ``seq_len`` tokens),
which the contract tests compare with ``kvfree.state_bytes`` of the real state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from kvfree.state import RowInts, map_tensors


def _compact(t: torch.Tensor) -> torch.Tensor:
    """A state tensor that is a view into a larger (prefill-sized) buffer is copied, so the
    carried state does not pin O(T) memory after prefill."""
    if t.untyped_storage().nbytes() > 2 * t.numel() * t.element_size():
        return t.clone()
    return t


def head_width(d_model: int, num_heads: int, head_dim: int | None) -> int:
    """``head_dim``, or d_model / num_heads when it is None (which must divide)."""
    if head_dim is not None:
        return head_dim
    if d_model % num_heads:
        raise ValueError(
            f"d_model={d_model} is not divisible by num_heads={num_heads}; pass head_dim explicitly"
        )
    return d_model // num_heads


@dataclass(frozen=True)
class Padding:
    """Leading padding of one chunk: row b's first ``counts[b]`` of T positions are not tokens."""

    counts: torch.Tensor  # [B] int64
    mask: torch.Tensor  # [B, T] bool, True at padding

    @classmethod
    def of(cls, counts: torch.Tensor, T: int) -> Padding:
        counts = counts.to(torch.int64)
        return cls(counts, torch.arange(T, device=counts.device) < counts[:, None])

    def segments(self, size: int):
        """This padding cut into consecutive pieces of ``size`` positions (None where a piece
        has none), for mixers that run a chunk in segments."""
        T = self.mask.shape[1]
        for s in range(0, T, size):
            counts = (self.counts - s).clamp(0, min(size, T - s))
            yield Padding.of(counts, min(size, T - s)) if bool(counts.any()) else None

    def zero(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` [B, T, ...] with the padded positions set to 0."""
        return t.masked_fill(self.mask.view(*self.mask.shape, *[1] * (t.dim() - 2)), 0)


def grow_padding(old: tuple[int, ...] | None, seen: int, pad: Padding | None, who: str):
    """Leading padding slots per row of a cache that holds ``seen`` slots, after a chunk with
    ``pad`` (:class:`kvfree.state.RowInts`, metadata: not counted as state bytes; None = no
    padding)."""
    if pad is None:
        return old
    add = pad.counts.tolist()
    old = old or (0,) * len(add)
    if any(a and seen - o for o, a in zip(old, add)):
        raise ValueError(
            f"{who}: left_pad after a row's first token; padding may only precede a prompt "
            "(pad the whole prompt on the left)"
        )
    return RowInts(o + a for o, a in zip(old, add))


def key_padding_mask(rows, keys: torch.Tensor, queries: torch.Tensor | None = None):
    """Visibility [B, n, m] (or [B, 1, m] without ``queries``) of key slots at absolute
    indices ``keys`` [m] to queries at ``queries`` [n], given ``rows`` padding slots per row
    (None → None): padding keys are hidden from real queries; a padded query keeps its keys
    (its output is dropped), so no softmax row is empty."""
    if rows is None:
        return None
    p = torch.tensor(rows, device=keys.device)[:, None, None]
    real = keys[None, None, :] >= p
    return real if queries is None else real | (queries[None, :, None] < p)


def row_positions(pos: torch.Tensor, rows) -> torch.Tensor:
    """Text positions of slots ``pos`` [T] per row, [B, 1, T] (broadcasts over heads): the
    slot index minus the row's leading padding; ``pos`` itself without padding (rows None)."""
    if rows is None:
        return pos
    return (pos - torch.tensor(rows, device=pos.device)[:, None]).clamp_min(0)[:, None]


def formula(*terms: tuple[str, str, str | None]) -> str:
    """``state_formula`` text from (symbols, numbers, note or None) terms:
    ``formula(("4·D", "4·64", "complex states"), ("(k−1)·D", "3·64", "conv buffer"))`` →
    ``"4·D + (k−1)·D = 4·64 + 3·64 (complex states; conv buffer)"``."""
    notes = [n for _, _, n in terms if n]
    text = " + ".join(s for s, _, _ in terms) + " = " + " + ".join(v for _, v, _ in terms)
    return text + (f" ({'; '.join(notes)})" if notes else "")


class Mixer(nn.Module):
    """Base class for token mixers. Subclasses implement ``_forward``, ``_step``,
    ``init_state``, ``state_formula`` and ``state_size``."""

    name: ClassVar[str] = ""
    #: True when the carried state does not grow with the sequence (everything but full attention).
    fixed_memory: ClassVar[bool] = True
    #: True when the mixer accepts a write mask (SKA prefix/masked modes).
    supports_mask: ClassVar[bool] = False
    #: True when a prompt may run through the parallel form in segments, each continuing from
    #: the state the previous one returned, with the result of one pass (the chunked-prefill
    #: invariant); False for non-causal modes (SKA prefix/masked: one operator per sequence).
    causal: ClassVar[bool] = True
    #: True when ``forward`` takes ``left_pad`` (a batch of prompts of different lengths).
    supports_padding: ClassVar[bool] = False
    #: True when the mixer is a whole residual block (own norms, residuals, MLP), e.g. FDM's layer.
    is_block: ClassVar[bool] = False

    def __init__(self, d_model: int):
        super().__init__()
        if d_model <= 0:
            raise ValueError(f"d_model must be positive, got {d_model}")
        self.d_model = d_model

    # ----- public contract ------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        state: Any = None,
        mask: torch.Tensor | None = None,
        *,
        left_pad: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Any]:
        self._check_input(x, 3)
        mask = self._check_mask(mask, x.shape[:2])
        pad = self._check_padding(left_pad, x)
        if state is None:
            state = self.init_state(x.shape[0], device=x.device, dtype=x.dtype)
        if x.shape[1] == 0:  # empty chunk: nothing to mix, the state is unchanged
            return x.new_zeros(x.shape), state
        if pad is None:
            y, state = self._forward(x, state, mask)
        else:
            y, state = self._forward(x, state, mask, pad)
            y = pad.zero(y)
        return y, map_tensors(state, _compact)

    def step(
        self, x_t: torch.Tensor, state: Any, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, Any]:
        self._check_input(x_t, 2)
        mask = self._check_mask(mask, x_t.shape[:1])
        if state is None:
            raise ValueError(
                f"{type(self).__name__}.step needs a state: call init_state(batch) or prefill first"
            )
        return self._step(x_t, state, mask)

    def init_state(self, batch: int, *, device=None, dtype=None) -> Any:
        raise NotImplementedError

    def state_formula(self) -> str:
        """Carried elements per layer: ``"<symbols> = <the same with numbers>"`` with exactly
        one ``" = "`` (e.g. ``"H·F·d_v = 2·32·32"``), optionally followed by a note in
        parentheses; :func:`formula` builds one from terms."""
        raise NotImplementedError

    def state_size(self, seq_len: int) -> int:
        """Carried state elements per layer after ``seq_len`` tokens (analytic count)."""
        raise NotImplementedError

    def state_nbytes(self, seq_len: int, dtype: torch.dtype = torch.float32) -> int:
        """Carried bytes per sequence after ``seq_len`` tokens for a model in ``dtype``.

        Default: ``state_size × itemsize``. Mixers whose state mixes dtypes (fp32 scan states
        in a bf16 model, int64 indices) override it, so the analytic figure stays exact."""
        return int(self.state_size(seq_len)) * torch.empty((), dtype=dtype).element_size()

    # ----- to implement ---------------------------------------------------------------------
    def _forward(self, x: torch.Tensor, state: Any, mask: torch.Tensor | None):
        raise NotImplementedError

    def _step(self, x_t: torch.Tensor, state: Any, mask: torch.Tensor | None):
        raise NotImplementedError

    # ----- input checks ---------------------------------------------------------------------
    def _check_input(self, x: torch.Tensor, ndim: int) -> None:
        shape = "[batch, seq, d_model]" if ndim == 3 else "[batch, d_model]"
        if not isinstance(x, torch.Tensor) or x.dim() != ndim or x.shape[-1] != self.d_model:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                f"{type(self).__name__} expects x of shape {shape} with d_model={self.d_model}, "
                f"got {got}"
            )
        if not x.is_floating_point():
            raise TypeError(f"{type(self).__name__} expects a floating-point input, got {x.dtype}")

    def _check_mask(self, mask, shape) -> torch.Tensor | None:
        if mask is None:
            return None
        if not self.supports_mask:
            raise ValueError(
                f"{type(self).__name__} does not take a write mask; only mixers with "
                "supports_mask=True (e.g. SKA in prefix/masked mode) accept one"
            )
        if tuple(mask.shape) != tuple(shape):
            raise ValueError(f"mask must have shape {tuple(shape)}, got {tuple(mask.shape)}")
        return mask

    def _check_padding(self, left_pad, x: torch.Tensor) -> Padding | None:
        """``left_pad`` [B] integers in [0, T] → :class:`Padding` (None when nothing is padded)."""
        if left_pad is None:
            return None
        B, T = x.shape[:2]
        if (
            not isinstance(left_pad, torch.Tensor)
            or left_pad.shape != (B,)
            or left_pad.is_floating_point()
        ):
            got = tuple(left_pad.shape) if isinstance(left_pad, torch.Tensor) else left_pad
            raise ValueError(f"left_pad must be an integer tensor of shape ({B},), got {got}")
        if bool(((left_pad < 0) | (left_pad > T)).any()):
            raise ValueError(
                f"left_pad counts must lie in [0, {T}] (the chunk length), got {left_pad.tolist()}"
            )
        if not bool(left_pad.any()):
            return None
        if not self.supports_padding:
            raise ValueError(
                f"{type(self).__name__} does not take padded batches (left_pad) yet; run "
                "prompts of equal length together, or one at a time"
            )
        return Padding.of(left_pad.to(x.device), T)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}"
