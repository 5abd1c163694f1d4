"""The mixer contract (docs/design.md §1) as a reusable test class.

Subclass :class:`MixerContract` in ``tests/mixers/test_<name>.py``::

    class TestLinearAttention(MixerContract):
        name = "linear_attention"
        configs = [dict(chunk_size=16), dict(chunk_size=64, normalize=False)]

        def reference(self, mixer, x, state, mask):
            ...  # a plain per-token loop written for the test, returns (y, final_state)

Every config is checked in float64: parallel = step-by-step, chunked prefill at several split
points (including inside and on chunk boundaries), parallel = reference in outputs, final state
and all gradients (parameters, input, initial state), state bytes = ``state_size`` and constant
for fixed-memory mixers; plus fp32 and bf16-autocast tolerances against float64.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvfree
from kvfree.mixers import build_mixer
from kvfree.state import clone_state, iter_tensors, map_tensors

F64 = dict(atol=1e-12, ratio=1e-10)
F32 = dict(atol=1e-6, ratio=1e-5)


def err_ratio(ref: torch.Tensor, x: torch.Tensor) -> float:
    ref, x = ref.double(), x.double()
    return (ref - x).pow(2).mean().sqrt().item() / (ref.pow(2).mean().sqrt().item() + 1e-8)


def assert_close(what: str, ref: torch.Tensor, x: torch.Tensor, *, atol: float, ratio: float):
    """fla's rule without its relaxation: max-abs ≤ atol, else rms(ref-x)/rms(ref) < ratio."""
    assert ref.shape == x.shape, f"{what}: shape {tuple(x.shape)} != {tuple(ref.shape)}"
    if ref.is_floating_point() or ref.is_complex():
        diff = (ref - x).abs().max().item() if ref.numel() else 0.0
        if diff <= atol:
            return
        r = err_ratio(ref, x)
        assert r < ratio, f"{what}: max-abs {diff:.3e}, error ratio {r:.3e} >= {ratio:.1e}"
    else:
        assert torch.equal(ref, x), f"{what}: integer tensors differ"


def canonical(state):
    """Comparable tensors of a state (a state may trim capacity padding via ``canonical()``)."""
    if hasattr(state, "canonical"):
        state = state.canonical()
    return list(iter_tensors(state))


def assert_states_close(what, ref_state, state, **tol):
    a, b = canonical(ref_state), canonical(state)
    assert len(a) == len(b), f"{what}: states carry {len(b)} tensors, expected {len(a)}"
    for i, (r, s) in enumerate(zip(a, b)):
        assert_close(f"{what} tensor {i}", r, s, **tol)


def run_steps(mixer, x, state=None, mask=None):
    if state is None:
        state = mixer.init_state(x.shape[0], device=x.device, dtype=x.dtype)
    ys = []
    for t in range(x.shape[1]):
        y, state = mixer.step(x[:, t], state, None if mask is None else mask[:, t])
        ys.append(y)
    return torch.stack(ys, 1), state


def _float_leaves(state):
    return [t for t in canonical(state) if t.is_floating_point() or t.is_complex()]


def grads_of(fn, mixer, x, state, mask, weights=None):
    """Gradients of a random linear functional of (outputs, final state) w.r.t. the parameters,
    the input and the initial state's float tensors."""
    x = x.detach().clone().requires_grad_(True)
    if state is not None:
        state = map_tensors(
            clone_state(state),
            lambda t: t.detach().requires_grad_(t.is_floating_point() or t.is_complex()),
        )
    mixer.zero_grad(set_to_none=True)
    y, new_state = fn(mixer, x, state, mask)
    leaves = [y, *_float_leaves(new_state)]
    if weights is None:
        g = torch.Generator().manual_seed(1234)
        weights = [
            torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype) for t in leaves
        ]
    loss = sum(
        (t * w).real.sum() if t.is_complex() else (t * w).sum() for t, w in zip(leaves, weights)
    )
    loss.backward()
    out = {
        f"param {n}": p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        for n, p in mixer.named_parameters()
    }
    out["input x"] = x.grad.clone()
    if state is not None:
        for i, t in enumerate(_float_leaves(state)):
            out[f"initial state tensor {i}"] = (
                t.grad.clone() if t.grad is not None else torch.zeros_like(t)
            )
    return out, weights


