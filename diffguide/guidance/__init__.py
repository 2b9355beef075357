"""Guidance rules: pure tensor code, one file per method (see ``base.py`` for the contract),
and the registry every face is built from (``registry.py``)."""

from .adaptive import AdaptiveGuidance
from .apg import APG
from .base import GuidanceRule, GuidanceStep
from .cfg import CFG
from .cutoff import cfg_cutoff, cutoff_sigma, cutoff_step, step_noise_levels
from .interval import GuidanceInterval
from .linear_ag import LinearAG
from .registry import METHODS, Method, Param, make_rule, method, method_of

__all__ = [
    "APG",
    "CFG",
    "METHODS",
    "AdaptiveGuidance",
    "GuidanceInterval",
    "GuidanceRule",
    "GuidanceStep",
    "LinearAG",
    "Method",
    "Param",
    "cfg_cutoff",
    "cutoff_sigma",
    "cutoff_step",
    "make_rule",
    "method",
    "method_of",
    "step_noise_levels",
]
