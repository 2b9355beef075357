"""Rules attached to real diffusers pipelines: identities with CFG, exact NFE, clean removal."""

import math

import pytest
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler
from tiny_pipelines import tiny_sd, tiny_sd3, tiny_sdxl

import diffguide as dg
from diffguide.guidance.linear_ag import paper_schedule

NO_CAP = float("inf")


def _sd_with(scheduler_cls):
    pipe = tiny_sd()
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    return pipe


BUILDERS = {
    "digits": None,
    "sd": tiny_sd,
    "sd-v": lambda: tiny_sd("v_prediction"),
    "sd-dpm++": lambda: _sd_with(DPMSolverMultistepScheduler),
    "sd-ddpm": lambda: _sd_with(DDPMScheduler),
    "sdxl": tiny_sdxl,
    "sd3": tiny_sd3,
}


def _first_layer(pipe) -> torch.nn.Module:
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    return getattr(denoiser, "conv_in", None) or denoiser.pos_embed


class Case:
    """A pipeline, the keyword arguments of one guided call, and a row counter on its first layer."""

    def __init__(self, name: str, tiny_pipe):
        self.name = name
        if name == "digits":
            self.pipe = tiny_pipe
            self.kwargs = {"class_labels": [1, 2, 3, 4], "output_type": "pt"}
        else:
            self.pipe = BUILDERS[name]()
            self.kwargs = {
                "prompt": ["a cat", "a dog"],
                "negative_prompt": ["bad", "ugly"],
                "num_images_per_prompt": 2,
                "output_type": "latent",
            }
        self.batch = 4
        self.rows = 0
        _first_layer(self.pipe).register_forward_pre_hook(self._count)

    def _count(self, module, args):
        self.rows += args[0].shape[0]

    def __call__(self, steps: int = 4, **extra) -> torch.Tensor:
        self.rows = 0
        kwargs = {**self.kwargs, "num_inference_steps": steps, "guidance_scale": 5.0, **extra}
        return self.pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images


def assert_matches(output: torch.Tensor, reference: torch.Tensor) -> None:
    """Max abs difference <= 1e-5 of the output's scale: images in [0, 1] for digits, while the
    random-weight latents of the tiny SD pipelines reach |x| ~ 30 (float32 rounding scales too)."""
    tolerance = 1e-5 * max(1.0, float(reference.abs().max()))
    assert (output - reference).abs().max() <= tolerance


@pytest.fixture(params=list(BUILDERS))
def case(request, tiny_pipe) -> Case:
    return Case(request.param, tiny_pipe)


def test_cfg_rule_gives_the_pipelines_own_output(case):
    reference = case()
    with dg.guided(case.pipe, dg.CFG()):
        assert torch.equal(case(), reference)


def test_apg_reduces_to_cfg(case):
    reference = case()
    with dg.guided(case.pipe, dg.APG(eta=1.0, norm_threshold=NO_CAP, momentum=0.0)):
        guided = case()
    assert_matches(guided, reference)


def test_apg_model_output_space_reduces_to_cfg(case):
    reference = case()
    with dg.guided(case.pipe, dg.APG(eta=1.0, norm_threshold=NO_CAP, momentum=0.0, space="model_output")):
        assert_matches(case(), reference)


def test_ag_with_threshold_above_one_equals_cfg(case):
    reference = case()
    with dg.guided(case.pipe, dg.AdaptiveGuidance(threshold=1.01)):
        assert_matches(case(), reference)
        assert dg.stats(case.pipe)["nfe"] == 8


def test_interval_covering_every_step_equals_cfg(case):
    reference = case()
    with dg.guided(case.pipe, dg.GuidanceInterval(sigma_lo=0.0, sigma_hi=math.inf)):
        assert_matches(case(), reference)
        assert dg.stats(case.pipe)["nfe"] == 8


def test_empty_interval_skips_every_unconditional_evaluation(case):
    reference = case(guidance_scale=1.0)  # the conditional prediction alone
    with dg.guided(case.pipe, dg.GuidanceInterval(sigma_lo=1e8, sigma_hi=1e9)):
        assert_matches(case(), reference)
        assert dg.stats(case.pipe)["nfe"] == 4


def test_nfe_counts_are_exact(case):
    steps = 5
    rule = dg.AdaptiveGuidance(threshold=-1.0, min_steps=2)  # every sample switches at step 2
    with dg.guided(case.pipe, rule):
        case(steps)
        stats = dg.stats(case.pipe)
    assert stats["nfe_per_sample"] == [3 * 2 + 2 * 1] * case.batch
    assert case.rows == sum(stats["nfe_per_sample"])  # counted independently, on the first layer
    assert stats["steps"] == steps


