import pytest
import torch
import torch.nn.functional as F

from kvfree.mixers import build_mixer
from kvfree.mixers.delta_rule import delta_rule_chunked
from kvfree.mixers.deltanet import DeltaNetState
from tests.contract import F64, MixerContract, assert_close, err_ratio


def delta_layer_reference(m, x, state, gated: bool, channel: bool = False, gdn2: bool = False):
    """Plain per-token (Gated) DeltaNet layer: conv window + SiLU, l2norm, β = σ(b),
    [α = exp(−exp(A_log)·softplus(a + dt_bias))], S = (I − β k kᵀ) Diag(α) S + β k vᵀ,
    o = scale·Sᵀq, RMSNorm over d_v [⊙ SiLU(r)], o_proj. ``channel``: α per key channel (KDA,
    a has H·d_k logits), else one per head. ``gdn2`` (implies ``channel``): GDN-2's erase gate
    b = σ(·) [d_k] and write gate w = σ(·) [d_v], S = (I − k (b⊙k)ᵀ) Diag(α) S + k (w⊙v)ᵀ, and
    a σ(r) output gate."""
    Bsz, T, _ = x.shape
    H, dk, dv, K, Cq = m.H, m.dk, m.dv, m.conv_size, m.qkv_dim
    channel = channel or gdn2
    nb, na = (H * dk if gdn2 else H), (H * dk if channel else H)
    S = state.S if state is not None else x.new_zeros(Bsz, H, dk, dv)
    hist = (
        list(state.conv.unbind(1))
        if state is not None
        else [x.new_zeros(Bsz, Cq) for _ in range(K - 1)]
    )
    eye = torch.eye(dk, dtype=x.dtype)
    ys = []
    for t in range(T):
        u = m.in_proj(x[:, t])
        b, a, r, w = u[:, Cq:].split([nb, na if gated else 0, H * dv if gated else 0,
                                      H * dv if gdn2 else 0], -1)  # fmt: skip
        hist.append(u[:, :Cq])
        win = hist[len(hist) - K :]
        c = F.silu(sum(m.conv.weight[:, i] * win[i] for i in range(K)))
        q = c[:, : H * dk].reshape(Bsz, H, dk)
        k = c[:, H * dk : 2 * H * dk].reshape(Bsz, H, dk)
        q = q / torch.sqrt(q.pow(2).sum(-1, keepdim=True) + 1e-6)
        k = k / torch.sqrt(k.pow(2).sum(-1, keepdim=True) + 1e-6)
        v = c[:, 2 * H * dk :].reshape(Bsz, H, dv)
        alpha = 1.0
        if gated:
            A = torch.exp(m.A_log).repeat_interleave(dk) if channel else torch.exp(m.A_log)
            alpha = torch.exp(-A * F.softplus(a + m.dt_bias))
            alpha = alpha.reshape(Bsz, H, dk, 1) if channel else alpha[..., None, None]
        if gdn2:
            e, u_w = (
                torch.sigmoid(b).reshape(Bsz, H, dk) * k,
                torch.sigmoid(w).reshape(Bsz, H, dv) * v,
            )
        else:
            beta = torch.sigmoid(b)[..., None]
            e, u_w = beta * k, beta * v
        erase = eye - k[..., :, None] * e[..., None, :]
        S = erase @ (alpha * S) + k[..., :, None] * u_w[..., None, :]
        o = m.scale * torch.einsum("bhkv,bhk->bhv", S, q)
        o = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + m.o_norm.eps) * m.o_norm.weight
        if gated:
            gate = torch.sigmoid if gdn2 else F.silu
            o = o * gate(r.reshape(Bsz, H, dv))
        ys.append(m.o_proj(o.reshape(Bsz, H * dv)))
    return torch.stack(ys, 1), DeltaNetState(S, torch.stack(hist[len(hist) - (K - 1) :], 1))


class TestDeltaNet(MixerContract):
    name = "deltanet"
    configs = [
        dict(chunk_size=16),  # 2 heads of 8
        dict(chunk_size=64, num_heads=4),  # 4 heads of 4
        dict(chunk_size=16, num_heads=2, head_dim=12, expand_v=0.5, conv_size=2),  # d_v = 6
    ]

    def reference(self, m, x, state, mask):
        return delta_layer_reference(m, x, state, gated=False)


