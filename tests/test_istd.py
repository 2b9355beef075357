import math
import statistics

import pytest
import torch

from diffguide.metrics import clipped_fraction, interpolation_istd, mean_contrast, slerp, strip_istd


def test_slerp_endpoints_and_norm_of_orthogonal_noises():
    z0 = torch.tensor([[1.0, 0.0]])
    z1 = torch.tensor([[0.0, 1.0]])
    torch.testing.assert_close(slerp(z0, z1, 0.0), z0)
    torch.testing.assert_close(slerp(z0, z1, 1.0), z1)
    half = slerp(z0, z1, 0.5)
    torch.testing.assert_close(half, torch.tensor([[math.sqrt(0.5), math.sqrt(0.5)]]))


def test_strip_istd_is_zero_for_even_steps_and_positive_for_a_jump():
    ramp = torch.linspace(0, 1, 11, dtype=torch.float64).reshape(11, 1, 1, 1).expand(11, 1, 4, 4)
    assert strip_istd(ramp) == pytest.approx(0, abs=1e-9)
    jump = torch.cat([torch.zeros(5, 1, 4, 4), torch.ones(6, 1, 4, 4)])
    # one distance of 255 * 4, nine of 0: std = 1020 * sqrt(0.1 * 0.9)
    assert strip_istd(jump) == pytest.approx(1020 * math.sqrt(0.09))


def _naive_istd(strip: torch.Tensor) -> float:
    """ISTD by its definition, with loops and the standard library: population standard
    deviation of the L2 distances between adjacent images on 0-255 pixels."""
    images = [[255.0 * float(v) for v in image.flatten()] for image in strip]
    distances = [math.dist(a, b) for a, b in zip(images, images[1:], strict=False)]
    return statistics.pstdev(distances)


def test_strip_istd_is_the_population_std_of_adjacent_l2_distances_chosen_by_hand():
    # 11 images of 2 x 2 pixels walking back and forth along the unit direction (1, 1, 1, 1) / 2
    # (0-255 scale), with adjacent L2 distances chosen as five 3s then five 7s: mean 5, every
    # distance 2 from it, so the population std is exactly 2 (the sample std would be
    # 2 sqrt(10 / 9); L1 distances would give 4; distances to the first image would differ).
    distances = [3.0] * 5 + [7.0] * 5
    position, positions = 0.0, [0.0]
    for k, d in enumerate(distances):
        position += d if k % 2 == 0 else -d
        positions.append(position)
    strip = torch.tensor([[[[(127.5 + p / 2) / 255] * 2] * 2] for p in positions], dtype=torch.float64)
    assert strip.shape == (11, 1, 2, 2)
    assert strip_istd(strip) == pytest.approx(2.0, rel=1e-12)
    assert _naive_istd(strip) == pytest.approx(2.0, rel=1e-12)  # the reference agrees with the hand value


def test_interpolation_istd_is_the_mean_of_the_naive_istd_of_each_seeded_strip(tiny_pipe):
    mean, values, strips = interpolation_istd(tiny_pipe, [1, 2], seed=3, num_inference_steps=2)
    assert strips.shape == (2, 11, 1, 8, 8) and len(values) == 2
    assert values == pytest.approx([_naive_istd(strip) for strip in strips], rel=1e-9)
    assert mean == pytest.approx(statistics.fmean(_naive_istd(strip) for strip in strips), rel=1e-9)
    # the strips run from noise seeded seed + 2i (ratio 0) to seed + 2i + 1 (ratio 1) for label i
    for i, label in enumerate([1, 2]):
        for end, offset in ((0, 0), (-1, 1)):
            noise = torch.randn((1, 1, 8, 8), generator=torch.Generator().manual_seed(3 + 2 * i + offset))
            alone = tiny_pipe([label], latents=noise, output_type="pt", num_inference_steps=2).images
            torch.testing.assert_close(strips[i, end], alone[0], atol=1e-5, rtol=0)


def test_saturation_measures():
    images = torch.tensor([0.0, 1.0, 0.5, 0.5]).reshape(1, 1, 2, 2)
    assert clipped_fraction(images) == 0.5
    # by hand: mean 0.5, squared deviations 0.25, 0.25, 0, 0, variance 0.5 / 4, std sqrt(1 / 8)
    assert mean_contrast(images) == pytest.approx(math.sqrt(1 / 8))
    # a flat second image (std 0): the mean over images halves it (pooling the 8 values would
    # give 0.2915, the sample std sqrt(1 / 6) / 2); two of its 8 values are at the limits
    two = torch.cat([images, torch.full((1, 1, 2, 2), 0.2)])
    assert mean_contrast(two) == pytest.approx(math.sqrt(1 / 8) / 2)
    assert clipped_fraction(two) == 0.25
    with pytest.raises(ValueError, match="images must be"):
        clipped_fraction(torch.zeros(0, 1, 2, 2))


