"""diffguide's guidance rules as ComfyUI nodes (V1 API): each takes a MODEL and returns a
clone with the rule attached (:mod:`diffguide.comfy.patch`). The math is
:mod:`diffguide.guidance`'s; nothing is re-implemented here.

Put a node between the checkpoint loader and the KSampler; the KSampler's ``cfg`` is the
guidance scale ``w`` the rule uses.
"""

from __future__ import annotations

import math
from pathlib import Path

from ..guidance import APG, AdaptiveGuidance, GuidanceInterval, LinearAG
from .patch import attach

CATEGORY = "sampling/diffguide"


def range_error(node: type, **values) -> str | None:
    """The declared min/max check, worded as ComfyUI words it. ComfyUI skips its own check for
    every input that ``VALIDATE_INPUTS`` names, so each node's ``VALIDATE_INPUTS`` calls this."""
    required = node.INPUT_TYPES()["required"]
    for name, value in values.items():
        options = required[name][1] if len(required[name]) > 1 else {}
        if not isinstance(value, (int, float)) or value != value:  # NaN
            return f"{name}: {value!r} is not a number"
        if "min" in options and value < options["min"]:
            return f"{name}: Value {value} smaller than min of {options['min']}"
        if "max" in options and value > options["max"]:
            return f"{name}: Value {value} bigger than max of {options['max']}"
    return None


