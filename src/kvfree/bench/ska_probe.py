"""What an SKA memory sees while it trains (``kvfree bench ridge-study``, docs/ska.md §19).

At every validation point of a recall run on ``mqar_gap`` the bench calls :func:`probe` on a
fixed batch of the longest validation cell and stores the numbers in the learning curve:

    grad_k, grad_q, grad_v, grad_beta   ‖∂loss/∂W‖ of SKA's key, query, value and β projections
                                        (the gradient reaching the memory; summed over layers)
    cond_G                              condition number λ_max/λ_min of G̃ = εI + Σ β ẑẑᵀ over the
                                        context and gap (median over examples and heads)
    filler_share                        share of the write mass Σ β‖ẑ‖² that comes from filler
                                        tokens of the gap (the rest: keys and values)
    beta_key, beta_value, beta_filler   mean write strength β per token kind (1 without a gate;
                                        the oracle prefix mask is included)

The gradients come from :func:`torch.autograd.grad`, so the optimiser's ``.grad`` is untouched.
"""

from __future__ import annotations

import torch

from kvfree.mixers.ska import SKA


def ska_layers(model) -> list[SKA]:
    return [m for m in model.modules() if isinstance(m, SKA)]


def _gram_stats(layer: SKA, x: torch.Tensor, mask, n_ctx: int, n_kv: int) -> dict:
    """cond(G̃), filler share and β per token kind from the layer input x [B, T, D]."""
    with torch.no_grad():
        z, _, _, beta, _ = layer._project(
            x, layer.init_state(x.shape[0], device=x.device, dtype=x.dtype).conv
        )
        z = z[:, :n_ctx].double()  # [B, T, H, r]
        if layer.norm == "l2":
            zh = z / z.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        else:  # seqmax: divided by the largest written key norm
            zh = z / z.norm(dim=-1).amax(1, keepdim=True).unsqueeze(-1).clamp_min(1e-12)
        w = torch.ones(z.shape[:3], dtype=z.dtype, device=z.device)
        if beta is not None:
            w = w * beta[:, :n_ctx].double()
        if mask is not None:
            w = w * mask[:, :n_ctx, None].double()
        G = torch.einsum("bth,bthi,bthj->bhij", w, zh, zh)
        G = G + layer.cfg.eps * torch.eye(layer.r, dtype=G.dtype, device=G.device)
        ev = torch.linalg.eigvalsh(G)
        cond = (ev[..., -1] / ev[..., 0].clamp_min(1e-300)).median()
        mass = w * zh.pow(2).sum(-1)  # [B, T, H]
        kinds = {
            "beta_key": w[:, 0:n_kv:2],
            "beta_value": w[:, 1:n_kv:2],
            "beta_filler": w[:, n_kv:],
        }
        out = {k: float(v.mean()) if v.numel() else None for k, v in kinds.items()}
        total = float(mass.sum())
        out["filler_share"] = float(mass[:, n_kv:].sum()) / total if total > 0 else None
        out["cond_G"] = float(cond)
    return out


def probe(model, batch: dict, *, num_kv_pairs: int, gap: int) -> dict:
    """The diagnostics of the module docstring on ``batch`` (inputs, labels, optional mask) of
    an ``mqar_gap`` cell with ``num_kv_pairs`` pairs and ``gap`` filler tokens."""
    from kvfree.train import lm_loss

    layers = ska_layers(model)
    if not layers:
        return {}
    inputs = {}
    hooks = [
        layer.register_forward_pre_hook(lambda mod, args, i=i: inputs.__setitem__(i, args[0]))
        for i, layer in enumerate(layers)
    ]
    was_training = model.training
    model.eval()
    try:
        mask = batch.get("mask")
        with torch.enable_grad():  # the bench evaluates under no_grad
            logits, _ = model(batch["inputs"], mask=mask)
            loss = lm_loss(logits, batch["labels"])
        names = ("k_proj", "q_proj", "v_proj", "beta_proj")
        params = [
            (n, getattr(layer, n).weight)
            for layer in layers
            for n in names
            if getattr(layer, n) is not None
        ]
        grads = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    out: dict = {"loss": float(loss.detach())}
    for (n, _), g in zip(params, grads, strict=True):
        key = "grad_" + n.split("_")[0]
        out[key] = out.get(key, 0.0) + (float(g.norm()) if g is not None else 0.0)
    n_kv = 2 * num_kv_pairs
    stats = [
        _gram_stats(layer, inputs[i], mask, n_kv + gap, n_kv) for i, layer in enumerate(layers)
    ]
    for key in stats[0]:
        vals = [s[key] for s in stats if s[key] is not None]
        out[key] = sum(vals) / len(vals) if vals else None
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in out.items()}
