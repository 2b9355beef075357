"""Metrics: Frechet distance (plain and at N = infinity), KID, ISTD and saturation."""

from .frechet import feature_frechet_distance, frechet_distance, frechet_distance_infinity, gaussian_stats
from .istd import interpolation_istd, slerp, strip_istd
from .kid import kernel_distance, polynomial_mmd2
from .saturation import clipped_fraction, mean_contrast

#: the name DESIGN.md gives ISTD in the public API
istd = interpolation_istd

__all__ = [
    "clipped_fraction",
    "interpolation_istd",
    "istd",
    "mean_contrast",
    "slerp",
    "strip_istd",
    "feature_frechet_distance",
    "frechet_distance",
    "frechet_distance_infinity",
    "gaussian_stats",
    "kernel_distance",
    "polynomial_mmd2",
]
