"""Deterministic DDIM inversion (Song, Meng & Ermon, "Denoising Diffusion Implicit Models", ICLR
2021, section 4.3; used by Smooth Diffusion, arXiv 2312.04410, to interpolate real images).

DDIM with eta = 0 is an ODE discretisation, so it can be run backwards. Going up from
``x_s`` (less noise) to the next sampled timestep ``t > s`` with the model's noise estimate at
the current point:

    eps = eps_theta(x_s, t),   x0_hat = (x_s - sqrt(1 - abar_s) eps) / sqrt(abar_s),
    x_t = sqrt(abar_t) x0_hat + sqrt(1 - abar_t) eps,

which is the DDIM update ``t -> s`` solved for ``x_t`` with ``eps`` evaluated at ``x_s``
instead of ``x_t`` (the usual first-order approximation; it is exact when ``eps_theta`` does
not change over the step). ``s`` below the first sampled timestep is the clean image
(``abar = final_alpha_cumprod``, 1 with ``set_alpha_to_one``). Sampling the result with the
same pipeline, steps, condition and ``guidance_scale=1`` returns (close to) the image.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


@torch.no_grad()
def ddim_invert(
    pipe,
    images: torch.Tensor,
    class_labels: Sequence[int] | torch.Tensor,
    num_inference_steps: int = 50,
) -> torch.Tensor:
    """The starting noise from which ``pipe`` (DDIM, eta = 0, no guidance) regenerates ``images``.

    Args:
        pipe: a class-conditional pipeline with a ``DDIMScheduler`` over an epsilon model and a
            ``predict(x, t, class_labels)`` method (``DigitsPipeline``).
        images: (B, C, H, W) in [0, 1].
        class_labels: the condition of each image.
        num_inference_steps: the steps the pipeline will sample with.
    """
    from diffusers import DDIMScheduler

    scheduler = pipe.scheduler
    if not isinstance(scheduler, DDIMScheduler):
        raise ValueError(
            f"DDIM inversion needs a DDIMScheduler, got {type(scheduler).__name__}: set pipe.scheduler"
        )
    if scheduler.config.get("clip_sample") or scheduler.config.get("thresholding"):
        raise ValueError(
            "DDIM inversion cannot undo clip_sample or thresholding: sample with "
            "DDIMScheduler.from_config(config, clip_sample=False, thresholding=False)"
        )
    if scheduler.config.prediction_type != "epsilon":
        raise ValueError(
            f"DDIM inversion here takes an epsilon model, got {scheduler.config.prediction_type!r}"
        )
    if images.ndim != 4 or images.min() < 0 or images.max() > 1:
        raise ValueError("images must be (B, C, H, W) in [0, 1]")
    labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
    if len(labels) != len(images):
        raise ValueError(f"{len(images)} images but {len(labels)} class labels")
    device = pipe.denoiser.device
    scheduler.set_timesteps(int(num_inference_steps), device=device)
    stride = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alphas_cumprod = scheduler.alphas_cumprod.to(device=device, dtype=torch.float64)
    x = (images.to(device) * 2 - 1).double()
    for t in scheduler.timesteps.flip(0):
        s = int(t) - stride
        abar_s = (
            alphas_cumprod[s] if s >= 0 else torch.tensor(float(scheduler.final_alpha_cumprod), dtype=x.dtype)
        )
        abar_t = alphas_cumprod[int(t)]
        eps = pipe.predict(x.to(pipe.denoiser.dtype), t, labels.to(device)).double()
        x0_hat = (x - (1 - abar_s).sqrt() * eps) / abar_s.sqrt()
        x = abar_t.sqrt() * x0_hat + (1 - abar_t).sqrt() * eps
    return x.to(pipe.denoiser.dtype)
