"""The capacity experiment (docs/tasks.md §5): write rules against plain references, acceptance
identities, the pilot reference values, and the command's outputs."""

import json

import numpy as np
import pytest

from kvfree.bench import capacity as C


def stream(T=3, N=40, d=16, rho=0.5, seed=0):
    rng = np.random.default_rng(seed)
    return C.make_keys(rng, T, N, d, rho), C.unit(rng.standard_normal((T, N, d)))


def test_delta_rule_chunked_equals_token_loop():
    K, V = stream(N=150)
    S = np.zeros((3, 16, 16))
    for _ in range(2):
        for i in range(150):
            k, v = K[:, i], V[:, i]
            S = S + (v - np.einsum("tvd,td->tv", S, k))[:, :, None] * k[:, None, :]
    assert np.abs(C.delta_rule(K, V, passes=2, chunk=32) - S).max() < 1e-12
    # β = 1 on unit keys: the last written pair is recalled exactly
    S1 = C.delta_rule(K, V, 1)
    assert np.abs(np.einsum("tvd,td->tv", S1, K[:, -1]) - V[:, -1]).max() < 1e-12


def test_orthonormal_keys_ridge_is_scaled_linear_and_ska_k0_is_ridge():
    rng = np.random.default_rng(1)
    d, N, lam = 32, 20, 1e-3
    Q = np.linalg.qr(rng.standard_normal((2, d, d)))[0][:, :, :N].transpose(0, 2, 1)  # [2,N,d]
    V = rng.standard_normal((2, N, d))
    lin = C.read("linear", Q, V)
    ridge = C.read("ridge", Q, V, lam)
    assert np.abs(ridge - lin / (1 + lam)).max() < 1e-12
    # SKA K = 0 against ridge written directly: C (Σ k kᵀ + λI)⁻¹ q
    K, V = stream(N=50)
    G = np.einsum("tni,tnj->tij", K, K) + lam * np.eye(16)
    Cm = np.einsum("tnv,tnd->tvd", V, K)
    ref = np.einsum("tvd,tmd->tmv", Cm @ np.linalg.inv(G), K)
    assert np.abs(C.ska_read(K, V, K, 0, lam) - ref).max() < 1e-12


def test_ska_closed_form_equals_whitened_filter():
    """docs/ska.md §8: ŷ = η B_v L (c A_w)^K L⁻¹ q̂ with A_w = L⁻¹ M L⁻ᵀ equals the closed form."""
    K, V = stream(T=2, N=30, d=8, rho=0.3)
    lam, gamma, eta = 1e-3, 1.3, 1.5
    for t in range(2):
        k, v = K[t], V[t]
        G = k.T @ k + lam * np.eye(8)
        M = sum(np.outer(k[i], k[i - 1]) for i in range(1, 30))
        Cm = v.T @ k
        L = np.linalg.cholesky(G)
        Li = np.linalg.inv(L)
        A_w = Li @ M @ Li.T
        sigma = C.power_sigma(A_w[None])[0]
        c = gamma / max(1.0, sigma)
        B_v = Cm @ np.linalg.inv(G)
        ref = np.stack([eta * B_v @ L @ np.linalg.matrix_power(c * A_w, 2) @ Li @ q for q in k])
        got = C.ska_read(K[t : t + 1], V[t : t + 1], K[t : t + 1], 2, lam, gamma, eta)[0]
        assert np.abs(got - ref).max() < 1e-10 * np.abs(ref).max()


def test_power_sigma_estimates_the_spectral_norm():
    A = np.random.default_rng(2).standard_normal((5, 12, 12))
    est, true = C.power_sigma(A, iters=200), np.linalg.norm(A, 2, axis=(1, 2))
    assert np.allclose(est, true, rtol=1e-6)
    assert (C.power_sigma(A, iters=6) <= true + 1e-12).all()  # under-estimates (docs/ska.md §17.4)


