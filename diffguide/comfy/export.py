"""``diffguide export-comfy DIR``: a ready ComfyUI custom-node folder.

The folder holds no copy of the nodes: its ``__init__.py`` re-exports the mappings of the
diffguide installed in ComfyUI's Python, so upgrading diffguide upgrades the nodes.
"""

from __future__ import annotations

from pathlib import Path

from .. import __version__

INIT = '''"""diffguide's guidance nodes for ComfyUI (written by `diffguide export-comfy`)."""

try:
    from diffguide.comfy import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
    from diffguide.comfy.v3 import comfy_entrypoint
except ImportError as err:
    raise ImportError(
        "the diffguide nodes need diffguide installed in ComfyUI's Python environment: "
        "pip install diffguide"
    ) from err

if comfy_entrypoint is None:  # a ComfyUI without the V3 API: V1 mappings only
    del comfy_entrypoint

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
'''

PYPROJECT = """[project]
name = "comfyui-diffguide"
description = "Guidance nodes from diffguide: CFG, APG (paper formula), Adaptive Guidance, LinearAG, guidance interval"
version = "{version}"
license = {{ text = "MIT" }}
dependencies = ["diffguide>={version}"]

[tool.comfy]
PublisherId = "diffguide"
DisplayName = "diffguide guidance"
Icon = ""
"""


def _readme() -> str:
    """The folder's README: one line per node, from the method registry."""
    from ..guidance import METHODS
    from .nodes import NODE_DISPLAY_NAME_MAPPINGS, node_id

    lines = [
        f"- **{NODE_DISPLAY_NAME_MAPPINGS[node_id(entry)]}**: " + ", ".join(p.name for p in entry.params)
        for entry in METHODS.values()
    ]
    return README.format(nodes="\n".join(lines))


README = """# diffguide nodes for ComfyUI

Written by `diffguide export-comfy`. The nodes live in the `diffguide` package; this folder
only re-exports them. Install: `pip install diffguide` in ComfyUI's Python, then restart
ComfyUI with this folder in `custom_nodes/`.

Nodes (category `sampling/diffguide`), each between the model loader and the KSampler, whose
`cfg` is the guidance scale; inputs, defaults and ranges come from diffguide's method registry:

{nodes}

Details: https://github.com/diffguide/diffguide/blob/main/docs/comfyui.md
"""

FILES = {"__init__.py": INIT, "pyproject.toml": PYPROJECT, "README.md": README}


def export_comfy(folder: str | Path, overwrite: bool = False) -> list[Path]:
    """Write the custom-node folder; refuses to touch a folder holding other files unless
    ``overwrite``. Returns the files written."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} exists and is not a folder")
    if folder.is_dir() and not overwrite:
        foreign = sorted(p.name for p in folder.iterdir() if p.name not in FILES and p.name != "__pycache__")
        if foreign or any((folder / name).exists() for name in FILES):
            raise ValueError(f"{folder} is not empty; choose a new folder or pass --overwrite")
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in FILES.items():
        path = folder / name
        if name == "pyproject.toml":
            text = text.format(version=__version__)
        elif name == "README.md":
            text = _readme()
        path.write_text(text)
        written.append(path)
    return written
