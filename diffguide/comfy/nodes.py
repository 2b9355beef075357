"""diffguide's guidance methods as ComfyUI nodes (V1 API), one per entry of the method registry
(``diffguide/guidance/registry.py``): the inputs, their defaults, ranges and tooltips, the
validation and the rule each node builds all come from there. Each node takes a MODEL and
returns a clone with the rule attached (:mod:`diffguide.comfy.patch`); nothing is computed here.

Put a node between the checkpoint loader and the KSampler; the KSampler's ``cfg`` is the
guidance scale ``w`` the rule uses.
"""

from __future__ import annotations

from ..guidance import METHODS, Method, Param
from .patch import attach

CATEGORY = "sampling/diffguide"


def input_spec(param: Param) -> tuple:
    """A registry parameter as a ComfyUI V1 input: ``(TYPE, options)`` or ``(choices, options)``."""
    options = {"default": param.widget_value(param.default), "tooltip": f"{param.doc} ({param.range_text})"}
    if param.kind == "choice":
        return (list(param.choices), options)
    if param.kind == "path":
        return ("STRING", {**options, "default": param.default or "", "multiline": False})
    bounds = {"min": param.low, "max": param.high, "step": param.step}
    return ("FLOAT" if param.kind == "float" else "INT", {**options, **bounds})


def node_id(entry: Method) -> str:
    """The node's id in ComfyUI workflows: ``Diffguide`` + the rule class name."""
    return f"Diffguide{entry.rule.__name__}"


def node_class(entry: Method) -> type:
    """The V1 node class of one registry entry."""

    def input_types(cls):
        return {"required": {"model": ("MODEL",), **{p.name: input_spec(p) for p in entry.params}}}

    def validate_inputs(cls, **inputs):
        # with **kwargs ComfyUI skips its own min/max and choice checks for every input and passes
        # them all here: the registry's checks, and the rule's own, are the node's
        try:
            # a linked input arrives as None at validation time: it is checked when the node runs
            entry.make(None, **{k: v for k, v in inputs.items() if k != "model" and v is not None})
        except ValueError as err:
            return str(err)
        return True

    def patch(self, model, **inputs):
        return (attach(model, entry.make(None, **inputs), skips_uncond=entry.skips_uncond),)

    doc = f"{entry.title} ({entry.paper}), the registry's {entry.name!r} method."
    return type(
        node_id(entry),
        (),
        {
            "__doc__": doc,
            "DESCRIPTION": doc,
            "CATEGORY": CATEGORY,
            "RETURN_TYPES": ("MODEL",),
            "FUNCTION": "patch",
            "INPUT_TYPES": classmethod(input_types),
            "VALIDATE_INPUTS": classmethod(validate_inputs),
            "patch": patch,
            "method": entry,
        },
    )


NODE_CLASS_MAPPINGS = {node_id(entry): node_class(entry) for entry in METHODS.values()}

NODE_DISPLAY_NAME_MAPPINGS = {node_id(entry): f"{entry.title} (diffguide)" for entry in METHODS.values()}
