"""Guidance rules: pure tensor code, one file per method (see ``base.py`` for the contract)."""

from .adaptive import AdaptiveGuidance
from .apg import APG
from .base import GuidanceRule, GuidanceStep
from .cfg import CFG
from .linear_ag import LinearAG

__all__ = ["APG", "CFG", "AdaptiveGuidance", "GuidanceRule", "GuidanceStep", "LinearAG"]
