"""Shortest Path Diffusion (Das, Chen, Ho, Baram, Gu, Hoogeboom, ... "Image generation with
shortest path diffusion", ICML 2023, arXiv 2306.00501) as a diffusers scheduler.

The corruption acts per spatial frequency ``f`` of the orthonormal 2-D Fourier transform of
each channel:

    u_t(f) = sqrt(abar_t(f)) u_0(f) + sqrt(1 - abar_t(f)) eps(f),
    abar_t(f) = (1 - D_f^tau) / (1 - D_f),   tau = 1 - t / T,

with ``D_f`` the data's power spectrum, by default ``D_f = c1 / (c2 + |f|)^m`` (|f| in
integer cycles per image; the authors' CIFAR-10 constants c1 = 1.59, c2 = 0.0086, m = 2). The
marginal variance at frequency f is then ``D_f^tau``, the Fisher-metric geodesic from the data
(tau = 1, t = 0) to white noise (tau = 0, t = T). ``D_f = 1`` takes the limit ``abar = tau``.
Low frequencies, which carry the most power, lose their signal-to-noise first.

Training is DDPM's (predict the pixel-space noise ``eps`` whose Fourier transform is
``eps(f)``, uniform t in 1..T): :meth:`add_noise` is the only change. Sampling is ancestral in
Fourier space with ``beta_t(f) = 1 - abar_t(f) / abar_{t-1}(f)`` (clamped at 0.999, as the
authors do) and the posterior variance ``(1 - abar_{t-1}) / (1 - abar_t) beta_t``. With fewer
inference steps than T (ours; the authors always run all T), consecutive kept timesteps
define ``beta`` the same way, which is exact per frequency because the forward process is
Markov in each frequency with marginals ``abar_t(f)``.

``sampler="ddim"`` (ours) is the deterministic member of the same family per frequency
(Song et al.'s DDIM with eta = 0): ``u_prev = sqrt(abar_prev) u0_hat + sqrt(1 - abar_prev) eps_hat``
with ``u0_hat = (u_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t)`` (0 where ``abar_t = 0``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

AUTHORS_CIFAR10 = {"c1": 1.59, "c2": 0.0086, "m": 2.0}
MAX_BETA = 0.999
SAMPLERS = ("ancestral", "ddim")


@dataclass
class ShortestPathSchedulerOutput(BaseOutput):
    """``prev_sample``: x at the next (less noisy) timestep; ``pred_original_sample``: x0."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


def frequency_magnitude(height: int, width: int) -> torch.Tensor:
    """|f| in integer cycles per image for each bin of an (H, W) FFT, float64."""
    fy = torch.fft.fftfreq(height, d=1.0 / height, dtype=torch.float64)
    fx = torch.fft.fftfreq(width, d=1.0 / width, dtype=torch.float64)
    return torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)


def parametric_spectrum(height: int, width: int, c1: float, c2: float, m: float) -> torch.Tensor:
    """``D_f = c1 / (c2 + |f|)^m`` on the (H, W) FFT grid."""
    return c1 / (c2 + frequency_magnitude(height, width)) ** m


