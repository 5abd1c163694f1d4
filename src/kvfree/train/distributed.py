"""Data-parallel training with ``torch.distributed``: DDP, and FSDP2 for larger models.

Launch the ordinary trainer under ``torchrun`` (one process per device)::

    torchrun --nproc_per_node 2 -m kvfree train --preset lm-mamba2 ...   # DDP
    torchrun --nproc_per_node 2 -m kvfree train ... --set train.distributed=fsdp  # FSDP2

``init_from_env`` starts the process group when ``WORLD_SIZE > 1`` (NCCL on CUDA, gloo on CPU).

Data design: the batch function still returns the **global** batch ``batches(step)``; every
rank builds it (cheap for token streams) and keeps its contiguous slice of rows
(:func:`shard_batch`). The loss on each rank is ``Σ local token NLL · world / Σ global scored
tokens``, so after DDP's gradient averaging the gradient equals the single-process gradient of
the global batch's mean loss — even when ranks hold different numbers of scored tokens.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def init_from_env(backend: str | None = None) -> bool:
    """Start the default process group from torchrun's variables; False when not launched so."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return is_distributed()
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return True


def local_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def shard_batch(batch: dict[str, Any], r: int, world: int) -> dict[str, Any]:
    """Rows ``[r·B/W, (r+1)·B/W)`` of every tensor in the global batch."""
    if world == 1:
        return batch
    rows = batch["inputs"].shape[0]
    if rows % world:
        raise ValueError(
            f"global batch of {rows} rows cannot be split evenly over {world} "
            f"processes; use a batch size divisible by {world}"
        )
    n = rows // world
    return {
        k: v[r * n : (r + 1) * n]
        if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == rows
        else v
        for k, v in batch.items()
    }


def global_mean_loss(
    logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to backpropagate, global mean loss to report) for a data-parallel step."""
    nll = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        labels.reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )
    stats = torch.stack([nll.detach(), (labels != -100).sum().to(nll.dtype)])
    dist.all_reduce(stats)
    count = stats[1].clamp_min(1)
    return nll * world_size() / count, stats[0] / count


def wrap(model: nn.Module, mode: str, device: torch.device) -> nn.Module:
    """The module to call in training: ``model`` itself, a DDP wrapper, or ``model`` sharded
    in place with FSDP2 (``fully_shard`` on every block, then on the root)."""
    if mode == "none" or not is_distributed():
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in getattr(model, "blocks", []):
            fully_shard(block)
        fully_shard(model)
        return model
    raise ValueError(f"distributed mode must be auto | none | ddp | fsdp, got {mode!r}")


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` from every rank (a one-element list when not distributed)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out