def test_remove_restores_the_untouched_pipeline(case):
    reference = case()
    dg.apply(case.pipe, dg.APG())
    case()
    dg.remove(case.pipe)
    assert torch.equal(case(), reference)
    with pytest.raises(ValueError, match="no diffguide rule"):
        dg.stats(case.pipe)


def test_no_state_leaks_between_calls(case):
    with dg.guided(case.pipe, dg.APG(momentum=-0.5, norm_threshold=1.0)):
        first = case()
        assert torch.equal(case(), first)
    with dg.guided(case.pipe, dg.AdaptiveGuidance(threshold=-1.0, min_steps=1)):
        case(3)
        assert dg.stats(case.pipe)["nfe"] == 2 + 2 + 1  # switches after step 1's CFG
        case(3)
        assert dg.stats(case.pipe)["nfe"] == 2 + 2 + 1


def test_linear_ag_calibrates_and_runs_its_schedule(case):
    steps = 6
    calls = [{**case.kwargs, "num_inference_steps": steps, "guidance_scale": 5.0}]
    rule = dg.calibrate_linear_ag(case.pipe, calls)
    assert rule.coefficients.shape == (steps, 4) and torch.isfinite(rule.coefficients).all()
    with dg.guided(case.pipe, rule):
        case(steps)
        assert dg.stats(case.pipe)["nfe"] == rule.nfe == 2 + 1 + 2 + 1 + 1 + 1
    reference = case(steps)
    with dg.guided(case.pipe, rule.with_schedule(["cfg"] * steps)):
        assert torch.equal(case(steps), reference)  # an all-real schedule is CFG


def test_linear_ag_refuses_another_step_count(tiny_pipe):
    rule = dg.LinearAG(torch.zeros(4, 4), schedule=paper_schedule(4))
    with dg.guided(tiny_pipe, rule), pytest.raises(ValueError, match="calibrated for 4 steps"):
        tiny_pipe([1], num_inference_steps=6)


def test_guidance_scale_one_passes_cfg_through_and_refuses_a_rule_without_effect(tiny_pipe):
    kwargs = {"num_inference_steps": 3, "guidance_scale": 1.0, "output_type": "pt"}
    reference = tiny_pipe([1, 2], generator=torch.Generator().manual_seed(0), **kwargs).images
    with dg.guided(tiny_pipe, dg.CFG()):
        out = tiny_pipe([1, 2], generator=torch.Generator().manual_seed(0), **kwargs).images
        assert dg.stats(tiny_pipe)["nfe"] == 3  # the conditional pass alone, as the pipeline runs it
    assert torch.equal(out, reference)
    with dg.guided(tiny_pipe, dg.APG()), pytest.raises(ValueError, match=r"guidance_scale=1\), so APG"):
        tiny_pipe([1, 2], **kwargs)


def test_a_noise_level_rule_on_the_spd_scheduler_is_refused_not_switched_off(tiny_pipe):
    """SPD corrupts each frequency at its own rate, so a step has no single sigma/alpha: the interval
    cannot decide, and must not silently run as the conditional prediction (3 NFE instead of 6)."""
    tiny_pipe.scheduler = dg.ShortestPathScheduler(num_train_timesteps=50, sample_size=8)
    kwargs = {"num_inference_steps": 3, "guidance_scale": 3.0, "output_type": "pt"}
    for rule in (dg.GuidanceInterval(sigma_lo=0.0, sigma_hi=math.inf), dg.APG(), dg.AdaptiveGuidance()):
        with (
            dg.guided(tiny_pipe, rule),
            pytest.raises(ValueError, match="needs the noise level of each step"),
        ):
            tiny_pipe([1, 2], **kwargs)
    reference = tiny_pipe([1, 2], generator=torch.Generator().manual_seed(0), **kwargs).images
    model_output_rule = dg.APG(eta=1.0, norm_threshold=math.inf, momentum=0.0, space="model_output")
    with dg.guided(tiny_pipe, model_output_rule):
        out = tiny_pipe([1, 2], generator=torch.Generator().manual_seed(0), **kwargs).images
        assert dg.stats(tiny_pipe)["nfe_per_sample"] == [6, 6]
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)


def test_guidance_rescale_keeps_working():
    pipe = tiny_sd()
    kwargs = {"prompt": ["a cat"], "num_inference_steps": 3, "guidance_scale": 6.0, "output_type": "latent"}
    reference = pipe(**kwargs, guidance_rescale=0.7, generator=torch.Generator().manual_seed(0)).images
    plain = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    with dg.guided(pipe, dg.CFG()):
        rescaled = pipe(**kwargs, guidance_rescale=0.7, generator=torch.Generator().manual_seed(0)).images
    assert_matches(rescaled, reference)
    assert (plain - reference).abs().max() > 1e-3  # the rescale does change the output


