"""The same nodes through ComfyUI's V3 schema API, built from the V1 definitions (and so from
the method registry).

Only defined where ``comfy_api.latest`` imports (a ComfyUI with the V3 API); elsewhere
``comfy_entrypoint`` is ``None`` and ComfyUI uses the V1 mappings.
"""

from __future__ import annotations

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

try:  # only inside ComfyUI
    from comfy_api.latest import ComfyExtension, io
except ImportError:
    ComfyExtension = io = None


def _input(io, name: str, spec: tuple):
    kind, options = spec[0], dict(spec[1]) if len(spec) > 1 else {}
    if kind == "MODEL":
        return io.Model.Input(name)
    if isinstance(kind, list):  # a V1 combo: its choices come first
        return io.Combo.Input(name, options=kind, **options)
    factory = {"FLOAT": io.Float, "INT": io.Int, "STRING": io.String}[kind]
    return factory.Input(name, **options)


def _v3_node(io, node_id: str, v1):
    required = v1.INPUT_TYPES()["required"]

    class Node(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(
                node_id=node_id,
                display_name=NODE_DISPLAY_NAME_MAPPINGS[node_id],
                category=v1.CATEGORY,
                description=v1.DESCRIPTION,
                inputs=[_input(io, name, spec) for name, spec in required.items()],
                outputs=[io.Model.Output()],
            )

        @classmethod
        def validate_inputs(cls, **kwargs):
            return v1.VALIDATE_INPUTS(**{k: v for k, v in kwargs.items() if k != "model"})

        @classmethod
        def execute(cls, **kwargs):
            return io.NodeOutput(v1().patch(**kwargs)[0])

    Node.__name__ = f"{node_id}V3"
    return Node


if io is not None:
    V3_NODES = [_v3_node(io, node_id, v1) for node_id, v1 in NODE_CLASS_MAPPINGS.items()]

    class DiffguideExtension(ComfyExtension):
        async def get_node_list(self):
            return V3_NODES

    async def comfy_entrypoint():
        """ComfyUI's V3 entry point."""
        return DiffguideExtension()
else:
    V3_NODES = []
    comfy_entrypoint = None
