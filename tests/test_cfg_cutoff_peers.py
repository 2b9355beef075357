"""diffusers' CFG-cutoff callbacks against diffguide's interval cutoff (``dg.cfg_cutoff``).

``SDCFGCutoffCallback`` and kin turn CFG off at the end of step ``k`` by setting the pipeline's
guidance scale to 0 and keeping the last row of the prompt embeddings. With one prompt and one
image, ``GuidanceInterval(cutoff_sigma(...), inf)`` gives the same images at the same network
rows. With more rows the callbacks' slice keeps one conditional row for the whole batch: SD and
SDXL then fail at the first unguided step, SD3 broadcasts it and conditions every image on the
last prompt. The interval rule decides per sample, so any batch works.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import diffusers.callbacks
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.callbacks import SD3CFGCutoffCallback, SDCFGCutoffCallback, SDXLCFGCutoffCallback
from tiny_pipelines import tiny_sd, tiny_sd3, tiny_sdxl

import diffguide as dg
from diffguide.adapters.cutoff import cfg_cutoff, cutoff_sigma, cutoff_step, step_noise_levels

STEPS = 10
CASES = {
    "sd": (tiny_sd, SDCFGCutoffCallback),
    "sdxl": (tiny_sdxl, SDXLCFGCutoffCallback),
    "sd3": (tiny_sd3, SD3CFGCutoffCallback),
}
_PIPES: dict[str, object] = {}


def _pipe(name: str):
    if name not in _PIPES:
        _PIPES[name] = CASES[name][0]()
    return _PIPES[name]


def _callback(name: str, **cutoff):
    """The family's callback; ``cutoff_step_index`` needs ``cutoff_step_ratio=None`` spelled out
    (the ratio defaults to 1.0 and the two are exclusive)."""
    cutoff.setdefault("cutoff_step_ratio", None)
    return CASES[name][1](**cutoff)


@contextmanager
def evaluated_rows(pipe):
    """Rows the denoiser actually evaluates per call, from a pre-hook on its first layer (the
    denoiser's own forward is replaced by diffguide's hook, which may drop rows before it)."""
    first = pipe.unet.conv_in if hasattr(pipe, "unet") else pipe.transformer.pos_embed
    rows: list[int] = []
    handle = first.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    try:
        yield rows
    finally:
        handle.remove()


def _run(pipe, prompt, *, rule=None, callback=None, images_per_prompt=1, latents=None, output_type="pt"):
    kwargs = {
        "prompt": prompt,
        "num_images_per_prompt": images_per_prompt,
        "num_inference_steps": STEPS,
        "guidance_scale": 5.0,
        "generator": torch.Generator().manual_seed(0),
        "output_type": output_type,
        "latents": latents,
    }
    if callback is not None:
        kwargs["callback_on_step_end"] = callback
    with evaluated_rows(pipe) as rows:
        if rule is None:
            images = pipe(**kwargs).images
        else:
            with dg.guided(pipe, rule):
                images = pipe(**kwargs).images
                assert dg.stats(pipe)["nfe"] == pytest.approx(sum(rows) / len(images))
    return images, rows


def test_the_cutoff_callbacks_diffusers_ships():
    """diffusers 0.42.1 (pinned) has these four CFG cutoffs; none for Flux or the others."""
    names = sorted(name for name in dir(diffusers.callbacks) if name.endswith("CFGCutoffCallback"))
    assert names == [
        "SD3CFGCutoffCallback",
        "SDCFGCutoffCallback",
        "SDXLCFGCutoffCallback",
        "SDXLControlnetCFGCutoffCallback",
    ]


# -- cutoff_sigma ---------------------------------------------------------------------------------


SCHEDULERS = {
    "ddim": lambda: tiny_sd().scheduler,
    "euler": lambda: tiny_sdxl().scheduler,
    "flow": lambda: FlowMatchEulerDiscreteScheduler(shift=3.0),
}


@pytest.mark.parametrize("kind", SCHEDULERS)
def test_cutoff_sigma_guides_steps_up_to_k(kind):
    scheduler = SCHEDULERS[kind]()
    before = None if scheduler.timesteps is None else scheduler.timesteps.clone()
    levels = step_noise_levels(scheduler, STEPS)
    assert len(levels) == STEPS and all(a > b for a, b in zip(levels, levels[1:], strict=False))
    for k in range(STEPS - 1):
        sigma_lo = cutoff_sigma(scheduler, STEPS, k)
        assert [level > sigma_lo for level in levels] == [i <= k for i in range(STEPS)], k
    assert cutoff_sigma(scheduler, STEPS, STEPS - 1) == 0.0  # the callback never fires
    assert cutoff_sigma(scheduler, STEPS, STEPS + 5) == 0.0
    after = scheduler.timesteps
    assert (before is None and after is None) or torch.equal(before, after)  # a copy was set, not this one


def test_cutoff_sigma_flow_first_level_is_infinite():
    """Flow matching's first sigma is 1 (alpha 0): the level is inf and still counts as guided."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    assert math.isinf(step_noise_levels(scheduler, STEPS)[0])
    sigma_lo = cutoff_sigma(scheduler, STEPS, 0)
    assert math.isfinite(sigma_lo) and sigma_lo >= step_noise_levels(scheduler, STEPS)[1]


