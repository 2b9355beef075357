"""Fidelity and diversity apart: k-nearest-neighbour manifold metrics on any features.

Improved precision and recall (Kynkaanniemi, Karras, Laine, Lehtinen & Aila, "Improved Precision
and Recall Metric for Assessing Generative Models", NeurIPS 2019). Each sample of a set spans
a ball whose radius is the distance to its k-th nearest neighbour in the same set (itself
excluded); the set's manifold is the union of the balls:

    precision = (1/M) sum_j 1[fake_j lies in the real manifold]
    recall    = (1/N) sum_i 1[real_i lies in the fake manifold]

Density and coverage (Naeem, Oh, Uh, Choi & Yoo, "Reliable Fidelity and Diversity Metrics for
Generative Models", ICML 2020) use the real balls only, which makes them robust to fake outliers:

    density  = 1/(k M) sum_j sum_i 1[fake_j in B(real_i, NND_k(real_i))]
    coverage = (1/N) sum_i 1[some fake_j in B(real_i, NND_k(real_i))]

The papers' defaults: k = 3 for precision/recall, k = 5 for density/coverage. Both sets should
have the same size (the radii shrink as a set grows). "In a ball" is ``distance <= radius``,
as in the papers. Distances are Euclidean, computed in float64 in row blocks so large sets fit
in memory.
"""

from __future__ import annotations

import numpy as np
import torch

from .frechet import as_feature_array

#: rows of the distance matrix computed at once (a block is BLOCK x N float64)
BLOCK = 1024


def _as_tensor(features: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    try:
        return torch.from_numpy(as_feature_array(features))
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None


def _check_pair(real, fake, k: int, fake_radii: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    real, fake = _as_tensor(real, "real_features"), _as_tensor(fake, "fake_features")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(
            f"feature dimensions differ: real {real.shape[1]}, fake {fake.shape[1]}; "
            "extract both sets with the same feature extractor"
        )
    sizes = (len(real), len(fake)) if fake_radii else (len(real),)
    if k < 1 or k >= min(sizes):
        names = "both set sizes" if fake_radii else "the real set size"
        raise ValueError(f"k must be >= 1 and smaller than {names} {sizes}, got {k}")
    return real, fake


def _distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # the direct form, not the matmul shortcut, so a distance is the same in every block and
    # "distance <= radius" holds exactly for a point and itself
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def knn_radii(features: torch.Tensor | np.ndarray, k: int) -> torch.Tensor:
    """Per sample (N,), the distance to its k-th nearest neighbour in ``features``, itself excluded."""
    points = _as_tensor(features, "features")
    if not 1 <= k < len(points):
        raise ValueError(f"k must be >= 1 and smaller than the set size {len(points)}, got {k}")
    radii = []
    for start in range(0, len(points), BLOCK):
        distances = _distances(points[start : start + BLOCK], points)
        # the (k+1)-th smallest: the row's own zero distance comes first
        radii.append(distances.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def _inside_balls(
    queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query (M,), how many balls ``B(centres_i, radii_i)`` contain it; per ball (N,), whether
    any query lies in it. One pass over the query-centre distances gives both."""
    counts, occupied = [], torch.zeros(len(centres), dtype=torch.bool)
    for start in range(0, len(queries), BLOCK):
        inside = _distances(queries[start : start + BLOCK], centres) <= radii[None, :]
        counts.append(inside.sum(dim=1))
        occupied |= inside.any(dim=0)
    return torch.cat(counts), occupied


def manifold_membership(
    real_features: torch.Tensor | np.ndarray, fake_features: torch.Tensor | np.ndarray, k: int = 3
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample, the indicators precision and recall average: bool (M,) whether each fake lies
    in the real manifold, and bool (N,) whether each real lies in the fake one. Paired runs (same
    seeds, same real set) compare these sample by sample."""
    real, fake = _check_pair(real_features, fake_features, k)
    fake_in_real = _inside_balls(fake, real, knn_radii(real, k))[0] > 0
    real_in_fake = _inside_balls(real, fake, knn_radii(fake, k))[0] > 0
    return fake_in_real, real_in_fake


def precision_recall(
    real_features: torch.Tensor | np.ndarray, fake_features: torch.Tensor | np.ndarray, k: int = 3
) -> tuple[float, float]:
    """Improved precision (fakes inside the real manifold) and recall (reals inside the fake one)."""
    fake_in_real, real_in_fake = manifold_membership(real_features, fake_features, k)
    return float(fake_in_real.double().mean()), float(real_in_fake.double().mean())


def density_coverage(
    real_features: torch.Tensor | np.ndarray, fake_features: torch.Tensor | np.ndarray, k: int = 5
) -> tuple[float, float]:
    """Density (mean count of real balls per fake, over k; can exceed 1) and coverage (the
    fraction of real balls holding at least one fake)."""
    real, fake = _check_pair(real_features, fake_features, k, fake_radii=False)
    radii = knn_radii(real, k)
    counts, occupied = _inside_balls(fake, real, radii)
    density = counts.double().sum() / (k * len(fake))
    coverage = occupied.double().mean()
    return float(density), float(coverage)
