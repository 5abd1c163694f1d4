"""``kvfree bench capacity``: how many random key–value pairs fit in a fixed state, by write
rule (docs/tasks.md §5; no training, float64).

Glossary (per trial):
    d, d_v   key and value dimension (d_v = d);  N pairs, written as a stream i = 1..N
    k_i      unit keys, k_i = normalize(ρ·s + √(1−ρ²)·u_i) with one shared unit s per trial
    v_i      values: N distinct rows of a fixed table of 4096 random unit vectors
    G        Σ k kᵀ + λI (λ = 10⁻³);  C = Σ v kᵀ;  M = Σ_{i≥2} k_i k_{i−1}ᵀ (lag one)

Methods (read ŷ(q) for every stored key q = k_i):
    linear        S = Σ v kᵀ,                        ŷ = S q             d·d_v floats
    delta1/4      S ← S + (v − S k) kᵀ (β = 1), 1 or 4 passes over the stream
    ridge         ŷ = C G⁻¹ q  (= SKA K = 0 = MesaNet γ = 1)               d² + d·d_v
    ska2          ŷ = η (γ/max(1, σ̂))^K C (G⁻¹M)^K G⁻¹ q, K = 2, γ = η = 1, σ̂ = 6-step power
                  iteration on A_w = L⁻¹ M L⁻ᵀ (docs/ska.md §7–8)               2d² + d·d_v + d + 1
    softmax       Σ_i softmax_i(τ q·k_i) v_i, τ = 2√d (a KV cache)          2·N·d (grows)
    softmax_hard  v of argmax_i q·k_i

Metrics: ``acc`` nearest stored value (max cosine over the N stored values) is the right one;
``vocab_acc`` nearest row of the whole 4096-row table is the right one (an LM output layer's
decision); ``rel_err`` ‖ŷ − v‖/‖v‖; ``cosine`` mean cos(ŷ, v). State bytes are counted at fp32
(4 bytes per float, the field's convention) although the experiment runs in float64.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

METHODS = ("linear", "delta1", "delta4", "ridge", "ska2", "softmax", "softmax_hard")
DIMS = (32, 64, 128)
RATIOS = (0.25, 0.5, 1, 2, 4, 8)
RHOS = (0.0, 0.5, 0.8)
LAMBDA = 1e-3
VOCAB = 4096


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def tr(x: np.ndarray) -> np.ndarray:
    """Contiguous transpose of the last two axes (numpy's stacked matmul only reaches BLAS
    for contiguous operands)."""
    return np.ascontiguousarray(np.swapaxes(x, -1, -2))


def make_keys(rng: np.random.Generator, trials: int, n: int, d: int, rho: float) -> np.ndarray:
    """[trials, n, d] unit keys with pairwise correlation ≈ ρ² through a shared direction."""
    s = unit(rng.standard_normal((trials, 1, d)))
    u = unit(rng.standard_normal((trials, n, d)))
    return unit(rho * s + np.sqrt(1 - rho**2) * u)


def state_floats(method: str, d: int, d_v: int, n: int) -> int:
    return {
        "linear": d * d_v,
        "delta1": d * d_v,
        "delta4": d * d_v,
        "ridge": d * d + d * d_v,
        "ska2": 2 * d * d + d * d_v + d + 1,
        "softmax": 2 * n * d,
        "softmax_hard": 2 * n * d,
    }[method]


def delta_rule(K: np.ndarray, V: np.ndarray, passes: int = 1, chunk: int = 64) -> np.ndarray:
    """S [T, d_v, d] after S ← S + (v − S k) kᵀ (β = 1) over the stream K [T, N, d],
    V [T, N, d_v], ``passes`` times.

    Chunked (exact): inside a chunk starting from S₀ the corrections u_t = v_t − S_{t−1} k_t
    satisfy (I + A) U = V_c − K_c S₀ᵀ with A[t, s] = k_tᵀ k_s for s < t (strictly lower), and
    then S = S₀ + Uᵀ K_c — one small solve per chunk instead of one rank-1 update per token.
    """
    T, N, d = K.shape
    S = np.zeros((T, V.shape[2], d))
    for _ in range(passes):
        for c0 in range(0, N, chunk):
            Kc = np.ascontiguousarray(K[:, c0 : c0 + chunk])  # [T, C, d]
            Vc = V[:, c0 : c0 + chunk]  # [T, C, d_v]
            A = np.tril(Kc @ tr(Kc), -1)  # [T, C, C]
            U = np.linalg.solve(A + np.eye(Kc.shape[1]), Vc - Kc @ tr(S))  # [T, C, d_v]
            S = S + tr(U) @ Kc
    return S


def power_sigma(A: np.ndarray, iters: int = 6) -> np.ndarray:
    """σ̂ ≈ σ_max(A) [T] by ``iters`` power iterations on (A, Aᵀ) from v₀ = 𝟏/√r (docs/ska.md §7)."""
    v = np.full(A.shape[:-1], 1 / np.sqrt(A.shape[-1]))
    for _ in range(iters):
        u = unit((A @ v[:, :, None])[:, :, 0])
        v = unit((tr(A) @ u[:, :, None])[:, :, 0])
    return np.linalg.norm((A @ v[:, :, None])[:, :, 0], axis=-1)


def ska_map(
    K: np.ndarray,
    V: np.ndarray,
    order: int,
    lam: float = LAMBDA,
    gamma: float = 1.0,
    eta: float = 1.0,
) -> np.ndarray:
    """SKA's readout map R [T, d_v, d] with ŷ = R q̂, from the stream K [T, N, d], V [T, N, d_v]:
    R = η (γ/max(1, σ̂))^K · C (G⁻¹M)^K G⁻¹ (docs/ska.md §8), built right to left as
    Rᵀ = G⁻¹ (Mᵀ G⁻¹)^K Cᵀ with d × d solves. K = 0 is ridge regression."""
    d = K.shape[2]
    G = tr(K) @ K + lam * np.eye(d)  # [T, d, d]
    Z = np.linalg.solve(G, np.ascontiguousarray(tr(V) @ K).transpose(0, 2, 1))  # G⁻¹ Cᵀ
    if order > 0:
        M = tr(np.ascontiguousarray(K[:, 1:])) @ np.ascontiguousarray(K[:, :-1])
        L = np.linalg.cholesky(G)
        A_w = tr(np.linalg.solve(L, tr(np.linalg.solve(L, M))))  # L⁻¹ M L⁻ᵀ
        scale = (gamma / np.maximum(1.0, power_sigma(A_w))) ** order
        Mt = tr(M)
        for _ in range(order):
            Z = np.linalg.solve(G, Mt @ np.ascontiguousarray(Z))
        Z = Z * scale[:, None, None]
    return eta * tr(Z)


def ska_read(
    K: np.ndarray,
    V: np.ndarray,
    Q: np.ndarray,
    order: int,
    lam: float = LAMBDA,
    gamma: float = 1.0,
    eta: float = 1.0,
) -> np.ndarray:
    """ŷ [T, m, d_v] for queries Q [T, m, d] (see :func:`ska_map`)."""
    return Q @ tr(ska_map(K, V, order, lam, gamma, eta))


def read(
    method: str,
    K: np.ndarray,
    V: np.ndarray,
    lam: float = LAMBDA,
    queries: np.ndarray | None = None,
) -> np.ndarray:
    """ŷ [T, m, d_v] for queries [T, m, d] (default: every key) after writing the stream
    K [T, N, d], V [T, N, d_v]."""
    d = K.shape[2]
    Q = K if queries is None else queries
    if method == "linear":
        return Q @ (tr(K) @ V)  # (Σ v kᵀ) q for every q
    if method in ("delta1", "delta4"):
        S = delta_rule(K, V, 1 if method == "delta1" else 4)
        return Q @ tr(S)
    if method == "ridge":
        return ska_read(K, V, Q, 0, lam)
    if method == "ska2":
        return ska_read(K, V, Q, 2, lam)
    out = []
    for b in range(0, len(K), 4):  # blocks of trials keep the [m, N] score arrays small
        scores = Q[b : b + 4] @ tr(K[b : b + 4])  # [4, m, N]
        if method == "softmax":
            w = np.exp(2 * np.sqrt(d) * (scores - scores.max(-1, keepdims=True)))  # τ = 2√d
            out.append((w / w.sum(-1, keepdims=True)) @ V[b : b + 4])
        elif method == "softmax_hard":
            out.append(np.take_along_axis(V[b : b + 4], scores.argmax(-1)[:, :, None], 1))
        else:
            break
    else:
        return np.concatenate(out)
    raise ValueError(f"unknown capacity method {method!r}; choose from {', '.join(METHODS)}")


def score(
    Y: np.ndarray,
    V: np.ndarray,
    idx: np.ndarray,
    table: np.ndarray,
    vocab_queries: int,
    rng: np.random.Generator,
) -> dict:
    """Metrics of ŷ = Y [T, N, d_v] against the stored V, whose table rows are idx [T, N].

    Nearest-stored accuracy uses every query; the 4096-row vocabulary readout (the costly
    part: 4096·d per query) uses ``vocab_queries`` random stored keys per trial.
    """
    T, n = Y.shape[:2]
    Yu = unit(Y + 1e-300)
    Y32, V32 = Yu.astype(np.float32), tr(V).astype(np.float32)
    nearest = np.concatenate([(Y32[b : b + 4] @ V32[b : b + 4]).argmax(-1) for b in range(0, T, 4)])
    m = min(n, vocab_queries)
    pick = np.argsort(rng.random((T, n)), axis=1)[:, :m]
    Ys = np.take_along_axis(Yu, pick[:, :, None], 1).astype(np.float32)
    vocab = (Ys @ tr(table).astype(np.float32)).argmax(-1)
    rel = np.linalg.norm(Y - V, axis=-1) / np.linalg.norm(V, axis=-1)
    ahead = np.arange(n) + 2
    return {
        "acc": float((nearest == np.arange(n)).mean()),
        "vocab_acc": float((vocab == np.take_along_axis(idx, pick, 1)).mean()),
        "rel_err": float(rel.mean()),
        "cosine": float((Yu * V).sum(-1).mean()),
        # diagnostic: the answer is the value written two steps later (the K = 2 lag
        # filter shifts a query forward along an i.i.d. stream)
        "acc_shift2": float((nearest[:, :-2] == ahead[:-2]).mean()) if n > 2 else 0.0,
    }


def stream(
    rng: np.random.Generator,
    K: np.ndarray,
    V: np.ndarray,
    layout: str,
    extra_keys: np.ndarray | None = None,
    repeats: int = 2,
    distractors: int = 2,
):
    """The write stream. ``iid``: each pair once. ``structured`` (docs/tasks.md §5, optional): each
    pair written ``repeats`` times in a row, then ``distractors`` fresh single-step pairs
    (keys ``extra_keys`` [T, n·distractors, d], values fresh unit vectors)."""
    if layout == "iid":
        return K, V
    if layout != "structured":
        raise ValueError(f"layout must be 'iid' or 'structured', got {layout!r}")
    T, n, d = K.shape
    dv = unit(rng.standard_normal((T, n * distractors, V.shape[2])))
    rep = lambda x: np.repeat(x[:, :, None], repeats, 2)  # [T, n, R, ·]
    Ks = np.concatenate([rep(K), extra_keys.reshape(T, n, distractors, d)], 2)
    Vs = np.concatenate([rep(V), dv.reshape(T, n, distractors, -1)], 2)
    return Ks.reshape(T, -1, d), Vs.reshape(T, -1, V.shape[2])


def capacity_point(
    d: int,
    n: int,
    rhos,
    trials: int,
    seed: int,
    methods=METHODS,
    table: np.ndarray | None = None,
    layout: str = "iid",
    vocab_queries: int = 64,
    distractors: int = 2,
) -> list[dict]:
    """Rows for every (ρ, method) at one (d, N, layout). The ρ values are stacked into one
    batch of len(rhos)·trials streams (fewer Python steps in the delta-rule loops)."""
    rhos = [float(r) for r in np.atleast_1d(rhos)]
    rng = np.random.default_rng([seed, d, n, layout == "structured"])
    if table is None:
        table = unit(np.random.default_rng([seed, d]).standard_normal((VOCAB, d)))
    extra = n * distractors if layout == "structured" else 0
    # one shared direction per trial; keys [R·T, n + extra, d]
    K_all = np.concatenate([make_keys(rng, trials, n + extra, d, r) for r in rhos])
    K = K_all[:, :n]
    idx = np.argsort(rng.random((len(K), len(table))), axis=1)[:, :n]  # distinct rows
    V = table[idx]
    Ks, Vs = stream(rng, K, V, layout, K_all[:, n:], distractors=distractors)
    rows = []
    for m in methods:
        t0 = time.perf_counter()
        Y = read(m, Ks, Vs, queries=K)
        seconds = (time.perf_counter() - t0) / len(rhos)
        floats = state_floats(m, d, d, Ks.shape[1])
        for i, rho in enumerate(rhos):
            sl = slice(i * trials, (i + 1) * trials)
            t1 = time.perf_counter()
            metrics = score(Y[sl], V[sl], idx[sl], table, vocab_queries, rng)
            rows.append(
                {
                    "layout": layout,
                    "d": d,
                    "N": n,
                    "ratio": n / d,
                    "rho": rho,
                    "method": m,
                    **metrics,
                    "state_floats": floats,
                    "state_bytes_fp32": 4 * floats,
                    "seconds": seconds + time.perf_counter() - t1,
                    "trials": trials,
                }
            )
    return rows


def run(
    out_dir: str | Path = "runs/bench-capacity",
    dims=DIMS,
    ratios=RATIOS,
    rhos=RHOS,
    trials: int = 20,
    seed: int = 0,
    methods=METHODS,
    layouts=("iid", "structured"),
    structured_dims=(64,),
    vocab_queries: int = 64,
    blas_threads: int | None = 1,
    progress: bool = True,
    plot: bool = True,
) -> dict:
    """The whole experiment: the i.i.d. layout at every (d, N/d, ρ), the structured layout at
    ``structured_dims``. Writes capacity.json, capacity.md and capacity.png under out_dir.

    ``blas_threads`` caps numpy's BLAS threads (default 1: the batched small solves here run
    orders of magnitude slower when a multi-threaded BLAS competes for busy cores).
    """
    from threadpoolctl import threadpool_limits
    from tqdm.auto import tqdm

    from kvfree.report.tables import atomic_write, write_json
    from kvfree.utils import environment

    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown capacity method(s) {bad}; choose from {', '.join(METHODS)}")
    out_dir = Path(out_dir)
    t0, c0 = time.time(), time.process_time()
    rows = []
    points = [
        (lay, d, max(1, int(round(r * d))))
        for lay in layouts
        for d in (dims if lay == "iid" else [x for x in dims if x in structured_dims])
        for r in ratios
    ]
    with threadpool_limits(blas_threads, "blas"):
        for lay, d, n in tqdm(points, desc="bench capacity", disable=not progress):
            table = unit(np.random.default_rng([seed, d]).standard_normal((VOCAB, d)))
            rows.extend(
                capacity_point(d, n, rhos, trials, seed, methods, table, lay, vocab_queries)
            )
    elapsed, cpu = time.time() - t0, time.process_time() - c0
    result = {
        "benchmark": "capacity",
        "protocol": "docs/tasks.md §5",
        "lambda": LAMBDA,
        "vocab": VOCAB,
        "vocab_queries": vocab_queries,
        "trials": trials,
        "seed": seed,
        "dims": list(dims),
        "ratios": list(ratios),
        "rhos": list(rhos),
        "methods": list(methods),
        "layouts": list(layouts),
        "blas_threads": blas_threads,
        "seconds": elapsed,
        "cpu_seconds": cpu,
        "env": environment("cpu"),
        "rows": rows,
    }
    write_json(out_dir / "capacity.json", result)
    md = capacity_markdown(result)
    atomic_write(out_dir / "capacity.md", md)
    if plot:
        capacity_plot([r for r in rows if r["layout"] == "iid"], out_dir / "capacity.png")
    return {**result, "markdown": md}


#: One style per write rule (colour, line style, marker, width): softmax is a wide pale band,
#: softmax_hard a thin black dashed line with × on top of it, so both stay visible even
#: where their accuracies coincide (both 1.0 over most of the range).
STYLES = {
    "linear": ("C0", "-", "o", 1.2),
    "delta1": ("C1", "-", "s", 1.2),
    "delta4": ("C2", "--", "s", 1.2),
    "ridge": ("C3", "-", "^", 1.2),
    "ska2": ("C4", "-.", "v", 1.2),
    "softmax": ("C5", "-", "o", 4.0),
    "softmax_hard": ("k", "--", "x", 1.0),
}


def capacity_plot(rows: list[dict], path, metric: str = "acc") -> Path:
    """capacity.png: :func:`capacity_figure`, written atomically."""
    import matplotlib.pyplot as plt

    fig = capacity_figure(rows, metric)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    return path


def capacity_figure(rows: list[dict], metric: str = "acc"):
    """Accuracy vs N/d, one panel per (ρ, d), one line per method, a legend on every panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    dims = sorted({r["d"] for r in rows})
    rhos = sorted({r["rho"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(
        len(rhos),
        len(dims),
        figsize=(4.2 * len(dims), 3.3 * len(rhos)),
        squeeze=False,
        sharey=True,
    )
    for i, rho in enumerate(rhos):
        for j, d in enumerate(dims):
            ax = axes[i][j]
            ratios = set()
            for k, m in enumerate(methods):
                sel = sorted(
                    (r for r in rows if r["d"] == d and r["rho"] == rho and r["method"] == m),
                    key=lambda r: r["ratio"],
                )
                color, ls, marker, lw = STYLES.get(m, (f"C{(7 + k) % 10}", ":", "d", 1.2))
                ax.plot(
                    [r["ratio"] for r in sel],
                    [r[metric] for r in sel],
                    color=color,
                    linestyle=ls,
                    marker=marker,
                    ms=6 if lw > 2 else 4,
                    mfc="none" if marker in "os^v" and lw <= 2 else None,
                    lw=lw,
                    alpha=0.45 if lw > 2 else 1.0,
                    zorder=1 if lw > 2 else 2,
                    label=m,
                )
                ratios.update(r["ratio"] for r in sel)
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_locator(FixedLocator(sorted(ratios)))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.set_title(f"d = {d}, ρ = {rho}", fontsize=9)
            ax.set_ylim(-0.02, 1.02)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=6, loc="lower left", ncol=2, framealpha=0.8)
            if i == len(rhos) - 1:
                ax.set_xlabel("N / d")
            if j == 0:
                ax.set_ylabel(metric)
    fig.suptitle("Retrieval accuracy vs stored pairs per dimension (no training)")
    fig.subplots_adjust(hspace=0.45)
    return fig


def falloff(rows: list[dict], metric: str = "acc", threshold: float = 0.9) -> list[dict]:
    """Per (layout, d, ρ, method): the largest N/d before ``metric`` first drops below
    ``threshold`` (None if it is below already at the smallest N/d)."""
    out: dict[tuple, dict] = {}
    for r in sorted(rows, key=lambda r: r["ratio"]):
        key = (r.get("layout", "iid"), r["d"], r["rho"], r["method"])
        rec = out.setdefault(
            key,
            {
                "layout": key[0],
                "d": r["d"],
                "rho": r["rho"],
                "method": r["method"],
                "last_ok": None,
                "broken": False,
            },
        )
        if r[metric] < threshold:
            rec["broken"] = True
        elif not rec["broken"]:
            rec["last_ok"] = r["ratio"]
    return list(out.values())


def _cell(r: dict) -> str:
    return f"{r['acc']:.2f} / {r['vocab_acc']:.2f} / {r['rel_err']:.2f}"


def _point_table(rows: list[dict], methods, d: int) -> str:
    from kvfree.report.tables import markdown_table

    table = []
    for n in sorted({r["N"] for r in rows}):
        rec = {"N (N/d)": f"{n} ({n / d:g})"}
        for m in methods:
            rec[m] = _cell(next(x for x in rows if x["N"] == n and x["method"] == m))
        table.append(rec)
    return markdown_table(table)


def capacity_markdown(result: dict, d: int | None = None) -> str:
    """Tables at one d (nearest-stored accuracy / vocabulary accuracy / relative error) for
    every ρ, where each memory's accuracy falls at every d, and the structured layout."""
    from kvfree.report.tables import markdown_table

    rows, methods = result["rows"], result["methods"]
    iid = [r for r in rows if r.get("layout", "iid") == "iid"]
    d = d or (64 if 64 in result["dims"] else result["dims"][0])
    parts = [
        f"Capacity (docs/tasks.md §5): {result['trials']} trials per point, float64, "
        f"λ = {result['lambda']}, SKA K = 2 with γ = η = 1, softmax τ = 2√d, "
        f"vocabulary {result['vocab']} rows (scored on {result['vocab_queries']} random "
        f"stored keys per trial), seed {result['seed']}; {result['seconds']:.1f} s wall"
        + (f", {result['cpu_seconds']:.1f} s CPU" if "cpu_seconds" in result else "")
        + f" on {result['env']['device']} ({result['env']['cpu_count']} cores, numpy BLAS "
        f"threads {result.get('blas_threads', 'default')}).\n"
        "Cells: accuracy (nearest stored value) / accuracy (nearest vocabulary row) / "
        "relative error ‖ŷ − v‖/‖v‖.\n"
    ]
    for rho in result["rhos"]:
        sel = [r for r in iid if r["d"] == d and r["rho"] == rho]
        if sel:
            parts.append(f"\ni.i.d. stream, d = {d}, ρ = {rho}\n\n" + _point_table(sel, methods, d))
    fall = falloff(iid)
    summary = []
    for dd in result["dims"]:
        for rho in result["rhos"]:
            rec = {"d": dd, "ρ": rho}
            for m in methods:
                f = next(
                    (x for x in fall if x["d"] == dd and x["rho"] == rho and x["method"] == m), None
                )
                if f is not None:
                    rec[m] = (
                        f"<{min(result['ratios']):g}"
                        if f["last_ok"] is None
                        else f"{f['last_ok']:g}"
                    )
            summary.append(rec)
    parts.append(
        "\nLargest N/d before nearest-stored accuracy first drops below 0.9 "
        f"(i.i.d. stream; {max(result['ratios']):g} = not within the grid):\n\n"
        + markdown_table(summary)
    )
    shift = [r for r in iid if r["method"] == "ska2" and r["d"] == d and r["rho"] == 0.0]
    if shift:
        parts.append(
            "\nska2 on an i.i.d. stream answers with the value written two steps "
            "*later*: the lag operator M = Σ k_i k_{i−1}ᵀ maps k_i to k_{i+1}, so "
            "(G⁻¹M)² moves every query two writes forward. Fraction of queries whose "
            f"nearest stored value is v_(i+2) (d = {d}, ρ = 0): "
            + ", ".join(f"N/d = {r['ratio']:g}: {r['acc_shift2']:.2f}" for r in shift)
            + ".\n"
        )
    struct = [r for r in rows if r.get("layout") == "structured"]
    for dd in sorted({r["d"] for r in struct}):
        for rho in result["rhos"]:
            sel = [r for r in struct if r["d"] == dd and r["rho"] == rho]
            if sel:
                parts.append(
                    "\nStructured stream (each pair written twice in a row, then 2 "
                    "fresh distractor pairs; only the persistent pairs are queried; "
                    f"N counts persistent pairs), d = {dd}, ρ = {rho}\n\n"
                    + _point_table(sel, methods, dd)
                )
    return "".join(parts)
