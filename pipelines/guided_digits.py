"""diffguide's embedded digits pipeline with guidance rules as call arguments.

    pipe = DiffusionPipeline.from_pretrained(folder, custom_pipeline="pipelines/guided_digits.py",
                                             trust_remote_code=True)
    images = pipe([3, 7], guidance="apg", guidance_preset="digits").images

All the work is in diffguide (pipeline_mixin.py).
"""

# the module, not the class: diffusers wants exactly one pipeline class defined in this file
from diffguide.models import pipeline as digits
from diffguide.pipeline_mixin import GuidedPipelineMixin


class GuidedDigitsPipeline(GuidedPipelineMixin, digits.DigitsPipeline):
    """``DigitsPipeline`` whose call also takes ``guidance=`` and ``guidance_kwargs=``."""
