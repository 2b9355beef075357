"""Attach a guidance rule to a diffusers pipeline without forking it: ``dg.apply`` and friends.

``apply`` looks the pipeline up in the support table (``adapters/support.py``), refuses it with
the reason and the fix where diffguide cannot serve it, and otherwise registers the adapter of
its kind as a diffusers ``ModelHook`` on each denoiser (``unet`` or ``transformer``; Wan 2.2's
``transformer_2`` too, sharing one rule state): ``adapters/batched.py`` for ``[uncond, cond]``
batches, ``adapters/two_call.py`` for a call per branch. Both run on one
:class:`~diffguide.adapters.core.GuidanceSession`. A diffusers cache on a denoiser that cannot
run under the rule (``adapters/caches.py``) is refused there and at the start of every call.

So that scales kept in a local of ``__call__`` (Flux's ``true_cfg_scale``, PixArt's and DiT's
``guidance_scale``) can be read and the rule reset at the start of every call, ``apply`` also
gives the pipeline instance a subclass of its own class (same name) whose ``__call__`` records
the call's arguments and then runs the original; ``remove`` restores the class and the
denoisers' forwards.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from diffusers.hooks import HookRegistry

from .adapters.batched import BatchedGuidanceHook
from .adapters.caches import check_caches
from .adapters.core import GuidanceSession, nfe_stats
from .adapters.support import support_for
from .adapters.two_call import TwoCallGuidanceHook
from .guidance.base import GuidanceRule

HOOK_NAME = "diffguide_guidance"
ADAPTERS = {"batched": BatchedGuidanceHook, "two_call": TwoCallGuidanceHook}

__all__ = ["apply", "check_pipeline", "guided", "remove", "run_call", "stats"]


def _denoisers(pipe, component_names: list[str] | None = None) -> dict[str, torch.nn.Module]:
    """The denoiser modules of ``pipe`` by component name (Wan 2.2 has two)."""
    names = component_names or ["unet", "transformer", "transformer_2"]
    found = {
        name: getattr(pipe, name) for name in names if isinstance(getattr(pipe, name, None), torch.nn.Module)
    }
    if not found:
        raise TypeError(f"{type(pipe).__name__} has no unet or transformer to attach guidance to")
    return found


def check_pipeline(pipe) -> None:
    """Raise ``TypeError`` (reason and fix) unless diffguide can guide ``pipe``."""
    support_for(pipe)
    _denoisers(pipe)


# -- the call wrapper ---------------------------------------------------------------------------

_WRAPPED: dict[type, type] = {}


@functools.lru_cache(maxsize=64)
def _signature(function: Callable) -> inspect.Signature:
    return inspect.signature(function)


def _call_arguments(call: Callable, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The arguments of a pipeline call (a bound ``__call__``) by name, defaults filled,
    ``**kwargs`` flattened; the signature is the function's, cached, so ``self`` is bound too."""
    signature = _signature(call.__func__)
    bound = signature.bind(call.__self__, *args, **kwargs)
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    arguments.pop(next(iter(signature.parameters)))
    for name, parameter in signature.parameters.items():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            arguments.update(arguments.pop(name, {}))
    return arguments


def run_call(pipe, call: Callable, args: tuple, kwargs: dict):
    """Run ``call(*args, **kwargs)`` (a pipeline's ``__call__``, bound) as one guided sampling
    call: the attached rule sees its arguments and starts afresh."""
    session = _session(pipe)
    if session is None:
        return call(*args, **kwargs)
    check_caches(session.rule, _denoisers(pipe, session.components))  # a cache enabled after apply
    session.begin_call(_call_arguments(call, args, kwargs))
    try:
        output = call(*args, **kwargs)
    except BaseException:
        session.end_call(failed=True)
        raise
    session.end_call()
    return output


def _wrapped_class(cls: type) -> type:
    if "_diffguide_base" in cls.__dict__:
        return cls
    if cls not in _WRAPPED:

        def __call__(self, *args, **kwargs):
            return run_call(self, super(wrapped, self).__call__, args, kwargs)

        wrapped = type(
            cls.__name__,
            (cls,),
            {
                "__call__": __call__,
                "__module__": cls.__module__,
                "__qualname__": cls.__qualname__,
                "__doc__": cls.__doc__,
                "_diffguide_base": cls,
            },
        )
        _WRAPPED[cls] = wrapped
    return _WRAPPED[cls]


# -- public API ---------------------------------------------------------------------------------


def _session(pipe) -> GuidanceSession | None:
    try:
        denoiser = next(iter(_denoisers(pipe).values()))
    except TypeError:
        return None
    registry = getattr(denoiser, "_diffusers_hook", None)
    hook = registry.get_hook(HOOK_NAME) if registry is not None else None
    if hook is None or hook.session._pipe() is not pipe:  # a denoiser shared with another pipeline
        return None
    return hook.session


def apply(pipe, rule: GuidanceRule):
    """Attach ``rule`` to ``pipe`` (replacing any rule attached before); returns ``pipe``.

    Raises ``TypeError`` with the reason and the fix for a pipeline diffguide cannot serve
    (see ``diffguide.adapters.support.PIPELINES``), ``ValueError`` for a diffusers cache on its
    denoiser that cannot run under ``rule`` (see ``diffguide.adapters.caches``)."""
    if not isinstance(rule, GuidanceRule):
        raise TypeError(
            f"expected a diffguide guidance rule (CFG, APG, AdaptiveGuidance, LinearAG, GuidanceInterval), "
            f"got {rule!r}"
        )
    class_name, support = support_for(pipe)
    components = [name for name in support.scale if name != "*"] or None
    denoisers = _denoisers(pipe, components)
    check_caches(rule, denoisers)
    remove(pipe)
    session = GuidanceSession(pipe, rule, support, class_name)
    adapter = ADAPTERS[support.kind]
    session.components = list(denoisers)
    for name, denoiser in denoisers.items():
        registry = HookRegistry.check_if_exists_or_initialize(denoiser)
        registry.register_hook(adapter(session, name), HOOK_NAME)
    pipe.__class__ = _wrapped_class(type(pipe))
    return pipe


def remove(pipe):
    """Detach diffguide's rule from ``pipe``, restoring its class and its denoisers' forwards;
    returns ``pipe``."""
    for denoiser in _denoisers(pipe).values():
        registry = getattr(denoiser, "_diffusers_hook", None)
        if registry is not None and registry.get_hook(HOOK_NAME) is not None:
            registry.remove_hook(HOOK_NAME, recurse=False)
    base = type(pipe).__dict__.get("_diffguide_base")
    if base is not None:
        pipe.__class__ = base
    return pipe


def stats(pipe) -> dict:
    """Network evaluations of the last sampling call: ``nfe`` (mean per sample),
    ``nfe_per_sample``, ``steps``, and the attached ``rule``."""
    session = _session(pipe)
    if session is None:
        raise ValueError("no diffguide rule is attached to this pipeline; use dg.apply(pipe, rule) first")
    session.finish_pending()
    return nfe_stats(session.nfe_per_sample, session.steps, session.rule)


@contextmanager
def guided(pipe, rule: GuidanceRule) -> Iterator:
    """``with dg.guided(pipe, rule): pipe(...)``: the rule is attached inside the block only,
    and any rule attached before is restored after it."""
    previous = _session(pipe)
    apply(pipe, rule)
    try:
        yield pipe
    finally:
        remove(pipe)
        if previous is not None:
            apply(pipe, previous.rule)
