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

Our addition: ``rule`` puts another rule in CFG's place inside the interval, e.g.
``GuidanceInterval(1.0, inf, rule=AdaptiveGuidance(0.991))`` guides the noisiest steps only and
stops earlier per sample once AG's switch fires. The inner rule sees only the steps inside the
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
        rule: a rule to run inside the interval instead of CFG (e.g. ``AdaptiveGuidance``); the
            interval then works in that rule's space. Rules that need every step are refused.
    """

    def __init__(
        self,
        sigma_lo: float = 0.28,
        sigma_hi: float = 5.42,
        space: str | None = None,
        rule: GuidanceRule | None = None,
    ):
        if not 0 <= sigma_lo < sigma_hi:
            raise ValueError(f"need 0 <= sigma_lo < sigma_hi, got sigma_lo={sigma_lo}, sigma_hi={sigma_hi}")
        if rule is not None and space is not None and space != rule.space:
            raise ValueError(
                f"space={space!r} but the inner rule works in {rule.space!r}; leave space unset with rule="
            )
        if rule is not None and rule.needs_every_step:
            raise ValueError(
                f"{type(rule).__name__} inside an interval would miss the steps outside it that its estimates "
                "need; give it a schedule with 'cond' steps instead"
            )
        self.sigma_lo = float(sigma_lo)
        self.sigma_hi = float(sigma_hi)
        self.rule = rule
        # the inner rule works in its own space; the interval's choice is then moot
        self.space = rule.space if rule is not None else check_space(space or "model_output")

    @property
    def uses_noise_level(self) -> bool:
        return True

    def reset(self) -> None:
        if self.rule is not None:
            self.rule.reset()

    def _inside(self, batch_size: int, step: GuidanceStep) -> torch.Tensor:
        noise_level = (step.sigma.double() / step.alpha.double()).cpu().expand(batch_size)
        return in_interval(noise_level, self.sigma_lo, self.sigma_hi)

    def uncond_mask(self, batch_size: int, step: GuidanceStep) -> torch.Tensor:
        inside = self._inside(batch_size, step)
        if self.rule is None or not inside.any():
            return inside
        return inside & self.rule.uncond_mask(batch_size, step)

    def combine(
        self, cond: torch.Tensor, uncond: torch.Tensor, uncond_mask: torch.Tensor, step: GuidanceStep
    ) -> torch.Tensor:
        if self.rule is None:
            guided = per_sample(uncond_mask.to(cond.device), cond).bool()
            return torch.where(guided, cfg_combine(cond, uncond, step.guidance_scale), cond)
        inside = self._inside(len(cond), step)
        if not inside.any():
            return cond
        combined = self.rule.combine(cond, uncond, uncond_mask, step)
        return torch.where(per_sample(inside.to(cond.device), cond).bool(), combined, cond)

    def __repr__(self) -> str:
        inner = f", rule={self.rule!r}" if self.rule is not None else ""
        return f"GuidanceInterval(sigma_lo={self.sigma_lo}, sigma_hi={self.sigma_hi}, space={self.space!r}{inner})"
