"""Short gated causal convolution (zoology's BaseConv role in the "BASED recipe").

Glossary (shapes per token):
    x_t  [B, D]        input
    a_t  [B, D]        W_in x_t (value branch);  g_t = W_g x_t (gate)
    c_t  [B, D]        Σ_{i<k} w_i ⊙ a_{t-k+1+i} + b   (depthwise causal conv, kernel k)
    y_t  [B, D]        W_out (c_t ⊙ g_t)

State: the last k-1 values of a — ``(k-1)·D`` elements, constant in T.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kvfree.blocks import CausalConv1d
from kvfree.mixers.base import Mixer
from kvfree.state import State


@dataclass
class ShortConvState(State):
    buf: torch.Tensor  # [B, k-1, D]


class ShortConv(Mixer):
    """Short gated causal convolution (zoology's BaseConv): y_t = W_out((Σ_{i<k} w_i ⊙
    a_{t−k+1+i} + b) ⊙ g_t), a = W_in x, g = W_g x; state (k−1)·D. Full glossary in the module
    docstring."""

    name = "shortconv"
    supports_padding = True

    def __init__(self, d_model: int, *, kernel_size: int = 4, gate: bool = True):
        super().__init__(d_model)
        self.kernel_size, self.gate = kernel_size, gate
        self.in_proj = nn.Linear(d_model, 2 * d_model if gate else d_model, bias=False)
        self.conv = CausalConv1d(d_model, kernel_size, activation=None)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)

    def init_state(self, batch, *, device=None, dtype=None):
        return ShortConvState(self.conv.init_buffer(batch, device, dtype))

    def state_formula(self) -> str:
        return f"(k-1)·D = {self.kernel_size - 1}·{self.d_model}"

    def state_size(self, seq_len: int) -> int:
        return (self.kernel_size - 1) * self.d_model

    def _split(self, x):
        u = self.in_proj(x)
        return u.chunk(2, dim=-1) if self.gate else (u, None)

    def _forward(self, x, state, mask, pad=None):
        a, g = self._split(x)
        c, buf = self.conv(a, state.buf, pad)
        return self.out_proj(c * g if g is not None else c), ShortConvState(buf)

    def _step(self, x_t, state, mask):
        a, g = self._split(x_t)
        c, buf = self.conv.step(a, state.buf)
        return self.out_proj(c * g if g is not None else c), ShortConvState(buf)
