"""DigitsPipeline: determinism, output formats, the [uncond, cond] batch, errors."""

import numpy as np
import PIL.Image
import pytest
import torch

from diffguide.nfe import count_nfe


def _run(pipe, **kwargs):
    kwargs.setdefault("num_inference_steps", 3)
    kwargs.setdefault("generator", torch.Generator().manual_seed(0))
    return pipe([1, 2, 3], **kwargs).images


def test_same_seed_gives_same_images(tiny_pipe):
    a = _run(tiny_pipe, output_type="pt")
    b = _run(tiny_pipe, output_type="pt")
    c = _run(tiny_pipe, output_type="pt", generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_output_types_and_shapes(tiny_pipe):
    pt = _run(tiny_pipe, output_type="pt")
    array = _run(tiny_pipe, output_type="np")
    pil = _run(tiny_pipe, output_type="pil")
    assert pt.shape == (3, 1, 8, 8) and pt.dtype == torch.float32
    assert 0 <= pt.min() and pt.max() <= 1
    assert isinstance(array, np.ndarray) and array.shape == (3, 8, 8, 1)
    np.testing.assert_allclose(array, pt.permute(0, 2, 3, 1).numpy())
    assert len(pil) == 3 and isinstance(pil[0], PIL.Image.Image) and pil[0].size == (8, 8)
    assert tiny_pipe(1, num_inference_steps=2, return_dict=False)[0][0].size == (8, 8)


def test_cfg_batches_uncond_then_cond_in_one_call(tiny_pipe):
    seen = []
    handle = tiny_pipe.unet.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["class_labels"].tolist()), with_kwargs=True
    )
    try:
        with count_nfe(tiny_pipe.unet) as nfe:
            _run(tiny_pipe, guidance_scale=3.0, num_inference_steps=4)
    finally:
        handle.remove()
    assert seen == [[10, 10, 10, 1, 2, 3]] * 4
    assert nfe.calls == 4 and nfe.per_sample(3) == 8


def test_cfg_combines_like_stable_diffusion(tiny_pipe):
    """One step at scale w equals u + w (c - u) computed from two separate calls."""
    unet, scheduler = tiny_pipe.unet, tiny_pipe.scheduler
    latents = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    out = tiny_pipe(
        [4, 7], guidance_scale=5.0, num_inference_steps=1, latents=latents, output_type="pt"
    ).images
    t = scheduler.timesteps[0]
    with torch.no_grad():
        cond = unet(latents, t, class_labels=torch.tensor([4, 7])).sample
        uncond = unet(latents, t, class_labels=torch.tensor([10, 10])).sample
    expected = scheduler.step(uncond + 5.0 * (cond - uncond), t, latents).prev_sample
    torch.testing.assert_close(out, (expected / 2 + 0.5).clamp(0, 1))


def test_scale_one_runs_conditional_only(tiny_pipe):
    with count_nfe(tiny_pipe.unet) as nfe:
        _run(tiny_pipe, guidance_scale=1.0, num_inference_steps=4)
    assert nfe.per_sample(3) == 4


def test_callback_on_step_end_sees_and_replaces_latents(tiny_pipe):
    steps = []

    def callback(pipe, i, t, kwargs):
        steps.append(i)
        return {"latents": torch.zeros_like(kwargs["latents"])}

    out = _run(tiny_pipe, num_inference_steps=3, output_type="pt", callback_on_step_end=callback)
    assert steps == [0, 1, 2]
    assert torch.allclose(out, torch.full_like(out, 0.5))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"class_labels": [3, 10]}, "class label 10 is out of range"),
        ({"class_labels": []}, "empty"),
        ({"class_labels": 1, "num_inference_steps": 0}, "num_inference_steps"),
        ({"class_labels": 1, "output_type": "latent"}, "unknown output_type"),
        ({"class_labels": 1, "latents": torch.zeros(2, 1, 8, 8)}, "latents have shape"),
    ],
)
def test_bad_input_is_refused(tiny_pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_pipe(**kwargs)


def test_save_and_reload_round_trip(tiny_pipe, tmp_path):
    from diffguide import DigitsPipeline

    tiny_pipe.save_pretrained(tmp_path)
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").exists()
    reloaded = DigitsPipeline.from_pretrained(tmp_path)
    reloaded.set_progress_bar_config(disable=True)
    torch.testing.assert_close(_run(reloaded, output_type="pt"), _run(tiny_pipe, output_type="pt"))
