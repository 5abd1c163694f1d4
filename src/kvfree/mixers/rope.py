"""Rotary position embedding (RoPE; Su et al. 2021, RoFormer, arXiv 2104.09864), half-split
layout (GPT-NeoX / Llama convention).

A head vector x ∈ ℝ^d is read as d/2 pairs (x_i, x_{i+d/2}); pair i at position p is rotated by
the angle p·θ_i with θ_i = base^{-2i/d}:

    rope(x, p) = [x₁ ⊙ cos(pθ) − x₂ ⊙ sin(pθ),  x₂ ⊙ cos(pθ) + x₁ ⊙ sin(pθ)],   x = [x₁, x₂]

so ⟨rope(q, p), rope(k, p')⟩ depends on p − p' only. Angles are formed in float64 (positions
reach 65 536 and more) and the rotation runs in fp32 for half-precision inputs.
"""

from __future__ import annotations

import torch

from kvfree.linalg import upcast


def rope_cos_sin(
    positions: torch.Tensor, dim: int, base: float = 10000.0, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of the angles p·θ_i for integer ``positions`` [...] -> two tensors [..., dim/2]."""
    if dim % 2:
        raise ValueError(f"RoPE needs an even head dimension, got {dim}")
    i = torch.arange(dim // 2, device=positions.device, dtype=torch.float64)
    inv_freq = base ** (-2.0 * i / dim)  # θ_i  [dim/2]
    ang = positions.to(torch.float64).unsqueeze(-1) * inv_freq  # [..., dim/2]
    return ang.cos().to(dtype), ang.sin().to(dtype)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotate x [..., n, d] at integer ``positions`` [n] (or broadcastable to x[..., :1])."""
    xf = upcast(x)
    cos, sin = rope_cos_sin(positions, x.shape[-1], base, xf.dtype)
    x1, x2 = xf.chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.to(x.dtype)