def test_softmax_and_state_sizes():
    K, V = stream(N=64, d=32, rho=0.0)
    assert np.allclose(C.read("softmax_hard", K, V), V)
    assert C.state_floats("ska2", 64, 64, 10) == 2 * 64 * 64 + 64 * 64 + 64 + 1
    assert C.state_floats("softmax", 64, 64, 100) == 2 * 100 * 64  # grows with N
    with pytest.raises(ValueError, match="unknown capacity method"):
        C.read("nope", K, V)


def test_pilot_reference_values_at_d64():
    """docs/tasks.md §5 pilot (d = 64, ρ = 0): accuracy of linear / delta / ridge / softmax."""
    table = C.unit(np.random.default_rng([0, 64]).standard_normal((C.VOCAB, 64)))
    ref = {  # N: {method: (accuracy, relative error)}
        64: {
            "linear": (1.00, 0.97),
            "delta1": (0.91, 0.73),
            "delta4": (1.00, 0.49),
            "ridge": (1.00, 0.13),
        },
        256: {
            "linear": (0.76, 1.99),
            "delta1": (0.26, 1.19),
            "ridge": (0.89, 0.86),
            "softmax": (1.00, None),
        },
    }
    for n, exp in ref.items():
        rows = C.capacity_point(64, n, [0.0], 4, 0, tuple(exp), table, vocab_queries=16)
        for r in rows:
            acc, err = exp[r["method"]]
            assert abs(r["acc"] - acc) < 0.06, (n, r["method"], r["acc"])
            if err is not None:
                assert abs(r["rel_err"] - err) < 0.06, (n, r["method"], r["rel_err"])


def test_run_writes_results_and_accuracy_falls(tmp_path):
    res = C.run(
        tmp_path,
        dims=(16,),
        ratios=(0.5, 8),
        rhos=(0.0, 0.8),
        trials=3,
        layouts=("iid", "structured"),
        structured_dims=(16,),
        vocab_queries=8,
        progress=False,
    )
    data = json.loads((tmp_path / "capacity.json").read_text())
    assert len(data["rows"]) == 2 * 2 * 2 * len(C.METHODS)
    assert (tmp_path / "capacity.md").read_text() == res["markdown"]
    assert (tmp_path / "capacity.png").stat().st_size > 1000

    def acc(method, ratio, rho, layout="iid"):
        return next(
            r["acc"]
            for r in data["rows"]
            if r["method"] == method
            and r["ratio"] == ratio
            and r["rho"] == rho
            and r["layout"] == layout
        )

    for m in ("linear", "delta1", "ridge"):
        assert acc(m, 8, 0.0) < acc(m, 0.5, 0.0) - 0.3  # crosstalk once N ≫ d
    assert acc("softmax_hard", 8, 0.8) == 1.0  # no crosstalk limit for a KV cache
    assert acc("ridge", 0.5, 0.8) > acc("linear", 0.5, 0.8) + 0.3  # whitening vs correlation
    assert "Largest N/d" in res["markdown"] and "Structured stream" in res["markdown"]
    fall = {
        (f["rho"], f["method"]): f["last_ok"]
        for f in C.falloff(data["rows"])
        if f["layout"] == "iid"
    }
    assert fall[(0.0, "softmax")] == 8 and fall[(0.0, "linear")] == 0.5


def test_cli_and_report(tmp_path):
    from typer.testing import CliRunner

    import kvfree.commands  # noqa: F401
    from kvfree.cli import app

    runner = CliRunner()
    res = runner.invoke(
        app,
        [
            "bench",
            "capacity",
            "--out",
            str(tmp_path),
            "--dims",
            "8",
            "--ratios",
            "0.5,4",
            "--rhos",
            "0",
            "--trials",
            "2",
            "--no-structured",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "Largest N/d" in res.output and (tmp_path / "capacity.json").exists()
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- BEGIN capacity -->\nold\n<!-- END capacity -->\n")
    res = runner.invoke(app, ["report", "capacity", str(tmp_path), "--readme", str(readme)])
    assert res.exit_code == 0, res.output
    text = readme.read_text()
    assert "old" not in text and "Largest N/d" in text
    bad = runner.invoke(app, ["bench", "capacity", "--methods", "nope", "--out", str(tmp_path)])
    assert bad.exit_code != 0 and "unknown method" in bad.output
