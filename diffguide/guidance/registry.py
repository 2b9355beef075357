"""The method registry: every guidance method once, with its parameters, paper and presets.

Each face of diffguide is built from this table and nothing else: :func:`make_rule`, the CLI's
``--method`` / ``--param`` flags, the Gradio controls, the ComfyUI node inputs (V1 and V3), the
drop-in pipelines' ``guidance=`` / ``guidance_kwargs=`` and the guider's config. A parameter has
one default and one range here; a rule class keeps the same default in its signature (a test
checks both). Adding a method is its rule file plus one :class:`Method` entry in ``METHODS``.

Widgets cannot hold infinity, so a parameter whose "no limit" setting is ``inf`` names an
in-range value that stands for it (``Param.infinite``): APG's ``norm_threshold = 0`` means no
cap, the interval's ``sigma_hi = 10000`` means "from the start". Every face resolves it here,
so ``make_rule("apg", norm_threshold=0)`` and the ComfyUI node at 0 build the same rule;
``inf`` itself is accepted too.

Presets are named settings per model family: the paper's SDXL values for APG, the values
measured on the embedded digits model (docs/guidance.md). A face that knows its pipeline's
family (``guidance_family``) offers that preset as its default and says so.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .adaptive import AdaptiveGuidance
from .apg import APG, FORMULATIONS
from .base import SPACES, GuidanceRule
from .cfg import CFG
from .interval import GuidanceInterval
from .linear_ag import LinearAG

KINDS = ("float", "int", "choice", "path")


@dataclass(frozen=True)
class Param:
    """One parameter of a method as every face exposes it.

    ``low``/``high`` bound numbers (inclusive); ``choices`` list a choice's values; ``step`` is
    the widgets' increment; ``infinite`` is the in-range value that means ``inf``.
    """

    name: str
    kind: str
    default: Any
    doc: str
    low: float | None = None
    high: float | None = None
    step: float | None = None
    choices: tuple[str, ...] = ()
    infinite: float | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Param kind must be one of {KINDS}, got {self.kind!r}")

    @property
    def range_text(self) -> str:
        """The allowed values, as error messages and help texts say them."""
        if self.kind == "choice":
            return "one of " + ", ".join(self.choices)
        if self.kind == "path":
            return "a file path"
        text = (
            f"from {self.low:g} to {self.high:g}"
            if self.kind == "float"
            else f"from {self.low} to {self.high}"
        )
        if self.infinite is not None:
            text += f", or inf ({self.infinite:g} means inf)"
        return text

    def check(self, value: Any) -> Any:
        """``value`` as the rule takes it (``infinite`` -> ``inf``), or a ValueError that names the
        parameter and its range."""
        if self.kind == "path":
            if value is None or isinstance(value, str) or hasattr(value, "__fspath__"):
                return None if value in (None, "") else str(value)
            raise ValueError(f"{self.name} must be {self.range_text}, got {value!r}")
        if self.kind == "choice":
            if value not in self.choices:
                raise ValueError(f"{self.name} must be {self.range_text}, got {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"{self.name} must be a number {self.range_text}, got {value!r}")
        if self.infinite is not None and (value == math.inf or value == self.infinite):
            return math.inf
        if not (self.low <= value <= self.high):  # also refuses NaN and unasked-for infinities
            raise ValueError(f"{self.name} must be {self.range_text}, got {value!r}")
        if self.kind == "int" and value != int(value):
            raise ValueError(f"{self.name} must be a whole number {self.range_text}, got {value!r}")
        return int(value) if self.kind == "int" else float(value)

    def parse(self, text: str) -> Any:
        """A command-line string as this parameter's value (then :meth:`check` it)."""
        text = text.strip()
        if self.kind in ("choice", "path"):
            return text
        try:
            value = float(text)
            return int(value) if self.kind == "int" and value.is_integer() else value
        except ValueError:
            raise ValueError(f"{self.name} must be {self.range_text}, got {text!r}") from None

    def widget_value(self, value: Any) -> Any:
        """A rule's value as a widget shows it (``inf`` -> ``infinite``)."""
        if self.infinite is not None and value == math.inf:
            return self.infinite
        return value


@dataclass(frozen=True)
class Method:
    """A guidance method: its name, rule class, parameters, paper and presets.

    ``build`` turns checked parameters into the rule (default: ``rule(**params)``);
    ``skips_uncond``: the rule leaves out unconditional evaluations (adapters that can skip
    work register for it).
    """

    name: str
    title: str
    rule: type[GuidanceRule]
    paper: str
    params: tuple[Param, ...]
    presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    skips_uncond: bool = False
    build: Callable[..., GuidanceRule] | None = None

    def param(self, name: str) -> Param:
        for param in self.params:
            if param.name == name:
                return param
        raise ValueError(
            f"{self.name} has no parameter {name!r}; its parameters: {', '.join(p.name for p in self.params)}"
        )

    def settings(self, preset: str | None = None, **params) -> dict[str, Any]:
        """Every parameter's value: defaults, then the ``preset``'s, then ``params``; checked."""
        values = {p.name: p.default for p in self.params}
        if preset is not None:
            if preset not in self.presets:
                known = ", ".join(self.presets) or "none"
                raise ValueError(f"{self.name} has no preset {preset!r}; its presets: {known}")
            values.update(self.presets[preset])
        for name, value in params.items():
            self.param(name)
            values[name] = value
        return {p.name: p.check(values[p.name]) for p in self.params}

    def make(self, preset: str | None = None, **params) -> GuidanceRule:
        """The rule at these settings (see :meth:`settings`)."""
        settings = self.settings(preset, **params)
        try:
            return (self.build or self.rule)(**settings)
        except (ValueError, OSError) as err:  # OSError: a coefficients file that is not there
            raise ValueError(f"bad parameters for {self.name!r}: {err}") from None


