"""Classifier-free guidance (Ho & Salimans, "Classifier-Free Diffusion Guidance", 2022).

``guided = u + w (c - u)`` with ``c``/``u`` the conditional and unconditional predictions
and ``w`` the pipeline's ``guidance_scale``. This is the reference every other rule reduces
to; through the hook it gives the pipeline's own output.
"""

from __future__ import annotations

import torch

from .base import GuidanceRule, GuidanceStep, cfg_combine, check_space


class CFG(GuidanceRule):
    """Plain classifier-free guidance, in model-output space by default (CFG is affine, so
    the denoised space gives the same result up to rounding)."""

    def __init__(self, space: str = "model_output"):
        self.space = check_space(space)

    def combine(
        self, cond: torch.Tensor, uncond: torch.Tensor, uncond_mask: torch.Tensor, step: GuidanceStep
    ) -> torch.Tensor:
        return cfg_combine(cond, uncond, step.guidance_scale)

    def __repr__(self) -> str:
        return f"CFG(space={self.space!r})"
