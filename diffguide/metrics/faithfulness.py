"""Faithfulness to a reference sampler: how far a cheaper sampler moves each image.

A rule that skips work (or CFG with fewer steps) is meant to give the images the reference
sampler would have given, seed for seed. Distribution metrics cannot tell that: a rule that
guides less can score a better FD with different images. Faithfulness compares sample ``i``
of a run with sample ``i`` of the reference run (same seed, same condition):

    d_i = || x_i - x_i^ref ||_2

over the flattened image (pixels in [0, 1]) or over its features, reported as the mean over
samples with the standard deviation (the spread) and the standard error of the mean. The
reference the evals use is CFG at the same guidance scale with the full step count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Distance:
    """Mean, standard deviation and standard error of per-sample distances."""

    mean: float
    std: float
    stderr: float

    @classmethod
    def of(cls, distances: torch.Tensor) -> Distance:
        """Summary of (N,) per-sample distances (sample standard deviation, ddof 1)."""
        values = distances.double()
        std = float(values.std(unbiased=True)) if len(values) > 1 else 0.0
        return cls(float(values.mean()), std, std / len(values) ** 0.5)


def per_sample_distance(samples: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """(N,) Euclidean distance between ``samples[i]`` and ``reference[i]``, flattened, in float64."""
    samples, reference = torch.as_tensor(samples), torch.as_tensor(reference)
    if samples.shape != reference.shape or samples.ndim < 2:
        raise ValueError(
            f"samples and reference must be paired (N, ...) tensors of one shape, got "
            f"{tuple(samples.shape)} and {tuple(reference.shape)}; generate both on the same seeds"
        )
    return (samples.double() - reference.double()).flatten(1).norm(dim=1)


def faithfulness(
    samples: torch.Tensor,
    reference: torch.Tensor,
    features: torch.Tensor | None = None,
    reference_features: torch.Tensor | None = None,
) -> dict[str, Distance]:
    """Per-sample distance of ``samples`` to the same seeds' ``reference`` images: ``"pixel"``
    always, ``"feature"`` when both feature sets are given (e.g. the judge's features)."""
    result = {"pixel": Distance.of(per_sample_distance(samples, reference))}
    if (features is None) != (reference_features is None):
        raise ValueError("give features for both samples and reference, or for neither")
    if features is not None:
        result["feature"] = Distance.of(per_sample_distance(features, reference_features))
    return result
