"""alpha/sigma from the scheduler and the x0 conversions, against the schedulers' own numbers."""

import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

from diffguide.prediction import KINDS, alpha_sigma, from_denoised, prediction_kind, to_denoised


def test_integer_timesteps_give_sqrt_alphas_cumprod():
    scheduler = DDIMScheduler(beta_schedule="scaled_linear")
    t = torch.tensor([1, 500, 999])
    alpha, sigma = alpha_sigma(scheduler, t)
    abar = scheduler.alphas_cumprod[t].double()
    torch.testing.assert_close(alpha, abar.sqrt())
    torch.testing.assert_close(sigma, (1 - abar).sqrt())


def test_non_integer_euler_timesteps_match_the_schedulers_sigmas():
    scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear")
    scheduler.set_timesteps(7)
    assert any(float(t) != int(t) for t in scheduler.timesteps)  # Euler really uses fractional t
    alpha, sigma = alpha_sigma(scheduler, scheduler.timesteps)
    # Euler's input scaling makes x_t = x / sqrt(sigma_k^2 + 1): noise-to-signal sigma / alpha = sigma_k
    torch.testing.assert_close(sigma / alpha, scheduler.sigmas[:-1].double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones(7, dtype=torch.float64))


def test_flow_matching_sigma_is_the_schedulers_sigma():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(5)
    assert prediction_kind(scheduler) == "flow"
    alpha, sigma = alpha_sigma(scheduler, scheduler.timesteps)
    torch.testing.assert_close(sigma, scheduler.sigmas[:-1].double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(alpha, 1 - sigma)


@pytest.mark.parametrize("kind", KINDS)
def test_conversions_invert_each_other_and_recover_x0(kind):
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 3, 4, 4, generator=generator, dtype=torch.float64)
    noise = torch.randn(2, 3, 4, 4, generator=generator, dtype=torch.float64)
    if kind in ("flow", "reverse_flow"):
        alpha, sigma = (
            torch.tensor([0.3, 0.9], dtype=torch.float64),
            torch.tensor([0.7, 0.1], dtype=torch.float64),
        )
    else:
        abar = torch.tensor([0.2, 0.95], dtype=torch.float64)
        alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    a, s = alpha.reshape(-1, 1, 1, 1), sigma.reshape(-1, 1, 1, 1)
    x_t = a * x0 + s * noise
    output = {"epsilon": noise, "v_prediction": a * noise - s * x0, "sample": x0, "flow": noise - x0,
              "reverse_flow": x0 - noise}[kind]  # fmt: skip
    torch.testing.assert_close(to_denoised(output, x_t, alpha, sigma, kind), x0)
    torch.testing.assert_close(from_denoised(x0, x_t, alpha, sigma, kind), output)


def test_unknown_prediction_type_is_refused():
    scheduler = DDIMScheduler()
    scheduler.register_to_config(prediction_type="mystery")
    with pytest.raises(ValueError, match="unsupported prediction_type"):
        prediction_kind(scheduler)


@pytest.mark.parametrize("options", [{"timestep_type": "continuous"}, {"use_karras_sigmas": True}])
def test_euler_variants_use_the_current_sigma(options):
    scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", **options)
    scheduler.set_timesteps(5)
    sample = torch.zeros(1, 1, 2, 2)
    for i, t in enumerate(scheduler.timesteps):
        scheduler.scale_model_input(sample, t)  # the pipeline does this before the denoiser call
        alpha, sigma = alpha_sigma(scheduler, t)
        torch.testing.assert_close(sigma / alpha, scheduler.sigmas[i].double().reshape(1))
        sample = scheduler.step(torch.zeros_like(sample), t, sample).prev_sample


@pytest.mark.parametrize(
    "make",
    [
        lambda: __import__("diffusers").FlowMatchEulerDiscreteScheduler(shift=3.0),
        lambda: __import__("diffusers").FlowMatchEulerDiscreteScheduler(invert_sigmas=True),
        lambda: __import__("diffusers").UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
        ),
    ],
    ids=["flowmatch", "mochi-inverted", "unipc-flow"],
)
def test_noise_level_of_flow_schedulers_is_the_noise_fraction(make):
    """x_t = (1 - s) x0 + s noise with s the scheduler's sigma (1 - sigma where Mochi's inverted
    schedule counts the other way); the end-to-end check is tests/test_reach.py's x0 test."""
    from diffguide.prediction import noise_level

    scheduler = make()
    scheduler.set_timesteps(4)
    kind = prediction_kind(scheduler)
    alpha, sigma = noise_level(scheduler, 1)
    assert kind in ("flow", "reverse_flow")
    torch.testing.assert_close(alpha + sigma, torch.ones(1, dtype=torch.float64))
    value = float(scheduler.sigmas[1])
    expected = 1 - value if kind == "reverse_flow" else value
    assert float(sigma) == pytest.approx(expected)
