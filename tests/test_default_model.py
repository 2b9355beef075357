"""The embedded default model and its judge, loaded offline from the package."""

import pytest
import torch

import diffguide as dg
from diffguide.generation import generate_samples
from diffguide.models.pipeline import use_sampler


def test_judge_test_accuracy_at_least_98_percent(judge):
    images, labels = dg.load_digits("test")
    with torch.no_grad():
        accuracy = (judge(images).argmax(1) == labels).float().mean().item()
    assert accuracy >= 0.98


def test_judge_refuses_wrong_image_shape(judge):
    with pytest.raises(ValueError, match="the judge takes images of shape"):
        judge(torch.zeros(2, 3, 28, 28))


def test_default_pipeline_loads_offline(default_pipe):
    assert isinstance(default_pipe, dg.DigitsPipeline)
    assert default_pipe.num_classes == 10 and default_pipe.image_shape == (1, 28, 28)
    assert type(default_pipe.scheduler).__name__ == "DDIMScheduler"


@pytest.mark.parametrize("sampler", ["ddim", "dpm++", "euler"])
def test_swapped_schedulers_still_give_recognisable_digits(sampler, judge):
    pipe = use_sampler(dg.load_default_pipeline(), sampler)
    labels = torch.arange(10)
    images = generate_samples(pipe, labels, seed=0, batch_size=10, guidance_scale=3.0, num_inference_steps=20)
    with torch.no_grad():
        correct = (judge(images).argmax(1) == labels).sum().item()
    assert correct >= 9, f"{sampler}: judge recognised {correct}/10"


def test_generation_does_not_depend_on_batch_size(default_pipe):
    kwargs = {"guidance_scale": 3.0, "num_inference_steps": 3}
    whole = generate_samples(default_pipe, [1, 2, 3, 4], batch_size=4, **kwargs)
    pieces = generate_samples(default_pipe, [1, 2, 3, 4], batch_size=3, **kwargs)
    shard = generate_samples(default_pipe, [1, 2, 3, 4], batch_size=2, indices=[2, 3], **kwargs)
    torch.testing.assert_close(whole, pieces, atol=1e-5, rtol=0)
    torch.testing.assert_close(whole[2:], shard, atol=1e-5, rtol=0)


def test_default_sampler_starts_where_x0_is_estimable(default_pipe):
    """The first step's x0 estimate divides the eps error by sqrt(alpha_bar): keep it >= 1e-4."""
    scheduler = default_pipe.scheduler
    scheduler.set_timesteps(50)
    first = int(scheduler.timesteps[0])
    assert scheduler.alphas_cumprod[first] >= 1e-4
    assert not scheduler.config.clip_sample
