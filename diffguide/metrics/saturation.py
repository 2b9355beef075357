"""Saturation measures for generated images in [0, 1].

``clipped_fraction``: the fraction of pixel values at the clip limits (within half a level
of 0 or 1 on a 0-255 scale). ``mean_contrast``: the mean over images of the per-image
standard deviation of pixel values. On grayscale digits strokes and background sit at the
limits by nature, so compare these against the real data, not against zero.
"""

from __future__ import annotations

import torch


def _check(images: torch.Tensor) -> torch.Tensor:
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be (B>=1, C, H, W), got shape {tuple(images.shape)}")
    return images.double()


def clipped_fraction(images: torch.Tensor) -> float:
    """Fraction of pixel values at 0 or 1 (within 0.5/255)."""
    pixels = _check(images)
    tolerance = 0.5 / 255
    return float(((pixels <= tolerance) | (pixels >= 1 - tolerance)).double().mean())


def mean_contrast(images: torch.Tensor) -> float:
    """Mean per-image standard deviation of pixel values."""
    return float(_check(images).flatten(1).std(dim=1, unbiased=False).mean())
