"""Model-level contract: forward = prefill + step (float64), clear errors, constant state."""

import pytest
import torch

import kvfree
from kvfree.mixers import available, get_mixer_class, names
from kvfree.models import LanguageModel, ModelConfig, preset, preset_names

V = 50


#: evicting caches keep every token below their budget: the model-level equivalences hold for
#: them there (above it decode is the reference by design: tests/mixers/test_kv_evict.py)
EVICTING = ("attention_h2o", "attention_snapkv")


def model_for(name: str, budget: int = 1024, **kw) -> LanguageModel:
    torch.manual_seed(0)
    first = name if get_mixer_class(name).is_block else "shortconv"
    opts = {name: {"budget": budget}} if name in EVICTING else {}
    cfg = ModelConfig(vocab_size=V, d_model=32, layers=[first, name], mixer_options=opts, **kw)
    return LanguageModel(cfg).double().eval()


def test_every_registered_mixer_is_implemented():
    missing = sorted(set(names()) - set(available()))
    assert not missing, f"registered but not importable: {missing}"


@pytest.mark.parametrize("name", available())
@pytest.mark.parametrize("split", [1, 17, 40])
def test_forward_equals_prefill_plus_step(name, split):
    model = model_for(name)
    ids = torch.randint(0, V, (2, 57), generator=torch.Generator().manual_seed(split))
    with torch.no_grad():
        full, state_full = model(ids)
        logits, state = model.prefill(ids[:, :split])
        steps = [logits]
        for t in range(split, ids.shape[1]):
            lt, state = model.step(ids[:, t], state)
            steps.append(lt[:, None])
    got = torch.cat(steps, 1)
    assert (got - full).abs().max().item() < 1e-9
    assert (got.argmax(-1) == full.argmax(-1)).all()
    assert kvfree.state_bytes(state) == kvfree.state_bytes(state_full)


