"""``kvfree export-hf``: a kvfree checkpoint as a Hugging Face model folder (kvfree.hf)."""

from __future__ import annotations

import typer

from kvfree.cli import app


@app.command("export-hf")
def export_hf(
    run: str = typer.Argument(..., help="Run folder or checkpoint file."),
    out: str = typer.Argument(..., help="Folder to write (config.json, model.safetensors)."),
    checkpoint: str = typer.Option("last", help="last | best (inside a run folder)."),
    force: bool = typer.Option(False, help="Write into OUT even if it already holds files."),
) -> None:
    """Write config.json + model.safetensors (and, for a BPE run, the tokenizer) that
    ``AutoModelForCausalLM.from_pretrained`` loads once ``kvfree.hf`` is imported — or, with
    ``trust_remote_code=True``, without importing it (lm-evaluation-harness's ``--model hf``)."""
    from pathlib import Path

    from kvfree.train.lm import load_model

    if checkpoint not in ("last", "best"):
        raise typer.BadParameter(f"--checkpoint {checkpoint!r}: use last or best")
    try:
        from kvfree.hf import export_pretrained
    except ImportError as e:
        raise typer.BadParameter(str(e)) from None
    path = Path(run)
    if not path.exists():
        raise typer.BadParameter(f"{run} does not exist: give a run folder or a checkpoint file")
    if Path(out).is_dir() and any(Path(out).iterdir()) and not force:
        raise typer.BadParameter(f"{out} already holds files: pick an empty folder or pass --force")
    model, tok, _ = load_model(path / "checkpoints" / f"{checkpoint}.pt" if path.is_dir() else path)
    note = export_pretrained(model, out, tok)
    size = sum(f.stat().st_size for f in Path(out).iterdir() if f.is_file())
    print(f"wrote {out}: {model.num_parameters():,} parameters, {size:,} bytes, {note}")
    print(
        f"load it with: import kvfree.hf; from transformers import AutoModelForCausalLM; "
        f"AutoModelForCausalLM.from_pretrained({out!r}); or evaluate it: lm_eval --model hf "
        f"--model_args pretrained={out},trust_remote_code=True --tasks ..."
    )
