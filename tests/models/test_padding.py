"""Prompts of different lengths in one batch (``attention_mask``, left or right padding): every
row computes, in float64, what its prompt computes alone — prefill logits, segmented prefill,
greedy generation — for every mixer that takes padding; the others say so in one line."""

import pytest
import torch

from kvfree.mixers import available, get_mixer_class
from kvfree.models import LanguageModel, ModelConfig
from kvfree.state import select_rows

from .test_lm import V, model_for

LENGTHS = (13, 7, 1, 10)


def padded(lengths, side, seed=0):
    """ids [B, T] with row b's prompt in n_b positions (left/right/mixed padding, pad id 0),
    the attention mask, and the prompts alone."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    am = torch.zeros(len(lengths), T, dtype=torch.long)
    prompts = []
    for b, n in enumerate(lengths):
        p = torch.randint(1, V, (n,), generator=g)
        left = side == "left" or (side == "mixed" and b % 2 == 0)
        sl = slice(T - n, T) if left else slice(0, n)
        ids[b, sl], am[b, sl] = p, 1
        prompts.append((p, sl))
    return ids, am, prompts


def takes_padding(model: LanguageModel) -> bool:
    return all(m.supports_padding for m in model.mixers())


@pytest.mark.parametrize("name", available())
@pytest.mark.parametrize("side", ["left", "right", "mixed"])
def test_padded_prefill_and_generate_equal_each_prompt_alone(name, side):
    model = model_for(name)
    ids, am, prompts = padded(LENGTHS, side)
    if not takes_padding(model):
        with pytest.raises(ValueError, match="padded batches"):
            model.prefill(ids, attention_mask=am)
        return
    with torch.no_grad():
        logits, _ = model.prefill(ids, attention_mask=am, segment=None)
        seg, _ = model.prefill(ids, attention_mask=am, segment=4) if model.causal else (None, None)
        out = model.generate(ids, 6, attention_mask=am)
    for b, (p, sl) in enumerate(prompts):
        with torch.no_grad():
            alone, _ = model.prefill(p[None], segment=None)
            gen = model.generate(p[None], 6)
        assert (logits[b, sl] - alone[0]).abs().max() < 1e-9, f"row {b} prefill logits"
        if seg is not None:
            assert (seg[b, sl] - alone[0]).abs().max() < 1e-9, f"row {b} segmented prefill"
        assert torch.equal(out[b, ids.shape[1] :], gen[0, len(p) :]), f"row {b} generation"


@pytest.mark.parametrize("variant", ["lm", "mqar"])
def test_fdm_segments_and_cache_skip_the_padding(variant):
    """FDM's own segments (4 tokens) cut through the padding; a window of 3 and a heap of 2
    hold only tokens (padding is never read nor ranked), and positions are each row's own."""
    torch.manual_seed(0)
    opts = {"fdm": {"variant": variant, "segment": 4, "window": 3, "top_k": 2}}
    cfg = ModelConfig(vocab_size=V, d_model=32, layers=["fdm", "fdm"], mixer_options=opts)
    model = LanguageModel(cfg).double().eval()
    ids, am, prompts = padded(LENGTHS, "left")
    with torch.no_grad():
        logits, _ = model.prefill(ids, attention_mask=am, segment=None)
        out = model.generate(ids, 8, attention_mask=am)
        for b, (p, sl) in enumerate(prompts):
            alone, _ = model.prefill(p[None], segment=None)
            assert (logits[b, sl] - alone[0]).abs().max() < 1e-9, f"row {b} prefill logits"
            assert torch.equal(out[b, ids.shape[1] :], model.generate(p[None], 8)[0, len(p) :])


def test_learned_positions_follow_each_row():
    model = model_for("attention", pos_emb="learned", max_len=64)
    ids, am, prompts = padded(LENGTHS, "left")
    with torch.no_grad():
        out = model.generate(ids, 5, attention_mask=am)
        for b, (p, _) in enumerate(prompts):
            assert torch.equal(out[b, ids.shape[1] :], model.generate(p[None], 5)[0, len(p) :])


def test_forward_with_padding_keeps_gradients_of_tokens_only():
    """A training batch of different lengths: the loss gradient equals the sum over prompts."""
    model = model_for("gated_deltanet").train()
    ids, am, prompts = padded(LENGTHS, "right")
    logits, _ = model(ids, attention_mask=am)
    sum(logits[b, sl].logsumexp(-1).sum() for b, (_, sl) in enumerate(prompts)).backward()
    padded_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for p, _ in prompts:
        model(p[None])[0].logsumexp(-1).sum().backward()
    for a, b in zip(padded_grads, (p.grad for p in model.parameters())):
        assert (a - b).abs().max() < 1e-9


@pytest.mark.parametrize(
    "am, match",
    [
        (torch.tensor([[1, 0, 1, 1]]), "padding between tokens"),
        (torch.tensor([[1, 1, 1]]), "shape of ids"),
        (torch.tensor([[2, 1, 1, 1]]), "1 for a token and 0 for padding"),
    ],
)
def test_bad_attention_masks_say_what_is_wrong(am, match):
    model = model_for("mamba2")
    with pytest.raises(ValueError, match=match):
        model.prefill(torch.ones(1, 4, dtype=torch.long), attention_mask=am)


def test_padding_after_tokens_is_refused():
    model = model_for("attention")
    ids = torch.ones(1, 4, dtype=torch.long)
    with torch.no_grad():
        _, state = model.prefill(ids)
        with pytest.raises(ValueError, match="padding may only precede a prompt"):
            model(ids, state, attention_mask=torch.tensor([[0, 1, 1, 1]]))


def test_select_rows_reorders_states_and_padding():
    """Beam search's reorder: the state of rows [2, 0, 0] decodes what those rows decode."""
    model = model_for("attention")
    ids, am, _ = padded(LENGTHS, "left")
    rows = torch.tensor([2, 0, 0])
    with torch.no_grad():
        last, state = model.prefill(ids, attention_mask=am, last_only=True)
        tok = last.argmax(-1)
        ref, _ = model.step(tok, state)
        got, _ = model.step(tok[rows], select_rows(state, rows))
    assert (got - ref[rows]).abs().max() < 1e-12


def test_every_layer_takes_padding_but_attention_sinks():
    """Every registered mixer takes padded batches; attention with sinks (each row's first
    tokens) refuses them in one line."""
    assert [n for n in available() if not get_mixer_class(n).supports_padding] == []
    opts = {"attention": {"window": 4, "sinks": 1}}
    model = LanguageModel(
        ModelConfig(vocab_size=V, d_model=32, layers=["attention"], mixer_options=opts)
    )
    ids, am, _ = padded(LENGTHS, "left")
    with pytest.raises(ValueError, match="does not take padded batches"):
        model.prefill(ids, attention_mask=am)
