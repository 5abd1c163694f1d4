"""The Hugging Face integration (kvfree.hf, optional extra kvfree[hf]): transformers' generate
computes what LanguageModel.generate computes; the state is kvfree's (constant bytes for
fixed-memory models); save/load is bit-exact; what is not supported says so."""

import pytest
import torch

pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM  # noqa: E402

from kvfree.hf import CACHE_FIELD, KvfreeCache, KvfreeForCausalLM  # noqa: E402
from kvfree.models import LanguageModel, ModelConfig  # noqa: E402

V = 40
LAYERS = {"fixed": ["gated_deltanet", "mamba2"], "kv": ["attention", "shortconv"]}


def _pair(kind):
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(vocab_size=V, d_model=32, layers=LAYERS[kind])).eval()
    return model, KvfreeForCausalLM.from_kvfree(model)


@pytest.mark.parametrize("kind", list(LAYERS))
def test_hf_generate_equals_kvfree_generate(kind):
    model, hf = _pair(kind)
    ids = torch.randint(1, V, (2, 9))
    greedy = hf.generate(ids, max_new_tokens=15, do_sample=False, pad_token_id=0)
    assert torch.equal(greedy, model.generate(ids, 15))
    torch.manual_seed(3)
    ref = model.generate(ids, 15, temperature=0.7, top_k=8)
    torch.manual_seed(3)
    sampled = hf.generate(
        ids, max_new_tokens=15, do_sample=True, temperature=0.7, top_k=8, top_p=1.0, pad_token_id=0
    )
    assert torch.equal(sampled, ref)


@pytest.mark.parametrize("kind", list(LAYERS))
def test_the_cache_is_kvfree_state_constant_for_fixed_memory(kind):
    _, hf = _pair(kind)
    ids = torch.randint(1, V, (1, 6))
    sizes = []
    with torch.no_grad():
        out = hf(ids)
        cache = out[CACHE_FIELD]
        assert isinstance(cache, KvfreeCache) and cache.get_seq_length() == 6
        for _ in range(20):
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            out = hf(tok, **{CACHE_FIELD: cache})
            cache = out[CACHE_FIELD]
            sizes.append(cache.nbytes())
    assert cache.get_seq_length() == 26
    if kind == "fixed":
        assert len(set(sizes)) == 1 and sizes[0] > 0
    else:
        assert sizes[-1] > sizes[0]  # the KV cache grows with every token


def test_save_and_load_round_trip_is_bit_exact(tmp_path):
    model, hf = _pair("fixed")
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    back = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(back, KvfreeForCausalLM)
    a, b = hf.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.randint(1, V, (1, 5))
    assert torch.equal(
        back.generate(ids, max_new_tokens=10, do_sample=False), model.generate(ids, 10)
    )


@pytest.mark.parametrize("kind", list(LAYERS))
def test_a_left_padded_batch_generates_what_each_prompt_generates_alone(kind):
    model, hf = _pair(kind)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(1, V, (n,), generator=g) for n in (9, 4, 1)]
    ids = torch.zeros(3, 9, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, 9 - len(p) :], mask[b, 9 - len(p) :] = p, 1
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    for b, p in enumerate(prompts):
        assert torch.equal(out[b, 9:], model.generate(p[None], 8)[0, len(p) :]), f"row {b}"


def _beam_reference(model, ids, beams, steps):
    """Beam search written for the test: every candidate re-scored from scratch by the parallel
    forward, the ``beams`` best cumulative log-probabilities kept (no EOS, no length penalty)."""
    seqs, scores = ids, torch.zeros(1, dtype=torch.float64)
    for _ in range(steps):
        with torch.no_grad():
            logp = model(seqs)[0][:, -1].double().log_softmax(-1)  # [n, V]
        total = (scores[:, None] + logp).flatten()
        top = total.topk(beams).indices
        seqs = torch.cat([seqs[top // V], (top % V)[:, None]], 1)
        scores = total[top]
    return seqs[0]


@pytest.mark.parametrize("kind", list(LAYERS))
def test_beam_search_reorders_the_state_and_finds_the_reference_beam(kind):
    model, hf = _pair(kind)
    ids = torch.randint(1, V, (1, 6), generator=torch.Generator().manual_seed(2))
    out = hf.generate(
        ids, max_new_tokens=6, num_beams=3, do_sample=False, length_penalty=0.0,
        early_stopping=True, pad_token_id=0, eos_token_id=None,
    )  # fmt: skip
    assert torch.equal(out[0], _beam_reference(model, ids, 3, 6))


def test_assisted_generation_is_refused():
    _, hf = _pair("fixed")
    with pytest.raises(ValueError):
        hf.generate(torch.randint(1, V, (1, 5)), max_new_tokens=3, assistant_model=hf)


def test_labels_give_the_next_token_loss():
    model, hf = _pair("kv")
    ids = torch.randint(1, V, (2, 12))
    out = hf(ids, labels=ids)
    logits, _ = model(ids)
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(out.loss, ref)


def test_generate_prefills_the_last_logits_only():
    """generate asks for logits_to_keep=1: the prompt's [B, T, V] logits are never built."""
    model, hf = _pair("fixed")
    ids = torch.randint(1, V, (2, 9))
    with torch.no_grad():
        last = hf(ids, logits_to_keep=1).logits
        full = hf(ids).logits
    assert last.shape == (2, 1, V) and full.shape == (2, 9, V)
    torch.testing.assert_close(last[:, 0], full[:, -1])
