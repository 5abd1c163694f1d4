"""Plots of ``kvfree bench decode`` results: memory vs N and ms/token vs N (log axes, PNG)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

MiB = 2**20


def _series(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        out[r["model"]].append(r)
    return {m: sorted(rs, key=lambda r: r["n"]) for m, rs in out.items()}


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    return plt, fig, ax


def _plain(v: float, _pos=None) -> str:
    """Tick label as a plain number: 65,536, 12, 0.5 (never 2¹⁶ or 10⁻¹)."""
    return f"{int(round(v)):,}" if v >= 1 and abs(v - round(v)) < 1e-9 else f"{v:g}"


def plain_ticks(ax) -> None:
    """x ticks at the measured N, y ticks at 1-2-5 steps, all labelled as plain numbers."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullLocator

    xs = sorted({float(x) for line in ax.get_lines() for x in line.get_xdata()})
    if xs:
        ax.xaxis.set_major_locator(FixedLocator(xs))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_minor_locator(NullLocator())
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(FuncFormatter(_plain))
    if len(xs) > 6:
        ax.tick_params(axis="x", labelrotation=45)


def _save(plt, fig, ax, path: Path, title: str, ylabel: str) -> Path:
    plain_ticks(ax)
    ax.set_xlabel("prompt length N (tokens)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path


def plot_memory(rows: list[dict], path: str | Path) -> Path:
    """Decode peak above the loaded model (solid) and carried state bytes (dashed) vs N."""
    plt, fig, ax = _figure()
    for i, (model, rs) in enumerate(_series(rows).items()):
        color = f"C{i % 10}"
        n = [r["n"] for r in rs]
        peak = [max(r["decode_peak_bytes"], 1) / MiB for r in rs]
        state = [max(r["state_bytes"], 1) / MiB for r in rs]
        ax.plot(n, peak, "o-", color=color, label=f"{model}: decode peak")
        ax.plot(n, state, "x--", color=color, alpha=0.7, label=f"{model}: state_bytes")
    return _save(plt, fig, ax, path, "Decode memory above the loaded model", "MiB")


def plot_prefill_peak(rows: list[dict], path: str | Path) -> Path:
    """Prefill peak above the loaded model vs N; open markers: the prompt in segments."""
    plt, fig, ax = _figure()
    for i, (model, rs) in enumerate(_series(rows).items()):
        color = f"C{i % 10}"
        n = [r["n"] for r in rs]
        peak = [max(r["prefill_peak_bytes"], 1) / MiB for r in rs]
        ax.plot(n, peak, "-", color=color, label=model)
        seg = [r.get("prefill_chunk") is not None for r in rs]
        for face, pick in ((color, False), ("white", True)):
            pts = [(x, y) for x, y, s in zip(n, peak, seg) if s is pick]
            if pts:
                ax.plot(*zip(*pts), "o", color=color, markerfacecolor=face)
    title = "Prefill peak above the loaded model (open marker: prompt in segments)"
    return _save(plt, fig, ax, path, title, "MiB")


def plot_latency(rows: list[dict], path: str | Path) -> Path:
    """Median decode ms/token vs N, with the p10–p90 spread as error bars."""
    plt, fig, ax = _figure()
    for i, (model, rs) in enumerate(_series(rows).items()):
        n = [r["n"] for r in rs]
        med = [r["decode_ms_median"] for r in rs]
        lo = [m - r["decode_ms_p10"] for m, r in zip(med, rs)]
        hi = [r["decode_ms_p90"] - m for m, r in zip(med, rs)]
        ax.errorbar(n, med, yerr=[lo, hi], fmt="o-", color=f"C{i % 10}", capsize=2, label=model)
    return _save(plt, fig, ax, path, "Per-token decode latency (median, p10–p90)", "ms / token")
