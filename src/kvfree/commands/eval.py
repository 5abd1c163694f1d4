"""``kvfree eval``: perplexity and bits per byte, parallel forward vs token-by-token decoding."""

from __future__ import annotations

import typer

from kvfree.cli import app


@app.command("eval")
def eval_cmd(
    run: str = typer.Argument(..., help="Run folder or checkpoint file."),
    split: str = typer.Option("val", help="val | test | train."),
    checkpoint: str = typer.Option("last", help="last | best (inside a run folder)."),
    corpus: str = typer.Option(None, help="Evaluate on another corpus (default: the run's)."),
    seq_len: int = typer.Option(None, min=1, help="Window length (default: the run's)."),
    windows: int = typer.Option(
        256, min=0, help="Windows for the parallel pass (0 = the whole split)."
    ),
    decode_windows: int = typer.Option(8, min=0, help="Of those, windows decoded token by token."),
    prefill: int = typer.Option(1, min=1, help="Tokens given to prefill before stepping."),
    device: str = typer.Option(None, help="cpu | cuda (default: cuda if available)."),
    threads: int = typer.Option(
        None, min=1, help="Torch CPU threads (default: free physical cores)."
    ),
) -> None:
    """Evaluate a checkpoint: loss, perplexity and bits per byte through the parallel forward
    and through prefill + step decoding; prints both and their difference."""
    from pathlib import Path

    import torch

    from kvfree.data.loaders import load_corpus
    from kvfree.data.stream import encoded_split, eval_windows
    from kvfree.report.tables import markdown_table, write_json
    from kvfree.train.lm import load_model
    from kvfree.train.lm_eval import evaluate_lm
    from kvfree.utils import default_device, set_threads

    if checkpoint not in ("last", "best"):
        raise typer.BadParameter(f"--checkpoint {checkpoint!r}: use last or best")
    if split not in ("val", "test", "train"):
        raise typer.BadParameter(f"--split {split!r}: use val, test or train")
    set_threads(threads)
    path = Path(run)
    ckpt_path = path / "checkpoints" / f"{checkpoint}.pt" if path.is_dir() else path
    model, tok, ckpt = load_model(ckpt_path)
    dev = default_device() if device is None else device
    model.to(dev)
    data = (ckpt.get("meta") or {}).get("data", {})
    c = load_corpus(corpus or data.get("corpus", "en"), seed=data.get("seed", 0))
    T = seq_len or data.get("seq_len", 256)
    inputs, labels = eval_windows(encoded_split(c, split, tok), T, windows or None)
    res = evaluate_lm(
        model, inputs, labels, tok.token_bytes, decode_windows=decode_windows, prefill=prefill
    )
    res.update(
        {
            "checkpoint": str(ckpt_path),
            "step": ckpt["trainer"]["step"],
            "split": split,
            "corpus": c.name,
            "tokenizer": tok.name,
            "threads": torch.get_num_threads(),
        }
    )
    rows = [{"pass": f"parallel ({res['windows']} windows)", **res["parallel"]}]
    if "decode" in res:
        d = res["decode"]
        rows += [
            {"pass": f"parallel ({d['windows']} windows)", **d["parallel"]},
            {"pass": f"decode ({d['windows']} windows, prefill {prefill})", **d["decode"]},
        ]
    print(markdown_table(rows, ["pass", "tokens", "bytes", "loss", "ppl", "bpb"]))
    if "decode" in res:
        print(
            f"decode − parallel: bpb {res['decode']['bpb_diff']:+.3e}, max per-token NLL "
            f"difference {res['decode']['max_token_nll_diff']:.3e}"
        )
    if path.is_dir():
        write_json(path / f"eval-{split}.json", res)
        print(f"wrote {path / f'eval-{split}.json'}")
