"""Conversions between a denoiser's raw output and the denoised (x0) prediction.

Every supported scheduler describes ``x_t = alpha_t x0 + sigma_t noise`` as the denoiser
sees it (after ``scale_model_input``):

- schedulers that keep k-diffusion sigmas and a current ``step_index`` (Euler, Heun,
  DPM-Solver after its first step): the noise-to-signal ratio ``s = sigmas[step_index]``, then
  ``alpha = 1 / sqrt(1 + s^2)``, ``sigma = s alpha``; exact for continuous timesteps and
  Karras sigmas alike.
- other variance-preserving schedulers with ``alphas_cumprod`` (DDIM, DDPM, DPM-Solver's
  first step): ``alpha = sqrt(abar_t)``, ``sigma = sqrt(1 - abar_t)``; a non-integer t
  interpolates ``sqrt((1 - abar) / abar)`` linearly, as diffusers' Euler does.
- flow matching (FlowMatchEuler; UniPC / DPM-Solver with ``use_flow_sigmas``):
  ``x_t = (1 - s) x0 + s noise`` with ``s = sigmas[i]``; at a scheduler timestep,
  ``s = timestep / num_train_timesteps``. Mochi's ``invert_sigmas`` counts the other way
  (``s = 1 - sigmas[i]``) and its model predicts the reversed velocity.

Predictions: epsilon ``x0 = (x_t - sigma eps) / alpha``; v ``x0 = alpha x_t - sigma v``;
sample ``x0 = output``; flow (velocity ``noise - x0``) ``x0 = x_t - s v``; reverse flow
(``x0 - noise``, Mochi and Lumina2) ``x0 = x_t + s v``.

:func:`alpha_sigma` takes a *scheduler* timestep. The denoiser's own ``timestep`` argument is
not one on many pipelines (Flux and Qwen pass t/1000, Lumina 1 - t/1000, Sana t x scale), so
the guidance adapters read the noise level from the scheduler's state with :func:`noise_level`.
"""

from __future__ import annotations

import math

import torch

from .guidance.base import per_sample

KINDS = ("epsilon", "v_prediction", "sample", "flow", "reverse_flow")


def uses_flow_sigmas(scheduler) -> bool:
    """Whether the scheduler's ``sigmas`` are flow-matching noise fractions ``s`` (not VP ratios)."""
    return "FlowMatch" in type(scheduler).__name__ or bool(
        getattr(scheduler.config, "use_flow_sigmas", False)
    )


def prediction_kind(scheduler) -> str:
    """The prediction type of the model a scheduler drives."""
    if "FlowMatch" in type(scheduler).__name__:
        return "reverse_flow" if getattr(scheduler.config, "invert_sigmas", False) else "flow"
    kind = getattr(scheduler.config, "prediction_type", "epsilon")
    if kind == "flow_prediction":  # UniPC / DPM-Solver driving a flow model (Wan, Sana, HiDream)
        return "flow"
    if kind not in KINDS:
        raise ValueError(
            f"unsupported prediction_type {kind!r} of {type(scheduler).__name__}; supported: {KINDS}"
        )
    return kind


