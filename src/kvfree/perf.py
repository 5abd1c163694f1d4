"""Fast CPU paths for training, each with the reference code path it replaces kept behind one
switch, so that ``kvfree bench train-speed`` can time both side by side.

Fast paths (on by default; the math is unchanged and the contract tests run on both):

- **allocator** (:func:`tune_allocator`): glibc mmap-s every allocation above its (dynamic)
  threshold and trims the heap top on free, so the multi-MB activations of a training step were
  mapped and page-faulted afresh on every step (a [32, 288, 192] fp32 ``mul`` took 3.5 ms with
  a fresh output against 1.0 ms into a reused one). The training processes raise the mmap
  threshold to glibc's 32 MiB ceiling and the trim threshold to 1 GiB, so freed blocks are
  reused.
- **causal conv** (:class:`kvfree.blocks.CausalConv1d`): the depthwise k = 4 convolution as k
  shifted multiply-adds instead of ``F.conv1d`` (mkldnn's depthwise backward took ~30 ms per call
  at [32, 192, 288], its forward needs two transposed copies).
- **flush denormals** (:func:`flush_denormals`): values below fp32's normal range (|x| <
  1.2e-38: decays exp(g) of long gaps, products of small gates) take a slow microcode path on
  x86; as recall training went on, a Gated DeltaNet step slowed to half its speed at init and
  FDM ran ~1.3× slower throughout. Training processes set flush-to-zero / denormals-are-zero
  (``torch.set_flush_denormal``), which changes only such values, to zero.
- **scored logits** (:meth:`kvfree.models.LanguageModel.forward` with ``select``): the training
  loss computes the final norm, the head and the log-softmax only at positions with a label; a
  recall batch scores M of up to 288 positions.

``KVFREE_REFERENCE_KERNELS=1`` in the environment (or :func:`set_fast` / :func:`reference`)
selects the reference paths.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager

_fast = os.environ.get("KVFREE_REFERENCE_KERNELS", "").lower() not in ("1", "true", "yes")


def fast() -> bool:
    """True when the fast paths are selected (the default)."""
    return _fast


def set_fast(flag: bool) -> None:
    global _fast
    _fast = bool(flag)


@contextmanager
def reference() -> Iterator[None]:
    """Run the reference code paths inside the block."""
    old = _fast
    set_fast(False)
    try:
        yield
    finally:
        set_fast(old)


# ----------------------------------------------------------------------------- glibc malloc

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt(3) parameter numbers (glibc malloc.h)
#: glibc's upper bound for its mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
MAX_MMAP_THRESHOLD = 32 * 2**20
TRAIN_TRIM_THRESHOLD = 2**30


def _mallopt(param: int, value: int) -> bool:
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(param, int(value)))
    except (OSError, AttributeError):
        return False


def set_mmap_threshold(nbytes: int) -> bool:
    """``mallopt(M_MMAP_THRESHOLD, nbytes)``: later allocations of at least ``nbytes`` are
    mmap-ed; False where glibc's mallopt is absent (then nothing changed)."""
    return _mallopt(M_MMAP_THRESHOLD, nbytes)


def tune_allocator() -> bool:
    """Let a training process reuse freed heap memory (see the module docstring). A no-op that
    returns False in reference mode, when ``MALLOC_MMAP_THRESHOLD_`` is set by the user, or
    without glibc."""
    if not _fast or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    return set_mmap_threshold(MAX_MMAP_THRESHOLD) and _mallopt(
        M_TRIM_THRESHOLD, TRAIN_TRIM_THRESHOLD
    )


def flush_denormals() -> bool:
    """Flush subnormal floats to zero in this process (see the module docstring); a no-op
    that returns False in reference mode or where the CPU does not support it."""
    if not _fast:
        return False
    import torch

    return bool(torch.set_flush_denormal(True))


def _flushing() -> bool:
    import torch

    return bool((torch.tensor([1e-39], dtype=torch.float32) * 1.0)[0] == 0)


@contextmanager
def flushed_denormals() -> Iterator[bool]:
    """:func:`flush_denormals` inside the block, the previous mode restored after it (a
    library call must not change the process's floating-point mode: Hypothesis, for one,
    refuses to run with flush-to-zero set)."""
    before = _flushing()
    on = flush_denormals()
    try:
        yield on
    finally:
        if on and not before:
            import torch

            torch.set_flush_denormal(False)


def with_flushed_denormals(fn):
    """Decorator: ``fn`` runs inside :func:`flushed_denormals`."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with flushed_denormals():
            return fn(*args, **kwargs)

    return wrapper


# ----------------------------------------------------------------------------- chunk loops


def unbind(t, dim: int) -> tuple:
    """The slices of ``t`` along ``dim`` for a Python loop over chunks. Fast: ``unbind``, whose
    backward stacks the slice gradients once; reference: one ``select`` per slice, whose
    backward writes each slice's gradient into a zero tensor of ``t``'s full size (quadratic
    in the number of chunks)."""
    if _fast:
        return t.unbind(dim)
    return tuple(t.select(dim, i) for i in range(t.shape[dim]))


def split(t, sizes: list[int], dim: int = -1) -> tuple:
    """The pieces of ``t`` of widths ``sizes`` along ``dim`` (e.g. a fused projection's outputs).
    Fast: one ``split``, whose backward concatenates the pieces' gradients; reference: a slice
    per piece, whose backward writes each piece's gradient into a zero tensor of ``t``'s full
    size and sums them (2.2× slower for a [32, 288, 260] projection in four pieces)."""
    if _fast:
        return t.split(sizes, dim)
    out, start = [], 0
    for n in sizes:
        out.append(t.narrow(dim, start, n))
        start += n
    return tuple(out)
