"""Plain per-token references for SKA tests: the closed form of docs/ska.md §8 evaluated with
ordinary solves, and a token loop that keeps the decoder statistics by hand."""

from __future__ import annotations

import torch
from torch import nn

from kvfree.mixers.ska import SKAPending, SKAState


def sigma_hat(A: torch.Tensor, iters: int) -> torch.Tensor:
    """Power iteration on (A, Aᵀ) from 𝟏/√n, written independently of kvfree.linalg."""
    with torch.no_grad():
        n = A.shape[-1]
        v = torch.ones(*A.shape[:-1], 1, dtype=A.dtype) / n**0.5
        for _ in range(iters):
            u = A @ v
            u = u / u.norm(dim=-2, keepdim=True).clamp_min(1e-300)
            v = A.transpose(-1, -2) @ u
            v = v / v.norm(dim=-2, keepdim=True).clamp_min(1e-300)
        return (A @ v).norm(dim=(-2, -1))


def whitened_sigma(G, M, eps, iters):
    """σ̂ of A_w = L⁻¹ M L⁻ᵀ with L = chol(G + εI) (the gauge the module uses)."""
    L = torch.linalg.cholesky(G + eps * torch.eye(G.shape[-1], dtype=G.dtype))
    Li = torch.linalg.inv(L)
    return sigma_hat(Li @ M @ Li.transpose(-1, -2), iters)


def closed_form(G, M, C, q, *, gamma, eta, eps, K, sigma=None):
    """η (γ / max(1, σ))^K C (G̃⁻¹ M)^K G̃⁻¹ q  for G, M [..., r, r], C [..., P, r], q [..., r].
    G̃ is symmetrised as in docs/ska.md §6.1 (this fixes the gradient off the symmetric matrices)."""
    Gt = 0.5 * (G + G.transpose(-1, -2)) + eps * torch.eye(G.shape[-1], dtype=G.dtype)
    w = torch.linalg.solve(Gt, q.unsqueeze(-1))
    for _ in range(K):
        w = torch.linalg.solve(Gt, M @ w)
    y = (C @ w).squeeze(-1)
    if K == 0:
        return eta * y
    c = gamma if sigma is None else gamma / sigma.clamp_min(1.0)
    c = c if not torch.is_tensor(c) or c.dim() == 0 else c.unsqueeze(-1)
    return eta * c**K * y


def unit(z):
    return z / (z.pow(2).sum(-1, keepdim=True) + 1e-12).sqrt()


def gamma_of(m) -> torch.Tensor:
    if m.gamma_raw is None:
        return torch.tensor(1.0, dtype=torch.float64)
    return m.gamma_raw.clamp(1.0, m.gamma_max)


def read(m, G, M, C, q):
    sig = whitened_sigma(G, M, m.cfg.eps, m.cfg.power_iters) if m.cfg.spectral_norm else None
    return closed_form(
        G, M, C, q, gamma=gamma_of(m), eta=m.eta, eps=m.cfg.eps, K=m.cfg.K, sigma=sig
    )


def project(m, h, history=None):
    """z, q [B, H, r], v [B, H, P] of one token h [B, D]; with a conv, ``history`` holds the
    last k−1 raw projections [B, k−1, H(2r+P)] and is updated in place (list-free loop)."""
    B = h.shape[0]
    z, q, v = m.k_proj(h), m.q_proj(h), m.v_proj(h)
    if m.conv is not None:
        raw = torch.cat([z, q, v], -1)
        window = torch.cat([history[0], raw[:, None]], 1)  # [B, k, C], oldest first
        y = sum(window[:, i] * m.conv.weight[:, i] for i in range(window.shape[1]))
        history[0] = window[:, 1:]
        z, q, v = torch.nn.functional.silu(y).split([m.H * m.r, m.H * m.r, m.H * m.P], -1)
    return z.reshape(B, m.H, m.r), q.reshape(B, m.H, m.r), v.reshape(B, m.H, m.P)


def out(m, y):
    o = m.out_proj(y.reshape(y.shape[0], -1))
    return o * m.layerscale if m.layerscale is not None else o


