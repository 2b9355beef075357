"""Metrics: Frechet distance (plain and at N = infinity), KID, precision/recall, density/coverage,
faithfulness to a reference sampler, ISTD and saturation."""

from .faithfulness import Distance, faithfulness, per_sample_distance
from .frechet import feature_frechet_distance, frechet_distance, frechet_distance_infinity, gaussian_stats
from .istd import interpolation_istd, slerp, strip_istd
from .kid import kernel_distance, polynomial_mmd2
from .manifold import density_coverage, knn_radii, manifold_membership, precision_recall
from .saturation import clipped_fraction, mean_contrast

#: the name DESIGN.md gives ISTD in the public API
istd = interpolation_istd

__all__ = [
    "Distance",
    "density_coverage",
    "faithfulness",
    "knn_radii",
    "manifold_membership",
    "per_sample_distance",
    "precision_recall",
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
