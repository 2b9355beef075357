"""The browser demo: ``diffguide app`` or ``make app`` (Gradio, the ``app`` extra).

:mod:`diffguide.app.core` holds what each tab does as plain functions; :mod:`diffguide.app.ui`
lays them out as a Gradio Blocks app and :func:`launch` serves it on 127.0.0.1.
"""

from .core import AppError, ModelRegistry


def launch(*args, **kwargs):
    """Build and serve the demo (see :func:`diffguide.app.ui.launch`)."""
    from .ui import launch as _launch

    return _launch(*args, **kwargs)


def build_app(*args, **kwargs):
    """The demo as an unlaunched ``gr.Blocks`` (see :func:`diffguide.app.ui.build_app`)."""
    from .ui import build_app as _build

    return _build(*args, **kwargs)


__all__ = ["AppError", "ModelRegistry", "build_app", "launch"]