def test_cutoff_ratio_is_the_callbacks():
    for ratio in (0.0, 0.3, 0.5, 0.7, 1.0):
        assert cutoff_step(20, cutoff_step_ratio=ratio) == int(20 * ratio)
    scheduler = DDIMScheduler()
    assert cutoff_sigma(scheduler, 20, cutoff_step_ratio=0.5) == cutoff_sigma(scheduler, 20, 10)
    rule = cfg_cutoff(scheduler, 20, cutoff_step_ratio=0.5)
    assert isinstance(rule, dg.GuidanceInterval) and rule.sigma_hi == math.inf


@pytest.mark.parametrize(
    "cutoff",
    [
        {},
        {"cutoff_step_index": 1, "cutoff_step_ratio": 0.5},
        {"cutoff_step_index": -1},
        {"cutoff_step_ratio": 1.5},
    ],
)
def test_cutoff_step_refuses_bad_arguments(cutoff):
    with pytest.raises(ValueError):
        cutoff_step(20, **cutoff)


def test_cutoff_sigma_refuses_levels_that_do_not_fall():
    class Rising(EulerDiscreteScheduler):
        def set_timesteps(self, num_inference_steps, **kwargs):
            super().set_timesteps(num_inference_steps, **kwargs)
            self.sigmas = self.sigmas.flip(0)

    with pytest.raises(ValueError, match="do not fall"):
        cutoff_sigma(Rising(), STEPS, 3)


# -- against the callbacks ------------------------------------------------------------------------


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("cutoff", [{"cutoff_step_index": 3}, {"cutoff_step_ratio": 0.5}])
def test_interval_is_the_callback_for_one_prompt(name, cutoff):
    pipe = _pipe(name)
    k = cutoff_step(STEPS, **{"cutoff_step_index": None, "cutoff_step_ratio": None, **cutoff})
    reference, callback_rows = _run(pipe, "a cat", callback=_callback(name, **cutoff))
    rule = cfg_cutoff(pipe.scheduler, STEPS, **cutoff)
    images, rule_rows = _run(pipe, "a cat", rule=rule)
    assert (images - reference).abs().max().item() <= 1e-5
    expected = [2] * (k + 1) + [1] * (STEPS - k - 1)  # CFG rows on steps 0..k, the conditional row after
    assert callback_rows == rule_rows == expected


@pytest.mark.parametrize("name", ["sd", "sdxl"])
@pytest.mark.parametrize(("prompt", "per_prompt"), [(["a cat", "a dog"], 1), ("a cat", 2)])
def test_sd_callbacks_fail_on_more_than_one_row(name, prompt, per_prompt):
    """The last-row slice leaves one text row for two latents; the UNet's cross-attention then
    folds the batch into the token axis and the residual add fails at the first unguided step."""
    pipe = _pipe(name)
    with pytest.raises(RuntimeError, match="must match the size"):
        _run(pipe, prompt, callback=_callback(name, cutoff_step_index=3), images_per_prompt=per_prompt)


