"""ISTD, the interpolation standard deviation of Smooth Diffusion (Guo et al., CVPR 2024).

For one condition, two Gaussian noises ``z0, z1`` are spherically interpolated at mix ratios
``0, 0.1, ..., 1`` (11 latents), each is sampled deterministically to an image, and the L2
distances between adjacent images (pixel values 0-255) are taken; ISTD is the standard
deviation of those 10 distances, averaged over conditions. A smooth latent space moves
evenly along the path (low ISTD); a jumpy one concentrates the change in a few steps.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

MIX_RATIOS = tuple(i / 10 for i in range(11))


def slerp(z0: torch.Tensor, z1: torch.Tensor, ratio: float) -> torch.Tensor:
    """Spherical interpolation between two noises (per sample, over all non-batch dims)."""
    flat0, flat1 = z0.flatten(1).double(), z1.flatten(1).double()
    cosine = (flat0 * flat1).sum(1) / (flat0.norm(dim=1) * flat1.norm(dim=1))
    omega = torch.arccos(cosine.clamp(-1, 1))
    sin_omega = torch.sin(omega)
    linear = sin_omega.abs() < 1e-6  # (anti)parallel noises: fall back to linear interpolation
    w0 = torch.where(linear, 1 - ratio, torch.sin((1 - ratio) * omega) / torch.where(linear, 1, sin_omega))
    w1 = torch.where(linear, ratio, torch.sin(ratio * omega) / torch.where(linear, 1, sin_omega))
    mixed = w0[:, None] * flat0 + w1[:, None] * flat1
    return mixed.reshape(z0.shape).to(z0.dtype)


def strip_istd(strip: torch.Tensor) -> float:
    """ISTD of one interpolation strip: images (K, C, H, W) in [0, 1], K >= 3."""
    if strip.ndim != 4 or strip.shape[0] < 3:
        raise ValueError(f"an interpolation strip is (K>=3, C, H, W) images, got shape {tuple(strip.shape)}")
    pixels = strip.double() * 255
    distances = (pixels[1:] - pixels[:-1]).flatten(1).norm(dim=1)
    return float(distances.std(unbiased=False))


@torch.no_grad()
def interpolation_istd(
    pipe,
    class_labels: Sequence[int],
    seed: int = 0,
    ratios: Sequence[float] = MIX_RATIOS,
    **pipe_kwargs,
) -> tuple[float, list[float], torch.Tensor]:
    """Mean ISTD over conditions for a pipeline with deterministic sampling (e.g. DDIM eta=0).

    Pair ``i`` interpolates the noises seeded ``seed + 2i`` and ``seed + 2i + 1`` for class
    ``class_labels[i]``. Returns the mean, the per-pair values, and the strips (P, K, C, H, W).
    """
    shape = tuple(pipe.image_shape)
    values, strips = [], []
    for i, label in enumerate(class_labels):
        z0 = torch.randn((1, *shape), generator=torch.Generator().manual_seed(seed + 2 * i))
        z1 = torch.randn((1, *shape), generator=torch.Generator().manual_seed(seed + 2 * i + 1))
        latents = torch.cat([slerp(z0, z1, r) for r in ratios])
        strip = pipe([label] * len(ratios), latents=latents, output_type="pt", **pipe_kwargs).images.cpu()
        values.append(strip_istd(strip))
        strips.append(strip)
    return sum(values) / len(values), values, torch.stack(strips)