def test_per_sample_skipping_gives_the_images_of_each_sample_alone(default_pipe):
    labels, kwargs = [0, 3, 7, 8], {"num_inference_steps": 10, "guidance_scale": 3.0, "output_type": "pt"}
    rule = dg.AdaptiveGuidance(threshold=0.99)
    with dg.guided(default_pipe, rule):
        generators = [torch.Generator().manual_seed(i) for i in range(4)]
        together = default_pipe(labels, generator=generators, **kwargs).images
        nfe_together = dg.stats(default_pipe)["nfe_per_sample"]
        alone, nfe_alone = [], []
        for i, label in enumerate(labels):
            alone.append(default_pipe([label], generator=[torch.Generator().manual_seed(i)], **kwargs).images)
            nfe_alone += dg.stats(default_pipe)["nfe_per_sample"]
    assert len(set(nfe_together)) > 1  # the samples really switched at different steps
    assert nfe_together == nfe_alone
    # float32 convolutions sum in a batch- and thread-dependent order (1.1e-5 seen on 2 threads);
    # 1e-4 is still 40x below one 8-bit grey level
    assert (torch.cat(alone) - together).abs().max() <= 1e-4


def test_unsupported_pipelines_and_rules_are_refused(tiny_pipe):
    from diffusers import DiffusionPipeline

    class HomeMadePipeline(DiffusionPipeline):  # a pipeline whose CFG diffguide has not read
        def __init__(self, unet):
            super().__init__()
            self.register_modules(unet=unet)

    with pytest.raises(TypeError, match="HomeMadePipeline is not supported.*StableDiffusionPipeline"):
        dg.apply(HomeMadePipeline(tiny_pipe.unet), dg.CFG())
    with pytest.raises(TypeError, match="expected a diffguide guidance rule"):
        dg.apply(tiny_pipe, lambda c, u: c)


def test_sd3_skip_layer_guidance_is_refused_not_silently_wrong():
    pipe = tiny_sd3()
    with dg.guided(pipe, dg.APG()), pytest.raises(RuntimeError, match="skip-layer guidance"):
        # diffusers runs the extra skip-layer call for steps 1 to 1 of 10 here (start 0.01, stop 0.2)
        pipe(
            prompt="a cat",
            num_inference_steps=10,
            guidance_scale=5.0,
            skip_guidance_layers=[0],
            output_type="latent",
        )


def test_repeated_timesteps_of_heun_stay_in_one_call(tiny_pipe):
    from diffusers import HeunDiscreteScheduler

    tiny_pipe.scheduler = HeunDiscreteScheduler.from_config(tiny_pipe.scheduler.config)
    with dg.guided(tiny_pipe, dg.AdaptiveGuidance(threshold=-1.0)):
        tiny_pipe([1, 2], num_inference_steps=4, output_type="pt")
        stats = dg.stats(tiny_pipe)
    evaluations = len(tiny_pipe.scheduler.timesteps)  # 2 * 4 - 1: Heun repeats timesteps
    assert stats["steps"] == evaluations and stats["nfe"] == 2 + (evaluations - 1)


def test_img2img_runs_the_steps_of_its_own_schedule():
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline(**tiny_sd().components)
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    kwargs = {"prompt": "a cat", "image": image, "strength": 0.5, "num_inference_steps": 6, "guidance_scale": 5.0,
              "output_type": "latent"}  # fmt: skip
    rule = dg.calibrate_linear_ag(pipe, kwargs)
    assert rule.num_steps == 6 and not rule.coefficients[:3].any()  # steps 0-2 never run at strength 0.5
    schedule = ["cfg", "cfg", "cfg", "cfg", "estimate", "cond"]
    with dg.guided(pipe, rule.with_schedule(schedule)):
        pipe(**kwargs, generator=torch.Generator().manual_seed(0))
        assert dg.stats(pipe)["nfe"] == 2 + 1 + 1  # steps 3, 4, 5 of the 6-step schedule
    reference = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    with dg.guided(pipe, dg.APG(eta=1.0, norm_threshold=NO_CAP, momentum=0.0)):
        assert_matches(pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images, reference)


def test_list_arguments_are_sliced_like_tensors():
    from diffguide.adapters.core import select_rows

    index = torch.tensor([1, 2, 3])
    value = {"image_embeds": [torch.arange(4.0), torch.zeros(2)], "scale": 1.0}
    selected = select_rows(value, 4, index)
    assert selected["image_embeds"][0].tolist() == [1.0, 2.0, 3.0] and selected["image_embeds"][1].shape == (
        2,
    )
