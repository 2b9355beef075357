"""Frechet distance between Gaussians fitted to features (FID and its domain variants).

``FD = ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))``.

The trace of the matrix square root is computed in float64 through the symmetric form
``tr((sqrt(S1) S2 sqrt(S1))^(1/2))``, whose eigenvalues are real and non-negative in exact
arithmetic; ``eigh`` gives them stably and the tiny negative ones rounding produces are
clipped to zero. This avoids ``scipy.linalg.sqrtm`` (deprecated in SciPy 1.17) and its
complex parts.
"""

from __future__ import annotations

import numpy as np
import torch


def gaussian_stats(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64) of features (N, D), N >= 2."""
    array = np.asarray(
        features.detach().cpu() if isinstance(features, torch.Tensor) else features, np.float64
    )
    if array.ndim != 2 or array.shape[0] < 2:
        raise ValueError(f"features must be (N, D) with N >= 2, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError("features contain NaN or inf")
    return array.mean(axis=0), np.atleast_2d(np.cov(array, rowvar=False))


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


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
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def feature_frechet_distance(features1: torch.Tensor, features2: torch.Tensor) -> float:
    """Frechet distance between two feature sets (N1, D) and (N2, D)."""
    return frechet_distance(*gaussian_stats(features1), *gaussian_stats(features2))