def token_loop(m, x, state, mask):
    """Reference for ``token`` and ``chunk`` modes (l2 keys): returns (y, final state)."""
    B, T, _ = x.shape
    H, S = m.H, m.chunk_size
    st = state if state is not None else m.init_state(B, dtype=x.dtype)
    G, M, C, prev, n = st.G, st.M, st.C, st.prev, st.scalar
    chunk = m.mode == "chunk"
    if chunk:
        Gp, Mp, Cp = st.pending.G, st.pending.M, st.pending.C
    pos = int(n.flatten()[0]) if n.numel() else 0
    history = [st.conv]
    ys = []
    for t in range(T):
        z, q, v = project(m, x[:, t], history)
        zh, qh = unit(z), unit(q)
        sb = (
            torch.sigmoid(m.beta_proj(x[:, t])).sqrt()
            if m.beta_proj is not None
            else torch.ones(B, H, dtype=x.dtype)
        )
        sm = (
            mask[:, t, None].expand(B, H).sqrt()
            if mask is not None
            else torch.ones(B, H, dtype=x.dtype)
        )
        xw, uw = (sb * sm)[..., None] * zh, (sb * sm)[..., None] * v
        if m.beta_mode == "sqrt" or m.beta_proj is None:
            lw = pw = xw
        else:
            pw = sm[..., None] * zh
            lw = (sb * sb)[..., None] * pw
        dG = xw[..., :, None] * xw[..., None, :]
        dC = uw[..., :, None] * xw[..., None, :]
        dM = lw[..., :, None] * prev[..., None, :]
        if chunk:
            if pos > 0 and pos % S == 0:
                G, M, C = G + Gp, M + Mp, C + Cp
                Gp, Mp, Cp = torch.zeros_like(Gp), torch.zeros_like(Mp), torch.zeros_like(Cp)
                if m.inclusive:
                    M, dM = M + dM, torch.zeros_like(dM)
            y = read(m, G, M, C, qh)
            Gp, Mp, Cp = Gp + dG, Mp + dM, Cp + dC
        else:
            G, M, C = G + dG, M + dM, C + dC
            y = read(m, G, M, C, qh)
        prev, pos = pw, pos + 1
        ys.append(out(m, y))
    pending = SKAPending(Gp, Mp, Cp) if chunk else None
    return torch.stack(ys, 1), SKAState(G, M, C, prev, n + T, pending, history[0])


def randomize(m: nn.Module, seed: int = 0, gamma: float | None = None) -> nn.Module:
    """Non-trivial weights for tests: random out_proj and β gate (both zero at init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = m.out_proj.weight
        w.copy_(torch.randn(w.shape, generator=g, dtype=w.dtype) * 0.3)
        if m.beta_proj is not None:
            for p in m.beta_proj.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
        if gamma is not None and m.gamma_raw is not None:
            m.gamma_raw.fill_(gamma)
    return m


def core_out(m, x, state=None, mask=None, step=False):
    """ŷ [B, (T,) H, P] before the output projection (the module's own island and modes)."""
    orig = m._out
    m._out = lambda y, dtype: y
    try:
        return m.step(x, state, mask) if step else m(x, state, mask)
    finally:
        m._out = orig


def features(m, x, scale=None):
    """ẑ, q̂ [B, T, H, r] and v [B, T, H, P] computed in the test (ℓ2, or divided by ``scale``)."""
    B, T, _ = x.shape
    z = m.k_proj(x).view(B, T, m.H, m.r)
    q = m.q_proj(x).view(B, T, m.H, m.r)
    v = m.v_proj(x).view(B, T, m.H, m.P)
    if scale is None:
        return unit(z), unit(q), v
    return z / scale, q / scale, v


def stats(zh, v, w=None):
    """Token-causal statistics at every t from keys zh [B, T, H, r] and values v, with write
    weights w [B, T] (binary mask; None = 1): plain loops over tokens."""
    B, T, H, r = zh.shape
    w = torch.ones(B, T, dtype=zh.dtype) if w is None else w
    G = torch.zeros(B, H, r, r, dtype=zh.dtype)
    M = torch.zeros_like(G)
    C = torch.zeros(B, H, v.shape[-1], r, dtype=zh.dtype)
    out = []
    for t in range(T):
        wt = w[:, t, None, None, None]
        G = G + wt * zh[:, t, :, :, None] * zh[:, t, :, None, :]
        C = C + wt * v[:, t, :, :, None] * zh[:, t, :, None, :]
        if t > 0:
            wm = (w[:, t] * w[:, t - 1])[:, None, None, None]
            M = M + wm * zh[:, t, :, :, None] * zh[:, t - 1, :, None, :]
        out.append((G, M, C))
    return out
