"""Guidance rules: pure tensor code, one file per method (see ``base.py`` for the contract),
and the registry every face is built from (``registry.py``)."""

from .adaptive import AdaptiveGuidance
from .apg import APG
from .base import GuidanceRule, GuidanceStep
from .cfg import CFG
from .interval import GuidanceInterval, WithinInterval
from .linear_ag import LinearAG
from .registry import METHODS, Method, Param, make_rule, method, method_of

__all__ = [
    "APG",
    "CFG",
    "METHODS",
    "AdaptiveGuidance",
    "GuidanceInterval",
    "WithinInterval",
    "GuidanceRule",
    "GuidanceStep",
    "LinearAG",
    "Method",
    "Param",
    "make_rule",
    "method",
    "method_of",
]
