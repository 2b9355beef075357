"""A CFG cutoff as a guidance interval: the replacement for diffusers' CFG-cutoff callbacks.

diffusers 0.42 ships ``SDCFGCutoffCallback``, ``SDXLCFGCutoffCallback``,
``SDXLControlnetCFGCutoffCallback`` and ``SD3CFGCutoffCallback`` (``diffusers.callbacks``). At the
end of step ``k`` (``cutoff_step_index=k``, or ``k = int(num_steps * cutoff_step_ratio)``) they set
the pipeline's guidance scale to 0 and keep only the last row of the prompt embeddings, so steps
``0..k`` are guided and the rest run on the conditional rows alone. That last-row slice assumes
one prompt and one image per prompt (see docs/guidance.md).

The same schedule written as noise levels is ``GuidanceInterval(sigma_lo, inf)`` with ``sigma_lo``
between the noise level ``sigma / alpha`` of step ``k`` and that of step ``k + 1``; it is decided
per sample, so it serves any batch. :func:`cutoff_sigma` finds that ``sigma_lo`` from the scheduler
(set to the call's number of steps on a copy, so the pipeline's scheduler is untouched), and
:func:`cfg_cutoff` returns the rule. The noise levels are computed as the adapters compute them
(:func:`diffguide.prediction.noise_level`), so the split is exact, not approximate.

Text-to-image only: an img2img ``strength`` or SDXL's ``denoising_end`` starts or stops the loop
partway through the schedule, where the step indices no longer match.
"""

from __future__ import annotations

import copy
import math

from ..guidance.interval import GuidanceInterval
from ..prediction import noise_level

__all__ = ["cfg_cutoff", "cutoff_sigma", "cutoff_step", "step_noise_levels"]


def step_noise_levels(scheduler, num_inference_steps: int, **set_timesteps_kwargs) -> list[float]:
    """The noise level ``sigma / alpha`` of each of the ``num_inference_steps`` denoising steps of
    ``scheduler``, first (noisiest) to last, as a guidance rule sees them.

    ``set_timesteps_kwargs`` go to ``scheduler.set_timesteps`` as the pipeline passes them (e.g.
    ``mu=`` where the scheduler uses dynamic shifting, ``sigmas=`` for Flux); the scheduler itself
    is not changed.
    """
    scheduler = copy.deepcopy(scheduler)
    scheduler.set_timesteps(num_inference_steps, **set_timesteps_kwargs)
    num_steps = len(scheduler.timesteps)
    levels = []
    for index in range(num_steps):
        alpha, sigma = noise_level(scheduler, index)
        levels.append(float(sigma.double()[0] / alpha.double()[0]))
    return levels


def cutoff_step(
    num_steps: int, cutoff_step_index: int | None = None, cutoff_step_ratio: float | None = None
) -> int:
    """The last guided step index, as diffusers' cutoff callbacks compute it: ``cutoff_step_index``,
    or ``int(num_steps * cutoff_step_ratio)``; exactly one of the two must be given."""
    if (cutoff_step_index is None) == (cutoff_step_ratio is None):
        raise ValueError("give exactly one of cutoff_step_index and cutoff_step_ratio")
    if cutoff_step_ratio is not None:
        if not 0.0 <= cutoff_step_ratio <= 1.0:
            raise ValueError(f"cutoff_step_ratio must lie in [0, 1], got {cutoff_step_ratio}")
        return int(num_steps * cutoff_step_ratio)
    if cutoff_step_index < 0:
        raise ValueError(f"cutoff_step_index must be >= 0, got {cutoff_step_index}")
    return int(cutoff_step_index)


def cutoff_sigma(
    scheduler,
    num_inference_steps: int,
    cutoff_step_index: int | None = None,
    *,
    cutoff_step_ratio: float | None = None,
    **set_timesteps_kwargs,
) -> float:
    """``sigma_lo`` such that ``GuidanceInterval(sigma_lo, inf)`` guides steps ``0..k`` and no other,
    ``k`` given as diffusers' callbacks take it (``cutoff_step_index=k``, or ``cutoff_step_ratio``
    with ``k = int(num_steps * ratio)``). To guide the first ``n`` steps pass
    ``cutoff_step_index=n - 1``.

    The value is the midpoint of the noise levels of steps ``k`` and ``k + 1``; 0 (guide every
    step) where ``k`` is the last step or beyond it, as the callback then never fires. Raises
    ``ValueError`` where the schedule's noise levels do not fall from step ``k`` to the steps after
    it, so that no interval can give that split.
    """
    levels = step_noise_levels(scheduler, num_inference_steps, **set_timesteps_kwargs)
    k = cutoff_step(len(levels), cutoff_step_index, cutoff_step_ratio)
    if k >= len(levels) - 1:
        return 0.0
    guided, unguided = min(levels[: k + 1]), max(levels[k + 1 :])
    if not guided > unguided:
        raise ValueError(
            f"{type(scheduler).__name__}'s noise levels do not fall after step {k} "
            f"(lowest guided {guided:.6g}, highest unguided {unguided:.6g}); no sigma_lo splits the steps there"
        )
    sigma_lo = (guided + unguided) / 2
    if not unguided < sigma_lo < guided:  # adjacent floats, or an infinite first level (flow sigma 1)
        sigma_lo = unguided
    return sigma_lo


def cfg_cutoff(
    scheduler,
    num_inference_steps: int,
    cutoff_step_index: int | None = None,
    *,
    cutoff_step_ratio: float | None = None,
    **set_timesteps_kwargs,
) -> GuidanceInterval:
    """``GuidanceInterval(cutoff_sigma(...), inf)``: CFG on steps ``0..k``, the conditional
    prediction alone after, per sample; a drop-in for ``SDCFGCutoffCallback`` and its kin with the
    same ``cutoff_step_index`` / ``cutoff_step_ratio``, valid for any number of prompts and images
    per prompt."""
    sigma_lo = cutoff_sigma(
        scheduler,
        num_inference_steps,
        cutoff_step_index,
        cutoff_step_ratio=cutoff_step_ratio,
        **set_timesteps_kwargs,
    )
    return GuidanceInterval(sigma_lo, math.inf)
