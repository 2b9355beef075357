"""Frechet distance between Gaussians fitted to features (FID and its domain variants).

``FD = ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))``.

The trace of the matrix square root is computed in float64 through the symmetric form
``tr((sqrt(S1) S2 sqrt(S1))^(1/2))``, whose eigenvalues are real and non-negative in exact
arithmetic; ``eigh`` gives them stably, and eigenvalues at rounding-noise level (negative
or not) are set to zero, which keeps rank-deficient covariances (N < D) exact. This avoids ``scipy.linalg.sqrtm`` (deprecated in SciPy 1.17) and its
complex parts.
"""

from __future__ import annotations

import numpy as np
import torch


def as_feature_array(features: torch.Tensor | np.ndarray) -> np.ndarray:
    """Features (N, D), N >= 2, as a finite float64 array; anything else is refused."""
    array = np.asarray(
        features.detach().cpu() if isinstance(features, torch.Tensor) else features, np.float64
    )
    if array.ndim != 2 or array.shape[0] < 2:
        raise ValueError(f"features must be (N, D) with N >= 2, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError("features contain NaN or inf")
    return array


def gaussian_stats(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64) of features (N, D), N >= 2."""
    array = as_feature_array(features)
    return array.mean(axis=0), np.atleast_2d(np.cov(array, rowvar=False))


def _psd_eigh(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigen-decomposition of a symmetric PSD matrix with rounding noise set to zero.

    Eigenvalues below ``D * eps * max|lambda|`` (numpy's matrix-rank tolerance) are rounding
    noise, not signal. Left in, they matter: a covariance of N < D samples (common with 2048-d
    Inception features) has D - N such eigenvalues, and the square roots of ~1e-16-relative
    noise sum to a visible error, e.g. a negative FD between identical statistics.
    """
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    tolerance = len(values) * np.finfo(np.float64).eps * max(np.abs(values).max(initial=0.0), 1e-300)
    return np.where(values > tolerance, values, 0.0), vectors


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    values, vectors = _psd_eigh(matrix)
    return (vectors * np.sqrt(values)) @ vectors.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = (
        np.atleast_2d(np.asarray(sigma1, np.float64)),
        np.atleast_2d(np.asarray(sigma2, np.float64)),
    )
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(
            f"shapes do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}"
        )
    for name, value in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.isfinite(value).all():
            raise ValueError(f"{name} contains NaN or inf")
    root1 = _sqrt_psd(sigma1)
    middle = root1 @ sigma2 @ root1
    trace_sqrt = np.sqrt(_psd_eigh(middle)[0]).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def feature_frechet_distance(features1: torch.Tensor, features2: torch.Tensor) -> float:
    """Frechet distance between two feature sets (N1, D) and (N2, D)."""
    return frechet_distance(*gaussian_stats(features1), *gaussian_stats(features2))


def frechet_distance_infinity(
    features: torch.Tensor | np.ndarray,
    reference_mu: np.ndarray,
    reference_sigma: np.ndarray,
    sizes: list[int] | None = None,
    seed: int = 0,
) -> tuple[float, list[tuple[int, float]]]:
    """FD extrapolated to infinitely many samples (Chong & Forsyth, CVPR 2020).

    FD computed on N samples is biased upward roughly linearly in 1/N. This draws random
    subsets of ``features`` of each size in ``sizes`` (default: 5 sizes from N/5 to N),
    fits ``FD_N = FD_inf + slope / N`` by least squares, and returns the intercept with the
    measured points.
    """
    array = as_feature_array(features)
    total = len(array)
    sizes = sizes or sorted({int(round(n)) for n in np.linspace(max(2, total // 5), total, 5)})
    if len(sizes) < 2 or min(sizes) < 2 or max(sizes) > total:
        raise ValueError(f"need at least two subset sizes between 2 and {total}, got {sizes}")
    rng = np.random.default_rng(seed)
    points = []
    for size in sizes:
        subset = array[rng.choice(total, size, replace=False)]
        points.append((size, frechet_distance(*gaussian_stats(subset), reference_mu, reference_sigma)))
    inverse = np.array([1 / n for n, _ in points])
    values = np.array([fd for _, fd in points])
    _slope, intercept = np.polyfit(inverse, values, 1)
    return float(intercept), points
