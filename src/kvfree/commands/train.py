"""``kvfree train``: a language model on real text, from a preset or a JSON run config."""

from __future__ import annotations

import json

import typer

from kvfree.cli import app


def apply_set(cfg: dict, assignments: list[str]) -> dict:
    """``section.key=value`` overrides (value parsed as JSON when it parses, else a string)."""
    for item in assignments or []:
        key, eq, value = item.partition("=")
        if not eq:
            raise typer.BadParameter(
                f"--set {item!r}: expected section.key=value, e.g. "
                "train.lr=3e-4 or model.d_model=128"
            )
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        node = cfg
        *path, last = key.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = parsed
    return cfg


@app.command()
def train(
    preset: str = typer.Option(None, help="Model preset (kvfree info lists them)."),
    config: str = typer.Option(
        None,
        help="JSON run config {preset, model, data, train, "
        "schedule, schedule_options}; options below override it.",
    ),
    out: str = typer.Option(None, help="Run folder (default runs/lm-<preset>)."),
    corpus: str = typer.Option(None, help="Corpus: built name (en), text file/folder, hf:NAME."),
    tokenizer: str = typer.Option(None, help="byte | bpe:N | cl100k."),
    seq_len: int = typer.Option(None, min=1, help="Training window length (tokens)."),
    batch_size: int = typer.Option(None, min=1, help="Global batch size (sequences per step)."),
    steps: int = typer.Option(
        None, min=1, help="Training steps (total, counting a resumed run's)."
    ),
    lr: float = typer.Option(None, help="Peak learning rate."),
    seed: int = typer.Option(None, help="Seed (model init, dropout)."),
    set_: list[str] = typer.Option(
        None, "--set", help="Override: section.key=JSON, e.g. train.eval_every=100 (repeatable)."
    ),
    resume: bool = typer.Option(False, help="Continue from <out>/checkpoints/last.pt."),
    from_: str = typer.Option(
        None,
        "--from",
        help="Resume from this checkpoint instead: best (<out>/checkpoints/best.pt), last, "
        "or a file (implies --resume).",
    ),
    threads: int = typer.Option(
        None, min=1, help="Torch CPU threads (default: free physical cores; see kvfree info)."
    ),
) -> None:
    """Train an LM with checkpoints, exact resume and a final parallel + decode evaluation.

    Under torchrun (WORLD_SIZE > 1) the same command trains data-parallel (DDP; FSDP2 with
    --set train.distributed=\\"fsdp\\").
    """
    from pathlib import Path

    from kvfree import perf
    from kvfree.train import distributed as D
    from kvfree.train.lm import LMRunConfig, run_lm
    from kvfree.train.trainer import TrainingInterrupted
    from kvfree.utils import set_threads

    D.init_from_env()
    set_threads(threads, workers=D.world_size())
    resume = from_ or resume
    if resume and not (out or preset or config):
        raise typer.BadParameter("--resume / --from continue a run folder: give it with --out RUN")
    cfg: dict = json.loads(Path(config).read_text()) if config else {}
    if resume and out and (Path(out) / "config.json").exists() and not config:
        cfg = json.loads((Path(out) / "config.json").read_text())
        for k in ("model_config", "tokenizer", "parameters", "corpus_manifest"):
            cfg.pop(k, None)
    if preset:
        cfg["preset"] = preset
    for section, key, value in (
        ("data", "corpus", corpus),
        ("data", "tokenizer", tokenizer),
        ("data", "seq_len", seq_len),
        ("data", "batch_size", batch_size),
        ("train", "steps", steps),
        ("train", "lr", lr),
        ("train", "seed", seed),
    ):
        if value is not None:
            cfg.setdefault(section, {})[key] = value
    cfg = apply_set(cfg, set_)
    cfg.setdefault("train", {}).setdefault("checkpoint_every", 200)
    run_cfg = LMRunConfig.from_dict(cfg)
    if not run_cfg.preset and not run_cfg.model:
        raise typer.BadParameter("give --preset NAME or --config FILE with a model section")
    out = out or f"runs/lm-{run_cfg.preset or 'custom'}"
    try:
        with perf.flushed_denormals():  # perf.py: subnormal floats take a slow path on x86
            summary = run_lm(run_cfg, out, resume=resume)
    except TrainingInterrupted as e:
        if D.is_main():
            import shlex
            import sys

            print(f"\n{e}", file=sys.stderr)
            if e.path is not None:
                print(
                    f"resume with: kvfree train --out {shlex.quote(str(out))} --resume",
                    file=sys.stderr,
                )
        raise typer.Exit(130) from None
    if D.is_main():
        val = summary.get("val", {})
        p = val.get("parallel", {})
        line = f"{out}: val bpb {p.get('bpb', float('nan')):.4f}, ppl {p.get('ppl', 0):.3f}"
        if "decode" in val:
            line += f"; decode-vs-parallel bpb diff {val['decode']['bpb_diff']:+.2e}"
        print(line)
        print(f"wrote {out}/summary.json, metrics.jsonl, checkpoints/")
