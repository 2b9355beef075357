"""Diffusers' caching hooks under a diffguide rule: which compose, and why the others are refused.

Read from diffusers 0.42.1's ``hooks/``. Every cache there is a stateful hook on the denoiser's
blocks or attention layers that keeps, from one denoiser call to the next, tensors of the rows it
saw: the first or last block's residual (FirstBlockCache, MagCache, SeaCache), Taylor factors of
layer outputs (TaylorSeerCache), attention outputs (PyramidAttentionBroadcast, FasterCache), text
keys and values (TextKVCache). FirstBlockCache, TaylorSeer and MagCache keep one state per
``cache_context`` name (``"cond"``/``"uncond"`` on two-call pipelines); PAB and FasterCache one
per layer, shared by every call.

- A rule that evaluates the unconditional branch of every sample at every step (CFG, APG: it
  keeps :meth:`GuidanceRule.uncond_mask`'s default) feeds the denoiser the rows the pipeline
  would, so these caches compose with it. NFE counts denoiser calls: a cache makes a call
  cheaper (blocks or attention skipped), it does not remove one.
- A rule that skips unconditional evaluations at some steps or for some samples (AG, LinearAG,
  GuidanceInterval: it overrides ``uncond_mask``) changes what the cache sees from call to call.
  On a batched pipeline the batch shrinks or grows between steps, and a cache applies state kept
  for other rows: a shape error on the first step it skips (FirstBlockCache, TaylorSeer, PAB) or,
  in MagCache, blocks skipped without their residual and only a logged warning. On a two-call
  pipeline the unconditional call runs on fewer samples (the same errors) or not at all, and the
  caches that count calls as steps extrapolate over the wrong interval (TaylorSeer) or read the
  wrong step's magnitude ratio (MagCache). Refused, whether or not the cache is set to skip.
- FasterCache is refused with every rule: it drops the unconditional half of a ``[uncond, cond]``
  batch itself and returns its own estimate of it, in place of the unconditional evaluation the
  rule asked for (and diffguide counts); its attention approximation runs on any call smaller
  than the first it saw, which a skipping rule's calls are.

The check runs in ``dg.apply`` and again at the start of every guided call (a cache enabled
after ``apply``), on every denoiser the rule is attached to.
"""

from __future__ import annotations

import torch

from ..guidance.base import GuidanceRule
from .core import RuleHook

#: diffusers' hook names (diffusers.hooks.*) -> the cache they belong to
CACHE_HOOKS = {
    "fbc_leader_block_hook": "FirstBlockCache",
    "fbc_block_hook": "FirstBlockCache",
    "taylorseer_cache": "TaylorSeerCache",
    "mag_cache_leader_block_hook": "MagCache",
    "mag_cache_block_hook": "MagCache",
    "pyramid_attention_broadcast": "PyramidAttentionBroadcast",
    "faster_cache_denoiser": "FasterCache",
    "faster_cache_block": "FasterCache",
    "sea_cache_root": "SeaCache",
    "sea_cache_leader_block": "SeaCache",
    "sea_cache_block": "SeaCache",
    "sea_cache_post_norm": "SeaCache",
    "text_kv_cache_transformer": "TextKVCache",
    "text_kv_cache_block": "TextKVCache",
}
COMPOSING = "FirstBlockCache, TaylorSeerCache, MagCache or PyramidAttentionBroadcast"


def caches_on(module: torch.nn.Module) -> list[str]:
    """The caches hooked into ``module`` or its submodules, in module order: the known diffusers
    caches by hook name, any other stateful diffusers hook (state kept across calls) by its class."""
    found: list[str] = []
    for submodule in module.modules():
        registry = getattr(submodule, "_diffusers_hook", None)
        if registry is None:
            continue
        for name, hook in registry.hooks.items():
            if isinstance(hook, RuleHook) or not (name in CACHE_HOOKS or hook._is_stateful):
                continue
            cache = CACHE_HOOKS.get(name, type(hook).__name__)
            if cache not in found:
                found.append(cache)
    return found


def skips_unconditional(rule: GuidanceRule) -> bool:
    """Whether ``rule`` may leave out unconditional evaluations (it overrides ``uncond_mask``)."""
    return type(rule).uncond_mask is not GuidanceRule.uncond_mask


def check_caches(rule: GuidanceRule, denoisers: dict[str, torch.nn.Module]) -> None:
    """Raise ``ValueError`` (reason and fix, one line) where a cache on one of ``denoisers`` (by
    component name) cannot run under ``rule``."""
    for component, denoiser in denoisers.items():
        caches = caches_on(denoiser)
        remove = (
            f"pipe.{component}.disable_cache()"
            if hasattr(denoiser, "disable_cache")
            else f"remove its hooks from pipe.{component}"
        )
        if "FasterCache" in caches:
            raise ValueError(
                f"FasterCache on the {component} cannot run under a diffguide rule: it replaces the unconditional "
                f"half of the batch with its own estimate, in place of the evaluations {rule!r} asks for; use "
                f"{COMPOSING} with the rule, or {remove} first"
            )
        if caches and skips_unconditional(rule):
            raise ValueError(
                f"{rule!r} cannot run with {caches[0]} on the {component}: it skips unconditional evaluations at "
                "some steps or for some samples, so the cache would apply what it kept from calls on other rows or "
                f"at other steps; use CFG or APG with the cache, or {remove} first"
            )
