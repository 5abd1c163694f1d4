"""Echo's Spectral Koopman MLP (docs/ska.md §12): rotation pairs with radius clamped to ≤ 1."""

import math

import pytest
import torch
import torch.nn.functional as F

from kvfree.blocks import KoopmanMLP, build_mlp
from kvfree.models import LanguageModel, ModelConfig
from kvfree.train.optim import param_groups


def test_registered_and_parameter_count():
    mlp = build_mlp("koopman", 48, 128)
    assert isinstance(mlp, KoopmanMLP)
    assert sum(p.numel() for p in mlp.parameters()) == 2 * 48 * 128 + 128  # lift, read, γ, ω
    model = LanguageModel(
        ModelConfig(vocab_size=11, d_model=32, layers=["shortconv"], mlp="koopman")
    )
    blk = model.blocks[0].mlp
    assert isinstance(blk, KoopmanMLP) and blk.d_ff == 128  # ceil(32·8/3 / 64)·64


def test_forward_matches_complex_reference():
    torch.manual_seed(0)
    mlp = KoopmanMLP(12, 20).double()
    with torch.no_grad():  # some radii above 1 (clamped), some below
        mlp.gamma.copy_(torch.linspace(0.3, 1.6, 10))
        mlp.omega.copy_(torch.linspace(-0.8, 0.9, 10))
    u = torch.randn(3, 5, 12, dtype=torch.float64)
    g = F.silu(u @ mlp.lift.weight.T)
    lam = torch.complex(mlp.gamma, mlp.omega)
    lam = lam / lam.abs() * lam.abs().clamp(max=1.0)
    zc = lam.conj() * torch.complex(g[..., :10], g[..., 10:])  # z¹ + i z² = conj(λ̃)(g¹ + i g²)
    ref = torch.cat([zc.real, zc.imag], -1) @ mlp.read.weight.T
    assert torch.allclose(mlp(u), ref, atol=1e-12)


def test_radius_clamped_and_contractive():
    mlp = KoopmanMLP(8, 16).double()
    with torch.no_grad():
        mlp.gamma.copy_(torch.tensor([2.0, 0.5, 0.0, -3.0, 0.6, 1.0, 0.1, 0.9]))
        mlp.omega.copy_(torch.tensor([1.0, 0.5, 4.0, 0.0, 0.8, 0.0, 0.0, -0.2]))
    a, b = mlp.eigenvalues()
    rho = torch.sqrt(a**2 + b**2)
    raw = torch.sqrt(mlp.gamma**2 + mlp.omega**2)
    assert (rho <= 1 + 1e-12).all()
    assert torch.allclose(rho, raw.clamp(max=1.0))  # radii ≤ 1 untouched, others set to 1
    assert torch.allclose(torch.atan2(b, a), torch.atan2(mlp.omega, mlp.gamma))  # angle kept
    # per pair ‖z‖ = ρ̃ ‖g‖: a rotation when ρ̃ = 1, a strict shrink otherwise (not norm-preserving)
    g1, g2 = torch.randn(2, 4, 8, dtype=torch.float64)
    z1, z2 = a * g1 + b * g2, -b * g1 + a * g2
    assert torch.allclose((z1**2 + z2**2).sqrt(), rho * (g1**2 + g2**2).sqrt())
    assert rho[1] < 1 and abs(rho[0].item() - 1.0) < 1e-12


def test_init_and_gradients_and_no_weight_decay():
    torch.manual_seed(1)
    mlp = KoopmanMLP(16, 64)
    assert torch.equal(mlp.gamma, torch.ones(32))
    assert 0.05 < mlp.omega.std().item() < 0.2  # ω ~ N(0, 0.1²)
    bound = math.sqrt(6 / (16 + 64))  # Xavier-uniform
    assert mlp.lift.weight.abs().max() <= bound and mlp.lift.weight.abs().max() > 0.8 * bound
    mlp(torch.randn(4, 16)).pow(2).sum().backward()
    assert mlp.gamma.grad.abs().sum() > 0 and mlp.omega.grad.abs().sum() > 0
    groups = param_groups(mlp, 0.1)
    plain = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(mlp.gamma) in plain and id(mlp.omega) in plain and id(mlp.lift.weight) not in plain


def test_gate_option_and_errors():
    mlp = KoopmanMLP(8, 16, gate=True)
    assert mlp(torch.randn(2, 8)).shape == (2, 8)
    assert sum(p.numel() for p in mlp.parameters()) == 3 * 8 * 16 + 16
    with pytest.raises(ValueError, match="even"):
        KoopmanMLP(8, 15)


def test_model_with_koopman_mlp_decodes_exactly():
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=30, d_model=32, layers=["shortconv", "linear_attention"], mlp="koopman"
    )
    model = LanguageModel(cfg).double().eval()
    ids = torch.randint(0, 30, (2, 20))
    with torch.no_grad():
        full, _ = model(ids)
        logits, state = model.prefill(ids[:, :7])
        outs = [logits]
        for t in range(7, 20):
            lt, state = model.step(ids[:, t], state)
            outs.append(lt[:, None])
    assert (torch.cat(outs, 1) - full).abs().max() < 1e-10
