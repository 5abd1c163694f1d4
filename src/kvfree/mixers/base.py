"""The one contract every token mixer implements (docs/design.md §1).

    y, state   = mixer(x, state=None, mask=None)   # parallel: x [B, T, D] -> y [B, T, D]
    state      = mixer.init_state(batch, device=..., dtype=...)
    y_t, state = mixer.step(x_t, state, mask=None)  # recurrent: x_t [B, D]

``forward`` accepts an initial state and returns the state after ``x``, so chunked prefill
(``mixer(x[:, :a])`` then ``mixer(x[:, a:], state)``) equals ``mixer(x)``. A mixer may update
state tensors in place: callers that need the old state keep a ``kvfree.clone_state`` copy.

``mask`` ([B, T] or [B], 1 = the token writes to memory) is only accepted by mixers with
``supports_mask = True`` (SKA's oracle prefix mask); others raise a clear error.

Every mixer documents its state size: ``state_formula()`` (a human-readable formula with the
numbers filled in) and ``state_size(seq_len)`` (carried elements after ``seq_len`` tokens),
which the contract tests compare with ``kvfree.state_bytes`` of the real state.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from kvfree.state import map_tensors


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
    #: True when the mixer is a whole residual block (own norms, residuals, MLP), e.g. FDM's layer.
    is_block: ClassVar[bool] = False

    def __init__(self, d_model: int):
        super().__init__()
        if d_model <= 0:
            raise ValueError(f"d_model must be positive, got {d_model}")
        self.d_model = d_model

    # ----- public contract ------------------------------------------------------------------
    def forward(
        self, x: torch.Tensor, state: Any = None, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, Any]:
        self._check_input(x, 3)
        mask = self._check_mask(mask, x.shape[:2])
        if state is None:
            state = self.init_state(x.shape[0], device=x.device, dtype=x.dtype)
        if x.shape[1] == 0:  # empty chunk: nothing to mix, the state is unchanged
            return x.new_zeros(x.shape), state
        y, state = self._forward(x, state, mask)
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

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}"