def naive_delta_rule(q, k, v, beta, S0, scale, g=None):
    """Per-token S_t = α_t(S_{t−1} − β_t k_t (k_tᵀ S_{t−1})) + β_t k_t v_tᵀ, o_t = scale·S_tᵀq_t."""
    S, os_ = S0, []
    for t in range(q.shape[1]):
        kt, b = k[:, t], beta[:, t, :, None, None]
        if g is not None:
            S = g[:, t].exp()[..., None, None] * S
        S = (
            S
            - b * kt[..., :, None] * torch.einsum("bhk,bhkv->bhv", kt, S)[..., None, :]
            + b * kt[..., :, None] * v[:, t, :, None, :]
        )
        os_.append(scale * torch.einsum("bhkv,bhk->bhv", S, q[:, t]))
    return torch.stack(os_, 1), S


def core_inputs(T, *, b=2, H=3, dk=8, dv=5, gated=False, g_scale=1.0, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    q, k = F.normalize(r(b, T, H, dk), dim=-1), F.normalize(r(b, T, H, dk), dim=-1)
    v, beta, S0 = r(b, T, H, dv), torch.sigmoid(r(b, T, H)), r(b, H, dk, dv)
    g = -g_scale * torch.rand(b, T, H, generator=gen, dtype=torch.float64) if gated else None
    out = [q, k, v, beta, S0] + ([g] if gated else [])
    return [t.to(dtype) for t in out]


def check_core_against_naive(T, chunk, gated, g_scale=1.0):
    compare_core(core_inputs(T, gated=gated, g_scale=g_scale), naive_delta_rule, chunk)


def compare_core(inputs, naive, chunk, w=None):
    """Chunked core = ``naive(q, k, v, β, S0, scale, g[, w])``: outputs, final state, gradients
    (inputs q, k, v, β, S0 and optionally g; ``w``: GDN-2's write gate)."""
    ins = [t.requires_grad_(True) for t in inputs + ([] if w is None else [w])]
    q, k, v, beta, S0 = ins[:5]
    g = ins[5] if len(inputs) > 5 else None
    extra = [] if w is None else [ins[-1]]
    o, S = delta_rule_chunked(q, k, v, beta, S0, g=g, w=w, scale=0.7, chunk_size=chunk)
    o_ref, S_ref = naive(q, k, v, beta, S0, 0.7, g, *extra)
    assert_close("output", o_ref, o, **F64)
    assert_close("state", S_ref, S, **F64)
    w1, w2 = torch.randn_like(o), torch.randn_like(S)
    grads = torch.autograd.grad((o * w1).sum() + (S * w2).sum(), ins)
    grads_ref = torch.autograd.grad((o_ref * w1).sum() + (S_ref * w2).sum(), ins)
    names = ("q", "k", "v", "beta", "S0") + (("g",) if g is not None else ()) + ("w",) * len(extra)
    for name, a, b in zip(names, grads_ref, grads):
        assert_close(f"gradient of {name}", a, b, **F64)


@pytest.mark.parametrize("chunk", [16, 64])
@pytest.mark.parametrize("T", [9, 150])
def test_wy_core_equals_recurrence(T, chunk):
    """The chunked WY/UT core = the naive delta-rule recurrence on random L2-normalised keys:
    outputs, final state and gradients of q, k, v, β and the initial state."""
    check_core_against_naive(T, chunk, gated=False)


def test_fp32_core_close_to_fp64():
    """fla reports chunk vs recurrent ≈ 7e-7 in fp32; ours against the fp64 core at T = 512."""
    ref = core_inputs(512)
    o_ref, S_ref = delta_rule_chunked(*ref[:4], ref[4], scale=0.5, chunk_size=64)
    f32 = [t.float() for t in ref]
    o, S = delta_rule_chunked(*f32[:4], f32[4], scale=0.5, chunk_size=64)
    assert o.dtype == torch.float32
    assert err_ratio(o_ref, o) < 1e-5 and err_ratio(S_ref, S) < 1e-5


def test_defaults_and_state_size():
    m = build_mixer("deltanet", 64)
    assert (m.H, m.dk, m.dv, m.conv_size, m.chunk_size) == (2, 32, 32, 4, 64)
    assert m.state_size(4096) == 2 * 32 * 32 + 3 * 2 * (32 + 32 + 32)


def test_bad_options():
    with pytest.raises(ValueError, match="num_heads"):
        build_mixer("deltanet", 16, num_heads=3)
    with pytest.raises(ValueError, match="chunk_size"):
        build_mixer("deltanet", 16, chunk_size=0)
