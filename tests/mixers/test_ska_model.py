"""SKA inside a model and its parameters (docs/ska.md §7, §10, §16 test 8): Mamba-2 + SKA decodes
exactly, initialisation, weight-decay exclusions, the β gate, diagnostics and ablations."""

import pytest
import torch

from kvfree.mixers import build_mixer
from kvfree.mixers.ska import ABLATIONS, ablation
from kvfree.models import LanguageModel, ModelConfig
from kvfree.train.optim import param_groups

V = 40


def model(mode: str, dtype=torch.float64, **ska) -> LanguageModel:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=V,
        d_model=32,
        layers=["mamba2", "ska"],
        mixer_options={
            "mamba2": dict(head_dim=16, d_state=8),
            "ska": dict(num_heads=4, rank=6, chunk_size=8, mode=mode, **ska),
        },
    )
    lm = LanguageModel(cfg)
    with torch.no_grad():  # out_proj is zero at init: make SKA's contribution visible
        lm.blocks[1].mixer.out_proj.weight.normal_(0, 0.2)
    return lm.to(dtype).eval()


def decode(lm, ids, split, mask=None):
    with torch.no_grad():
        logits, state = lm.prefill(ids[:, :split], mask=None if mask is None else mask[:, :split])
        outs = [logits]
        for t in range(split, ids.shape[1]):
            lt, state = lm.step(ids[:, t], state)
            outs.append(lt[:, None])
    return torch.cat(outs, 1)


@pytest.mark.parametrize("mode", ["token", "chunk"])
def test_model_forward_equals_prefill_plus_decode(mode):
    ids = torch.randint(0, V, (2, 45), generator=torch.Generator().manual_seed(0))
    lm = model(mode)
    with torch.no_grad():
        full, _ = lm(ids)
    for split in (1, 8, 13):
        assert (decode(lm, ids, split) - full).abs().max() < 1e-10
    lm32 = model(mode, torch.float32)
    with torch.no_grad():
        full32, _ = lm32(ids)
    got = decode(lm32, ids, 10)[:, 10:]
    ref = full32[:, 10:]
    rel = ((got - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()
    assert rel <= 1e-4 and (got.argmax(-1) == ref.argmax(-1)).all()
    assert (full - model("token" if mode == "chunk" else "chunk")(ids)[0]).abs().max() > 1e-4


def test_model_prefix_mode_decodes_after_the_prefix():
    ids = torch.randint(0, V, (2, 40), generator=torch.Generator().manual_seed(1))
    mask = (torch.arange(40) < 25).double().expand(2, 40)
    lm = model("prefix")
    with torch.no_grad():
        full, _ = lm(ids, mask=mask)
    got = decode(lm, ids, 25, mask)
    assert (got - full).abs().max() < 1e-10  # the prefill already holds all mask = 1 tokens
    with pytest.raises(ValueError, match="mask"):
        lm(ids)  # no mask in prefix mode is an error, not a silent all-zero write


def test_initialisation():
    torch.manual_seed(0)
    m = build_mixer("ska", 64, num_heads=4, rank=12, beta_gate=True)
    for proj in (m.k_proj, m.q_proj):
        W = proj.weight.view(4, 12, 64)
        assert torch.allclose(W @ W.mT, torch.eye(12).expand(4, 12, 12), atol=1e-5)
    assert torch.equal(m.out_proj.weight, torch.zeros_like(m.out_proj.weight))
    assert m.eta.item() == 1.5 and m.gamma_raw.item() == 1.0
    x = torch.randn(2, 20, 64)
    y, _ = m(x)
    assert torch.equal(y, torch.zeros_like(y))  # a near-identity perturbation at init
    assert torch.equal(torch.sigmoid(m.beta_proj(x)), torch.full((2, 20, 4), 0.5))
    assert {"lambda_min", "sigma_max", "frac_clamped"} <= set(m.diagnostics)
    assert m.diagnostics["lambda_min"] >= 1e-3 * 0.999  # λ_min(G̃) ≥ ε
    ls = build_mixer("ska", 64, out_init="layerscale")
    assert ls.layerscale.item() == pytest.approx(1e-4) and ls.out_proj.weight.abs().sum() > 0


def test_gamma_eta_excluded_from_weight_decay_and_gamma_clamped():
    m = build_mixer("ska", 32, num_heads=2, rank=4, gamma_max=1.5)
    plain = {id(p) for g in param_groups(m, 0.1) if g["weight_decay"] == 0 for p in g["params"]}
    assert id(m.gamma_raw) in plain and id(m.eta) in plain
    assert id(m.k_proj.weight) not in plain
    for raw, want in ((0.3, 1.0), (1.2, 1.2), (9.0, 1.5)):
        with torch.no_grad():
            m.gamma_raw.fill_(raw)
        assert m.gamma(m.eta).item() == pytest.approx(want)
    assert build_mixer("ska", 32, use_gain=False).gamma_raw is None


def test_gradients_reach_gamma_and_eta():
    lm = model("token", torch.float32)
    lm.train()
    ids = torch.randint(0, V, (2, 30))
    lm(ids)[0].square().mean().backward()
    ska = lm.blocks[1].mixer
    assert ska.eta.grad.abs() > 0 and ska.gamma_raw.grad.abs() > 0
    assert ska.k_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_ablations_build_and_run(name):
    opts = ablation(name, num_heads=2, rank=4, chunk_size=8)
    m = build_mixer("ska", 16, **opts)
    x = torch.randn(1, 20, 16)
    mask = torch.ones(1, 20) if m.mode == "prefix" else None
    y, _ = m(x, None, mask)
    assert torch.isfinite(y).all()
    if name == "ridge":
        assert m.cfg.K == 0
    if name == "no_gain":
        assert m.gamma_raw is None
    if name == "no_specnorm":
        assert not m.cfg.spectral_norm
    with pytest.raises(ValueError, match="ablation"):
        ablation("no-such-thing")


def test_bad_options_raise():
    for kw, match in (
        (dict(rank=0), "rank"),
        (dict(K=-1), "K"),
        (dict(gamma_max=0.9), "gamma"),
        (dict(beta_mode="cube"), "beta_mode"),
        (dict(num_heads=5), "divisible"),
    ):
        with pytest.raises(ValueError, match=match):
            build_mixer("ska", 16, **kw)
