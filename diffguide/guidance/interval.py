"""Guidance in a limited interval (Kynkaanniemi, Aittala, Karras, Laine, Aila & Lehtinen,
"Applying Guidance in a Limited Interval Improves Sample and Distribution Quality in Diffusion
Models", NeurIPS 2024, arXiv 2404.07724).

With ``s = sigma / alpha`` the noise level of the step (EDM's sigma):

    D = u + w (c - u)   if sigma_lo < s <= sigma_hi,
    D = c               otherwise,

so outside the interval the unconditional prediction is not computed at all. A "CFG cutoff"
(guidance only for the first, noisiest steps) is the interval ``(sigma_lo, inf)``; ``(0, inf)``
is CFG. The default is the paper's interval for EDM2-XXL on ImageNet-512, (0.28, 5.42];
intervals are model-specific.

Our addition, :class:`WithinInterval`: another rule in CFG's place inside the interval, e.g.
``WithinInterval(AdaptiveGuidance(0.991), 1.0, inf)`` guides the noisiest steps only and stops
earlier per sample once AG's switch fires. The inner rule sees only the steps inside the
interval, so rules that need every step's history (LinearAG's estimates) are refused.
"""

from __future__ import annotations

import torch

from .base import GuidanceRule, GuidanceStep, cfg_combine, check_space, per_sample


def in_interval(noise_level: torch.Tensor, sigma_lo: float, sigma_hi: float) -> torch.Tensor:
    """Bool (B,): which noise levels ``sigma / alpha`` lie in ``(sigma_lo, sigma_hi]``."""
    return (noise_level > sigma_lo) & (noise_level <= sigma_hi)


class GuidanceInterval(GuidanceRule):
    """CFG where ``sigma_lo < sigma / alpha <= sigma_hi``, the conditional prediction elsewhere.

    Args:
        sigma_lo: lower end (exclusive) of the guided noise levels; 0 guides down to the end.
        sigma_hi: upper end (inclusive); ``inf`` guides from the start.
        Defaults: the paper's EDM2-XXL interval (0.28, 5.42].
        space: where CFG is combined (affine, so both spaces agree up to rounding).
    """

    def __init__(self, sigma_lo: float = 0.28, sigma_hi: float = 5.42, space: str = "model_output"):
        if not 0 <= sigma_lo < sigma_hi:
            raise ValueError(f"need 0 <= sigma_lo < sigma_hi, got sigma_lo={sigma_lo}, sigma_hi={sigma_hi}")
        self.sigma_lo = float(sigma_lo)
        self.sigma_hi = float(sigma_hi)
        self.space = check_space(space)

    @property
    def uses_noise_level(self) -> bool:
        return True

    def uncond_mask(self, batch_size: int, step: GuidanceStep) -> torch.Tensor:
        noise_level = (step.sigma.double() / step.alpha.double()).cpu().expand(batch_size)
        return in_interval(noise_level, self.sigma_lo, self.sigma_hi)

    def combine(
        self, cond: torch.Tensor, uncond: torch.Tensor, uncond_mask: torch.Tensor, step: GuidanceStep
    ) -> torch.Tensor:
        guided = per_sample(uncond_mask.to(cond.device), cond).bool()
        return torch.where(guided, cfg_combine(cond, uncond, step.guidance_scale), cond)

    def __repr__(self) -> str:
        return f"GuidanceInterval(sigma_lo={self.sigma_lo}, sigma_hi={self.sigma_hi}, space={self.space!r})"


class WithinInterval(GuidanceRule):
    """``rule`` where ``sigma_lo < sigma / alpha <= sigma_hi``, the conditional prediction elsewhere
    (no unconditional evaluation there). Over ``(0, inf)`` it is ``rule`` exactly.

    Args:
        rule: the rule to run inside the interval (e.g. ``AdaptiveGuidance``); it works in its
            own space. Rules that need every step (``needs_every_step``) are refused.
        sigma_lo, sigma_hi: the interval, as in :class:`GuidanceInterval`.
    """

    def __init__(self, rule: GuidanceRule, sigma_lo: float = 0.28, sigma_hi: float = 5.42):
        if not isinstance(rule, GuidanceRule):
            raise TypeError(f"WithinInterval needs a diffguide guidance rule to run inside, got {rule!r}")
        if rule.needs_every_step:
            raise ValueError(
                f"{type(rule).__name__} inside an interval would miss the steps outside it that its estimates "
                "need; give it a schedule with 'cond' steps instead"
            )
        self.interval = GuidanceInterval(sigma_lo, sigma_hi)
        self.rule = rule
        self.space = rule.space

    @property
    def uses_noise_level(self) -> bool:
        return True

    def reset(self) -> None:
        self.rule.reset()

    def uncond_mask(self, batch_size: int, step: GuidanceStep) -> torch.Tensor:
        inside = self.interval.uncond_mask(batch_size, step)
        return inside & self.rule.uncond_mask(batch_size, step) if inside.any() else inside

    def combine(
        self, cond: torch.Tensor, uncond: torch.Tensor, uncond_mask: torch.Tensor, step: GuidanceStep
    ) -> torch.Tensor:
        inside = self.interval.uncond_mask(len(cond), step)
        if not inside.any():
            return cond
        combined = self.rule.combine(cond, uncond, uncond_mask, step)
        return torch.where(per_sample(inside.to(cond.device), cond).bool(), combined, cond)

    def __repr__(self) -> str:
        return (
            f"WithinInterval({self.rule!r}, sigma_lo={self.interval.sigma_lo}, "
            f"sigma_hi={self.interval.sigma_hi})"
        )
