"""Adaptive Guidance (Castillo et al., "Adaptive Guidance: Training-free Acceleration of
Conditional Diffusion Models", arXiv 2312.12487, AAAI 2025).

Per step and per sample, ``gamma_t = cos(c, u)`` over the flattened predictions. Guidance
runs as CFG, ``u + w (c - u)``, until ``gamma_t >= gamma_bar``; from then on the sample uses
the conditional prediction alone, one network evaluation per step instead of two. The switch
is one-way: without the unconditional pass gamma can no longer be measured.

The paper reports thresholds 0.991-0.996 and measures gamma on the noise prediction. For
epsilon models that cosine is ~0.9999 at high noise (both predictions are close to
``x_t / sigma``), so an eps-space switch fires at the first step and turns guidance off. We
measure gamma on the denoised (x0) predictions by default; ``space="model_output"`` keeps
the paper's choice for comparison. ``min_steps`` forbids switching before that step index.

Our addition: the switch is per sample, so inside a batch only the samples that have not
converged pay for an unconditional evaluation.
"""

from __future__ import annotations

import torch

from .base import GuidanceRule, GuidanceStep, cfg_combine, check_space, per_sample


def cosine_similarity(cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
    """Per-sample cosine of the flattened predictions, in float64 (B,)."""
    return torch.nn.functional.cosine_similarity(cond.flatten(1).double(), uncond.flatten(1).double(), dim=1)


class AdaptiveGuidance(GuidanceRule):
    """CFG until cos(c, u) reaches ``threshold``, then the conditional prediction alone.

    Args:
        threshold: ``gamma_bar``; a value above 1 never switches (plain CFG).
        space: where gamma is measured: ``"denoised"`` (default) or ``"model_output"``.
        min_steps: no sample switches before this step index (0: from the first step).
    """

    def __init__(self, threshold: float = 0.991, space: str = "denoised", min_steps: int = 0):
        if min_steps < 0:
            raise ValueError(f"min_steps must be >= 0, got {min_steps}")
        self.threshold = threshold
        self.space = check_space(space)
        self.min_steps = min_steps
        self.converged: torch.Tensor | None = None
        #: per step, the similarities of the samples still guided (NaN for converged ones)
        self.similarities: list[torch.Tensor] = []

    def reset(self) -> None:
        self.converged = None
        self.similarities = []

    def uncond_mask(self, batch_size: int, step: GuidanceStep) -> torch.Tensor:
        if self.converged is None or len(self.converged) != batch_size:
            self.converged = torch.zeros(batch_size, dtype=torch.bool)
        return ~self.converged

    def similarity(self, cond: torch.Tensor, uncond: torch.Tensor, step: GuidanceStep) -> torch.Tensor:
        """``gamma_t`` per sample (B,): the cosine of the two predictions; the switch fires where it
        reaches ``threshold``."""
        return cosine_similarity(cond, uncond)

    def combine(
        self, cond: torch.Tensor, uncond: torch.Tensor, uncond_mask: torch.Tensor, step: GuidanceStep
    ) -> torch.Tensor:
        mask = uncond_mask.to(cond.device)
        guided = torch.where(
            per_sample(mask, cond).bool(), cfg_combine(cond, uncond, step.guidance_scale), cond
        )
        gamma = self.similarity(cond, uncond, step).cpu()
        gamma[~uncond_mask.cpu()] = float("nan")
        self.similarities.append(gamma)
        if step.step_index >= self.min_steps:
            self.converged = self.converged | (uncond_mask.cpu() & (gamma >= self.threshold))
        return guided

    def __repr__(self) -> str:
        return (
            f"AdaptiveGuidance(threshold={self.threshold}, space={self.space!r}, min_steps={self.min_steps})"
        )
