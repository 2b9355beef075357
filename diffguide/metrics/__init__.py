"""Metrics: Frechet distance (domain features for the default model)."""

from .frechet import feature_frechet_distance, frechet_distance, gaussian_stats

__all__ = ["feature_frechet_distance", "frechet_distance", "gaussian_stats"]
