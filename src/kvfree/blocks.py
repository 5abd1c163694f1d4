"""Building blocks shared by models: norms, MLPs, a stateful causal depthwise conv, and the
pre-norm residual block ``x + mixer(norm(x))``, ``x + mlp(norm(x))`` (docs/design.md §1)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kvfree import perf
from kvfree.fused import causal_conv
from kvfree.utils import unknown_keys_error


def build_norm(kind: str, d: int, eps: float = 1e-5) -> nn.Module:
    if kind == "rms":
        return nn.RMSNorm(d, eps=eps)
    if kind == "layer":
        return nn.LayerNorm(d, eps=eps)
    raise unknown_keys_error("norm", [kind], ["rms", "layer"])


def ffn_width(d_model: int, ratio: float, multiple: int = 64) -> int:
    """Hidden width ``ceil(d·ratio / multiple)·multiple`` (SwiGLU 8/3 convention)."""
    return int(-(-int(round(d_model * ratio)) // multiple) * multiple)


class SwiGLU(nn.Module):
    """``W_down(SiLU(W_gate x) ⊙ W_up x)``, no biases (Shazeer 2020)."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.gate = nn.Linear(d_model, d_ff, bias=False)
        self.up = nn.Linear(d_model, d_ff, bias=False)
        self.down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class GeluMLP(nn.Module):
    """``W_2 GELU(W_1 x + b_1) + b_2`` (the classic Transformer MLP)."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class KoopmanMLP(nn.Module):
    """Echo's Spectral Koopman MLP (docs/ska.md §12; paper §3.3), on the pre-normed input u:

        g = SiLU(W_lift u) ∈ ℝ^{d_k};  (g¹, g²) = first and second half of g (d_k/2 pairs)
        λ_i = γ_i + iω_i (γ_i = 1, ω_i ~ N(0, 0.1²) at init);  s_i = min(ρ_i, 1)/ρ_i, ρ_i = |λ_i|
        z¹ = s(γ g¹ + ω g²),  z² = s(−ω g¹ + γ g²)   (a 2×2 rotation-scaling per pair, radius ≤ 1)
        out = W_read [z¹; z²]   (optionally z ⊙ σ(W_gate u) before the readout)

    W_lift, W_read are Xavier-initialised and bias-free: 2·d·d_k + d_k parameters. The core is
    isotropic scaling × rotation with |λ| ≤ 1, *not* norm-preserving (docs/ska.md §17.16).
    """

    def __init__(self, d_model: int, d_ff: int, gate: bool = False, omega_std: float = 0.1):
        super().__init__()
        if d_ff <= 0 or d_ff % 2:
            raise ValueError(
                f"KoopmanMLP pairs its d_ff channels, so d_ff must be a positive "
                f"even number, got {d_ff}"
            )
        self.d_ff = d_ff
        self.lift = nn.Linear(d_model, d_ff, bias=False)
        self.read = nn.Linear(d_ff, d_model, bias=False)
        self.gate = nn.Linear(d_model, d_ff, bias=False) if gate else None
        nn.init.xavier_uniform_(self.lift.weight)
        nn.init.xavier_uniform_(self.read.weight)
        self.gamma = nn.Parameter(torch.ones(d_ff // 2))
        self.omega = nn.Parameter(torch.randn(d_ff // 2) * omega_std)

    def eigenvalues(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(Re λ̃, Im λ̃) after clamping the radius to ≤ 1."""
        rho = torch.sqrt(self.gamma**2 + self.omega**2).clamp_min(1e-12)
        s = rho.clamp(max=1.0) / rho
        return s * self.gamma, s * self.omega

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        g = F.silu(self.lift(u))
        g1, g2 = g.chunk(2, dim=-1)
        a, b = self.eigenvalues()
        z = torch.cat([a * g1 + b * g2, -b * g1 + a * g2], dim=-1)
        if self.gate is not None:
            z = z * torch.sigmoid(self.gate(u))
        return self.read(z)


_MLPS = {"swiglu": SwiGLU, "gelu": GeluMLP, "koopman": KoopmanMLP}


def register_mlp(name: str, cls) -> None:
    """Make an MLP class (``cls(d_model, d_ff)``) available to :func:`build_mlp`."""
    _MLPS[name] = cls


