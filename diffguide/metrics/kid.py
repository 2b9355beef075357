"""Kernel Inception Distance (Binkowski et al., ICLR 2018), on any features.

KID is the squared maximum mean discrepancy with the cubic polynomial kernel
``k(x, y) = (x.y / d + 1)^3``, estimated without bias:

``MMD^2 = mean_{i!=j} k(x_i, x_j) + mean_{i!=j} k(y_i, y_j) - 2 mean_{i,j} k(x_i, y_j)``,

averaged over random subsets of equal size. Unlike FID it is unbiased at small N, so it
suits the few hundred samples CPU evaluation affords.
"""

from __future__ import annotations

import numpy as np
import torch

from .frechet import as_feature_array


def polynomial_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 between two feature sets with the cubic polynomial kernel."""
    dim = x.shape[1]
    k_xx = (x @ x.T / dim + 1) ** 3
    k_yy = (y @ y.T / dim + 1) ** 3
    k_xy = (x @ y.T / dim + 1) ** 3
    n, m = len(x), len(y)
    within_x = (k_xx.sum() - np.trace(k_xx)) / (n * (n - 1))
    within_y = (k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within_x + within_y - 2 * k_xy.mean())


def kernel_distance(
    features1: torch.Tensor | np.ndarray,
    features2: torch.Tensor | np.ndarray,
    num_subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """KID: mean and standard deviation of the unbiased MMD^2 over random subsets.

    ``subset_size`` is capped at the smaller set's size; subsets are drawn without
    replacement by a generator seeded ``seed``.
    """
    x, y = as_feature_array(features1), as_feature_array(features2)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature dimensions differ: {x.shape[1]} vs {y.shape[1]}")
    if num_subsets < 1:
        raise ValueError(f"num_subsets must be >= 1, got {num_subsets}")
    size = min(subset_size, len(x), len(y))
    rng = np.random.default_rng(seed)
    values = [
        polynomial_mmd2(
            x[rng.choice(len(x), size, replace=False)], y[rng.choice(len(y), size, replace=False)]
        )
        for _ in range(num_subsets)
    ]
    return float(np.mean(values)), float(np.std(values))