def test_path_statistics_of_an_even_ramp_and_of_one_jump():
    from diffguide.metrics.istd import path_statistics, step_distances

    ramp = torch.linspace(0, 1, 11, dtype=torch.float64).reshape(11, 1, 1, 1).expand(11, 1, 4, 4)
    jump = torch.cat([torch.zeros(5, 1, 4, 4), torch.ones(6, 1, 4, 4)])
    distances = torch.stack([step_distances(ramp), step_distances(jump)])
    stats = path_statistics(distances)
    # ramp: ten steps of 25.5 * 4 = 102, std 0, largest share 0.1; jump: one step of 1020, share 1
    assert stats["mean_step"] == pytest.approx((102 + 102) / 2)
    assert stats["istd"] == pytest.approx((0 + 1020 * math.sqrt(0.09)) / 2)
    assert stats["relative_istd"] == pytest.approx((0 + 1020 * math.sqrt(0.09) / 102) / 2)
    assert stats["largest_share"] == pytest.approx((0.1 + 1.0) / 2)
    doubled = step_distances(jump, embed=lambda x: 2 * x.flatten(1))  # a feature space, no 0-255 scaling
    torch.testing.assert_close(doubled, step_distances(jump) * 2 / 255)


def test_ddim_inversion_is_exact_for_a_constant_noise_predictor_and_sampling_returns_the_image(tiny_pipe):
    from diffguide.inversion import ddim_invert

    noise = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    called = []

    def predict(x, t, labels):  # a constant noise estimate: x0_hat never changes along the path
        called.append(int(t))
        return noise.expand_as(x).to(x.dtype)

    tiny_pipe.predict = predict
    images = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    latent = ddim_invert(tiny_pipe, images, [1, 2], num_inference_steps=5)
    abar_start = tiny_pipe.scheduler.alphas_cumprod[tiny_pipe.scheduler.timesteps[0]]
    expected = abar_start.sqrt() * (images * 2 - 1) + (1 - abar_start).sqrt() * noise
    torch.testing.assert_close(latent, expected, rtol=1e-5, atol=1e-5)
    back = tiny_pipe(
        [1, 2], guidance_scale=1.0, num_inference_steps=5, latents=latent, output_type="pt"
    ).images
    torch.testing.assert_close(back, images, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="class labels"):
        ddim_invert(tiny_pipe, images, [1], 5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ddim_invert(tiny_pipe, images * 2 - 1, [1, 2], 5)


def test_ddim_inversion_refuses_a_scheduler_it_cannot_run_backwards(tiny_pipe):
    from diffusers import DDPMScheduler

    from diffguide.inversion import ddim_invert

    tiny_pipe.scheduler = DDPMScheduler.from_config(tiny_pipe.scheduler.config)
    with pytest.raises(ValueError, match="DDIMScheduler"):
        ddim_invert(tiny_pipe, torch.rand(1, 1, 8, 8), [0], 5)


def test_interpolation_istd_samples_the_same_strips_as_strips_between_on_its_noise_pairs(tiny_pipe):
    from diffguide.metrics.istd import noise_pairs, strips_between

    mean, values, strips = interpolation_istd(tiny_pipe, [1, 2], seed=4, num_inference_steps=2)
    start, end = noise_pairs(tiny_pipe.image_shape, 2, seed=4)
    torch.testing.assert_close(
        start[1:2], torch.randn((1, 1, 8, 8), generator=torch.Generator().manual_seed(6))
    )
    again = strips_between(tiny_pipe, start, end, [1, 2], num_inference_steps=2)
    torch.testing.assert_close(again, strips)
    one_at_a_time = strips_between(tiny_pipe, start, end, [1, 2], pairs_per_call=1, num_inference_steps=2)
    torch.testing.assert_close(one_at_a_time, strips, rtol=1e-5, atol=1e-5)  # batching keeps strips in order
    swapped = strips_between(tiny_pipe, end, start, [1, 2], pairs_per_call=1, num_inference_steps=2)
    torch.testing.assert_close(swapped, strips.flip(1), rtol=1e-5, atol=1e-5)  # slerp is symmetric
    assert mean == pytest.approx(sum(values) / 2)
    with pytest.raises(ValueError, match="one per class label"):
        strips_between(tiny_pipe, start, end, [1], num_inference_steps=2)