def signal_fraction(spectrum: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """``abar = (1 - D^tau) / (1 - D)`` per frequency; ``tau`` (B,) -> (B, H, W), float64."""
    d = spectrum.double()[None]
    tau = torch.as_tensor(tau, dtype=torch.float64).reshape(-1, 1, 1)
    near_one = (d - 1).abs() < 1e-9
    safe = torch.where(near_one, torch.full_like(d, 2.0), d)
    # log-space form: (1 - exp(tau log D)) / (1 - D), stable for D near 0 and far above 1
    value = -torch.expm1(tau * torch.log(safe)) / (1 - safe)
    return torch.where(near_one, tau.expand_as(value), value).clamp(0.0, 1.0)


def fourier(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal 2-D FFT over the last two dimensions (white noise stays white, variance 1)."""
    return torch.fft.fft2(x, norm="ortho")


def inverse_fourier(u: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`fourier`, real part (the per-frequency scalings keep the symmetry)."""
    return torch.fft.ifft2(u, norm="ortho").real


def radial_power_spectrum(images: torch.Tensor) -> torch.Tensor:
    """Empirical ``E|u_0(f)|^2`` (H, W) of images (N, C, H, W) in the model's [-1, 1] range,
    averaged over images, channels and bins of equal |f| (rounded to integer cycles)."""
    power = fourier(images.double()).abs().pow(2).mean(dim=(0, 1))
    radius = frequency_magnitude(*power.shape).round().long()
    sums = torch.zeros(int(radius.max()) + 1, dtype=torch.float64).index_add_(
        0, radius.flatten(), power.flatten()
    )
    counts = torch.bincount(radius.flatten()).double()
    return (sums / counts)[radius]


def fit_spectrum_parameters(images: torch.Tensor, m: float | None = None) -> dict[str, float]:
    """Least-squares fit of ``log D_f = log c1 - m log(c2 + |f|)`` to the empirical radial
    spectrum of ``images`` (N, C, H, W) in [-1, 1], excluding f = 0; ``m`` fixed if given."""
    power = radial_power_spectrum(images)
    radius = frequency_magnitude(*power.shape)
    keep = radius > 0
    r, p = radius[keep].numpy(), power[keep].numpy()
    best = None
    for c2 in np.geomspace(1e-3, 10.0, 200):
        x = np.log(c2 + r)
        if m is None:
            slope, intercept = np.polyfit(x, np.log(p), 1)
            exponent = -slope
        else:
            exponent, intercept = m, float(np.mean(np.log(p) + m * x))
        residual = float(np.mean((np.log(p) - (intercept - exponent * x)) ** 2))
        if best is None or residual < best[0]:
            best = (residual, float(np.exp(intercept)), float(c2), float(exponent))
    return {"c1": best[1], "c2": best[2], "m": best[3]}


class ShortestPathScheduler(SchedulerMixin, ConfigMixin):
    """Shortest Path Diffusion: per-frequency corruption and ancestral sampling in Fourier space.

    Args:
        num_train_timesteps: T.
        sample_size: image (H, W) (or one int for square images); the spectrum lives on this grid.
        c1, c2, m: parameters of ``D_f = c1 / (c2 + |f|)^m`` (defaults: the authors' CIFAR-10 fit).
        spectrum: optional explicit ``D_f`` as an (H, W) nested list (e.g. ``radial_power_spectrum``
            of the training data); overrides c1, c2, m.
        prediction_type: ``"epsilon"`` only (the authors' training objective).
        sampler: ``"ancestral"`` (the authors') or ``"ddim"`` (deterministic, ours; module docstring).
    """

    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        sample_size: int | list[int] | tuple[int, int] = 32,
        c1: float = AUTHORS_CIFAR10["c1"],
        c2: float = AUTHORS_CIFAR10["c2"],
        m: float = AUTHORS_CIFAR10["m"],
        spectrum: list | None = None,
        prediction_type: str = "epsilon",
        sampler: str = "ancestral",
    ):
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
        if prediction_type != "epsilon":
            raise ValueError(
                f"ShortestPathScheduler supports prediction_type='epsilon' only, got {prediction_type!r}"
            )
        height, width = (sample_size, sample_size) if isinstance(sample_size, int) else tuple(sample_size)
        if height < 1 or width < 1:
            raise ValueError(f"sample_size must be positive, got {sample_size}")
        if spectrum is not None:
            values = torch.as_tensor(spectrum, dtype=torch.float64)
            if values.shape != (height, width):
                raise ValueError(f"spectrum has shape {tuple(values.shape)}, expected {(height, width)}")
        else:
            if not (c1 > 0 and c2 > 0 and m >= 0):
                raise ValueError(f"need c1 > 0, c2 > 0, m >= 0; got c1={c1}, c2={c2}, m={m}")
            values = parametric_spectrum(height, width, c1, c2, m)
        if not torch.isfinite(values).all() or (values <= 0).any():
            raise ValueError("the spectrum D_f must be finite and positive everywhere")
        self.spectrum = values
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self.timesteps = torch.arange(num_train_timesteps, 0, -1)

    # -- the forward process -------------------------------------------------------------------

    def alphas_cumprod_at(self, timesteps: torch.Tensor | float) -> torch.Tensor:
        """``abar_t(f)`` (B, H, W) at timesteps in [0, T]."""
        t = torch.as_tensor(timesteps, dtype=torch.float64).reshape(-1).cpu()
        if (t < 0).any() or (t > self.config.num_train_timesteps).any():
            raise ValueError(f"timesteps must lie in [0, {self.config.num_train_timesteps}]")
        return signal_fraction(self.spectrum, 1 - t / self.config.num_train_timesteps)

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """``x_t`` from ``x_0`` and pixel-space noise ``eps`` (B, C, H, W) at ``timesteps`` (B,)."""
        self._check_shape(original_samples)
        abar = self.alphas_cumprod_at(timesteps)[:, None].to(original_samples.device)  # (B, 1, H, W)
        mixed = abar.sqrt() * fourier(original_samples.double()) + (1 - abar).sqrt() * fourier(noise.double())
        return inverse_fourier(mixed).to(original_samples.dtype)

    def scale_model_input(self, sample: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        """No input scaling (as DDPM)."""
        return sample

    def _check_shape(self, sample: torch.Tensor) -> None:
        if tuple(sample.shape[-2:]) != tuple(self.spectrum.shape):
            raise ValueError(
                f"sample has spatial size {tuple(sample.shape[-2:])}, the scheduler's spectrum is "
                f"{tuple(self.spectrum.shape)}: set sample_size to the image size"
            )

    # -- sampling ------------------------------------------------------------------------------

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Evenly spaced timesteps from T down to 1 (all T when ``num_inference_steps == T``)."""
        total = self.config.num_train_timesteps
        if not 1 <= num_inference_steps <= total:
            raise ValueError(f"num_inference_steps must be between 1 and {total}, got {num_inference_steps}")
        self.num_inference_steps = num_inference_steps
        steps = np.round(np.linspace(total, 0, num_inference_steps + 1)[:-1]).astype(np.int64)
        self.timesteps = torch.from_numpy(steps).to(device)

    def previous_timestep(self, timestep: int) -> int:
        """The next (less noisy) timestep of the current schedule; 0 after the last."""
        t = int(timestep)
        later = [int(s) for s in self.timesteps if int(s) < t]
        return max(later) if later else 0

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> ShortestPathSchedulerOutput | tuple:
        """One step in Fourier space (ancestral, or DDIM with ``sampler="ddim"``) from ``timestep``
        to the previous kept timestep."""
        self._check_shape(sample)
        t, t_prev = int(timestep), self.previous_timestep(timestep)
        abar_t = self.alphas_cumprod_at(t)[0].to(sample.device)
        abar_prev = self.alphas_cumprod_at(t_prev)[0].to(sample.device)
        if self.config.sampler == "ddim":
            return self._ddim_step(model_output, sample, abar_t, abar_prev, return_dict)
        beta = (1 - abar_t / abar_prev.clamp_min(1e-300)).clamp(0, MAX_BETA)
        alpha = 1 - beta
        u_t, eps = fourier(sample.double()), fourier(model_output.double())
        one_minus_abar = (1 - abar_t).clamp_min(1e-300)
        # x0 in Fourier space; where no signal is left (abar_t = 0) it is undefined: use 0
        u_0 = torch.where(
            abar_t > 0, (u_t - one_minus_abar.sqrt() * eps) / abar_t.clamp_min(1e-300).sqrt(), 0
        )
        mean = (u_t - beta / one_minus_abar.sqrt() * eps) / alpha.sqrt()
        variance = (1 - abar_prev) / one_minus_abar * beta
        if t_prev > 0:
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=torch.float64)
            mean = mean + variance.sqrt() * fourier(noise)
        prev = inverse_fourier(mean).to(sample.dtype)
        x0 = inverse_fourier(u_0).to(sample.dtype)
        if not return_dict:
            return (prev, x0)
        return ShortestPathSchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    def _ddim_step(self, model_output, sample, abar_t, abar_prev, return_dict):
        u_t, eps = fourier(sample.double()), fourier(model_output.double())
        u_0 = torch.where(abar_t > 0, (u_t - (1 - abar_t).sqrt() * eps) / abar_t.clamp_min(1e-300).sqrt(), 0)
        prev = inverse_fourier(abar_prev.sqrt() * u_0 + (1 - abar_prev).sqrt() * eps).to(sample.dtype)
        x0 = inverse_fourier(u_0).to(sample.dtype)
        if not return_dict:
            return (prev, x0)
        return ShortestPathSchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    def __len__(self) -> int:
        return self.config.num_train_timesteps
