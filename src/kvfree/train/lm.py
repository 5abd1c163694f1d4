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


def run_lm(cfg: LMRunConfig, out: str | Path, *, resume: bool = False, log=print) -> dict:
    """Train (or resume) one LM run in ``out`` and evaluate it; returns the summary."""
    from kvfree.data.stream import TokenBatches, eval_windows
    from kvfree.models import LanguageModel
    from kvfree.report.tables import write_json

    out = Path(out)
    if not D.is_main():
        log = _quiet
    if (out / "checkpoints" / "last.pt").exists() and not resume:
        raise FileExistsError(
            f"{out} already has a checkpoint: pass --resume to continue it, or choose another --out"
        )
    corpus, tok, train_tokens, val_tokens = prepare_data(cfg.data, log)
    model_cfg = cfg.model_config(tok.vocab_size)
    torch.manual_seed(cfg.train.seed)
    model = LanguageModel(model_cfg)
    n_params = model.num_parameters()
    batches = TokenBatches(train_tokens, cfg.data.seq_len, cfg.data.batch_size, cfg.data.seed)
    ev_in, ev_lab = eval_windows(val_tokens, cfg.data.seq_len, cfg.data.eval_windows)

    def eval_fn(m):
        return summarize(nll_parallel(m, ev_in, ev_lab), ev_lab, tok.token_bytes)

    if D.is_main():
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
    trainer = Trainer(
        model,
        cfg.train,
        batches,
        run_dir=out,
        eval_fn=eval_fn,
        schedule=build_schedule(cfg.schedule, cfg.schedule_options),
        desc=out.name,
        resume=resume,
        meta={"tokenizer": tok.spec(), "data": to_dict(cfg.data)},
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
