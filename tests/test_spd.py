"""Shortest Path Diffusion scheduler: the per-frequency process, its limits and its sampler."""

import pytest
import torch

import diffguide as dg
from diffguide.schedulers.spd import (
    fit_spectrum_parameters,
    fourier,
    frequency_magnitude,
    inverse_fourier,
    parametric_spectrum,
    signal_fraction,
)


def _data_with_spectrum(spectrum: torch.Tensor, n: int, channels: int = 1, seed: int = 0) -> torch.Tensor:
    """Gaussian images whose orthonormal Fourier coefficients have variance D_f."""
    white = torch.randn(
        n, channels, *spectrum.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )
    return inverse_fourier(spectrum.sqrt() * fourier(white))


def test_add_noise_variance_per_frequency_is_d_to_the_tau():
    scheduler = dg.ShortestPathScheduler(num_train_timesteps=100, sample_size=(6, 8), c1=2.0, c2=0.5, m=1.5)
    x0 = _data_with_spectrum(scheduler.spectrum, 20000)
    for t in (10, 50, 90):
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(t), dtype=torch.float64)
        x_t = scheduler.add_noise(x0, noise, torch.full((len(x0),), t))
        variance = fourier(x_t).abs().pow(2).mean(dim=(0, 1))
        expected = scheduler.spectrum ** (1 - t / 100)
        torch.testing.assert_close(variance, expected, rtol=0.06, atol=0)


def test_limits_no_signal_at_t_max_and_untouched_at_zero():
    scheduler = dg.ShortestPathScheduler(num_train_timesteps=50, sample_size=8)
    x0, noise = torch.randn(3, 2, 8, 8), torch.randn(3, 2, 8, 8)
    torch.testing.assert_close(scheduler.add_noise(x0, noise, torch.zeros(3)), x0)
    torch.testing.assert_close(scheduler.add_noise(x0, noise, torch.full((3,), 50)), noise)
    assert torch.equal(scheduler.alphas_cumprod_at(50), torch.zeros(1, 8, 8, dtype=torch.float64))


