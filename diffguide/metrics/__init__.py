"""Metrics: Frechet distance (plain and extrapolated to N = infinity) and KID, on any features."""

from .frechet import feature_frechet_distance, frechet_distance, frechet_distance_infinity, gaussian_stats
from .kid import kernel_distance, polynomial_mmd2

__all__ = [
    "feature_frechet_distance",
    "frechet_distance",
    "frechet_distance_infinity",
    "gaussian_stats",
    "kernel_distance",
    "polynomial_mmd2",
]
