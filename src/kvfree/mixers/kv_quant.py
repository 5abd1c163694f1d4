"""A quantised KV cache for :class:`~kvfree.mixers.attention.Attention` (``kv_bits=8|4|2``;
docs/frontier.md: KV-cache engineering; KIVI, Liu et al., arXiv 2402.02750, stores the cache in
2–4 bits with per-group scales).

Glossary (per KV head and token t; ``b`` bits, groups of G channels of d_h):
    m, s         per group: m = min over its G channels, s = (max − min)/(2^b − 1), both stored in
                 ``scale_dtype`` (fp16 by default, as KIVI)
    c_t          codes round((x − m)/s) clamped to [0, 2^b − 1]; 8/b codes per byte (4 bits: two,
                 2 bits: four), channel 8/b·i + j in bits [b·j, b·j + b) of byte i
    x̂_t         c·s + m — what attention reads, in the parallel form and in decode alike
    gradient     the exact one almost everywhere: the codes are piecewise constant, so it flows
                 through s and m only — the same in the parallel form and in decode (a
                 straight-through estimator could not be: decode reads only the stored codes).
                 Quantise a model trained in full precision (KIVI is tuning-free): load its
                 weights into a ``kv_bits`` layer, the parameters are the same

Quantisation is **per token** for keys and values (each cached vector is coded on its own), so it
is causal: the parallel form reads x̂ of every key, exactly what decode stores, and the mixer
contract (parallel = step = chunked prefill) holds exactly. KIVI itself quantises keys per
channel over blocks of tokens with a full-precision residual: :mod:`kvfree.mixers.kv_kivi`
(``kv_residual=R``).

Carried bytes per token and KV head: 2·(d_h·b/8 + 2·(d_h/G)·|scale|) — the codes and the
(scale, min) pairs of keys and values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvfree.state import State

SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class QuantKVCache(State):
    """Codes [B, n_kv, T, d_h·b/8] (uint8) and per-group (scale, min) [B, n_kv, T, d_h/G] of
    keys (RoPE applied) and values; ``length`` = tokens seen."""

    k_codes: torch.Tensor
    k_scale: torch.Tensor
    k_min: torch.Tensor
    v_codes: torch.Tensor
    v_scale: torch.Tensor
    v_min: torch.Tensor
    length: int = 0
    pad: tuple[int, ...] | None = None  # leading padding slots per row (left-padded prompts)

    @property
    def filled(self) -> int:
        return self.k_codes.shape[2]

    def keys(self, bits: int, dtype) -> torch.Tensor:
        return dequantize(self.k_codes, self.k_scale, self.k_min, bits, dtype)

    def values(self, bits: int, dtype) -> torch.Tensor:
        return dequantize(self.v_codes, self.v_scale, self.v_min, bits, dtype)


def empty_cache(batch: int, n_kv: int, head_dim: int, bits: int, group: int, scale_dtype, device):
    codes = torch.zeros(batch, n_kv, 0, head_dim * bits // 8, dtype=torch.uint8, device=device)
    scales = torch.zeros(batch, n_kv, 0, head_dim // group, dtype=scale_dtype, device=device)
    return QuantKVCache(
        codes, scales, scales.clone(), codes.clone(), scales.clone(), scales.clone()
    )


def quantize(x: torch.Tensor, bits: int, group: int, scale_dtype):
    """x [..., d] → (codes [..., d·bits/8] uint8, scale [..., d/group], min [..., d/group])."""
    levels = 2**bits - 1
    g = x.unflatten(-1, (-1, group))  # [..., n_groups, G]
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / levels).to(scale_dtype)
    lo = lo.to(scale_dtype)
    with torch.no_grad():
        s = scale.to(x.dtype).unsqueeze(-1)
        safe = torch.where(s > 0, s, torch.ones_like(s))
        codes = ((g - lo.to(x.dtype).unsqueeze(-1)) / safe).round().clamp(0, levels)
        codes = codes.flatten(-2).to(torch.uint8)
    return pack(codes, bits), scale, lo


def codes_per_byte(bits: int) -> int:
    return 8 // bits


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., d] of ``bits`` bits → [..., d·bits/8]: 8/bits per byte, the first
    channel of a byte in its low bits."""
    per = codes_per_byte(bits)
    if per == 1:
        return codes
    parts = codes.unflatten(-1, (-1, per)).unbind(-1)
    out = parts[0].clone()
    for j, part in enumerate(parts[1:], 1):
        out |= part << (bits * j)
    return out


def unpack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of :func:`pack`: [..., d·bits/8] → [..., d]."""
    per = codes_per_byte(bits)
    if per == 1:
        return codes
    mask = 2**bits - 1
    return torch.stack([(codes >> (bits * j)) & mask for j in range(per)], -1).flatten(-2)


def dequantize(codes, scale, lo, bits: int, dtype) -> torch.Tensor:
    """x̂ = c·s + m in ``dtype``, [..., d]."""
    c = unpack(codes, bits).to(dtype).unflatten(-1, (scale.shape[-1], -1))
    return (c * scale.to(dtype).unsqueeze(-1) + lo.to(dtype).unsqueeze(-1)).flatten(-2)


def round_trip(x: torch.Tensor, bits: int, group: int, scale_dtype):
    """(x̂ = what attention reads, (codes, scale, min) = what the cache stores)."""
    q = quantize(x, bits, group, scale_dtype)
    return dequantize(*q, bits, x.dtype), q


def append(cache: QuantKVCache, kq: tuple, vq: tuple, tokens: int) -> QuantKVCache:
    """The cache with T new quantised keys and values appended along the token axis."""
    with torch.autocast(cache.k_codes.device.type, enabled=False):  # fp16 scales on CPU
        parts = [
            torch.cat([old, new], dim=2)
            for old, new in zip(
                (cache.k_codes, cache.k_scale, cache.k_min)
                + (cache.v_codes, cache.v_scale, cache.v_min),
                (*kq, *vq),
            )
        ]
    return QuantKVCache(*parts, length=cache.length + tokens, pad=cache.pad)


def nbytes_per_token(n_kv: int, head_dim: int, bits: int, group: int, scale_dtype) -> int:
    """Carried bytes per token (all KV heads, keys and values)."""
    return 2 * n_kv * (head_dim * bits // 8 + 2 * (head_dim // group) * scale_dtype.itemsize)
