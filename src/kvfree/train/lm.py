"""Language-model runs on real text: config, data, training, final evaluation, loading.

    cfg = LMRunConfig(preset="lm-mamba2", data=DataConfig(corpus="en", tokenizer="byte"))
    summary = run_lm(cfg, "runs/lm-mamba2")           # resume=True continues a killed run
    model, tokenizer, ckpt = load_model("runs/lm-mamba2")

A run folder holds ``config.json`` (the resolved run config, with the full model config),
``metrics.jsonl``, ``checkpoints/{last,best}.pt``, ``summary.json`` (training summary plus the
final validation evaluation, parallel and decoded) — the files ``kvfree report lm`` reads.
"""

from __future__ import annotations

import importlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvfree.config import from_dict, to_dict
from kvfree.train import distributed as D
from kvfree.train.checkpoint import CheckpointError, load_checkpoint
from kvfree.train.lm_eval import evaluate_lm, nll_parallel, summarize
from kvfree.train.trainer import Schedule, TrainConfig, Trainer


@dataclass
class DataConfig:
    corpus: str = "en"  # built corpus name, text file/folder, or hf:NAME[:CONFIG]
    tokenizer: str = "byte"  # byte | bpe:N | cl100k
    seq_len: int = 256
    batch_size: int = 16  # global batch (split over ranks under torchrun)
    seed: int = 0
    eval_windows: int = 32  # validation windows for periodic evaluation
    final_eval_windows: int = 256  # validation windows for the final evaluation (0 = all)
    decode_windows: int = 8  # of those, decoded token by token and compared
    decode_prefill: int = 1  # tokens given to prefill before stepping

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataConfig:
        return from_dict(cls, data, kind="data config key")


@dataclass
class LMRunConfig:
    preset: str | None = None
    model: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields over the preset
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    schedule: str | None = None  # "module:Class" of a Schedule, e.g. a Freeze-Scan schedule
    schedule_options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LMRunConfig:
        data = dict(data)
        data.pop("model_config", None)  # written to config.json for reading, rebuilt on load
        data.pop("tokenizer_spec", None)
        out = from_dict(cls, data, kind="run config key")
        if isinstance(out.data, dict):
            out.data = DataConfig.from_dict(out.data)
        if isinstance(out.train, dict):
            out.train = TrainConfig.from_dict(out.train)
        return out

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def model_config(self, vocab_size: int):
        from kvfree.models import ModelConfig
        from kvfree.models import preset as get_preset

        if self.preset:
            return get_preset(self.preset, **{"vocab_size": vocab_size, **self.model})
        if not self.model:
            raise ValueError("give a preset or a model config ({'d_model': ..., 'layers': [...]})")
        return ModelConfig.from_dict({"vocab_size": vocab_size, **self.model})


def build_schedule(spec: str | None, options: dict) -> Schedule | None:
    if not spec:
        return None
    module, _, name = spec.partition(":")
    if not name:
        raise ValueError(
            f"schedule {spec!r}: give it as 'module:Class', e.g. "
            "'kvfree.train.freeze_scan:FreezeScan'"
        )
    cls = getattr(importlib.import_module(module), name)
    return cls(**options)


def prepare_data(cfg: DataConfig, log=print):
    """(corpus, tokenizer, train stream, validation stream)."""
    from kvfree.data.loaders import load_corpus
    from kvfree.data.stream import encoded_split
    from kvfree.data.tokenizer import tokenizer_for

    corpus = load_corpus(cfg.corpus, seed=cfg.seed)
    t0 = time.time()
    tok = tokenizer_for(cfg.tokenizer, corpus)
    train = encoded_split(corpus, "train", tok)
    val = encoded_split(corpus, "val", tok)
    log(
        f"data: {corpus.name} / {tok.name}: train {len(train):,} tokens, val {len(val):,} "
        f"tokens ({time.time() - t0:.1f}s)"
    )
    return corpus, tok, train, val


def resume_checkpoint(out: str | Path, resume: bool | str | Path) -> Path | None:
    """The checkpoint a run in ``out`` continues from: None for a new run (refused if ``out``
    already has one), ``checkpoints/last.pt`` for ``True``/``"last"``, ``checkpoints/best.pt``
    for ``"best"``, else the given file. Raises FileNotFoundError when there is nothing to
    resume, FileExistsError when a new run would overwrite one."""
    ckpts = Path(out) / "checkpoints"
    if not resume:
        if (ckpts / "last.pt").exists():
            raise FileExistsError(
                f"{out} already has a checkpoint: pass --resume to continue it, "
                "or choose another --out"
            )
        return None
    named = {"last": ckpts / "last.pt", "best": ckpts / "best.pt"}
    path = named["last"] if resume is True else named.get(resume) or Path(resume)
    if not path.exists():
        others = sorted(p.name for p in ckpts.glob("*.pt")) if ckpts.is_dir() else []
        hint = (
            f" (it has {', '.join(others)}: --from {Path(others[0]).stem})"
            if others
            else "; drop --resume to start a new run"
        )
        raise FileNotFoundError(f"nothing to resume: {path} does not exist{hint}")
    return path


