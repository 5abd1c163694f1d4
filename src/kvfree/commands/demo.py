"""``kvfree demo``: train a tiny fixed-memory model on key-value recall, then decode with a
constant-size state. (The recall benchmark's main job replaces this as the README's first
command once it exists.)"""

from __future__ import annotations

import typer

from kvfree.cli import app


@app.command()
def demo(
    steps: int = typer.Option(300, help="Training steps."),
    preset: str = typer.Option("tiny-linear", help="Model preset to train."),
    out: str = typer.Option("runs/demo", help="Run folder."),
) -> None:
    """Train a tiny model on 4-pair key-value recall and decode with constant memory."""
    import torch

    from kvfree import state_bytes
    from kvfree.models import LanguageModel
    from kvfree.models import preset as get_preset
    from kvfree.train import TrainConfig, Trainer

    def batch(step: int, n: int = 32, pairs: int = 4, vocab: int = 64):
        g = torch.Generator().manual_seed(step)
        keys = torch.rand(n, vocab // 2, generator=g).argsort(-1)[:, :pairs]
        vals = vocab // 2 + torch.randint(0, vocab // 2, (n, pairs), generator=g)
        q = torch.randint(0, pairs, (n,), generator=g)
        ctx = torch.stack([keys, vals], -1).flatten(1)
        inputs = torch.cat([ctx, keys.gather(1, q[:, None])], 1)
        labels = torch.full_like(inputs, -100)
        labels[:, -1] = vals.gather(1, q[:, None])[:, 0]
        return {"inputs": inputs, "labels": labels}

    model = LanguageModel(get_preset(preset, vocab_size=64))
    trainer = Trainer(model, TrainConfig(steps=steps, lr=3e-3, warmup_steps=30, log_every=25),
                      batch, run_dir=out)
    summary = trainer.fit()
    test = batch(10**6, n=512)
    model.eval()
    with torch.no_grad():
        logits, state = model.prefill(test["inputs"])
    acc = (logits[:, -1].argmax(-1) == test["labels"][:, -1]).float().mean().item()
    print(f"{preset}: final loss {summary['final_loss']:.3f}, recall accuracy {acc:.3f} "
          f"(chance {1 / 32:.3f}); decode state {state_bytes(state):,} bytes for "
          f"{test['inputs'].shape[0]} sequences")
    out_ids = model.generate(test["inputs"][:2], 8)
    print(f"generated {out_ids.shape[1] - test['inputs'].shape[1]} tokens with "
          f"{model.last_state_bytes:,} state bytes (constant in length); logs in {out}/")
