"""Which attention implementation a diffusers model really runs, and switching it for a feature.

diffusers has two ways to choose attention, and a model may mix them:

- **processors** on ``diffusers.models.attention_processor.Attention`` (the UNets of SD / SDXL,
  SD3's joint attention): ``AttnProcessor2_0`` calls torch's ``scaled_dot_product_attention``
  (SDPA), ``AttnProcessor`` computes ``softmax(q k^T * scale) v`` with plain matmuls, the
  ``XFormers*`` processors call ``xformers.ops.memory_efficient_attention``. Set by
  ``pipe.enable_xformers_memory_efficient_attention()`` or ``model.set_attn_processor``.
- **dispatch backends** on processors that carry an ``_attention_backend`` attribute (Flux,
  Qwen-Image, Wan and the other ``AttentionModuleMixin`` transformers): the processor calls
  ``dispatch_attention_fn``, which runs the named backend (``"native"`` is SDPA, ``"xformers"``,
  ``"flash"``, ``"_native_math"`` ...), or, where the processor names none, the registry's active
  backend. Set by ``model.set_attention_backend(name)``.

``model.set_attention_backend`` on a UNet changes none of its processors (``AttnProcessor2_0``
has no ``_attention_backend``) yet sets the registry's active backend for every other model in
the process, and ``reset_attention_backend`` does not undo that. :func:`attention_backends`
reports what each module will actually run, so a benchmark or a feature can check rather than
assume.

Guidance rules work on the denoiser's outputs and hold no attention code: they run under any
backend (``evals/gpu_walltime.py`` checks their outputs across backends). Two training features
need a particular attention:

- Smooth Diffusion's penalty differentiates a gradient (``create_graph=True``); torch's fused
  SDPA kernels (CPU flash, CUDA flash / memory-efficient) and xformers have no double backward.
  :func:`use_twice_differentiable_attention` switches every module to an implementation that has
  one, or refuses the model naming the module and its processor.
- SSA (``callbacks/ssa.py``) replaces the processor of ``Attention`` modules it can reproduce
  (:data:`SSA_REPRODUCES`) and refuses any other.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import torch

#: processor class names -> the backend they run (diffusers' names; SDPA written ``"sdpa"``)
PROCESSOR_BACKENDS = {
    "AttnProcessor": "plain",
    "AttnAddedKVProcessor": "plain",
    "AttnProcessor2_0": "sdpa",
    "AttnAddedKVProcessor2_0": "sdpa",
    "JointAttnProcessor2_0": "sdpa",
    "FusedAttnProcessor2_0": "sdpa",
    "FusedJointAttnProcessor2_0": "sdpa",
    "XFormersAttnProcessor": "xformers",
    "XFormersAttnAddedKVProcessor": "xformers",
    "XFormersJointAttnProcessor": "xformers",
    "SlicedAttnProcessor": "sliced",
    "SlicedAttnAddedKVProcessor": "sliced",
}

#: dispatch backend names that are torch's SDPA (any kernel it picks)
SDPA_DISPATCH = {"native"}

#: processors whose self/cross attention ``AttnProcessor`` computes exactly (same projections,
#: norms, residual and rescale); the others (joint, added-KV, IP-adapter ...) it would change
PLAIN_EQUIVALENT = {"AttnProcessor", "AttnProcessor2_0", "XFormersAttnProcessor", "SlicedAttnProcessor"}

#: the processors SSA's ``SubsampledAttnProcessor`` reproduces on its dense path
SSA_REPRODUCES = {"AttnProcessor", "AttnProcessor2_0", "XFormersAttnProcessor"}

#: the dispatch backend with a double backward: SDPA forced onto its math (composite) kernel
MATH_DISPATCH = "_native_math"


def attention_modules(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
    """``(name, module)`` for every diffusers attention module of ``model`` (either kind above)."""
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    for name, module in model.named_modules():
        if isinstance(module, (Attention, AttentionModuleMixin)) and hasattr(module, "processor"):
            yield name, module


def active_dispatch_backend() -> str:
    """The registry's active dispatch backend (what a processor naming none runs)."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    backend, _ = _AttentionBackendRegistry.get_active_backend()
    return getattr(backend, "value", str(backend))


def backend_of(module: torch.nn.Module) -> str:
    """The attention implementation ``module`` runs: ``"sdpa"``, ``"plain"``, ``"xformers"``,
    ``"sliced"``, a dispatch backend's own name (``"flash"``, ``"_native_math"`` ...), or
    ``"custom:<ProcessorClass>"`` for a processor this table does not know."""
    processor = module.processor
    if hasattr(processor, "_attention_backend"):
        backend = processor._attention_backend
        name = active_dispatch_backend() if backend is None else getattr(backend, "value", str(backend))
        return "sdpa" if name in SDPA_DISPATCH else name
    kind = type(processor).__name__
    return PROCESSOR_BACKENDS.get(kind, f"custom:{kind}")


def attention_backends(model: torch.nn.Module) -> dict[str, int]:
    """How many of ``model``'s attention modules run each backend (:func:`backend_of`)."""
    return dict(Counter(backend_of(module) for _, module in attention_modules(model)))


AttentionSnapshot = tuple[list[tuple[torch.nn.Module, object, object]], object]


def snapshot_attention(model: torch.nn.Module) -> AttentionSnapshot:
    """Each attention module's processor object and dispatch backend, and the registry's active
    backend, for :func:`restore_attention` to put back."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    modules = [
        (module, module.processor, getattr(module.processor, "_attention_backend", None))
        for _, module in attention_modules(model)
    ]
    return modules, _AttentionBackendRegistry._active_backend


def restore_attention(snapshot: AttentionSnapshot) -> None:
    """Put back what :func:`snapshot_attention` recorded."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    modules, active = snapshot
    for module, processor, backend in modules:
        module.set_processor(processor)
        if hasattr(processor, "_attention_backend"):
            processor._attention_backend = backend
    _AttentionBackendRegistry.set_active_backend(active)


def use_twice_differentiable_attention(model: torch.nn.Module) -> dict[str, int]:
    """Switch every attention module of ``model`` to an implementation with a double backward.

    Processors that ``AttnProcessor`` computes exactly become ``AttnProcessor``; dispatch
    processors get the ``"_native_math"`` backend (SDPA's composite math kernel). Any other
    processor is refused before anything is switched, since replacing it would change what the
    layer computes. Returns how many modules were switched from each backend; take a
    :func:`snapshot_attention` first to switch back afterwards.
    """
    from diffusers.models.attention_dispatch import AttentionBackendName
    from diffusers.models.attention_processor import AttnProcessor

    modules = list(attention_modules(model))
    for name, module in modules:
        processor = module.processor
        if not hasattr(processor, "_attention_backend") and type(processor).__name__ not in PLAIN_EQUIVALENT:
            raise ValueError(
                f"attention module {name!r} runs {type(processor).__name__} ({backend_of(module)}), for which "
                "diffguide knows no twice-differentiable equivalent; a double backward (Smooth Diffusion's "
                "penalty) needs a model whose attention is diffusers' AttnProcessor / AttnProcessor2_0 / "
                "XFormersAttnProcessor or a dispatch backend"
            )
    switched: Counter[str] = Counter()
    for _, module in modules:
        switched[backend_of(module)] += 1
        if hasattr(module.processor, "_attention_backend"):
            module.processor._attention_backend = AttentionBackendName(MATH_DISPATCH)
        else:
            module.set_processor(AttnProcessor())
    return dict(switched)