def parallel(mixer, x, state, mask):
    return mixer(x, state, mask)


def stepwise(mixer, x, state, mask):
    return run_steps(mixer, x, state, mask)


class MixerContract:
    """Contract tests for one mixer; subclass and set ``name``, ``configs``, ``reference``."""

    name: str = ""
    configs: list[dict] = [{}]
    d_model: int = 16
    batch: int = 2
    lengths: tuple[int, ...] = (1, 37, 100)  # includes T < chunk and T not a multiple of it
    long_len: int = 4096  # state-size constancy check
    fp32_ratio: float = 1e-5
    bf16_ratio: float = 0.02  # end-to-end, projections in bf16
    uses_mask: bool = False  # pass a random write mask

    # --- to override -------------------------------------------------------------------------
    def reference(self, mixer, x, state, mask):
        """A plain per-token loop written for the test: returns (y, final_state)."""
        raise NotImplementedError

    def make(self, cfg, dtype=torch.float64):
        torch.manual_seed(0)
        return build_mixer(self.name, self.d_model, **cfg).to(dtype)

    def inputs(self, T, dtype=torch.float64, batch=None, seed=0):
        g = torch.Generator().manual_seed(seed)
        return torch.randn(batch or self.batch, T, self.d_model, generator=g, dtype=dtype)

    def mask_for(self, x, cfg):
        if not self.uses_mask:
            return None
        g = torch.Generator().manual_seed(7)
        return (torch.rand(x.shape[:2], generator=g) < 0.7).to(x.dtype)

    def prefix_state(self, mixer, T0=23, seed=5):
        """A valid non-trivial initial state: the state after a random prefix."""
        with torch.no_grad():
            x0 = self.inputs(T0, seed=seed)
            return mixer(x0, None, self.mask_for(x0, {}))[1]

    # --- the contract --------------------------------------------------------------------------
    def test_parallel_equals_recurrent(self, cfg):
        mixer = self.make(cfg)
        for T in self.lengths:
            x = self.inputs(T)
            mask = self.mask_for(x, cfg)
            for init in (None, self.prefix_state(mixer)):
                with torch.no_grad():
                    y, s = mixer(x, clone_state(init), mask)
                    y2, s2 = run_steps(mixer, x, clone_state(init), mask)
                tag = f"T={T} init={'prefix' if init is not None else 'zero'}"
                assert_close(f"output {tag}", y, y2, **F64)
                assert_states_close(f"state {tag}", s, s2, **F64)

    def test_chunked_prefill(self, cfg):
        mixer = self.make(cfg)
        T = 100
        x = self.inputs(T)
        mask = self.mask_for(x, cfg)
        with torch.no_grad():
            y, s = mixer(x, None, mask)
            for a in (1, 15, 16, 17, 63, 64, 65, 99):
                m1, m2 = (None, None) if mask is None else (mask[:, :a], mask[:, a:])
                y1, s1 = mixer(x[:, :a], None, m1)
                y2, s2 = mixer(x[:, a:], s1, m2)
                assert_close(f"output split at {a}", y, torch.cat([y1, y2], 1), **F64)
                assert_states_close(f"state split at {a}", s, s2, **F64)

    def test_fast_equals_reference(self, cfg):
        mixer = self.make(cfg)
        for T in self.lengths:
            x = self.inputs(T)
            mask = self.mask_for(x, cfg)
            init = self.prefix_state(mixer)
            ref, w = grads_of(self.reference, mixer, x, init, mask)
            for label, fn in (("parallel", parallel), ("step", stepwise)):
                got, _ = grads_of(fn, mixer, x, init, mask, w)
                with torch.no_grad():
                    y_ref, s_ref = self.reference(mixer, x, clone_state(init), mask)
                    y, s = fn(mixer, x, clone_state(init), mask)
                assert_close(f"{label} output T={T}", y_ref, y, **F64)
                assert_states_close(f"{label} state T={T}", s_ref, s, **F64)
                for k in ref:
                    assert_close(f"{label} gradient of {k} T={T}", ref[k], got[k], **F64)

    def test_state_size(self, cfg):
        mixer = self.make(cfg)
        sizes = {}
        for T in (16, 300, self.long_len):
            x = self.inputs(T, batch=1)
            with torch.no_grad():
                _, s = mixer(x, None, self.mask_for(x, cfg))
            sizes[T] = kvfree.state_bytes(s)
            assert sizes[T] == mixer.state_nbytes(T, torch.float64), (
                f"state_bytes {sizes[T]} at T={T} != the formula's "
                f"{mixer.state_nbytes(T, torch.float64)} bytes ({mixer.state_formula()})"
            )
            _, s2 = (
                run_steps(
                    mixer,
                    x[:, :16],
                    None,
                    None if not self.uses_mask else self.mask_for(x, cfg)[:, :16],
                )
                if T == 16
                else (None, None)
            )
            if s2 is not None:
                assert kvfree.state_bytes(s2) == sizes[16], "step state differs in size"
        if mixer.fixed_memory:
            assert len(set(sizes.values())) == 1, f"state grows with T: {sizes}"
        assert isinstance(mixer.state_formula(), str) and mixer.state_formula()

    def test_fp32_and_bf16_tolerance(self, cfg):
        ref_mixer = self.make(cfg)
        x = self.inputs(100)
        mask = self.mask_for(x, cfg)
        with torch.no_grad():
            y_ref, _ = ref_mixer(x, None, mask)
            m32 = self.make(cfg, torch.float32)
            y32, _ = m32(x.float(), None, None if mask is None else mask.float())
            y32s, _ = run_steps(m32, x.float(), None, None if mask is None else mask.float())
            with torch.autocast("cpu", dtype=torch.bfloat16):
                ybf, _ = m32(x.float(), None, None if mask is None else mask.float())
        for what, y in (("fp32 parallel", y32), ("fp32 step", y32s)):
            r = err_ratio(y_ref, y)
            assert r < self.fp32_ratio, f"{what} vs float64: error ratio {r:.2e}"
        r = err_ratio(y_ref, ybf.float())
        assert math.isfinite(r) and r < self.bf16_ratio, f"bf16 autocast vs float64: {r:.2e}"

    @settings(
        max_examples=8, deadline=None, suppress_health_check=[HealthCheck.differing_executors]
    )
    @given(B=st.integers(1, 3), T=st.integers(1, 80), frac=st.floats(0, 1))
    def test_property_shapes(self, B, T, frac):
        """Random batch/length/split: chunked prefill = parallel = step (first config)."""
        mixer = self.make(self.configs[0])
        x = self.inputs(T, batch=B, seed=T)
        mask = self.mask_for(x, self.configs[0])
        a = int(frac * T)
        with torch.no_grad():
            y, s = mixer(x, None, mask)
            assert y.shape == x.shape
            y1, s1 = mixer(x[:, :a], None, None if mask is None else mask[:, :a])
            y2, s2 = mixer(x[:, a:], s1, None if mask is None else mask[:, a:])
        assert_close("property split", y, torch.cat([y1, y2], 1), **F64)
        assert_states_close("property state", s, s2, **F64)

    # --- padded batches (prompts of different lengths, docs/design.md §1) ------------------------
    pad_lengths: tuple[int, ...] = (37, 30, 1, 20)  # tokens per row of a left-padded batch

    def padded_batch(self):
        """x [B, T, D] whose row b holds its prompt in the last n_b positions (garbage before),
        the left_pad counts, and decode inputs for a few steps after it."""
        T = max(self.pad_lengths)
        B = len(self.pad_lengths)
        left_pad = torch.tensor([T - n for n in self.pad_lengths])
        return self.inputs(T, batch=B, seed=3), left_pad, self.inputs(5, batch=B, seed=4)

    def test_padded_batch(self, cfg):
        """Row by row, a padded batch gives what each prompt gives alone: outputs (zero at the
        padding), the decode steps after it, and the same after a prefill in two chunks where
        short rows are all padding in the first (causal mixers)."""
        mixer = self.make(cfg)
        x, left_pad, xs = self.padded_batch()
        mask = self.mask_for(x, cfg)
        if not mixer.supports_padding:
            with pytest.raises(ValueError, match="padded batches"):
                mixer(x, None, mask, left_pad=left_pad)
            return
        a = 12
        with torch.no_grad():
            y, s = mixer(x, None, mask, left_pad=left_pad)
            ys, _ = run_steps(mixer, xs, s)
            if mixer.causal:
                m1, m2 = (None, None) if mask is None else (mask[:, :a], mask[:, a:])
                y1, s1 = mixer(x[:, :a], None, m1, left_pad=left_pad.clamp(max=a))
                y2, s2 = mixer(x[:, a:], s1, m2, left_pad=(left_pad - a).clamp(min=0))
                ys2, _ = run_steps(mixer, xs, s2)
                y12 = torch.cat([y1, y2], 1)
        for b, p in enumerate(left_pad.tolist()):
            with torch.no_grad():
                y_b, s_b = mixer(
                    x[b : b + 1, p:], None, None if mask is None else mask[b : b + 1, p:]
                )
                ys_b, _ = run_steps(mixer, xs[b : b + 1], s_b)
            assert_close(f"row {b} output", y_b[0], y[b, p:], **F64)
            assert not y[b, :p].any(), f"row {b}: padded outputs are not zero"
            assert_close(f"row {b} steps after the padded prefill", ys_b[0], ys[b], **F64)
            if mixer.causal:
                assert_close(f"row {b} output, two chunks", y_b[0], y12[b, p:], **F64)
                assert_close(f"row {b} steps after two chunks", ys_b[0], ys2[b], **F64)

    def test_padded_batch_gradients(self, cfg):
        """Parameter gradients of a loss over a padded batch's tokens equal the sum over its
        prompts run alone (nothing leaks from the padding, no NaN from fully masked rows)."""
        mixer = self.make(cfg)
        if not mixer.supports_padding:
            pytest.skip(
                f"{self.name} does not take padded batches (test_padded_batch checks it says so)"
            )
        x, left_pad, _ = self.padded_batch()
        w = self.inputs(x.shape[1], batch=x.shape[0], seed=9)
        mask = self.mask_for(x, cfg)
        mixer.zero_grad(set_to_none=True)
        y, _ = mixer(x, None, mask, left_pad=left_pad)
        (y * w).sum().backward()
        padded = {n: p.grad.clone() for n, p in mixer.named_parameters() if p.grad is not None}
        mixer.zero_grad(set_to_none=True)
        for b, p in enumerate(left_pad.tolist()):
            y_b, _ = mixer(x[b : b + 1, p:], None, None if mask is None else mask[b : b + 1, p:])
            (y_b * w[b : b + 1, p:]).sum().backward()
        for n, p in mixer.named_parameters():
            if p.grad is not None:
                assert_close(f"gradient of {n}", p.grad, padded[n], **F64)

    def test_bad_input_errors(self):
        mixer = self.make(self.configs[0])
        with pytest.raises(ValueError, match="d_model"):
            mixer(torch.randn(2, 5, self.d_model + 1, dtype=torch.float64))
        with pytest.raises(ValueError, match="shape"):
            mixer(torch.randn(5, self.d_model, dtype=torch.float64))
        with pytest.raises(ValueError, match="state"):
            mixer.step(torch.randn(2, self.d_model, dtype=torch.float64), None)