def build_mlp(kind: str, d_model: int, d_ff: int) -> nn.Module | None:
    if kind == "none":
        return None
    if kind not in _MLPS:
        raise unknown_keys_error("mlp", [kind], [*_MLPS, "none"])
    return _MLPS[kind](d_model, d_ff)


class CausalConv1d(nn.Module):
    """Depthwise causal conv over time with a carried buffer of the last ``k-1`` inputs.

    ``forward(x [B,T,C], buf [B,k-1,C]) -> (y [B,T,C], buf')``; ``step(x_t [B,C], buf)``.
    Output at t is ``bias + Σ_{i<k} w[:, i]·x_{t-k+1+i}`` (zero history before the start).
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int = 4,
        bias: bool = True,
        activation: str | None = "silu",
    ):
        super().__init__()
        if kernel_size < 1:
            raise ValueError(f"kernel_size must be >= 1, got {kernel_size}")
        self.channels, self.kernel_size = channels, kernel_size
        self.weight = nn.Parameter(torch.empty(channels, kernel_size))
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None
        self.activation = activation
        nn.init.uniform_(self.weight, -(kernel_size**-0.5), kernel_size**-0.5)

    def init_buffer(self, batch: int, device=None, dtype=None) -> torch.Tensor:
        return torch.zeros(batch, self.kernel_size - 1, self.channels, device=device, dtype=dtype)

    def _act(self, y: torch.Tensor) -> torch.Tensor:
        return F.silu(y) if self.activation == "silu" else y

    def forward(
        self, x: torch.Tensor, buf: torch.Tensor, pad=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``pad`` (:class:`kvfree.mixers.base.Padding`): padded inputs count as zeros, which
        is exact because padding only precedes a row's first token (its buffer is still 0)."""
        T, k = x.shape[1], self.kernel_size
        if pad is not None:
            x = pad.zero(x)
        xx = torch.cat([buf.to(x.dtype), x], dim=1)  # [B, k-1+T, C]
        new_buf = xx[:, xx.shape[1] - (k - 1) :]
        if perf.fast():  # k shifted multiply-adds, hand-written backward (perf.py, fused.py)
            bias = None if self.bias is None else self.bias.to(x.dtype)
            y = causal_conv(xx, self.weight.to(x.dtype), bias, silu=self.activation == "silu")
            return y, new_buf
        y = F.conv1d(xx.transpose(1, 2), self.weight.unsqueeze(1), self.bias, groups=self.channels)
        return self._act(y.transpose(1, 2)[:, :T]), new_buf

    def step(self, x_t: torch.Tensor, buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        window = torch.cat([buf.to(x_t.dtype), x_t.unsqueeze(1)], dim=1)  # [B, k, C]
        y = torch.einsum("bkc,ck->bc", window, self.weight)
        if self.bias is not None:
            y = y + self.bias
        return self._act(y), window[:, 1:]


class ResidualBlock(nn.Module):
    """Pre-norm residual block: ``x += mixer(norm1(x))``; ``x += mlp(norm2(x))``."""

    def __init__(self, mixer: nn.Module, d_model: int, mlp: nn.Module | None, norm: str = "rms"):
        super().__init__()
        self.norm1 = build_norm(norm, d_model)
        self.mixer = mixer
        self.norm2 = build_norm(norm, d_model) if mlp is not None else None
        self.mlp = mlp

    def forward(self, x: torch.Tensor, state: Any = None, mask=None, left_pad=None):
        h, state = self.mixer(self.norm1(x), state, mask, left_pad=left_pad)
        x = x + h
        if self.mlp is not None:
            x = x + self.mlp(self.norm2(x))
        return x, state

    def step(self, x_t: torch.Tensor, state: Any, mask=None):
        h, state = self.mixer.step(self.norm1(x_t), state, mask)
        x_t = x_t + h
        if self.mlp is not None:
            x_t = x_t + self.mlp(self.norm2(x_t))
        return x_t, state

    def init_state(self, batch: int, *, device=None, dtype=None):
        return self.mixer.init_state(batch, device=device, dtype=dtype)