def check_config(cfg: LMRunConfig) -> None:
    """Refuse a run config that cannot train, before any data is loaded or file written: bad
    counts, an invalid tokenizer spec, an unknown preset or model key, seq_len over max_len."""
    from kvfree.data.tokenizer import check_spec

    for name, value, low in (
        ("train.steps", cfg.train.steps, 1),
        ("data.seq_len", cfg.data.seq_len, 1),
        ("data.batch_size", cfg.data.batch_size, 1),
        ("data.eval_windows", cfg.data.eval_windows, 1),
        ("data.final_eval_windows", cfg.data.final_eval_windows, 0),
        ("data.decode_windows", cfg.data.decode_windows, 0),
        ("data.decode_prefill", cfg.data.decode_prefill, 1),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an integer ≥ {low}, got {value!r}")
    if not cfg.train.lr > 0:
        raise ValueError(f"train.lr must be > 0, got {cfg.train.lr!r}")
    check_spec(cfg.data.tokenizer)
    model_cfg = cfg.model_config(256)  # vocab_size does not matter for these checks
    if model_cfg.max_len is not None and cfg.data.seq_len > model_cfg.max_len:
        raise ValueError(
            f"seq_len={cfg.data.seq_len} exceeds the model's max_len={model_cfg.max_len}; "
            f"use --seq-len ≤ {model_cfg.max_len}"
        )


def run_lm(
    cfg: LMRunConfig, out: str | Path, *, resume: bool | str | Path = False, log=print
) -> dict:
    """Train (or resume) one LM run in ``out`` and evaluate it; returns the summary.

    ``resume``: False (a new run), True or "last" (``checkpoints/last.pt``), "best", or a
    checkpoint file. Everything is checked (config, data, checkpoint against the model) before
    ``config.json`` is written, so a refused run leaves the folder as it was."""
    from kvfree.data.stream import TokenBatches, eval_windows
    from kvfree.models import LanguageModel
    from kvfree.report.tables import write_json

    out = Path(out)
    if not D.is_main():
        log = _quiet
    ckpt_path = resume_checkpoint(out, resume)
    check_config(cfg)
    corpus, tok, train_tokens, val_tokens = prepare_data(cfg.data, log)
    model_cfg = cfg.model_config(tok.vocab_size)
    torch.manual_seed(cfg.train.seed)
    model = LanguageModel(model_cfg)
    n_params = model.num_parameters()
    batches = TokenBatches(train_tokens, cfg.data.seq_len, cfg.data.batch_size, cfg.data.seed)
    ev_in, ev_lab = eval_windows(val_tokens, cfg.data.seq_len, cfg.data.eval_windows)

    def eval_fn(m):
        return summarize(nll_parallel(m, ev_in, ev_lab), ev_lab, tok.token_bytes)

    trainer = Trainer(  # loads and checks the checkpoint against the model
        model,
        cfg.train,
        batches,
        run_dir=out,
        eval_fn=eval_fn,
        schedule=build_schedule(cfg.schedule, cfg.schedule_options),
        desc=out.name,
        resume=ckpt_path,
        meta={"tokenizer": tok.spec(), "data": to_dict(cfg.data)},
    )
    if D.is_main():  # only now that everything checked out (atomic write)
        write_json(
            out / "config.json",
            {
                **cfg.to_dict(),
                "model_config": model_cfg.to_dict(),
                "tokenizer": tok.name,
                "parameters": n_params,
                "corpus_manifest": corpus.manifest,
            },
        )
    log(
        f"{out.name}: {n_params:,} parameters, {cfg.train.steps} steps of "
        f"{cfg.data.batch_size}×{cfg.data.seq_len} tokens"
        + (f" (resuming at step {trainer.step})" if trainer.step else "")
    )
    summary = trainer.fit()
    eval_model = trainer.model
    if trainer.mode == "fsdp":  # gather the full weights (collective) into a plain model
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(
            trainer.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if D.is_main():
            eval_model = LanguageModel(model_cfg)
            eval_model.load_state_dict(full)
    result = {**json.loads((out / "summary.json").read_text())} if D.is_main() else {}
    if D.is_main():
        fin_in, fin_lab = eval_windows(
            val_tokens, cfg.data.seq_len, cfg.data.final_eval_windows or None
        )
        t1 = time.time()
        ev = evaluate_lm(
            eval_model,
            fin_in,
            fin_lab,
            tok.token_bytes,
            decode_windows=cfg.data.decode_windows,
            prefill=cfg.data.decode_prefill,
        )
        result.update(
            {
                "name": out.name,
                "preset": cfg.preset,
                "layers": model_cfg.layers,
                "d_model": model_cfg.d_model,
                "parameters": n_params,
                "tokenizer": tok.name,
                "tokens_seen": trainer.step * cfg.data.batch_size * cfg.data.seq_len,
                "train_wall_seconds": round(summary["train_seconds_total"], 1),
                "eval_seconds": round(time.time() - t1, 1),
                "val": ev,
                "threads": torch.get_num_threads(),
            }
        )
        write_json(out / "summary.json", result)
    D.barrier()
    return result or summary


def _quiet(*args, **kwargs) -> None:
    pass


def load_model(path: str | Path, map_location: str = "cpu"):
    """(model, tokenizer, checkpoint) from a run folder or checkpoint file."""
    from kvfree.data.tokenizer import ByteTokenizer, from_spec
    from kvfree.models import LanguageModel, ModelConfig

    ckpt = load_checkpoint(path, map_location)
    if not ckpt.get("model_config"):
        raise CheckpointError(
            f"{path}: checkpoint has no model config; it was not written for a LanguageModel"
        )
    model = LanguageModel(ModelConfig.from_dict(ckpt["model_config"]))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not match the stored model config ({e})") from e
    spec = (ckpt.get("meta") or {}).get("tokenizer")
    tok = from_spec(spec) if spec else ByteTokenizer()
    return model.eval(), tok, ckpt
