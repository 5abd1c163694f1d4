import torch
import torch.nn.functional as F

from kvfree.mixers.linear_attention import LinearAttentionState
from tests.contract import MixerContract


class TestLinearAttention(MixerContract):
    name = "linear_attention"
    configs = [
        dict(chunk_size=16),
        dict(chunk_size=64, feature_map="identity", normalize=False),
        dict(chunk_size=16, num_heads=4, feature_map="elu", normalize=True),
    ]

    def reference(self, m, x, state, mask):
        B, T, _ = x.shape
        H, dk, dv = m.H, m.dk, m.dv
        phi = (lambda t: F.elu(t) + 1) if m.fmap == "elu" else (lambda t: t)
        S = state.S if state is not None else x.new_zeros(B, H, dk, dv)
        z = state.z if state is not None else (x.new_zeros(B, H, dk) if m.normalize else None)
        ys = []
        for t in range(T):
            q = phi(m.q_proj(x[:, t]).view(B, H, dk))
            k = phi(m.k_proj(x[:, t]).view(B, H, dk))
            v = m.v_proj(x[:, t]).view(B, H, dv)
            S = S + torch.einsum("bhf,bhv->bhfv", k, v)
            o = m.scale * torch.einsum("bhfv,bhf->bhv", S, q)
            if m.normalize:
                z = z + k
                o = o / (torch.einsum("bhf,bhf->bh", q, z) + 1e-6).unsqueeze(-1)
            ys.append(m.o_proj(o.reshape(B, H * dv)))
        return torch.stack(ys, 1), LinearAttentionState(S, z)
