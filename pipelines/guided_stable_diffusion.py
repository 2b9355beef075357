"""Stable Diffusion 1.x/2.x with diffguide's guidance rules as call arguments (a diffusers community pipeline).

    pipe = DiffusionPipeline.from_pretrained(model, custom_pipeline="pipelines/guided_stable_diffusion.py",
                                             trust_remote_code=True)
    image = pipe(prompt, guidance="apg", guidance_kwargs={"eta": 0.0, "norm_threshold": 15.0}).images[0]

``guidance``: "cfg", "apg", "ag" or "linear-ag" (with ``guidance_kwargs={"coefficients": path}``);
None runs the parent pipeline untouched. All the work is in diffguide (pipeline_mixin.py).
"""

from diffusers import StableDiffusionPipeline

from diffguide.pipeline_mixin import GuidedPipelineMixin


class GuidedStableDiffusionPipeline(GuidedPipelineMixin, StableDiffusionPipeline):
    """``StableDiffusionPipeline`` whose call also takes ``guidance=`` and ``guidance_kwargs=``."""
