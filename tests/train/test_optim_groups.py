"""Weight-decay groups are decided by parameter name before the model is wrapped: FSDP2 replaces
every parameter by a sharded one and drops the ``_no_weight_decay`` marks (MesaNet's λ,
Mamba-2's A_log / dt_bias / D, SKA's γ and η), so the groups cannot be read off the wrapped
parameters."""

import subprocess
import sys

import torch

from kvfree.models import LanguageModel, ModelConfig
from kvfree.train import TrainConfig, Trainer
from kvfree.train.optim import no_decay_names, param_groups


def make_model():
    torch.manual_seed(0)
    return LanguageModel(ModelConfig(vocab_size=32, d_model=32, layers=["mesanet", "ska"]))


def groups_by_name(model, groups):
    names = {id(p): n for n, p in model.named_parameters()}
    return {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in groups}


def test_marked_parameters_get_no_decay():
    m = make_model()
    plain = no_decay_names(m)
    marked = {n for n, p in m.named_parameters() if getattr(p, "_no_weight_decay", False)}
    assert any("lambda_raw" in n for n in marked)  # MesaNet's ridge
    assert any(n.endswith(("gamma_raw", "eta")) for n in marked), marked  # SKA's γ, η
    assert marked <= plain
    by = groups_by_name(m, param_groups(m, 0.1))
    assert by[0.0] == plain and not (by[0.1] & plain)


def test_trainer_keeps_the_groups_when_the_marks_are_gone():
    """What FSDP2 does to the parameters, simulated: strip every mark after the Trainer has
    taken the names, rebuild the optimizer (as Freeze-Scan does) — the groups do not change."""
    cfg = TrainConfig(steps=1, progress=False, device="cpu", weight_decay=0.1)
    t = Trainer(make_model(), cfg, lambda step: {})
    before = groups_by_name(t.model, t.opt.param_groups)
    for p in t.model.parameters():
        if hasattr(p, "_no_weight_decay"):
            del p._no_weight_decay
    assert not no_decay_names(t.model) >= t.no_decay  # the marks are really gone
    t.rebuild_optimizer()
    assert groups_by_name(t.model, t.opt.param_groups) == before
    assert before[0.0] == t.no_decay


FSDP_SCRIPT = """
import tempfile, torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from kvfree.models import LanguageModel, ModelConfig
from kvfree.train.optim import no_decay_names, param_groups
dist.init_process_group("gloo", init_method="file://" + tempfile.mktemp(), rank=0, world_size=1)
m = LanguageModel(ModelConfig(vocab_size=32, d_model=32, layers=["mesanet", "mamba2"]))
names = no_decay_names(m)
for b in m.blocks:
    fully_shard(b)
fully_shard(m)
lost = not any(getattr(p, "_no_weight_decay", False) for p in m.parameters())
ids = {id(p): n for n, p in m.named_parameters()}
zero = [g for g in param_groups(m, 0.1, names) if g["weight_decay"] == 0]
plain = {ids[id(p)] for g in zero for p in g["params"]}
print(lost, plain == names, sorted(n for n in names if "mixer" in n))
dist.destroy_process_group()
"""


def test_real_fsdp2_drops_the_marks_and_names_keep_the_groups():
    """A one-process FSDP2 sharding (gloo, world size 1) of MesaNet + Mamba-2 layers. (SKA's
    scalar η cannot be sharded by FSDP2 at all: it refuses 0-dim parameters.)"""
    res = subprocess.run(
        [sys.executable, "-c", FSDP_SCRIPT], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout.strip().splitlines()[-1]
    assert out.startswith("True True") and "lambda_raw" in out and "A_log" in out, out
