import numpy as np
import pytest

from diffguide.metrics import frechet_distance, frechet_distance_infinity, gaussian_stats, kernel_distance
from diffguide.metrics.kid import polynomial_mmd2


def _mmd2_by_loops(x, y):
    def k(a, b):
        return (a @ b / len(a) + 1) ** 3

    n, m = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return xx + yy - 2 * xy


def test_polynomial_mmd2_matches_explicit_sums():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(7, 3)), rng.normal(1.0, size=(9, 3))
    assert polynomial_mmd2(x, y) == pytest.approx(_mmd2_by_loops(x, y), rel=1e-10)


def test_kid_is_unbiased_near_zero_for_same_distribution_and_positive_otherwise():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(400, 8)), rng.normal(size=(400, 8))
    same, same_std = kernel_distance(a, b, num_subsets=20, subset_size=200)
    shifted, _ = kernel_distance(a, b + 0.5, num_subsets=20, subset_size=200)
    assert abs(same) < 3 * same_std + 1e-3
    assert shifted > 10 * abs(same)


def test_fd_infinity_removes_small_sample_bias():
    rng = np.random.default_rng(2)
    dim = 16
    mu_ref, sigma_ref = np.zeros(dim), np.eye(dim)
    generated = rng.normal(0.1, 1.0, size=(2000, dim))
    exact = frechet_distance(np.full(dim, 0.1), np.eye(dim), mu_ref, sigma_ref)  # 0.16
    fd_n = frechet_distance(*gaussian_stats(generated[:400]), mu_ref, sigma_ref)
    fd_inf, points = frechet_distance_infinity(generated, mu_ref, sigma_ref)
    assert len(points) == 5 and points[-1][0] == 2000
    assert abs(fd_inf - exact) < abs(fd_n - exact)