class _ModelPatchNode:
    """What every node here shares: MODEL in, a patched clone out, in our category."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"


class DiffguideAPG(_ModelPatchNode):
    """Adaptive Projected Guidance (Sadat et al., ICLR 2025) as the paper writes it:
    ``D = D_c + (w - 1) (g_orth + eta g_par)`` with reverse momentum and a norm cap."""

    DESCRIPTION = __doc__

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 (ComfyUI's name)
        return {
            "required": {
                "model": ("MODEL",),
                "eta": ("FLOAT", {"default": 0.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                  "tooltip": "share of the parallel component kept (1 with no cap or momentum = CFG)"}),
                "norm_threshold": ("FLOAT", {"default": 15.0, "min": 0.0, "max": 1000.0, "step": 0.1,
                                             "tooltip": "cap r on the guidance norm in x0 units; 0 = no cap"}),
                "momentum": ("FLOAT", {"default": -0.5, "min": -0.99, "max": 0.99, "step": 0.01,
                                       "tooltip": "beta of m <- g + beta m; the paper uses -0.5"}),
            }
        }  # fmt: skip

    @classmethod
    def VALIDATE_INPUTS(cls, eta=0.0, norm_threshold=15.0, momentum=-0.5):  # noqa: N802
        message = range_error(cls, eta=eta, norm_threshold=norm_threshold, momentum=momentum)
        if message:
            return message
        if norm_threshold < 0:
            return f"norm_threshold must be >= 0 (0 for no cap), got {norm_threshold!r}"
        if not -1 < momentum < 1:
            return f"momentum must be in (-1, 1), got {momentum!r}"
        return True

    def patch(self, model, eta: float, norm_threshold: float, momentum: float):
        cap = float(norm_threshold) if norm_threshold > 0 else math.inf
        return (
            attach(
                model, APG(eta=float(eta), norm_threshold=cap, momentum=float(momentum)), skips_uncond=False
            ),
        )


class DiffguideAdaptiveGuidance(_ModelPatchNode):
    """Adaptive Guidance (Castillo et al., 2023): CFG until the cosine of the conditional and
    unconditional x0 predictions reaches the threshold, per sample; after that the
    unconditional batch is not computed at all."""

    DESCRIPTION = __doc__

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802
        return {
            "required": {
                "model": ("MODEL",),
                "threshold": ("FLOAT", {"default": 0.991, "min": -1.0, "max": 1.5, "step": 0.001,
                                        "tooltip": "gamma_bar; above 1 never switches (plain CFG)"}),
                "min_steps": ("INT", {"default": 0, "min": 0, "max": 1000,
                                      "tooltip": "no sample switches before this step"}),
            }
        }  # fmt: skip

    @classmethod
    def VALIDATE_INPUTS(cls, threshold=0.991, min_steps=0):  # noqa: N802
        message = range_error(cls, threshold=threshold, min_steps=min_steps)
        if message:
            return message
        if not isinstance(min_steps, int):
            return f"min_steps must be a whole number >= 0, got {min_steps!r}"
        return True

    def patch(self, model, threshold: float, min_steps: int):
        rule = AdaptiveGuidance(threshold=float(threshold), min_steps=int(min_steps))
        return (attach(model, rule, skips_uncond=True),)


class DiffguideLinearAG(_ModelPatchNode):
    """LinearAG (Castillo et al., 2023): at the schedule's estimate steps the unconditional
    prediction is a per-step linear function of past predictions, with coefficients from a
    file written by ``LinearAG.calibrate(...).save(path)`` for this model, scale and steps."""

    DESCRIPTION = __doc__

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802
        return {
            "required": {
                "model": ("MODEL",),
                "coefficients_path": ("STRING", {"default": "", "multiline": False,
                                                 "tooltip": "a .safetensors or .json file from LinearAG.save"}),
            }
        }  # fmt: skip

    @classmethod
    def VALIDATE_INPUTS(cls, coefficients_path=""):  # noqa: N802
        if not coefficients_path:
            return "coefficients_path is empty: give the file written by LinearAG.calibrate(...).save(path)"
        if not Path(coefficients_path).is_file():
            return f"coefficients_path {coefficients_path!r} is not a file"
        try:
            LinearAG.load(coefficients_path)
        except ValueError as err:
            return str(err)
        return True

    def patch(self, model, coefficients_path: str):
        return (attach(model, LinearAG.load(coefficients_path), skips_uncond=True),)


class DiffguideCFGInterval(_ModelPatchNode):
    """Guidance in a limited interval (Kynkaanniemi et al., NeurIPS 2024): CFG only while the
    noise level sigma is in (sigma_end, sigma_start]; elsewhere the conditional prediction
    alone, without computing the unconditional one. sigma_start at its maximum = a CFG cutoff."""

    DESCRIPTION = __doc__

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802
        return {
            "required": {
                "model": ("MODEL",),
                "sigma_start": ("FLOAT", {"default": 5.42, "min": 0.0, "max": 10000.0, "step": 0.01,
                                          "tooltip": "guidance from this noise level down (10000 = from the start)"}),
                "sigma_end": ("FLOAT", {"default": 0.28, "min": 0.0, "max": 10000.0, "step": 0.01,
                                        "tooltip": "to this one (0 = to the end)"}),
            }
        }  # fmt: skip

    @classmethod
    def VALIDATE_INPUTS(cls, sigma_start=5.42, sigma_end=0.28):  # noqa: N802
        message = range_error(cls, sigma_start=sigma_start, sigma_end=sigma_end)
        if message:
            return message
        if not sigma_end < sigma_start:
            return (
                f"sigma_end must be below sigma_start, got sigma_start={sigma_start}, sigma_end={sigma_end}"
            )
        return True

    def patch(self, model, sigma_start: float, sigma_end: float):
        high = math.inf if sigma_start >= 10000.0 else float(sigma_start)
        return (attach(model, GuidanceInterval(sigma_lo=float(sigma_end), sigma_hi=high), skips_uncond=True),)


NODE_CLASS_MAPPINGS = {
    "DiffguideAPG": DiffguideAPG,
    "DiffguideAdaptiveGuidance": DiffguideAdaptiveGuidance,
    "DiffguideLinearAG": DiffguideLinearAG,
    "DiffguideCFGInterval": DiffguideCFGInterval,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "DiffguideAPG": "APG, paper formula (diffguide)",
    "DiffguideAdaptiveGuidance": "Adaptive Guidance (diffguide)",
    "DiffguideLinearAG": "LinearAG (diffguide)",
    "DiffguideCFGInterval": "CFG interval / cutoff (diffguide)",
}
