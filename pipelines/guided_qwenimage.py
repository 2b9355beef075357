"""Qwen-Image with diffguide's guidance rules as call arguments (a diffusers community pipeline).

    pipe = DiffusionPipeline.from_pretrained(model, custom_pipeline="pipelines/guided_qwenimage.py",
                                             trust_remote_code=True)
    image = pipe(prompt, negative_prompt=negative, true_cfg_scale=4.0, guidance="apg",
                 guidance_kwargs={"eta": 0.0, "norm_threshold": 15.0}).images[0]

The CFG here is the pipeline's true CFG: it needs ``true_cfg_scale > 1`` and a negative prompt
(a guided call without them is refused). ``guidance``: "cfg", "apg", "ag", "interval" or
"linear-ag" (with ``guidance_kwargs={"coefficients": path}``); None runs the parent pipeline
untouched. All the work is in diffguide (pipeline_mixin.py).
"""

from diffusers import QwenImagePipeline

from diffguide.pipeline_mixin import GuidedPipelineMixin


class GuidedQwenImagePipeline(GuidedPipelineMixin, QwenImagePipeline):
    """``QwenImagePipeline`` whose call also takes ``guidance=`` and ``guidance_kwargs=``."""
