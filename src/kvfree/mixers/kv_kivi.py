"""KIVI's quantised KV cache (Liu et al., arXiv 2402.02750; docs/frontier.md §2) for
:class:`~kvfree.mixers.attention.Attention` (``kv_bits=8|4|2`` with ``kv_residual=R``).

Glossary (per KV head; b bits; blocks of R consecutive tokens, aligned to positions 0, R, 2R, …):
    keys         quantised **per channel** over a block: each of the d_h channels gets its own
                 (scale, min) over the block's R tokens — keys have outlier channels, which a
                 per-token code would smear over every channel (KIVI §3)
    values       quantised **per token** (groups of ``kv_group`` channels), as ``kv_quant``
    residual     the tokens of the unfinished block, kept exact (model dtype) until the block's
                 R-th token arrives; then the block is coded and the residual emptied
    reading rule query t reads token j quantised iff j's block is complete after token t,
                 (⌊j/R⌋ + 1)·R ≤ t + 1, and exact otherwise — in the parallel form and in
                 decode alike, so the mixer contract holds exactly (a key reads differently
                 before and after its block fills, and both forms know when)
Scales and minima in ``scale_dtype`` (fp16, float64 in a float64 model); the gradient flows
through them (the codes are piecewise constant), as in ``kv_quant``.

Carried bytes per KV head after T tokens, n = ⌊T/R⌋ blocks, r = T − nR residual tokens:
n·R·d_h·b/8 (key codes) + n·2·d_h·|s| (key scales, minima) + n·R·(d_h·b/8 + 2·(d_h/G)·|s|)
(values) + 2·r·d_h·|x| (residual keys and values).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvfree.mixers import kv_quant as kvq
from kvfree.state import State


@dataclass
class KIVICache(State):
    """Coded blocks (keys [B, n_kv, n, d_h, R·b/8] with (scale, min) [B, n_kv, n, d_h, 1];
    values [B, n_kv, n·R, d_h·b/8] with [B, n_kv, n·R, d_h/G]) and the exact residual
    [B, n_kv, r, d_h]; ``length`` = tokens seen."""

    k_codes: torch.Tensor
    k_scale: torch.Tensor
    k_min: torch.Tensor
    v_codes: torch.Tensor
    v_scale: torch.Tensor
    v_min: torch.Tensor
    k_res: torch.Tensor
    v_res: torch.Tensor
    length: int = 0
    pad: None = None  # no padded batches (a block's per-channel scales would mix in padding)

    @property
    def filled(self) -> int:
        return self.v_codes.shape[2] + self.k_res.shape[2]


def empty_cache(batch, n_kv, dh, bits, group, R, scale_dtype, dtype, device) -> KIVICache:
    z = lambda *s, dt: torch.zeros(batch, n_kv, *s, dtype=dt, device=device)  # noqa: E731
    return KIVICache(
        z(0, dh, R * bits // 8, dt=torch.uint8),
        z(0, dh, 1, dt=scale_dtype),
        z(0, dh, 1, dt=scale_dtype),
        z(0, dh * bits // 8, dt=torch.uint8),
        z(0, dh // group, dt=scale_dtype),
        z(0, dh // group, dt=scale_dtype),
        z(0, dh, dt=dtype),
        z(0, dh, dt=dtype),
    )


def nbytes(T: int, n_kv, dh, bits, group, R, scale_dtype, dtype) -> int:
    """Carried bytes after T tokens (module docstring)."""
    n, r = divmod(T, R)
    s, x = scale_dtype.itemsize, dtype.itemsize
    keys = n * R * dh * bits // 8 + n * 2 * dh * s
    values = n * R * (dh * bits // 8 + 2 * (dh // group) * s)
    return n_kv * (keys + values + 2 * r * dh * x)


def _code_blocks(k, v, bits, group, R, scale_dtype):
    """Whole blocks k, v [B, n_kv, n·R, d_h] → (k̂, v̂, the stored key and value codes)."""
    per_channel = k.unflatten(2, (-1, R)).transpose(-1, -2)  # [B, n_kv, n, d_h, R]
    k_hat, kq = kvq.round_trip(per_channel, bits, R, scale_dtype)
    v_hat, vq = kvq.round_trip(v, bits, group, scale_dtype)
    return k_hat.transpose(-1, -2).flatten(2, 3), v_hat, kq, vq


def extend(cache: KIVICache, k, v, bits, group, R, scale_dtype):
    """Append T tokens (k, v [B, n_kv, T, d_h], RoPE applied) → (K̂, K, V̂, V, new cache):
    the quantised and the exact view of every token so far ([B, n_kv, length + T, d_h]; tokens
    stored only as codes are x̂ in both; tokens whose block is unfinished are exact in both)."""
    old_k = kvq.dequantize(cache.k_codes, cache.k_scale, cache.k_min, bits, k.dtype)
    old_k = old_k.transpose(-1, -2).flatten(2, 3)
    old_v = kvq.dequantize(cache.v_codes, cache.v_scale, cache.v_min, bits, v.dtype)
    fk = torch.cat([cache.k_res.to(k.dtype), k], 2)  # exact tokens: residual + new
    fv = torch.cat([cache.v_res.to(v.dtype), v], 2)
    m = fk.shape[2] // R * R  # tokens of blocks that are now complete
    k_hat, v_hat, kq, vq = _code_blocks(fk[:, :, :m], fv[:, :, :m], bits, group, R, scale_dtype)
    with torch.autocast(k.device.type, enabled=False):  # fp16 scales on CPU
        parts = [
            torch.cat([old, new], 2)
            for old, new in zip(
                (cache.k_codes, cache.k_scale, cache.k_min, cache.v_codes, cache.v_scale)
                + (cache.v_min,),
                (*kq, *vq),
            )
        ]
    new = KIVICache(*parts, fk[:, :, m:], fv[:, :, m:], cache.length + k.shape[2])
    K_hat = torch.cat([old_k, k_hat, fk[:, :, m:]], 2)
    V_hat = torch.cat([old_v, v_hat, fv[:, :, m:]], 2)
    return K_hat, torch.cat([old_k, fk], 2), V_hat, torch.cat([old_v, fv], 2), new


def attend(q, K_hat, K, V_hat, V, T0: int, R: int, g: int, q_block: int) -> torch.Tensor:
    """Causal softmax attention of queries q [B, H, T, d_h] at positions T0… over every token
    (views from :func:`extend`, [B, n_kv, S, d_h]) under the reading rule: query i reads token
    j from (K̂, V̂) once j's block is complete, from (K, V) before. → [B, H, T, d_h]."""
    B, H, T, d = q.shape
    n_kv, S = K.shape[1], K.shape[2]
    j = torch.arange(S, device=q.device)
    outs = []
    for b0 in range(0, T, q_block):
        b1 = min(T, b0 + q_block)
        i = torch.arange(T0 + b0, T0 + b1, device=q.device)[:, None]
        seen, done = j <= i, (j // R + 1) * R <= i + 1  # [n, S]
        qg = q[:, :, b0:b1].reshape(B, n_kv, g, b1 - b0, d).to(K.dtype) * d**-0.5
        s = torch.where(
            done,
            torch.einsum("bkgnd,bksd->bkgns", qg, K_hat),
            torch.einsum("bkgnd,bksd->bkgns", qg, K),
        )
        p = torch.softmax(s.masked_fill(~seen, float("-inf")), dim=-1)
        pd = p * done
        o = torch.einsum("bkgns,bksd->bkgnd", pd, V_hat) + torch.einsum(
            "bkgns,bksd->bkgnd", p - pd, V
        )
        outs.append(o.reshape(B, H, b1 - b0, d))
    return torch.cat(outs, 2)