def noise_level(scheduler, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 (alpha, sigma) of ``x_t`` at step ``index`` of the scheduler's own ``sigmas``
    (shape (1,)); :func:`alpha_sigma` at ``timesteps[index]`` where it keeps none (DDIM, DDPM)."""
    sigmas = getattr(scheduler, "sigmas", None)
    if isinstance(sigmas, torch.Tensor) and 0 <= index < len(sigmas):
        value = float(sigmas[index])  # python floats are float64, and cheaper than tensor ops here
        if uses_flow_sigmas(scheduler):
            s = 1 - value if getattr(scheduler.config, "invert_sigmas", False) else value
            alpha, sigma = 1 - s, s
        else:
            alpha = 1 / math.sqrt(1 + value**2)
            sigma = value * alpha
        return torch.tensor([alpha], dtype=torch.float64), torch.tensor([sigma], dtype=torch.float64)
    timesteps = getattr(scheduler, "timesteps", None)
    if not isinstance(timesteps, torch.Tensor) or not 0 <= index < len(timesteps):
        raise ValueError(f"{type(scheduler).__name__} has no sigma or timestep for step {index}")
    return alpha_sigma(scheduler, timesteps[index])


def alpha_sigma(scheduler, timestep: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 (alpha, sigma) of ``x_t`` at the scheduler timestep ``timestep`` (a number or a
    tensor of them)."""
    t = torch.as_tensor(timestep, dtype=torch.float64).detach().cpu().reshape(-1)
    if uses_flow_sigmas(scheduler):  # their timesteps are s x num_train_timesteps
        s = t / scheduler.config.num_train_timesteps
        return (s, 1 - s) if getattr(scheduler.config, "invert_sigmas", False) else (1 - s, s)
    sigmas, index = getattr(scheduler, "sigmas", None), getattr(scheduler, "step_index", None)
    if isinstance(sigmas, torch.Tensor) and index is not None and index < len(sigmas):
        # k-diffusion-style schedulers (Euler, Heun, DPM-Solver) know the current step's
        # noise-to-signal ratio exactly, whatever their timestep convention (continuous, Karras)
        ratio = sigmas[index].to(torch.float64).cpu().reshape(1).expand(len(t))
        alpha = 1 / (1 + ratio**2).sqrt()
        return alpha, ratio * alpha
    alphas_cumprod = getattr(scheduler, "alphas_cumprod", None)
    if alphas_cumprod is None:
        raise ValueError(f"{type(scheduler).__name__} has no alphas_cumprod; cannot derive alpha/sigma")
    abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).cpu()
    noise_to_signal = ((1 - abar) / abar).sqrt()
    t = t.clamp(0, len(abar) - 1)
    low = t.floor().long()
    high = (low + 1).clamp(max=len(abar) - 1)
    frac = t - low
    ratio = noise_to_signal[low] * (1 - frac) + noise_to_signal[high] * frac
    alpha = 1 / (1 + ratio**2).sqrt()
    exact = frac == 0  # integer timesteps: sqrt(abar) exactly
    alpha = torch.where(exact, abar[low].sqrt(), alpha)
    sigma = torch.where(exact, (1 - abar[low]).sqrt(), ratio * alpha)
    return alpha, sigma


def to_denoised(
    output: torch.Tensor, sample: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, kind: str
) -> torch.Tensor:
    """x0 from the model ``output`` at ``x_t = sample``."""
    a, s = per_sample(alpha, output), per_sample(sigma, output)
    if kind == "epsilon":
        return (sample - s * output) / a
    if kind == "v_prediction":
        return a * sample - s * output
    if kind == "sample":
        return output
    if kind == "flow":
        return sample - s * output
    if kind == "reverse_flow":
        return sample + s * output
    raise ValueError(f"unknown prediction kind {kind!r}; supported: {KINDS}")


def from_denoised(
    denoised: torch.Tensor, sample: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, kind: str
) -> torch.Tensor:
    """The model output that corresponds to ``denoised`` at ``x_t = sample``."""
    a, s = per_sample(alpha, denoised), per_sample(sigma, denoised)
    if kind == "epsilon":
        return (sample - a * denoised) / s
    if kind == "v_prediction":
        return (a * sample - denoised) / s
    if kind == "sample":
        return denoised
    if kind == "flow":
        return (sample - denoised) / s
    if kind == "reverse_flow":
        return (denoised - sample) / s
    raise ValueError(f"unknown prediction kind {kind!r}; supported: {KINDS}")


def implied_noise(
    output: torch.Tensor, sample: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, kind: str
) -> torch.Tensor:
    """The noise ``eps`` in ``x_t = alpha x0 + sigma eps`` that the model ``output`` implies.

    Flow kinds use the closed forms (``x_t + alpha v`` for flow, ``x_t - alpha v`` for reverse
    flow), which stay finite at ``sigma = 0``; the others go through :func:`to_denoised`.
    """
    if kind == "epsilon":
        return output
    if kind == "flow":
        return sample + per_sample(alpha, output) * output
    if kind == "reverse_flow":
        return sample - per_sample(alpha, output) * output
    denoised = to_denoised(output, sample, alpha, sigma, kind)
    return from_denoised(denoised, sample, alpha, sigma, "epsilon")