def _linear_ag(coefficients: str | None) -> LinearAG:
    if coefficients is None:
        raise ValueError(
            "linear-ag needs calibrated coefficients: dg.calibrate_linear_ag(pipe, calls).save(path), "
            "then pass coefficients=path"
        )
    return LinearAG.load(coefficients)


def _space(default: str, doc: str) -> Param:
    return Param("space", "choice", default, doc, choices=SPACES)


METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        Method(
            "cfg",
            "Classifier-free guidance",
            CFG,
            "Ho & Salimans, Classifier-Free Diffusion Guidance, 2022",
            (_space("model_output", "where u + w (c - u) is formed (affine: both agree up to rounding)"),),
        ),
        Method(
            "apg",
            "Adaptive Projected Guidance",
            APG,
            "Sadat, Hilliges & Weber, arXiv 2410.02416, ICLR 2025",
            (
                Param(
                    "eta",
                    "float",
                    0.0,
                    "share of the update parallel to D_c kept (1 with no cap or momentum = CFG)",
                    low=-10.0,
                    high=10.0,
                    step=0.01,
                ),
                Param(
                    "norm_threshold",
                    "float",
                    15.0,
                    "cap r on the update's norm, in x0 units; 0 = no cap",
                    low=0.0,
                    high=1000.0,
                    step=0.1,
                    infinite=0.0,
                ),
                Param(
                    "momentum",
                    "float",
                    -0.5,
                    "beta of m <- g + beta m; negative averages past updates away",
                    low=-0.99,
                    high=0.99,
                    step=0.01,
                ),
                _space("denoised", "where the update is formed: x0 (the paper) or the raw model output"),
                Param(
                    "formulation",
                    "choice",
                    "paper",
                    "paper: D_c + (w-1) N; diffusers: D_u + w N",
                    choices=FORMULATIONS,
                ),
            ),  # fmt: skip
            presets={
                "sdxl": {"eta": 0.0, "norm_threshold": 15.0, "momentum": -0.5},  # the paper, SDXL
                "digits": {"eta": 0.0, "norm_threshold": 2.0, "momentum": -0.5},  # measured, docs/guidance.md
                # the digits setting shown on the flow transformer: FD -17% against CFG (docs/fashion_model.md)
                "fashion": {"eta": 0.0, "norm_threshold": 2.0, "momentum": -0.5},
            },
        ),
        Method(
            "ag",
            "Adaptive Guidance",
            AdaptiveGuidance,
            "Castillo et al., arXiv 2312.12487, AAAI 2025",
            (
                Param(
                    "threshold",
                    "float",
                    0.991,
                    "gamma_bar: CFG until cos(c, u) reaches it; above 1 = CFG",
                    low=-1.0,
                    high=1.5,
                    step=0.001,
                ),
                _space("denoised", "where cos(c, u) is measured: x0 (ours) or the model output (the paper)"),
                Param("min_steps", "int", 0, "no sample switches before this step", low=0, high=1000, step=1),
            ),  # fmt: skip
            presets={"digits": {"threshold": 0.991}},  # measured, docs/guidance.md
            skips_uncond=True,
        ),
        Method(
            "linear-ag",
            "LinearAG",
            LinearAG,
            "Castillo et al., arXiv 2312.12487, AAAI 2025",
            (
                Param(
                    "coefficients", "path", None, "file from dg.calibrate_linear_ag(pipe, calls).save(path)"
                ),
            ),
            skips_uncond=True,
            build=_linear_ag,
        ),
        Method(
            "interval",
            "Guidance in a limited interval",
            GuidanceInterval,
            "Kynkaanniemi et al., NeurIPS 2024, arXiv 2404.07724",
            (
                Param(
                    "sigma_lo",
                    "float",
                    0.28,
                    "CFG only above this noise level sigma/alpha",
                    low=0.0,
                    high=10000.0,
                    step=0.01,
                ),
                Param(
                    "sigma_hi",
                    "float",
                    5.42,
                    "and at or below this one; 10000 = from the start (a CFG cutoff)",
                    low=0.0,
                    high=10000.0,
                    step=0.01,
                    infinite=10000.0,
                ),
                _space("model_output", "where CFG is formed (affine: both agree up to rounding)"),
            ),  # fmt: skip
            presets={"edm2-xxl": {"sigma_lo": 0.28, "sigma_hi": 5.42}},  # the paper, ImageNet-512
            skips_uncond=True,
        ),
    )
}


def method(name: str) -> Method:
    """The registry entry called ``name``, or a ValueError listing the methods."""
    if name not in METHODS:
        raise ValueError(f"unknown guidance method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name]


def method_of(rule: GuidanceRule) -> Method:
    """The registry entry of a rule object (by its exact class)."""
    for entry in METHODS.values():
        if type(rule) is entry.rule:
            return entry
    raise ValueError(
        f"{type(rule).__name__} is not a diffguide method; the registry holds "
        + ", ".join(entry.rule.__name__ for entry in METHODS.values())
    )


def make_rule(name: str, preset: str | None = None, **params) -> GuidanceRule:
    """A rule from its method name, an optional preset and parameters, checked against the
    registry: ``make_rule("apg", preset="digits")``, ``make_rule("ag", threshold=0.994)``.
    ``"linear-ag"`` needs ``coefficients=`` a file written by ``LinearAG.save``."""
    return method(name).make(preset, **params)
