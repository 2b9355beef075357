"""ISTD, the interpolation standard deviation of Smooth Diffusion (Guo et al., CVPR 2024).

For one condition, two Gaussian noises ``z0, z1`` are spherically interpolated at mix ratios
``0, 0.1, ..., 1`` (11 latents), each is sampled deterministically to an image, and the L2
distances between adjacent images (pixel values 0-255) are taken; ISTD is the standard
deviation of those 10 distances, averaged over conditions. A smooth latent space moves
evenly along the path (low ISTD); a jumpy one concentrates the change in a few steps.

Ours beside the paper's number: the same strips' adjacent distances in any feature space
(:func:`step_distances` with ``embed``), ISTD over the mean step (scale-free, so pixels and
features compare, and a model that only shortens every path does not look smoother), and the
largest step's share of the path (0.1 for an even 11-image strip; near 1 when one step holds
the whole change). The paper interpolates real images' DDIM-inverted noises as well as random
ones: :func:`diffguide.inversion.ddim_invert` gives those, :func:`strips_between` samples them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

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


def step_distances(
    strip: torch.Tensor, embed: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> torch.Tensor:
    """L2 distances between adjacent images of a strip (K, C, H, W) in [0, 1]: (K - 1,), float64.

    Without ``embed`` in pixel values 0-255 (the paper's); with it, between ``embed(strip)``
    rows (e.g. a judge's features).
    """
    if strip.ndim != 4 or strip.shape[0] < 3:
        raise ValueError(f"an interpolation strip is (K>=3, C, H, W) images, got shape {tuple(strip.shape)}")
    points = strip.double() * 255 if embed is None else embed(strip).double()
    return (points[1:] - points[:-1]).flatten(1).norm(dim=1)


def strip_istd(strip: torch.Tensor) -> float:
    """ISTD of one interpolation strip: images (K, C, H, W) in [0, 1], K >= 3."""
    return float(step_distances(strip).std(unbiased=False))


def path_statistics(distances: torch.Tensor) -> dict[str, float]:
    """For a (strips, K - 1) table of adjacent distances: the mean ``istd``, the mean step
    ``mean_step``, ``relative_istd`` (each strip's std over its mean step, averaged) and
    ``largest_share`` (each strip's largest step over its path length, averaged)."""
    distances = distances.double()
    mean_step = distances.mean(dim=1)
    std = distances.std(dim=1, unbiased=False)
    return {
        "istd": float(std.mean()),
        "mean_step": float(mean_step.mean()),
        "relative_istd": float((std / mean_step.clamp_min(1e-12)).mean()),
        "largest_share": float((distances.max(dim=1).values / distances.sum(dim=1).clamp_min(1e-12)).mean()),
    }


@torch.no_grad()
def strips_between(
    pipe,
    start: torch.Tensor,
    end: torch.Tensor,
    class_labels: Sequence[int],
    ratios: Sequence[float] = MIX_RATIOS,
    pairs_per_call: int = 10,
    **pipe_kwargs,
) -> torch.Tensor:
    """The images along slerp paths from ``start[i]`` to ``end[i]`` (noises, (P, C, H, W)) for class
    ``class_labels[i]``: (P, K, C, H, W) in [0, 1]; ``pairs_per_call`` strips share a pipeline call."""
    if start.shape != end.shape or len(start) != len(class_labels):
        raise ValueError(
            f"start {tuple(start.shape)} and end {tuple(end.shape)} must match, one per class label "
            f"({len(class_labels)} given)"
        )
    if pairs_per_call < 1:
        raise ValueError(f"pairs_per_call must be >= 1, got {pairs_per_call}")
    latents = torch.stack(
        [torch.cat([slerp(z0[None], z1[None], r) for r in ratios]) for z0, z1 in zip(start, end, strict=True)]
    )
    labels = [int(label) for label in class_labels for _ in ratios]
    images = []
    for first in range(0, len(start), pairs_per_call):
        chunk = latents[first : first + pairs_per_call].flatten(0, 1)
        chunk_labels = labels[first * len(ratios) : (first + pairs_per_call) * len(ratios)]
        images.append(pipe(chunk_labels, latents=chunk, output_type="pt", **pipe_kwargs).images.cpu())
    return torch.cat(images).reshape(len(start), len(ratios), *images[0].shape[1:])


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
    start, end = noise_pairs(tuple(pipe.image_shape), len(class_labels), seed)
    strips = strips_between(pipe, start, end, class_labels, ratios, **pipe_kwargs)
    values = [strip_istd(strip) for strip in strips]
    return sum(values) / len(values), values, strips


def noise_pairs(shape: tuple[int, ...], count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pair ``i``'s two Gaussian noises, seeded ``seed + 2i`` and ``seed + 2i + 1``: two (count, *shape)."""
    draws = [
        torch.randn((1, *shape), generator=torch.Generator().manual_seed(seed + i)) for i in range(2 * count)
    ]
    start, end = draws[0::2], draws[1::2]
    return torch.cat(start), torch.cat(end)
