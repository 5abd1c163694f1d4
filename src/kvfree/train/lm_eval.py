"""Language-model evaluation: perplexity and bits per byte, through the parallel forward and
through prefill + token-by-token decoding (the two must agree: docs/design.md §1).

Definitions, over the scored tokens (every label of every window):

    loss = Σ NLL / n_tokens            (nats per token)
    ppl  = exp(loss)                   (per token of *this* tokenizer)
    bpb  = Σ NLL / ln 2 / n_bytes      (n_bytes = UTF-8 bytes the scored tokens stand for)

bpb does not depend on the tokenizer, so it is the number to compare across tokenizers.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def _nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none").view(
        labels.shape
    )


@torch.no_grad()
def nll_parallel(
    model, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 16, device=None
) -> torch.Tensor:
    """Per-token NLL [W, T] from one parallel forward per window."""
    device = device or next(model.parameters()).device
    out = []
    for i in range(0, len(inputs), batch_size):
        logits, _ = model(inputs[i : i + batch_size].to(device))
        out.append(_nll(logits, labels[i : i + batch_size].to(device)).cpu())
    return torch.cat(out)


@torch.no_grad()
def nll_decode(
    model,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 16,
    prefill: int = 1,
    device=None,
) -> torch.Tensor:
    """Per-token NLL [W, T]: ``prefill`` tokens through ``model.prefill``, the rest one token
    at a time through ``model.step`` (the decoder's constant-memory path)."""
    device = device or next(model.parameters()).device
    T = inputs.shape[1]
    if not 1 <= prefill <= T:
        raise ValueError(f"prefill must be in [1, {T}] (the window length), got {prefill}")
    out = []
    for i in range(0, len(inputs), batch_size):
        x, y = inputs[i : i + batch_size].to(device), labels[i : i + batch_size].to(device)
        logits, state = model.prefill(x[:, :prefill])
        cols = [_nll(logits, y[:, :prefill])]
        for t in range(prefill, T):
            lt, state = model.step(x[:, t], state)
            cols.append(_nll(lt[:, None], y[:, t : t + 1]))
        out.append(torch.cat(cols, 1).cpu())
    return torch.cat(out)


def summarize(nll: torch.Tensor, labels: torch.Tensor, token_bytes: np.ndarray) -> dict:
    """loss / ppl / bpb over all tokens of ``nll`` [W, T] (see the module docstring)."""
    total = float(nll.double().sum())
    n_tok = labels.numel()
    n_bytes = int(torch.as_tensor(token_bytes)[labels.flatten()].sum())
    loss = total / max(1, n_tok)
    return {
        "tokens": n_tok,
        "bytes": n_bytes,
        "loss": loss,
        "ppl": math.exp(min(loss, 700.0)),
        "bpb": total / math.log(2) / max(1, n_bytes),
    }


def evaluate_lm(
    model,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    token_bytes: np.ndarray,
    *,
    decode_windows: int = 0,
    prefill: int = 1,
    batch_size: int = 16,
) -> dict:
    """Parallel evaluation over all windows, and (``decode_windows > 0``) decoding of the
    first ``decode_windows`` windows compared with the parallel numbers on those windows."""
    was_training = model.training
    model.eval()
    try:
        nll_p = nll_parallel(model, inputs, labels, batch_size)
        out = {
            "parallel": summarize(nll_p, labels, token_bytes),
            "windows": len(inputs),
            "seq_len": inputs.shape[1],
        }
        if decode_windows > 0:
            k = min(decode_windows, len(inputs))
            nll_d = nll_decode(model, inputs[:k], labels[:k], batch_size, prefill)
            sub_p = summarize(nll_p[:k], labels[:k], token_bytes)
            sub_d = summarize(nll_d, labels[:k], token_bytes)
            out["decode"] = {
                "windows": k,
                "prefill": prefill,
                "parallel": sub_p,
                "decode": sub_d,
                "bpb_diff": sub_d["bpb"] - sub_p["bpb"],
                "max_token_nll_diff": float((nll_d - nll_p[:k]).abs().max()),
            }
    finally:
        model.train(was_training)
    return out
