import torch

from kvfree.linalg import FallbackCounter, power_iteration_sigma, robust_cholesky, spd_solve


def test_cholesky_healthy_is_exact_and_uncounted():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(3, 5, 8, 8, generator=g, dtype=torch.float64)
    A = X @ X.transpose(-1, -2) + 1e-3 * torch.eye(8, dtype=torch.float64)
    c = FallbackCounter()
    L = robust_cholesky(A, c)
    assert torch.allclose(L @ L.transpose(-1, -2), A, atol=1e-10)
    assert c.total() == 0
    B = torch.randn(3, 5, 8, 2, generator=g, dtype=torch.float64)
    assert torch.allclose(A @ spd_solve(A, B), B, atol=1e-8)


def test_rank_deficient_slices_are_repaired_and_counted():
    g = torch.Generator().manual_seed(1)
    v = torch.randn(4, 6, 1, generator=g, dtype=torch.float64)
    A = v @ v.transpose(-1, -2)  # rank 1: Cholesky fails, jitter repairs
    A[0] = torch.eye(6, dtype=torch.float64)  # one healthy slice
    c = FallbackCounter()
    L = robust_cholesky(A, c)
    assert torch.isfinite(L).all() and c.jitter == 3 and c.eigen == 0
    assert torch.equal(L[0], torch.eye(6, dtype=torch.float64))
    c2 = FallbackCounter()
    L2 = robust_cholesky(A, c2, jitters=())  # eigen path only
    assert torch.isfinite(L2).all() and c2.eigen == 3
    rec = L2 @ L2.transpose(-1, -2)
    assert torch.allclose(rec[1:], A[1:], atol=1e-5)  # clamped at 1e-6 on the null space


def test_power_iteration_approaches_sigma_max():
    g = torch.Generator().manual_seed(2)
    A = torch.randn(10, 12, 12, generator=g, dtype=torch.float64)
    exact = torch.linalg.matrix_norm(A, ord=2)
    est = power_iteration_sigma(A, iters=200)
    assert torch.allclose(est, exact, rtol=1e-6)
    est6 = power_iteration_sigma(A, iters=6)
    assert (est6 <= exact * (1 + 1e-12)).all()  # an under-estimate, as docs/ska.md §17.4 warns
    assert not est6.requires_grad