def test_signal_fraction_handles_d_equal_one_as_tau():
    tau = torch.tensor([0.25, 0.7])
    value = signal_fraction(torch.ones(2, 2, dtype=torch.float64), tau)
    torch.testing.assert_close(value[:, 0, 0], tau.double())
    near = signal_fraction(torch.full((1, 1), 1 + 1e-7, dtype=torch.float64), tau)
    torch.testing.assert_close(near[:, 0, 0], tau.double(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("steps", [100, 7])
def test_exact_noise_predictor_samples_the_data_point(steps):
    scheduler = dg.ShortestPathScheduler(num_train_timesteps=100, sample_size=(4, 6))
    x0 = torch.randn(2, 3, 4, 6, dtype=torch.float64)
    scheduler.set_timesteps(steps)
    sample = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    generator = torch.Generator().manual_seed(1)
    for t in scheduler.timesteps:
        abar = scheduler.alphas_cumprod_at(t)[0]
        eps = inverse_fourier((fourier(sample) - abar.sqrt() * fourier(x0)) / (1 - abar).sqrt())
        sample = scheduler.step(eps, t, sample, generator=generator).prev_sample
    torch.testing.assert_close(sample, x0, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("steps", [100, 7, 2])
def test_ddim_sampler_is_deterministic_and_lands_on_the_data_point(steps):
    scheduler = dg.ShortestPathScheduler(num_train_timesteps=100, sample_size=(4, 6), sampler="ddim")
    x0 = torch.randn(2, 3, 4, 6, dtype=torch.float64)
    scheduler.set_timesteps(steps)
    start = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    finals = []
    for seed in (1, 2):  # the generator must not matter
        sample = start.clone()
        for t in scheduler.timesteps:
            abar = scheduler.alphas_cumprod_at(t)[0]
            eps = inverse_fourier((fourier(sample) - abar.sqrt() * fourier(x0)) / (1 - abar).sqrt())
            sample = scheduler.step(eps, t, sample, generator=torch.Generator().manual_seed(seed)).prev_sample
        finals.append(sample)
    torch.testing.assert_close(finals[0], x0, rtol=1e-6, atol=1e-6)
    assert torch.equal(finals[0], finals[1])
    with pytest.raises(ValueError, match="sampler"):
        dg.ShortestPathScheduler(sampler="euler")


def test_ddim_step_is_the_per_frequency_ddim_update():
    scheduler = dg.ShortestPathScheduler(num_train_timesteps=50, sample_size=4, sampler="ddim")
    scheduler.set_timesteps(5)
    sample, eps = torch.randn(1, 1, 4, 4, dtype=torch.float64), torch.randn(1, 1, 4, 4, dtype=torch.float64)
    t = int(scheduler.timesteps[2])
    a_t, a_s = (
        scheduler.alphas_cumprod_at(t)[0],
        scheduler.alphas_cumprod_at(scheduler.previous_timestep(t))[0],
    )
    u0 = (fourier(sample) - (1 - a_t).sqrt() * fourier(eps)) / a_t.sqrt()
    expected = inverse_fourier(a_s.sqrt() * u0 + (1 - a_s).sqrt() * fourier(eps))
    torch.testing.assert_close(scheduler.step(eps, t, sample).prev_sample, expected)


def _sample_with_optimal_denoiser(scheduler, steps: int, n: int) -> torch.Tensor:
    """Ancestral sampling with the exact E[eps | x_t] of Gaussian data with spectrum D:
    per frequency, E[eps | x_t] = sqrt(1 - abar) x_t / D^tau."""
    scheduler.set_timesteps(steps)
    shape = (n, 1, *scheduler.spectrum.shape)
    sample = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    generator = torch.Generator().manual_seed(1)
    for t in scheduler.timesteps:
        abar = scheduler.alphas_cumprod_at(t)[0]
        variance = scheduler.spectrum ** (1 - int(t) / scheduler.config.num_train_timesteps)
        eps = inverse_fourier((1 - abar).sqrt() / variance * fourier(sample))
        sample = scheduler.step(eps, t, sample, generator=generator).prev_sample
    return sample


def test_respaced_and_full_schedules_agree_in_the_limit():
    scheduler = dg.ShortestPathScheduler(num_train_timesteps=200, sample_size=4, c1=1.5, c2=0.3, m=1.0)
    target = scheduler.spectrum
    errors = {}
    for steps in (5, 40, 200):
        samples = _sample_with_optimal_denoiser(scheduler, steps, 6000)
        spectrum = fourier(samples).abs().pow(2).mean(dim=(0, 1))
        errors[steps] = float(((spectrum / target).log().abs()).mean())
    # the full T-step sampler reproduces the data spectrum; respaced ones approach it with more steps
    assert errors[200] < 0.05
    assert errors[5] > errors[40] > errors[200] * 0.5
    assert errors[40] < 0.15


def test_low_frequencies_lose_signal_first():
    scheduler = dg.ShortestPathScheduler(num_train_timesteps=100, sample_size=16)
    abar = scheduler.alphas_cumprod_at(50)[0]
    radius = frequency_magnitude(16, 16)
    assert abar[radius == 0].item() < abar[radius == radius.max()].min().item()


def test_config_round_trip_and_invalid_configs(tmp_path):
    scheduler = dg.ShortestPathScheduler(num_train_timesteps=10, sample_size=[4, 6], c1=1.0, c2=0.1, m=2.0)
    scheduler.save_pretrained(tmp_path)
    loaded = dg.ShortestPathScheduler.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded.spectrum, scheduler.spectrum)
    empirical = dg.ShortestPathScheduler(sample_size=(4, 6), spectrum=scheduler.spectrum.tolist())
    torch.testing.assert_close(empirical.spectrum, scheduler.spectrum)
    with pytest.raises(ValueError, match="epsilon"):
        dg.ShortestPathScheduler(prediction_type="v_prediction")
    with pytest.raises(ValueError, match="c1 > 0"):
        dg.ShortestPathScheduler(c1=-1.0)
    with pytest.raises(ValueError, match="spectrum has shape"):
        dg.ShortestPathScheduler(sample_size=4, spectrum=[[1.0]])
    with pytest.raises(ValueError, match="spatial size"):
        scheduler.add_noise(torch.zeros(1, 1, 5, 5), torch.zeros(1, 1, 5, 5), torch.ones(1))
    with pytest.raises(ValueError, match="num_inference_steps"):
        scheduler.set_timesteps(11)


def test_spectrum_fit_recovers_planted_parameters():
    planted = parametric_spectrum(32, 32, c1=3.0, c2=0.5, m=2.0)
    x0 = _data_with_spectrum(planted, 400)
    fitted = fit_spectrum_parameters(x0)
    assert fitted["m"] == pytest.approx(2.0, rel=0.1) and fitted["c1"] == pytest.approx(3.0, rel=0.3)


def test_training_with_spd_corruption_saves_a_pipeline_that_samples_with_spd(tmp_path, monkeypatch):
    from conftest import tiny_digits_unet

    import diffguide.models.training as training

    monkeypatch.setattr(
        training, "default_unet", lambda sample_size, num_classes: tiny_digits_unet(sample_size)
    )
    config = training.DefaultTrainingConfig(
        steps=2, batch_size=8, warmup_steps=1, source="sklearn", corruption="spd"
    )
    training.train_default(tmp_path / "spd", tmp_path / "run", config, progress=False)
    pipe = dg.DigitsPipeline.from_pretrained(tmp_path / "spd")
    assert isinstance(pipe.scheduler, dg.ShortestPathScheduler)
    assert pipe.scheduler.spectrum.shape == (8, 8)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        [1, 2], num_inference_steps=4, output_type="pt", generator=torch.Generator().manual_seed(0)
    ).images
    assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()
    with pytest.raises(ValueError, match="corruption must be one of"):
        training.train_default(
            tmp_path / "x", tmp_path / "y", training.DefaultTrainingConfig(corruption="blur")
        )


def test_guidance_rules_on_an_spd_pipeline_need_model_output_space(tiny_pipe):
    tiny_pipe.scheduler = dg.ShortestPathScheduler(num_train_timesteps=50, sample_size=8)
    kwargs = {"num_inference_steps": 3, "output_type": "pt"}
    reference = tiny_pipe([1, 2], generator=torch.Generator().manual_seed(0), **kwargs).images
    with dg.guided(
        tiny_pipe, dg.APG(eta=1.0, norm_threshold=float("inf"), momentum=0.0, space="model_output")
    ):
        guided = tiny_pipe([1, 2], generator=torch.Generator().manual_seed(0), **kwargs).images
    assert (guided - reference).abs().max() <= 1e-5
    with dg.guided(tiny_pipe, dg.AdaptiveGuidance()), pytest.raises(ValueError, match="space='model_output'"):
        tiny_pipe([1], **kwargs)
