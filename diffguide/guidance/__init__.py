"""Guidance rules: pure tensor code, one file per method (see ``base.py`` for the contract)."""

from .adaptive import AdaptiveGuidance
from .apg import APG
from .base import GuidanceRule, GuidanceStep
from .cfg import CFG
from .interval import GuidanceInterval
from .linear_ag import LinearAG

__all__ = [
    "APG",
    "CFG",
    "METHODS",
    "AdaptiveGuidance",
    "GuidanceInterval",
    "GuidanceRule",
    "GuidanceStep",
    "LinearAG",
    "make_rule",
]

#: method names accepted by :func:`make_rule`, the CLI and the drop-in pipelines
METHODS = ("cfg", "apg", "ag", "linear-ag", "interval")


def make_rule(name: str, **params) -> GuidanceRule:
    """A rule from its method name and constructor parameters, e.g.
    ``make_rule("apg", eta=0.0, norm_threshold=15.0)``. ``"linear-ag"`` needs
    ``coefficients=`` a file written by ``LinearAG.save`` (and optionally ``schedule=``)."""
    if name == "linear-ag":
        path = params.pop("coefficients", None)
        if path is None:
            raise ValueError(
                "linear-ag needs calibrated coefficients: LinearAG.calibrate(pipe, calls).save(path), "
                "then pass coefficients=path"
            )
        return LinearAG.load(path, **params)
    classes = {"cfg": CFG, "apg": APG, "ag": AdaptiveGuidance, "interval": GuidanceInterval}
    if name not in classes:
        raise ValueError(f"unknown guidance method {name!r}; choose from {', '.join(METHODS)}")
    try:
        return classes[name](**params)
    except TypeError as err:
        raise ValueError(f"bad parameters for {name!r}: {err}") from None
