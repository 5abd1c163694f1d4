"""Perplexity / bits per byte, and parallel forward = prefill + token-by-token decoding."""

import math

import numpy as np
import pytest
import torch

from kvfree.models import LanguageModel, ModelConfig
from kvfree.train.lm_eval import evaluate_lm, nll_decode, nll_parallel, summarize

V = 40


class Uniform(torch.nn.Module):
    """Zero logits everywhere: NLL = ln V per token, for both passes."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, ids, state=None, mask=None):
        return torch.zeros(*ids.shape, V) + self.w, None

    def prefill(self, ids):
        return self.forward(ids)

    def step(self, ids_t, state):
        return torch.zeros(ids_t.shape[0], V) + self.w, state


def windows(n=6, T=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (n, T + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def test_uniform_model_gives_known_ppl_and_bpb():
    x, y = windows()
    token_bytes = np.full(V, 3)  # every token stands for 3 bytes
    res = evaluate_lm(Uniform(), x, y, token_bytes, decode_windows=2)
    p = res["parallel"]
    assert p["tokens"] == y.numel() and p["bytes"] == 3 * y.numel()
    assert p["ppl"] == pytest.approx(V) and p["loss"] == pytest.approx(math.log(V))
    assert p["bpb"] == pytest.approx(math.log2(V) / 3)
    assert res["decode"]["bpb_diff"] == pytest.approx(0, abs=1e-12)


def test_bpb_uses_the_bytes_of_the_scored_tokens():
    nll = torch.full((1, 4), math.log(2))  # 1 bit per token
    labels = torch.tensor([[0, 1, 1, 2]])
    out = summarize(nll, labels, np.array([1, 2, 4]))
    assert out["bytes"] == 9 and out["bpb"] == pytest.approx(4 / 9)


@pytest.mark.parametrize("prefill", [1, 7, 20])
def test_parallel_and_decode_agree_on_a_real_model(prefill):
    torch.manual_seed(0)
    model = LanguageModel(
        ModelConfig(vocab_size=V, d_model=16, layers=["shortconv", "linear_attention"])
    ).eval()
    with torch.no_grad():  # make the model non-trivial
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x, y = windows()
    par = nll_parallel(model, x, y, batch_size=4)
    dec = nll_decode(model, x, y, batch_size=4, prefill=prefill)
    assert (par - dec).abs().max() < 1e-4
    assert par.std() > 0.1  # the per-token losses are not all equal
    res = evaluate_lm(model, x, y, np.ones(V, dtype=np.int64), decode_windows=3, prefill=prefill)
    assert abs(res["decode"]["bpb_diff"]) < 1e-5
    assert res["decode"]["parallel"]["tokens"] == 3 * 20
    assert model.training is False


def test_decode_notices_a_broken_step():
    """A step that ignores its state (a decode bug) shows up as a large difference."""
    torch.manual_seed(0)
    model = LanguageModel(
        ModelConfig(vocab_size=V, d_model=16, layers=["shortconv", "linear_attention"])
    ).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x, y = windows()
    good = nll_parallel(model, x, y)
    real_step = model.step
    model.step = lambda ids_t, state: real_step(ids_t, None)
    bad = nll_decode(model, x, y, prefill=1)
    assert (good - bad).abs().max() > 1e-2
    with pytest.raises(ValueError, match="prefill"):
        nll_decode(model, x, y, prefill=0)
