"""diffguide: diffusion sampling and guidance methods for Hugging Face diffusers pipelines."""

from . import metrics
from .models import DigitsPipeline, load_default_pipeline, load_digits, load_judge

__all__ = ["DigitsPipeline", "load_default_pipeline", "load_digits", "load_judge", "metrics"]
__version__ = "0.1.0"
