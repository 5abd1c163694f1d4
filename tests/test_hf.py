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


def test_padding_and_beam_search_are_refused_with_a_message():
    _, hf = _pair("fixed")
    ids = torch.randint(1, V, (2, 5))
    mask = torch.ones_like(ids)
    mask[0, 0] = 0
    with pytest.raises(ValueError, match="one length per batch"):
        hf.generate(ids, attention_mask=mask, max_new_tokens=3)
    with pytest.raises((NotImplementedError, ValueError)):
        hf.generate(ids, max_new_tokens=3, num_beams=2)


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
