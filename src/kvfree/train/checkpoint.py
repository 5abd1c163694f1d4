"""Checkpoints: one self-checking file per snapshot, written atomically.

File layout: ``MAGIC`` (16 bytes) · SHA-256 of the payload (32 bytes) · payload, where the
payload is ``torch.save`` of a dict of plain containers and tensors (loaded back with
``weights_only=True``, so a checkpoint cannot run code). A truncated or altered file fails the
hash check and raises :class:`CheckpointError` with what to do.

Payload keys: ``format``/``version``; ``model`` (full state dict, FQN keys); ``optimizer``
(``torch.distributed.checkpoint`` full optimizer state dict, keyed by parameter name, so the
same file resumes single-process, DDP and FSDP2 runs); ``requires_grad`` (name → flag, so a
Freeze-Scan phase is restored before the optimizer); ``trainer`` (step, best value);
``schedule``; ``rng`` (torch, CUDA, numpy and Python states, one entry per rank);
``model_config``, ``train_config`` and ``meta`` (e.g. the tokenizer spec).
"""

from __future__ import annotations

import hashlib
import io
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvfree.report.tables import atomic_write

MAGIC = b"KVFREE-CKPT\x00\x00\x00\x00\x01"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (corrupt, truncated, wrong format or wrong model)."""


# ----- RNG ------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """Every RNG that training touches: torch (CPU, dropout), CUDA, numpy, Python."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "gauss": float(np_state[4]),
        },
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----- files ----------------------------------------------------------------------------------
def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` to ``path`` atomically (temp file in the same folder + ``os.replace``)."""
    buf = io.BytesIO()
    torch.save({"format": "kvfree-checkpoint", "version": FORMAT_VERSION, **payload}, buf)
    data = buf.getvalue()
    return atomic_write(path, MAGIC + hashlib.sha256(data).digest() + data)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read and verify a checkpoint written by :func:`save_checkpoint`."""
    path = Path(path)
    if path.is_dir():
        for cand in (path / "checkpoints" / "last.pt", path / "last.pt"):
            if cand.exists():
                path = cand
                break
        else:
            raise CheckpointError(
                f"{path} is a folder without checkpoints/last.pt; pass a "
                "checkpoint file or a run folder trained with checkpoint_every>0"
            )
    if not path.exists():
        raise CheckpointError(
            f"checkpoint {path} does not exist; check the path (a run folder "
            "keeps them under checkpoints/)"
        )
    raw = path.read_bytes()
    if len(raw) < len(MAGIC) + 32 or raw[: len(MAGIC)] != MAGIC:
        raise CheckpointError(
            f"{path} is not a kvfree checkpoint (bad header, {len(raw)} bytes); "
            "it is truncated or another kind of file — use checkpoints/last.pt "
            "of a kvfree run, or retrain"
        )
    digest, data = raw[len(MAGIC) : len(MAGIC) + 32], raw[len(MAGIC) + 32 :]
    if hashlib.sha256(data).digest() != digest:
        raise CheckpointError(
            f"{path} is corrupt or truncated (SHA-256 mismatch over "
            f"{len(data):,} payload bytes); delete it and resume from another "
            "checkpoint (kvfree train --from best: checkpoints/best.pt) or retrain"
        )
    try:
        ckpt = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means an unusable file
        raise CheckpointError(
            f"{path} could not be unpickled ({type(e).__name__}: {e}); it was "
            "written by an incompatible version — retrain or convert it"
        ) from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != "kvfree-checkpoint":
        raise CheckpointError(f"{path}: payload is not a kvfree checkpoint")
    if ckpt.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {ckpt.get('version')}, this "
            f"kvfree reads version {FORMAT_VERSION}; use the matching kvfree "
            "version or retrain"
        )
    return ckpt


def config_mismatch(saved: dict | None, current: dict | None) -> list[str]:
    """Human-readable differences between a checkpoint's model config and the model's."""
    if saved is None or current is None:
        return []
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<missing>"), current.get(key, "<missing>")
        if _norm(a) != _norm(b):
            out.append(f"{key}: checkpoint {a!r} vs model {b!r}")
    return out


def _norm(v: Any) -> Any:
    """JSON-like normal form (int dict keys → str), so a config read back from JSON compares."""
    if isinstance(v, dict):
        return {str(k): _norm(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    return v


def model_config_dict(model: torch.nn.Module) -> dict | None:
    cfg = getattr(model, "config", None)
    return cfg.to_dict() if hasattr(cfg, "to_dict") else None
