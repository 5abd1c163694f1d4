"""``kvfree info``: mixers and their state formulas; ``--preset NAME`` for parameter counts."""

from __future__ import annotations

import typer

from kvfree.cli import app


@app.command()
def info(
    preset: str = typer.Option(None, help="Print this preset's layers and parameter counts."),
    d_model: int = typer.Option(64, help="Width used to fill in the state formulas."),
) -> None:
    """List the mixers with their carried-state formulas, or describe a preset."""
    from kvfree import environment
    from kvfree.models import LanguageModel, preset_names
    from kvfree.models import preset as get_preset
    from kvfree.models.presets import paper_params

    if preset:
        cfg = get_preset(preset)
        model = LanguageModel(cfg)
        total = model.num_parameters()
        print(
            f"preset {preset}: d_model={cfg.d_model}, layers={cfg.layers}, mlp={cfg.mlp}, "
            f"vocab={cfg.vocab_size}"
        )
        print(f"  parameters: {total:,}")
        paper = paper_params(preset)
        if paper:
            print(
                f"  paper: {paper:,}  (ours/paper = {total / paper:.4f}, "
                f"diff {100 * (total - paper) / paper:+.2f}%)"
            )
        for name, count in parameter_breakdown(model).items():
            print(f"    {name:<24} {count:>14,}")
        return
    from kvfree.mixers import available, build_mixer, names

    ok = set(available())
    print(f"mixers (state formulas at d_model={d_model}, default options):")
    for name in names():
        if name not in ok:
            print(f"  {name:<18} (not installed in this version)")
            continue
        m = build_mixer(name, d_model)
        kind = "fixed" if m.fixed_memory else "grows with T"
        symbols, values, note = split_formula(m.state_formula())
        at = "" if m.fixed_memory else " at T = 1024"
        print(f"  {name:<18} {kind:<13} {symbols}")
        print(f"  {'':<32} = {values} = {m.state_size(1024):,} elements{at}{note}")
    print("presets: " + ", ".join(preset_names()))
    env = environment()
    print(f"torch {env['torch']}, device {env['device']}, threads {env['threads']}")


def split_formula(text: str) -> tuple[str, str, str]:
    """(symbols, numbers, " (note)" or "") of a ``state_formula`` string."""
    import re

    symbols, _, rest = text.partition(" = ")
    i = rest.rfind(" (")  # a trailing note has words; parentheses of numbers do not
    if i >= 0 and rest.endswith(")") and re.search(r"[A-Za-z]{3}", rest[i:]):
        return symbols, rest[:i], rest[i:]
    return symbols, rest, ""


def parameter_breakdown(model) -> dict[str, int]:
    """Parameter counts by top-level component (embeddings, each block kind, head)."""
    out: dict[str, int] = {}
    for name, p in model.named_parameters():
        parts = name.split(".")
        key = f"{parts[0]}.{parts[2]}" if parts[0] == "blocks" and len(parts) > 2 else parts[0]
        out[key] = out.get(key, 0) + p.numel()
    return out
