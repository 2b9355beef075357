import math

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


def test_interpolation_istd_runs_on_a_pipeline(tiny_pipe):
    mean, values, strips = interpolation_istd(tiny_pipe, [1, 2], num_inference_steps=2)
    assert strips.shape == (2, 11, 1, 8, 8) and len(values) == 2
    assert mean == pytest.approx(sum(values) / 2)


def test_saturation_measures():
    images = torch.tensor([0.0, 1.0, 0.5, 0.5]).reshape(1, 1, 2, 2)
    assert clipped_fraction(images) == 0.5
    assert mean_contrast(images) == pytest.approx(
        torch.tensor([0.0, 1.0, 0.5, 0.5]).std(unbiased=False).item()
    )
    with pytest.raises(ValueError, match="images must be"):
        clipped_fraction(torch.zeros(0, 1, 2, 2))