@pytest.mark.parametrize("name", available())
def test_fp32_top1_agreement(name):
    model = model_for(name).float()
    ids = torch.randint(0, V, (2, 80), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full, _ = model(ids)
        _, state = model.prefill(ids[:, :10])
        outs = []
        for t in range(10, 80):
            lt, state = model.step(ids[:, t], state)
            outs.append(lt)
    got = torch.stack(outs, 1)
    ref = full[:, 10:80]
    rel = ((got - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()
    assert rel < 1e-4
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean().item() == 1.0


@pytest.mark.parametrize("name", [n for n in available() if get_mixer_class(n).fixed_memory])
def test_fixed_memory_model_state_is_constant(name):
    model = model_for(name, budget=8)  # H2O: bounded once the budget fills
    sizes = set()
    for T in (16, 700):
        with torch.no_grad():
            _, s = model.prefill(torch.randint(0, V, (1, T)))
        sizes.add(kvfree.state_bytes(s))
    assert len(sizes) == 1


def test_generate_matches_recomputation():
    model = model_for("linear_attention")
    ids = torch.randint(0, V, (2, 9))
    out = model.generate(ids, 6)
    seq = ids
    for _ in range(6):  # greedy by recomputing the full forward every token
        with torch.no_grad():
            nxt = model(seq)[0][:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert torch.equal(out, seq)


def test_errors_are_clear():
    model = model_for("linear_attention", pos_emb="learned", max_len=20)
    with pytest.raises(ValueError, match="out of vocabulary"):
        model(torch.tensor([[1, 2, V]]))
    with pytest.raises(ValueError, match="max_len=20"):
        model(torch.zeros(1, 21, dtype=torch.long))
    _, state = model.prefill(torch.zeros(1, 20, dtype=torch.long))
    with pytest.raises(ValueError, match="max_len=20"):
        model.step(torch.zeros(1, dtype=torch.long), state)
    with pytest.raises(TypeError, match="integer"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="shape"):
        model(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown mixer name: 'atention' \\(did you mean"):
        LanguageModel(ModelConfig(vocab_size=V, layers=["atention"]))
    with pytest.raises(ValueError, match="unknown option for mixer 'linear_attention': 'heads'"):
        LanguageModel(
            ModelConfig(
                vocab_size=V,
                layers=["linear_attention"],
                mixer_options={"linear_attention": {"heads": 4}},
            )
        )
    with pytest.raises(ValueError, match="unknown model config key: 'd_modle'"):
        ModelConfig.from_dict({"vocab_size": V, "d_modle": 3})
    with pytest.raises(ValueError, match="does not take a write mask"):
        get_mixer_class("linear_attention")(8)(torch.randn(1, 3, 8), mask=torch.ones(1, 3))


def test_config_roundtrip_and_layer_options():
    cfg = ModelConfig(
        vocab_size=V,
        d_model=32,
        layers=["linear_attention", "linear_attention"],
        mixer_options={"linear_attention": {"num_heads": 4}},
        layer_options={1: {"normalize": False}},
    )
    again = ModelConfig.from_dict(cfg.to_dict())
    assert again == cfg
    model = LanguageModel(again)
    heads = [m.H for m in model.mixers()]
    norms = [m.normalize for m in model.mixers()]
    assert heads == [4, 4] and norms == [True, False]


@pytest.mark.parametrize("name", preset_names())
def test_presets_build(name):
    cfg = preset(name)
    if not set(cfg.layers) <= set(available()):
        pytest.skip(f"{name} uses a mixer not implemented yet")
    if cfg.d_model > 256:
        pytest.skip("large preset: parameter counts are tested in its own module")
    assert LanguageModel(cfg).num_parameters() > 0


def test_segmented_prefill_carries_the_write_mask():
    """A causal masked model (SKA chunk mode with a write gate) prefilled in segments reads each
    segment's slice of the mask; a non-causal one (SKA prefix mode) is prefilled in one pass."""
    from kvfree.models import preset

    torch.manual_seed(0)
    model = LanguageModel(preset("recall-mamba2-ska-prefix")).double().eval()
    assert not model.causal and model.prefill_segment(10_000) is None
    ids = torch.randint(0, model.config.vocab_size, (2, 40))
    with pytest.raises(ValueError, match="non-causal"):
        model.prefill(ids, mask=torch.ones(2, 40, dtype=torch.bool), segment=16)
    cfg = preset("recall-mamba2-ska")
    model = LanguageModel(cfg).double().eval()
    assert model.causal and model.fixed_memory
    with torch.no_grad():  # SKA's output projection starts at zero: make the memory count
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    mask = torch.rand(2, 40) < 0.6
    whole, s1 = model.prefill(ids, mask=mask, segment=None)
    parts, s2 = model.prefill(ids, mask=mask, segment=16)
    torch.testing.assert_close(parts, whole, atol=1e-10, rtol=0)
    t = ids[:, 0]
    torch.testing.assert_close(model.step(t, s2)[0], model.step(t, s1)[0], atol=1e-10, rtol=0)


@pytest.mark.parametrize(
    "name", ["recall-gdn-attn", "recall-gdn-swa", "recall-swa-ska", "recall-mla"]
)
def test_hybrid_bytes_grow_only_in_attention(name):
    """Hybrids (docs/frontier.md §4): the state grows only in a full-attention layer; a model's
    forward equals prefill + token-by-token decode (float64)."""
    import kvfree

    torch.manual_seed(0)
    model = LanguageModel(preset(name)).double().eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 300))
    with torch.no_grad():
        sizes = {T: kvfree.state_bytes(model.prefill(ids[:, :T])[1]) for T in (100, 200, 300)}
        logits, _ = model(ids[:, :80])
        _, state = model.prefill(ids[:, :50])
        steps = []
        for t in range(50, 80):
            lg, state = model.step(ids[:, t], state)
            steps.append(lg)
    torch.testing.assert_close(torch.stack(steps, 1), logits[:, 50:80], rtol=1e-9, atol=1e-9)
    per_token = {
        "recall-gdn-attn": 2 * 2 * 32 * 8,  # K, V · n_kv 2 · d_h 32 · float64
        "recall-mla": (32 + 16) * 2 * 8,  # (d_c + d_r) per layer · 2 layers
    }.get(name, 0)
    assert sizes[200] - sizes[100] == sizes[300] - sizes[200] == 100 * per_token
