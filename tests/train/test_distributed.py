"""Data parallel on CPU: 2 gloo processes (spawned here) against a single-process run.

DDP: replicas stay bit-identical and match the single-process run of the same global batch
(loss and parameters, to fp32 reduction-order noise), even with unequal numbers of scored
tokens per rank. FSDP2 smoke run: same losses, and its gathered checkpoint holds the same
parameters.
"""

import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kvfree.models import LanguageModel, ModelConfig
from kvfree.train import TrainConfig, Trainer
from kvfree.train.checkpoint import load_checkpoint

V, STEPS = 32, 4


def make_model():
    torch.manual_seed(0)
    return LanguageModel(
        ModelConfig(vocab_size=V, d_model=16, layers=["shortconv", "linear_attention"])
    )


def batches(step):
    """Global batch of 4 rows; rows 2-3 (rank 1's) have most labels unscored."""
    g = torch.Generator().manual_seed(step)
    x = torch.randint(0, V, (4, 12), generator=g)
    labels = x.roll(-1, 1)
    labels[2:, 3:] = -100
    return {"inputs": x, "labels": labels}


def cfg(**kw):
    return TrainConfig(steps=STEPS, lr=1e-2, warmup_steps=1, log_every=1, progress=False, **kw)


def _losses(trainer):
    return [r["loss"] for r in trainer.history if "loss" in r]


def _worker(rank, tmp):
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rdzv", rank=rank, world_size=2)
    try:
        ddp = Trainer(make_model(), cfg(distributed="auto"), batches)
        assert ddp.mode == "ddp"
        ddp.fit()
        fsdp = Trainer(make_model(), cfg(distributed="fsdp"), batches)
        fsdp.fit()
        fsdp.save_checkpoint(f"{tmp}/fsdp.pt")
        torch.save(
            {
                "params": {n: p.detach() for n, p in ddp.model.named_parameters()},
                "ddp_loss": _losses(ddp),
                "fsdp_loss": _losses(fsdp),
            },
            f"{tmp}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(str(tmp),), nprocs=2, join=True)
    single = Trainer(make_model(), cfg(distributed="none"), batches)
    single.fit()
    ranks = [torch.load(tmp / f"rank{r}.pt") for r in range(2)]
    return single, ranks, load_checkpoint(tmp / "fsdp.pt")


def test_ddp_replicas_stay_identical(runs):
    _, ranks, _ = runs
    for name, p in ranks[0]["params"].items():
        assert torch.equal(p, ranks[1]["params"][name]), name
    assert ranks[0]["ddp_loss"] == ranks[1]["ddp_loss"]


def test_ddp_matches_single_process_global_batch(runs):
    single, ranks, _ = runs
    assert ranks[0]["ddp_loss"] == pytest.approx(_losses(single), rel=1e-5)
    for name, p in single.model.named_parameters():
        torch.testing.assert_close(ranks[0]["params"][name], p.detach(), rtol=1e-4, atol=2e-5)
    moved = sum(
        (p.detach() - make_model().state_dict()[n]).abs().sum()
        for n, p in single.model.named_parameters()
    )
    assert moved > 0.1  # training really changed the parameters being compared


def test_fsdp2_smoke_matches_single_process(runs):
    single, ranks, ckpt = runs
    assert ranks[0]["fsdp_loss"] == pytest.approx(_losses(single), rel=1e-5)
    assert ckpt["trainer"]["world_size"] == 2 and ckpt["trainer"]["step"] == STEPS
    for name, p in single.model.named_parameters():
        torch.testing.assert_close(ckpt["model"][name], p.detach(), rtol=1e-4, atol=2e-5)


def test_uneven_global_batch_is_refused():
    from kvfree.train.distributed import shard_batch

    with pytest.raises(ValueError, match="divisible by 3"):
        shard_batch(batches(0), 0, 3)
    part = shard_batch(batches(0), 1, 2)
    assert torch.equal(part["inputs"], batches(0)["inputs"][2:])


def test_distributed_mode_without_process_group_is_refused():
    with pytest.raises(ValueError, match="torchrun"):
        Trainer(make_model(), cfg(distributed="ddp"), batches)
