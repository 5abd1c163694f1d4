import torch

from kvfree.mixers.shortconv import ShortConvState
from tests.contract import MixerContract


class TestShortConv(MixerContract):
    name = "shortconv"
    configs = [dict(kernel_size=4), dict(kernel_size=3, gate=False), dict(kernel_size=1)]

    def reference(self, m, x, state, mask):
        B, T, D = x.shape
        k = m.kernel_size
        hist = (
            [state.buf[:, i] for i in range(k - 1)]
            if state is not None
            else [x.new_zeros(B, D) for _ in range(k - 1)]
        )
        ys = []
        for t in range(T):
            u = m.in_proj(x[:, t])
            a, g = u.chunk(2, -1) if m.gate else (u, None)
            hist.append(a)
            c = m.conv.bias + sum(m.conv.weight[:, i] * hist[len(hist) - k + i] for i in range(k))
            ys.append(m.out_proj(c * g if g is not None else c))
        buf = torch.stack(hist[len(hist) - (k - 1) :], 1) if k > 1 else x.new_zeros(B, 0, D)
        return torch.stack(ys, 1), ShortConvState(buf)
