"""PNG plots from result records (matplotlib with the Agg backend, imported lazily).

heatmap(grid, rows, cols, path)    accuracy over gap × pairs for one model
heatmaps(panels, rows, cols, path) the same for several models, one figure
accuracy_vs_state(points, path)    the field's standard plot: accuracy vs state bytes (log x)
learning_curves(panels, path)      accuracy vs examples seen (log x), a panel per cell, a line
                                   per model with a min–max band over seeds
"""

from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    tmp.replace(path)
    return path


def _heatmap_ax(ax, values, row_keys, col_keys, row_label, col_label):
    import numpy as np

    grid = np.full((len(row_keys), len(col_keys)), np.nan)
    for i, r in enumerate(row_keys):
        for j, c in enumerate(col_keys):
            if (r, c) in values:
                grid[i, j] = values[(r, c)]
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", origin="lower", aspect="auto")
    ax.set_xticks(range(len(col_keys)), [str(c) for c in col_keys])
    ax.set_yticks(range(len(row_keys)), [str(r) for r in row_keys])
    ax.set_xlabel(col_label)
    ax.set_ylabel(row_label)
    for i in range(len(row_keys)):
        for j in range(len(col_keys)):
            if grid[i, j] == grid[i, j]:
                color = "white" if grid[i, j] < 0.6 else "black"
                ax.text(
                    j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8, color=color
                )
    return im


def heatmap(
    values: dict[tuple, float],
    row_keys: list,
    col_keys: list,
    path,
    *,
    title: str,
    row_label: str,
    col_label: str,
) -> Path:
    """``values[(row, col)]`` → colour; missing cells are blank."""
    return heatmaps(
        {"": values},
        row_keys,
        col_keys,
        path,
        title=title,
        row_label=row_label,
        col_label=col_label,
    )


def heatmaps(
    panels: dict[str, dict[tuple, float]],
    row_keys: list,
    col_keys: list,
    path,
    *,
    title: str,
    row_label: str,
    col_label: str,
) -> Path:
    """One heatmap per model (``panels[model][(row, col)]``) in one figure, a shared scale."""
    plt = _plt()
    n = len(panels)
    ncol = min(3, n)
    nrow = -(-n // ncol)
    w, h = 1.1 * len(col_keys) + 1.5, 0.7 * len(row_keys) + 1.4
    fig, axes = plt.subplots(nrow, ncol, figsize=(w * ncol, h * nrow), squeeze=False)
    fig.subplots_adjust(hspace=0.6, wspace=0.4)
    im = None
    for ax, (name, values) in zip(axes.flat, panels.items()):
        im = _heatmap_ax(ax, values, row_keys, col_keys, row_label, col_label)
        ax.set_title(name, fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.colorbar(im, ax=axes, label="test accuracy", shrink=0.8)
    fig.suptitle(title, fontsize=10)
    out = _save(fig, path)
    plt.close(fig)
    return out


def _kilo_formatter():
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _: _kilo(v))


def _kilo(v: float) -> str:
    """Tick label: 512, 4.1k, 66k, 131k, 2M."""
    if v >= 1e6:
        return f"{v / 1e6:.2g}M"
    if v >= 1e5:
        return f"{v / 1e3:.0f}k"
    return f"{v / 1000:.2g}k" if v >= 1000 else f"{v:g}"


def _null_formatter():
    from matplotlib.ticker import NullFormatter

    return NullFormatter()


def _reference_lines(ax, refs):
    for label, y in refs or []:
        ax.axhline(y, color="grey", lw=0.8, ls=":")
        ax.text(ax.get_xlim()[0], y, f" {label}", fontsize=6, color="grey", va="bottom")


def learning_curves(panels: dict[str, dict[str, dict]], path, *, title: str, refs=None) -> Path:
    """``panels[cell][model] = {"x": examples, "mean", "lo", "hi"}`` (lists of equal length)
    and optionally ``"tails"``: [(x, acc)] single runs drawn thin past the mean's end;
    ``refs[cell]``: (label, accuracy) reference lines of that cell (chance, plateaus)."""
    plt = _plt()
    n = len(panels)
    ncol = min(2, n)
    nrow = -(-n // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.2 * ncol, 3.6 * nrow), squeeze=False)
    models = list(dict.fromkeys(m for p in panels.values() for m in p))
    colors = {m: f"C{i % 10}" for i, m in enumerate(models)}
    for ax, (cell, series) in zip(axes.flat, panels.items()):
        for model, c in series.items():
            ax.plot(c["x"], c["mean"], color=colors[model], lw=1.4, label=model)
            if any(lo != hi for lo, hi in zip(c["lo"], c["hi"])):
                ax.fill_between(c["x"], c["lo"], c["hi"], color=colors[model], alpha=0.18, lw=0)
            for x, acc in c.get("tails", []):
                ax.plot(x, acc, color=colors[model], lw=0.8, alpha=0.7)
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(_kilo_formatter())
        ax.xaxis.set_minor_formatter(_null_formatter())
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3, which="major")
        ax.set_xlabel("training examples seen")
        ax.set_ylabel("validation accuracy")
        ax.set_title(cell, fontsize=9)
        _reference_lines(ax, (refs or {}).get(cell))
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    rows = -(-len(labels) // 3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.035 * rows, 1, 0.97))
    fig.legend(handles, labels, loc="lower center", ncol=min(3, len(labels)), fontsize=7)
    out = _save(fig, path)
    plt.close(fig)
    return out


def accuracy_vs_state(points: list[dict], path, *, title: str, refs=None) -> Path:
    """points: {"model", "state_bytes", "accuracy"[, "label"]}; one marker per point; ``refs``:
    (label, accuracy) reference lines (chance, plateaus)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for model in dict.fromkeys(p["model"] for p in points):
        sel = sorted((p for p in points if p["model"] == model), key=lambda p: p["state_bytes"])
        ax.plot(
            [p["state_bytes"] for p in sel], [p["accuracy"] for p in sel], marker="o", label=model
        )
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    _reference_lines(ax, refs)
    ax.set_xlabel("state bytes (fp32, at the longest evaluated length)")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    out = _save(fig, path)
    plt.close(fig)
    return out
