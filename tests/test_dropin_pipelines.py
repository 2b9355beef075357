"""The community-pipeline files reload saved pipelines offline and take guidance as arguments."""

from pathlib import Path

import pytest
import tiny_flow_two_call
import torch
from diffusers import DiffusionPipeline
from tiny_pipelines import tiny_sd, tiny_sd3, tiny_sdxl

import diffguide as dg

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"
APG_AS_CFG = {"eta": 1.0, "norm_threshold": float("inf"), "momentum": 0.0}

_SD_CALL = {"prompt": ["a cat", "a dog"], "guidance_scale": 5.0, "output_type": "latent"}
#: file: (builder, from_pretrained kwargs, call kwargs)
CASES = {
    "guided_stable_diffusion": (tiny_sd, {}, _SD_CALL),
    "guided_stable_diffusion_xl": (tiny_sdxl, {}, _SD_CALL),
    "guided_stable_diffusion_3": (tiny_sd3, {"text_encoder_3": None, "tokenizer_3": None}, _SD_CALL),
    "guided_flux": (tiny_flow_two_call.CASES["flux"][0], {}, tiny_flow_two_call.CASES["flux"][1]),
    "guided_qwenimage": (
        tiny_flow_two_call.CASES["qwenimage"][0],
        {},
        tiny_flow_two_call.CASES["qwenimage"][1],
    ),
}


def _reload(pipe, tmp_path, file: str, **load_kwargs):
    pipe.save_pretrained(tmp_path)
    reloaded = DiffusionPipeline.from_pretrained(
        tmp_path, custom_pipeline=str(PIPELINES / f"{file}.py"), trust_remote_code=True, **load_kwargs
    )
    reloaded.set_progress_bar_config(disable=True)
    return reloaded


@pytest.mark.parametrize("file", list(CASES))
def test_dropin_pipeline_takes_guidance_arguments(file, tmp_path):
    build, load_kwargs, call_kwargs = CASES[file]
    pipe = _reload(build(), tmp_path, file, **load_kwargs)
    assert type(pipe).__name__.startswith("Guided")
    kwargs = {**call_kwargs, "num_inference_steps": 3}
    batch = len(kwargs["prompt"]) * kwargs.get("num_images_per_prompt", 1)

    def run(**extra):
        return pipe(**kwargs, generator=torch.Generator().manual_seed(0), **extra).images

    plain = run()
    as_cfg = run(guidance="apg", guidance_kwargs=APG_AS_CFG)
    assert (as_cfg - plain).abs().max() <= 1e-5 * max(1.0, float(plain.abs().max()))
    run(guidance="ag", guidance_kwargs={"threshold": -1.0})
    assert pipe.guidance_stats["nfe_per_sample"] == [2 + 1 + 1] * batch
    assert torch.equal(run(), plain)  # the hook is gone after a guided call


def test_dropin_digits_pipeline_and_bad_arguments(tmp_path, tiny_pipe):
    pipe = _reload(tiny_pipe, tmp_path, "guided_digits")
    kwargs = {"num_inference_steps": 3, "output_type": "pt"}
    plain = pipe([1, 2], generator=torch.Generator().manual_seed(0), **kwargs).images
    guided = pipe([1, 2], generator=torch.Generator().manual_seed(0), guidance="cfg", **kwargs).images
    assert torch.equal(guided, plain)
    with pytest.raises(ValueError, match="unknown guidance method 'magic'"):
        pipe([1], guidance="magic", **kwargs)
    with pytest.raises(ValueError, match="linear-ag needs calibrated coefficients"):
        pipe([1], guidance="linear-ag", **kwargs)
    with pytest.raises(ValueError, match="apg has no parameter .strength."):
        pipe([1], guidance="apg", guidance_kwargs={"strength": 2}, **kwargs)
    with pytest.raises(ValueError, match="go with a method name"):
        pipe([1], guidance_kwargs={"eta": 0}, **kwargs)
    assert isinstance(dg.make_rule("ag", threshold=0.99), dg.AdaptiveGuidance)
    pipe([1], generator=torch.Generator().manual_seed(0), guidance="apg", **kwargs)
    assert repr(pipe.guidance_stats["rule"]) == repr(dg.make_rule("apg", preset="digits"))  # the family's
    pipe([1], generator=torch.Generator().manual_seed(0), guidance="apg", guidance_preset="none", **kwargs)
    assert repr(pipe.guidance_stats["rule"]) == repr(dg.make_rule("apg"))
    with pytest.raises(ValueError, match="apg has no preset 'sd15'"):
        pipe([1], guidance="apg", guidance_preset="sd15", **kwargs)