@pytest.mark.parametrize("name", CASES)
def test_interval_serves_a_batch_as_the_callback_serves_each_prompt(name):
    """2 prompts x 2 images through the interval rule = each image alone through the callback
    (which is right for one image), with CFG's rows up to the cutoff and half of them after."""
    pipe = _pipe(name)
    prompts = ["a cat", "a dog"]
    channels = pipe.unet.config.in_channels if hasattr(pipe, "unet") else pipe.transformer.config.in_channels
    latents = torch.randn(4, channels, 8, 8, generator=torch.Generator().manual_seed(1))
    images, rows = _run(
        pipe, prompts, rule=cfg_cutoff(pipe.scheduler, STEPS, 3), images_per_prompt=2, latents=latents
    )
    assert rows == [8] * 4 + [4] * (STEPS - 4)
    for i in (1, 2):  # images are prompt-major (cat, cat, dog, dog): the second cat and the first dog
        alone, _ = _run(
            pipe, prompts[i // 2], callback=_callback(name, cutoff_step_index=3), latents=latents[i : i + 1]
        )
        assert (images[i] - alone[0]).abs().max().item() <= 1e-5, i


def test_interval_is_cfg_up_to_the_cutoff():
    """The latents after steps 0..k are CFG's for every image of the batch."""
    pipe = _pipe("sd")
    k, seen = 3, {"cfg": [], "interval": []}

    def recorder(key):
        def record(pipe, step, timestep, kwargs):
            seen[key].append(kwargs["latents"].clone())
            return kwargs

        return record

    for key, rule in [("cfg", dg.CFG()), ("interval", cfg_cutoff(pipe.scheduler, STEPS, k))]:
        with dg.guided(pipe, rule):
            pipe(
                ["a cat", "a dog"],
                num_images_per_prompt=2,
                num_inference_steps=STEPS,
                guidance_scale=5.0,
                generator=torch.Generator().manual_seed(0),
                output_type="latent",
                callback_on_step_end=recorder(key),
            )
    for step in range(STEPS):
        gap = (seen["cfg"][step] - seen["interval"][step]).abs().max().item()
        assert gap <= 1e-6 if step <= k else gap > 1e-4, (step, gap)


def test_sd3_callback_conditions_every_image_on_the_last_prompt():
    """SD3's transformer broadcasts the single text row kept by the callback: no error, but after
    the cutoff every image follows the last prompt. With one prompt x 2 images that is harmless."""
    pipe = _pipe("sd3")
    prompts, k = ["a cat", "a dog"], 3
    by_callback, _ = _run(pipe, prompts, callback=_callback("sd3", cutoff_step_index=k))
    by_rule, _ = _run(pipe, prompts, rule=cfg_cutoff(pipe.scheduler, STEPS, k))
    assert (by_callback[1] - by_rule[1]).abs().max().item() <= 1e-5  # the last prompt's image is right
    assert (by_callback[0] - by_rule[0]).abs().max().item() > 1e-3  # the first one is not

    def last_prompt_for_all(pipe, step, timestep, kwargs):  # what the callback amounts to
        if step == k:
            for key in ("prompt_embeds", "pooled_prompt_embeds"):
                kwargs[key] = kwargs[key][-1:].expand(len(prompts), *kwargs[key].shape[1:])
            pipe._guidance_scale = 0.0
        return kwargs

    explicit = pipe(
        prompts,
        num_inference_steps=STEPS,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
        callback_on_step_end=last_prompt_for_all,
        callback_on_step_end_tensor_inputs=["prompt_embeds", "pooled_prompt_embeds"],
    ).images
    assert (by_callback - explicit).abs().max().item() <= 1e-5

    one_prompt, _ = _run(pipe, "a cat", callback=_callback("sd3", cutoff_step_index=k), images_per_prompt=2)
    by_rule, _ = _run(pipe, "a cat", rule=cfg_cutoff(pipe.scheduler, STEPS, k), images_per_prompt=2)
    assert (one_prompt - by_rule).abs().max().item() <= 1e-5
