"""The quantised-cache options of :class:`~kvfree.mixers.attention.Attention`, as a mixin:
``kv_bits=8|4|2`` (per-token codes, :mod:`kvfree.mixers.kv_quant`) and, with ``kv_residual=R``,
KIVI's per-channel key blocks with an exact residual (:mod:`kvfree.mixers.kv_kivi`). It holds the
option checks, the state (init, formula, size, bytes, checks) and the read paths; the attention
math itself stays in attention.py and the two cache modules."""

from __future__ import annotations

import torch

from kvfree.mixers import kv_kivi
from kvfree.mixers import kv_quant as kvq
from kvfree.utils import unknown_keys_error


class QuantizedKV:
    """Mixin for Attention: everything that depends on ``kv_bits`` / ``kv_residual``."""

    def _init_kv_quant(self, bits, group, scale_dtype, head_dim, window, residual) -> None:
        """``kv_bits``: the cache stores b-bit codes per group of ``kv_group`` channels
        (kv_quant.py); with ``kv_residual`` KIVI's per-channel key blocks (kv_kivi.py)."""
        self.kv_bits, self.kv_group, self.kv_residual = bits, group or head_dim, residual
        if bits is not None and bits not in (2, 4, 8):
            raise ValueError(f"kv_bits must be 2, 4, 8 or None (unquantised), got {bits}")
        per = kvq.codes_per_byte(bits) if bits else 1
        if residual is not None and (bits is None or residual < 1 or residual % per):
            raise ValueError(
                f"kv_residual={residual}: KIVI's block of R tokens needs kv_bits=8|4|2 and R >= 1, "
                "a multiple of the codes per byte (2 for 4 bits, 4 for 2 bits)"
            )
        if bits is None:
            return
        if window is not None:
            raise ValueError("kv_bits quantises the full KV cache; it does not take a window yet")
        if head_dim % self.kv_group or head_dim % per:
            raise ValueError(
                f"kv_group={self.kv_group} must divide head_dim={head_dim}, and head_dim must be "
                f"a multiple of the {per} codes per byte of {bits}-bit codes"
            )
        if scale_dtype != "auto" and scale_dtype not in kvq.SCALE_DTYPES:
            raise unknown_keys_error("kv_scale_dtype", [scale_dtype], ["auto", *kvq.SCALE_DTYPES])
        self.kv_scale_dtype = scale_dtype

    def _scale_dtype(self, dtype) -> torch.dtype:
        """Scales and minima: fp16 (KIVI), float64 in a float64 model under ``"auto"``."""
        if self.kv_scale_dtype == "auto":
            return torch.float64 if dtype == torch.float64 else torch.float16
        return kvq.SCALE_DTYPES[self.kv_scale_dtype]

    def _kivi_args(self, dtype) -> tuple:
        R = self.kv_residual
        return self.n_kv, self.dh, self.kv_bits, self.kv_group, R, self._scale_dtype(dtype)

    @property
    def _groups(self) -> int:
        return self.dh // self.kv_group

    # ----- state ---------------------------------------------------------------------------
    def _quant_init_state(self, batch, device, dtype):
        if self.kv_residual:
            return kv_kivi.empty_cache(batch, *self._kivi_args(dtype), dtype, device)
        args = (self.n_kv, self.dh, self.kv_bits, self.kv_group, self._scale_dtype(dtype))
        return kvq.empty_cache(batch, *args, device)

    def _quant_formula(self) -> str:
        b, G, dh, n_kv = self.kv_bits, self.kv_group, self.dh, self.n_kv
        if self.kv_residual:
            return (
                f"n_kv·(nR·d_h·b/8 + n·2d_h + nR·(d_h·b/8 + 2·d_h/G) + 2r·d_h), n = ⌊T/R⌋, "
                f"r = T − nR = {n_kv}·(nR·{dh}·{b}/8 + n·2·{dh} + nR·({dh}·{b}/8 + 2·{dh}/{G}) "
                f"+ 2r·{dh}), R = {self.kv_residual} (KIVI: per-channel key blocks, per-token "
                f"values, exact residual; scales {self.kv_scale_dtype})"
            )
        return (
            f"2·T·n_kv·(d_h·b/8 + 2·d_h/G) = 2·T·{n_kv}·({dh}·{b}/8 + 2·{dh}/{G}) (bytes of "
            f"codes + (scale, min) items of {self.kv_scale_dtype}: fp16, float64 in a float64 "
            "model under auto)"
        )

    def _quant_size(self, seq_len: int) -> int:
        """Stored items: code bytes, scale/min entries (and KIVI's exact residual values)."""
        dh, b = self.dh, self.kv_bits
        if not self.kv_residual:
            return 2 * seq_len * self.n_kv * (dh * b // 8 + 2 * self._groups)
        (n, r), R = divmod(seq_len, self.kv_residual), self.kv_residual
        per_head = n * R * dh * b // 8 + n * 2 * dh
        per_head += n * R * (dh * b // 8 + 2 * self._groups) + 2 * r * dh
        return self.n_kv * per_head

    def _quant_nbytes(self, seq_len: int, dtype: torch.dtype) -> int:
        if self.kv_residual:
            return kv_kivi.nbytes(seq_len, *self._kivi_args(dtype), dtype)
        args = (self.n_kv, self.dh, self.kv_bits, self.kv_group, self._scale_dtype(dtype))
        return seq_len * kvq.nbytes_per_token(*args)

    def _check_quant_state(self, state, batch: int) -> None:
        if self.kv_residual:
            if not isinstance(state, kv_kivi.KIVICache) or state.k_res.shape[:2] != (
                batch,
                self.n_kv,
            ):
                raise TypeError(
                    f"a kv_residual={self.kv_residual} layer expects a KIVICache state of batch "
                    f"{batch} and {self.n_kv} KV heads, got {type(state).__name__}; use "
                    "init_state(batch) or a state it returned"
                )
            return
        if not isinstance(state, kvq.QuantKVCache):
            raise TypeError(
                f"a kv_bits={self.kv_bits} layer expects a QuantKVCache state, got "
                f"{type(state).__name__}; use init_state(batch) or a state it returned"
            )
        B, n_kv, _, width = state.k_codes.shape
        want = (batch, self.n_kv, self.dh * self.kv_bits // 8)
        if (B, n_kv, width) != want:
            raise ValueError(
                f"QuantKVCache has [batch, n_kv, code bytes] = {[B, n_kv, width]}, "
                f"expected {list(want)}"
            )

    # ----- reads ---------------------------------------------------------------------------
    def _extend_quantized(self, state, k, v):
        """kv_bits: quantise the T new keys/values; (K̂, V̂) over cache + new, new state."""
        args = (self.kv_bits, self.kv_group, self._scale_dtype(k.dtype))
        k_hat, kq = kvq.round_trip(k, *args)
        v_hat, vq = kvq.round_trip(v, *args)
        new_state = kvq.append(state, kq, vq, k.shape[2])
        if not state.filled:
            return k_hat, v_hat, new_state
        K = torch.cat([state.keys(self.kv_bits, k.dtype), k_hat], dim=2)
        V = torch.cat([state.values(self.kv_bits, v.dtype), v_hat], dim=2)
        return K, V, new_state

    def _kivi(self, q, k, v, state):
        """KIVI: append k, v, read under the block rule (kv_kivi.py) → o [B, H, T, d_h], state."""
        bits, group, R = self.kv_bits, self.kv_group, self.kv_residual
        K_hat, K, V_hat, V, new = kv_kivi.extend(
            state, k, v, bits, group, R, self._scale_dtype(k.dtype)
        )
        return kv_kivi.attend(q, K_hat, K, V_hat, V, state.length, R, self.g, self.q_block), new
