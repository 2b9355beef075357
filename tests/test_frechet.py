import numpy as np
import pytest
import scipy.linalg

from diffguide.metrics import feature_frechet_distance, frechet_distance, gaussian_stats


def _sqrtm_reference(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


@pytest.mark.parametrize("dim", [1, 4, 16])
def test_frechet_distance_matches_sqrtm(dim):
    rng = np.random.default_rng(dim)
    a, b = rng.normal(size=(200, dim)), rng.normal(size=(300, dim)) @ rng.normal(size=(dim, dim)) + 0.5
    mu1, s1 = gaussian_stats(a)
    mu2, s2 = gaussian_stats(b)
    expected = _sqrtm_reference(mu1, s1, mu2, s2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_of_identical_sets_is_zero():
    x = np.random.default_rng(0).normal(size=(100, 8))
    assert feature_frechet_distance(x, x) == pytest.approx(0, abs=1e-8)


def test_frechet_distance_of_identical_rank_deficient_sets_is_zero():
    # N < D, as with 1,000 samples of 2048-d Inception features: most eigenvalues are rounding noise
    x = np.random.default_rng(1).normal(size=(40, 512)) * 300.0 + 50.0
    mu, sigma = gaussian_stats(x)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0, abs=1e-9 * np.trace(sigma))


def test_frechet_distance_between_rank_deficient_sets_matches_the_low_rank_reference():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(30, 200)), rng.normal(size=(50, 200)) * 2 + 1
    (mu1, s1), (mu2, s2) = gaussian_stats(a), gaussian_stats(b)
    # tr sqrt(S1 S2) from the small (n1 x n1) matrix A S2 A^T / (n1 - 1): an independent route
    centered = (a - mu1) / np.sqrt(len(a) - 1)
    small = centered @ s2 @ centered.T
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(small), 0, None)).sum()
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_refuses_bad_input():
    with pytest.raises(ValueError, match="NaN or inf"):
        frechet_distance(np.array([np.nan]), np.eye(1), np.zeros(1), np.eye(1))
    with pytest.raises(ValueError, match="shapes do not match"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
