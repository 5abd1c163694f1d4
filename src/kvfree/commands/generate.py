"""``kvfree generate``: sample from a checkpoint with constant-memory decoding."""

from __future__ import annotations

import typer

from kvfree.cli import app


@app.command()
def generate(
    run: str = typer.Argument(..., help="Run folder or checkpoint file."),
    prompt: str = typer.Option("The ", help="Prompt text."),
    tokens: int = typer.Option(200, min=1, help="New tokens to generate."),
    temperature: float = typer.Option(0.8, min=0.0, help="0 = greedy."),
    top_k: int = typer.Option(40, min=0, help="Sample among the k most likely tokens (0 = all)."),
    seed: int = typer.Option(0, help="Sampling seed."),
    checkpoint: str = typer.Option("last", help="last | best (inside a run folder)."),
    threads: int = typer.Option(
        None, min=1, help="Torch CPU threads (default: free physical cores)."
    ),
) -> None:
    """Prefill the prompt, then decode one token at a time; prints the text and the bytes of
    decode state carried (for fixed-memory mixers the same after 1 and after N tokens)."""
    from pathlib import Path

    import torch

    from kvfree import state_bytes
    from kvfree.train.lm import load_model
    from kvfree.utils import set_threads

    if checkpoint not in ("last", "best"):
        raise typer.BadParameter(f"--checkpoint {checkpoint!r}: use last or best")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:  # bytes that are not UTF-8 reach Python as lone surrogates
        raise typer.BadParameter(
            "the prompt is not valid UTF-8 text; check the terminal's encoding (LANG) or "
            "the file it came from"
        ) from None
    set_threads(threads)
    path = Path(run)
    model, tok, _ = load_model(path / "checkpoints" / f"{checkpoint}.pt" if path.is_dir() else path)
    ids = torch.tensor([tok.encode(prompt)])
    if ids.shape[1] == 0:
        raise typer.BadParameter("the prompt is empty; give at least one character")
    with torch.no_grad():
        _, state = model.prefill(ids, last_only=True)
    after_prompt = state_bytes(state)
    g = torch.Generator().manual_seed(seed)
    out = model.generate(ids, tokens, temperature=temperature, top_k=top_k or None, generator=g)
    print(tok.decode(out[0].tolist()))
    print(
        f"\n[decode state: {after_prompt:,} bytes after the {ids.shape[1]}-token prompt, "
        f"{model.last_state_bytes:,} bytes after {ids.shape[1] + tokens - 1} tokens; "
        f"weights {sum(p.numel() * p.element_size() for p in model.parameters()):,} bytes]"
    )
