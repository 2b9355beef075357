"""Adaptive Projected Guidance (Sadat, Hilliges & Weber, "Eliminating Oversaturation and
Artifacts of High Guidance Scales in Diffusion Models", arXiv 2410.02416, ICLR 2025).

On denoised predictions ``D_c``, ``D_u`` (norms and inner products per sample, over all
non-batch dimensions), per step:

1. ``g = D_c - D_u``
2. reverse momentum: ``m <- g + beta * m`` (``m = 0`` at the start of each call), ``g = m``
3. norm cap: ``g <- g * min(1, r / ||g||)``
4. projection on the conditional prediction, in float64:
   ``g_par = (<g, D_c> / ||D_c||^2) D_c``, ``g_orth = g - g_par``
5. ``D = D_c + (w - 1) (g_orth + eta * g_par)``

With ``eta = 1``, ``r = inf`` and ``beta = 0`` this is CFG exactly. The paper's defaults for
SDXL are ``eta = 0``, ``r = 15``, ``beta = -0.5``; the cap ``r`` is in units of the
prediction's norm and must be chosen per model (see docs/guidance.md for the digits model).

``formulation="diffusers"`` reproduces diffusers' ``AdaptiveProjectedGuidance``, which
returns ``D_u + w N`` with ``N = g_orth + eta g_par``: the same as the paper only at
``eta = 1`` without cap or momentum.
"""

from __future__ import annotations

import math

import torch

from .base import GuidanceRule, GuidanceStep, check_space

FORMULATIONS = ("paper", "diffusers")


def _dims(x: torch.Tensor) -> list[int]:
    return list(range(1, x.ndim))


def cap_norm(diff: torch.Tensor, norm_threshold: float) -> torch.Tensor:
    """Scale each sample of ``diff`` down to L2 norm at most ``norm_threshold``."""
    if math.isinf(norm_threshold):
        return diff
    norm = diff.norm(p=2, dim=_dims(diff), keepdim=True)
    return diff * torch.clamp(norm_threshold / norm.clamp_min(torch.finfo(norm.dtype).tiny), max=1.0)


def project(diff: torch.Tensor, onto: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``diff`` split into its parts parallel and orthogonal to ``onto``, per sample, in float64."""
    diff64, onto64 = diff.double(), onto.double()
    dims = _dims(diff)
    squared_norm = (onto64 * onto64).sum(dim=dims, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    parallel = (diff64 * onto64).sum(dim=dims, keepdim=True) / squared_norm * onto64
    return parallel.to(diff.dtype), (diff64 - parallel).to(diff.dtype)


class APG(GuidanceRule):
    """Adaptive Projected Guidance.

    Args:
        eta: weight of the update's component parallel to ``D_c`` (0 drops it, 1 keeps it).
        norm_threshold: cap ``r`` on the per-sample norm of the update; ``inf`` for no cap.
        momentum: ``beta``; negative values average away the previous steps' updates; 0 off.
        space: ``"denoised"`` (the paper's x0 space, default) or ``"model_output"``.
        formulation: ``"paper"`` (``D_c + (w-1) N``) or ``"diffusers"`` (``D_u + w N``).
    """

    def __init__(
        self,
        eta: float = 0.0,
        norm_threshold: float = 15.0,
        momentum: float = -0.5,
        space: str = "denoised",
        formulation: str = "paper",
    ):
        if not norm_threshold > 0:
            raise ValueError(f"norm_threshold must be > 0 (inf for no cap), got {norm_threshold}")
        if formulation not in FORMULATIONS:
            raise ValueError(f"formulation must be one of {FORMULATIONS}, got {formulation!r}")
        self.eta = eta
        self.norm_threshold = norm_threshold
        self.momentum = momentum
        self.space = check_space(space)
        self.formulation = formulation
        self._average: torch.Tensor | None = None

    def reset(self) -> None:
        self._average = None

    def combine(
        self, cond: torch.Tensor, uncond: torch.Tensor, uncond_mask: torch.Tensor, step: GuidanceStep
    ) -> torch.Tensor:
        diff = cond - uncond
        if self.momentum != 0:
            self._average = diff if self._average is None else diff + self.momentum * self._average
            diff = self._average
        diff = cap_norm(diff, self.norm_threshold)
        parallel, orthogonal = project(diff, cond)
        update = orthogonal + self.eta * parallel
        if self.formulation == "diffusers":
            return uncond + step.guidance_scale * update
        return cond + (step.guidance_scale - 1) * update

    def __repr__(self) -> str:
        return (
            f"APG(eta={self.eta}, norm_threshold={self.norm_threshold}, momentum={self.momentum}, "
            f"space={self.space!r}, formulation={self.formulation!r})"
        )
