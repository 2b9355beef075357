"""The guidance contract: what a rule sees per step and what it must answer.

A rule never sees a pipeline. Per denoising step the adapter (``diffguide.hooks``) asks it
which samples need an unconditional evaluation (:meth:`GuidanceRule.uncond_mask`), runs the
network on those rows and on every conditional row, converts both predictions to the space
the rule declares (``"model_output"`` or ``"denoised"``, the x0 prediction), and calls
:meth:`GuidanceRule.combine`. Rows the rule did not ask for arrive as a copy of the
conditional prediction, flagged by ``uncond_mask``; the rule decides what to do with them
(AG uses the conditional prediction alone, LinearAG its estimate).

CFG is ``u + w (c - u)``. Every rule reproduces it at its "off" settings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SPACES = ("model_output", "denoised")


@dataclass(frozen=True)
class GuidanceStep:
    """What a rule knows about the current denoising step.

    ``alpha`` and ``sigma`` are the signal and noise scales of ``x_t = alpha x0 + sigma noise``
    per sample (shape (B,)), derived from the pipeline's scheduler, so rules working on
    denoised predictions behave the same for epsilon, v, sample and flow models.
    """

    step_index: int
    num_steps: int | None
    timestep: float
    guidance_scale: float
    alpha: torch.Tensor
    sigma: torch.Tensor


class GuidanceRule:
    """Base class of guidance rules; subclasses override :meth:`combine` and, to skip work,
    :meth:`uncond_mask`. State that lives for one sampling call is cleared by :meth:`reset`."""

    #: the space :meth:`combine` works in: raw ``"model_output"`` or ``"denoised"`` (x0)
    space: str = "model_output"
    #: whether the rule must see every step (LinearAG regresses on the previous steps), so that a
    #: wrapper running it on some steps only (``WithinInterval``) refuses it
    needs_every_step: bool = False

    @property
    def uses_noise_level(self) -> bool:
        """Whether the rule reads the step's alpha/sigma (x0-space rules, noise-level bands):
        an adapter that cannot give them refuses the rule instead of passing NaN."""
        return self.space == "denoised"

    def reset(self) -> None:
        """Forget per-call state; the adapter calls this when a new sampling call starts."""

    def uncond_mask(self, batch_size: int, step: GuidanceStep) -> torch.Tensor:
        """Bool (B,): which samples need a real unconditional evaluation at this step."""
        return torch.ones(batch_size, dtype=torch.bool)

    def combine(
        self, cond: torch.Tensor, uncond: torch.Tensor, uncond_mask: torch.Tensor, step: GuidanceStep
    ) -> torch.Tensor:
        """The guided prediction (B, ...) in :attr:`space`; ``uncond`` rows are real where
        ``uncond_mask`` is set and a copy of ``cond`` elsewhere."""
        raise NotImplementedError


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance, ``u + w (c - u)`` (Ho & Salimans, 2022)."""
    return uncond + guidance_scale * (cond - uncond)


def check_space(space: str) -> str:
    """Validate a rule's ``space`` argument."""
    if space not in SPACES:
        raise ValueError(f"space must be one of {SPACES}, got {space!r}")
    return space


def per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape (B,) values to broadcast over (B, ...) tensors like ``like``."""
    return values.reshape(-1, *([1] * (like.ndim - 1))).to(like)
