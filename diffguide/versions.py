"""Which diffusers each part of diffguide needs, said in one line where it is used.

The package metadata asks for ``diffusers>=0.37`` (:data:`DIFFUSERS_MIN`), the oldest release
that has what the adapters and the embedded pipelines use: ``diffusers.hooks``' ``StateManager``,
``CacheMixin.cache_context`` and the guiders (0.35), and a ``from_pretrained`` that reads
postponed annotations (0.37; before, loading ``DigitsPipeline`` fails with ``KeyError: 'unet'``).
CI runs the adapter and guider tests on 0.37.0 too (``make test-oldest``). Below the floor,
``import diffguide`` stops with one line; where a pipeline is served only from a newer release
(``PipelineSupport.min_diffusers``: AuraFlow from 0.41), ``dg.apply`` refuses it naming the
version, while importing diffguide still works. Where diffusers changed an internal the adapters
read, the shims below read both forms.
"""

from __future__ import annotations

from functools import cache

from packaging.version import Version

#: the oldest diffusers diffguide supports (also the floor in pyproject.toml)
DIFFUSERS_MIN = "0.37"


@cache
def diffusers_version() -> Version:
    """The installed diffusers' version (release part only: 0.36.0.dev0 counts as 0.36.0)."""
    import diffusers

    return Version(Version(diffusers.__version__).base_version)


def diffusers_at_least(minimum: str) -> bool:
    return diffusers_version() >= Version(minimum)


def require_diffusers(feature: str, minimum: str) -> None:
    """Raise ``ImportError`` naming ``feature``, the version it needs and the upgrade command."""
    if not diffusers_at_least(minimum):
        import diffusers

        raise ImportError(
            f"{feature} needs diffusers>={minimum}, but {diffusers.__version__} is installed; "
            f"upgrade with: pip install -U 'diffusers>={minimum}'"
        )


def forget_child_hooks(module) -> None:
    """Make the hook registries under ``module`` look for their submodules' hooks afresh (hooks
    added since the last call, e.g. by ``enable_cache``). diffusers 0.38+ cache that list in
    ``_child_registries_cache`` (0.41 adds ``invalidate_child_registries_cache``, which clears the
    same attribute across a tree); earlier releases cache nothing."""
    for _, submodule in module.named_modules():
        registry = getattr(submodule, "_diffusers_hook", None)
        if registry is not None and hasattr(registry, "_child_registries_cache"):
            registry._child_registries_cache = None


def cache_context_name(manager) -> str | None:
    """The ``cache_context`` name diffusers last pushed into a hook's ``StateManager`` (None outside
    one): 0.41+ keep a ``CacheContext`` in ``_context``, earlier releases the name in
    ``_current_context``."""
    context = getattr(manager, "_context", None)
    if context is not None:
        return context.name
    return getattr(manager, "_current_context", None)


# Below the floor the adapters' imports would fail deep inside diffusers; say it in one line first.
require_diffusers("diffguide", DIFFUSERS_MIN)
