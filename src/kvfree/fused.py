"""Hand-written backward passes for the elementwise-heavy layers of a training step (perf.py's
fast paths). On a CPU the recall models are bound by memory traffic: every elementwise op
reads and writes a [B, T, C] tensor, and autograd's generic backward adds more passes (a
zero-filled full-size gradient per slice, a product and a reduction per broadcast weight).
Each function here computes the same values and gradients as the plain PyTorch expression it
replaces (tests/test_perf.py checks both in float64) with fewer passes and no temporary
full-size zeros.

- :func:`causal_conv`: the depthwise causal conv of :class:`kvfree.blocks.CausalConv1d`,
  y_t = b + Σ_{i<k} w_i ⊙ x_{t−k+1+i}, optionally followed by SiLU. Forward: k in-place
  multiply-adds into one output. Backward: ∂x accumulated in place into one buffer
  (∂x_{t−k+1+i} += w_i ⊙ ∂y_t), ∂w_i = Σ_{b,t} ∂y_t ⊙ x_{t−k+1+i} as one batched dot product
  per tap, and SiLU's derivative from the saved pre-activation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _channel_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ over every dimension but the last of a ⊙ b: [..., C] × [..., C] -> [C]."""
    return (a * b).sum(tuple(range(a.dim() - 1)))


class _CausalConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xx, weight, bias, silu: bool):
        k = weight.shape[1]
        T = xx.shape[1] - (k - 1)
        wt = weight.t().contiguous()  # [k, C]: each tap a contiguous row
        y = xx[:, k - 1 :] * wt[k - 1]
        for i in range(k - 1):
            y.addcmul_(xx[:, i : i + T], wt[i])
        if bias is not None:
            y += bias
        ctx.save_for_backward(xx, wt, y if silu else None)
        ctx.silu, ctx.has_bias = silu, bias is not None
        return F.silu(y) if silu else y

    @staticmethod
    def backward(ctx, grad):
        xx, wt, y = ctx.saved_tensors
        k, T = wt.shape[0], grad.shape[1]
        gy = torch.ops.aten.silu_backward(grad, y) if ctx.silu else grad.contiguous()
        gxx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gxx = xx.new_empty(xx.shape)
            gxx[:, : k - 1].zero_()
            torch.mul(gy, wt[k - 1], out=gxx[:, k - 1 :])
            for i in range(k - 1):
                gxx[:, i : i + T].addcmul_(gy, wt[i])
        if ctx.needs_input_grad[1]:
            gw = torch.stack([_channel_dot(gy, xx[:, i : i + T]) for i in range(k)], 1)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = gy.sum((0, 1))
        return gxx, gw, gb, None


def causal_conv(xx, weight, bias=None, silu: bool = False):
    """Depthwise causal conv of the padded input xx [B, k−1+T, C] with weight [C, k] and
    optional bias [C] (then SiLU if ``silu``) -> y [B, T, C]."""
    return _CausalConv.apply(xx, weight, bias, silu)
