"""Plots read on their own: a legend on every capacity panel with softmax and softmax_hard
drawn differently; plain numbers (no 2¹⁶ or 10⁻¹) on the decode plots' axes."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

from kvfree.bench.capacity import METHODS, capacity_figure  # noqa: E402
from kvfree.report.decode_plots import plain_ticks, plot_latency, plot_prefill_peak  # noqa: E402


def capacity_rows():
    return [
        {"d": d, "rho": rho, "method": m, "ratio": ratio, "acc": 1.0 if "softmax" in m else 0.5}
        for d in (32, 64)
        for rho in (0.0, 0.5)
        for m in METHODS
        for ratio in (0.25, 1, 4)
    ]


def test_every_capacity_panel_has_a_legend_and_softmaxes_differ():
    fig = capacity_figure(capacity_rows())
    try:
        axes = fig.get_axes()
        assert len(axes) == 4
        for ax in axes:
            legend = ax.get_legend()
            assert legend is not None
            assert [t.get_text() for t in legend.get_texts()] == list(METHODS)
            lines = {ln.get_label(): ln for ln in ax.get_lines()}
            a, b = lines["softmax"], lines["softmax_hard"]
            assert a.get_color() != b.get_color() and a.get_linestyle() != b.get_linestyle()
            assert a.get_marker() != b.get_marker() and a.get_linewidth() != b.get_linewidth()
    finally:
        plt.close(fig)


def test_decode_axes_have_plain_tick_labels(tmp_path):
    fig, ax = plt.subplots()
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ns = [128, 1024, 8192, 65536]
    ax.plot(ns, [0.3, 0.8, 4.0, 30.0])
    plain_ticks(ax)
    fig.canvas.draw()
    xl = [t.get_text() for t in ax.get_xticklabels()]
    yl = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
    plt.close(fig)
    assert xl == ["128", "1,024", "8,192", "65,536"]
    assert yl and all("$" not in t and "^" not in t for t in yl), yl
    assert {"0.5", "1", "2", "5", "10", "20"} <= set(yl)
    rows = [
        {"model": "m", "n": n, "decode_ms_median": 1.0, "decode_ms_p10": 0.9, "decode_ms_p90": 1.1}
        for n in ns
    ]
    assert plot_latency(rows, tmp_path / "latency_vs_n.png").stat().st_size > 1000
    for r, chunk in zip(rows, (None, 512, 512, 512)):  # whole prompt, then segments
        r.update(prefill_peak_bytes=2**20 * r["n"] // 128, prefill_chunk=chunk)
    assert plot_prefill_peak(rows, tmp_path / "prefill.png").stat().st_size > 1000
