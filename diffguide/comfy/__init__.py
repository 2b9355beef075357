"""ComfyUI custom nodes for diffguide's guidance rules.

``diffguide export-comfy DIR`` writes a custom-node folder that re-exports these mappings;
ComfyUI loads it from ``custom_nodes/``. See docs/comfyui.md.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from .patch import ComfyGuidance, attach

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "ComfyGuidance", "attach"]
