"""diffguide: diffusion sampling and guidance methods for Hugging Face diffusers pipelines."""

from . import versions  # noqa: I001  (first: it checks the diffusers floor in one line)
from . import metrics
from .adapters.calibration import calibrate_linear_ag
from .adapters.cutoff import cfg_cutoff, cutoff_sigma
from .adapters.guider import as_guider
from .classifier import ClassifierSchedule, DiffusionClassifier
from .guidance import (
    APG,
    CFG,
    AdaptiveGuidance,
    GuidanceInterval,
    GuidanceRule,
    LinearAG,
    WithinInterval,
    make_rule,
)
from .hooks import apply, guided, remove, stats
from .models import (
    ClassConditionalTransformerPipeline,
    DigitsPipeline,
    load_default_pipeline,
    load_digits,
    load_fashion,
    load_judge,
    load_pipeline,
)
from .schedulers import ShortestPathScheduler

__all__ = [
    "cfg_cutoff",
    "cutoff_sigma",
    "APG",
    "CFG",
    "ClassifierSchedule",
    "DiffusionClassifier",
    "AdaptiveGuidance",
    "ClassConditionalTransformerPipeline",
    "DigitsPipeline",
    "GuidanceInterval",
    "WithinInterval",
    "GuidanceRule",
    "LinearAG",
    "apply",
    "as_guider",
    "calibrate_linear_ag",
    "guided",
    "load_default_pipeline",
    "load_digits",
    "load_fashion",
    "load_judge",
    "load_pipeline",
    "make_rule",
    "metrics",
    "remove",
    "ShortestPathScheduler",
    "stats",
    "versions",
]
__version__ = "0.1.0"
