"""Attach a guidance rule to a diffusers pipeline without forking it.

A diffusers ``ModelHook`` on the denoiser (``pipe.unet`` or ``pipe.transformer``) receives
the ``[uncond, cond]`` batch the pipeline builds for classifier-free guidance. It asks the
rule which samples need an unconditional evaluation, runs the network once on those rows
and on every conditional row (slicing every batch-sized tensor argument, including nested
ones such as SDXL's ``added_cond_kwargs``), lets the rule combine the predictions in its
space, and returns ``[g, g]``, so that the pipeline's own ``u + w (c - u)`` yields exactly
``g``. Where the pipeline rescales guidance (``guidance_rescale``), the hook applies the same
rescaling to ``g`` against the conditional prediction, and the pipeline's own pass becomes
the identity.

Per-call state is reset when a new sampling call starts (the timestep stops decreasing, or
the batch changes). The hook counts network evaluations per sample (:func:`stats`).
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook

from .guidance.base import GuidanceRule, GuidanceStep
from .prediction import alpha_sigma, from_denoised, prediction_kind, to_denoised

HOOK_NAME = "diffguide_guidance"

#: pipelines known to batch ``[uncond, cond]`` into one denoiser call and to expose
#: ``guidance_scale``; subclasses of these are accepted too
SUPPORTED_PIPELINES = (
    "StableDiffusionPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionXLPipeline",
    "StableDiffusionXLImg2ImgPipeline",
    "StableDiffusion3Pipeline",
    "StableDiffusion3Img2ImgPipeline",
    "DigitsPipeline",
)


def _denoiser(pipe) -> torch.nn.Module:
    for name in ("unet", "transformer"):
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    raise TypeError(f"{type(pipe).__name__} has no unet or transformer to attach guidance to")


def check_pipeline(pipe) -> None:
    """Refuse pipelines whose CFG is not one batched ``[uncond, cond]`` denoiser call."""
    names = {cls.__name__ for cls in type(pipe).__mro__}
    if not names & set(SUPPORTED_PIPELINES):
        raise TypeError(
            f"{type(pipe).__name__} is not supported: diffguide needs a pipeline that batches "
            f"[uncond, cond] in one denoiser call and exposes its guidance_scale. Supported: "
            f"{', '.join(SUPPORTED_PIPELINES)} (and their subclasses)"
        )
    _denoiser(pipe)


def _select_rows(value: Any, rows: int, index: torch.Tensor) -> Any:
    """``value`` with every batch-sized tensor (first dim ``rows``) restricted to ``index``."""
    if isinstance(value, torch.Tensor):
        return value[index.to(value.device)] if value.ndim > 0 and value.shape[0] == rows else value
    if isinstance(value, dict):
        return {key: _select_rows(item, rows, index) for key, item in value.items()}
    if isinstance(value, list | tuple):  # e.g. IP-Adapter's image_embeds, a list of batch tensors
        return type(value)(_select_rows(item, rows, index) for item in value)
    return value


def _prediction_of(output: Any) -> torch.Tensor:
    if isinstance(output, tuple):
        return output[0]
    return output.sample


def _with_prediction(output: Any, prediction: torch.Tensor) -> Any:
    if isinstance(output, tuple):
        return (prediction, *output[1:])
    return type(output)(sample=prediction)


class GuidanceHook(ModelHook):
    """The ``ModelHook`` that runs a :class:`~diffguide.guidance.base.GuidanceRule`."""

    _is_stateful = True

    def __init__(self, pipe, rule: GuidanceRule):
        super().__init__()
        self.rule = rule
        self._pipe = weakref.ref(pipe)
        self._signature: inspect.Signature | None = None
        self.reset_state(None)

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        self._signature = inspect.signature(module.forward)
        return module

    def reset_state(self, module: torch.nn.Module | None) -> torch.nn.Module | None:
        self._last_timestep: float | None = None
        self._timesteps_seen: torch.Tensor | None = None
        self._batch_size: int | None = None
        self.calls = 0
        self._offset = 0
        self.step_index = 0
        self.nfe_per_sample = torch.zeros(0, dtype=torch.long)
        return module

    def _start_call_if_new(self, scheduler, timestep: float, batch_size: int) -> None:
        """A new sampling call starts when the scheduler got new timesteps (``set_timesteps``
        builds a new tensor each call), or, for schedulers without them, when the timestep rises;
        repeated timesteps (Heun) stay inside the call."""
        timesteps = getattr(scheduler, "timesteps", None)
        if isinstance(timesteps, torch.Tensor):
            new_call = timesteps is not self._timesteps_seen
        else:
            new_call = self._last_timestep is None or timestep > self._last_timestep
        if new_call or batch_size != self._batch_size:
            self.rule.reset()
            self.calls = 0
            self._batch_size = batch_size
            self.nfe_per_sample = torch.zeros(batch_size, dtype=torch.long)
            # img2img pipelines start part-way down the schedule: find where
            self._offset = 0
            if isinstance(timesteps, torch.Tensor):
                matches = (timesteps.detach().cpu().double() == timestep).nonzero().flatten()
                self._offset = int(matches[0]) if len(matches) else 0
        self._timesteps_seen = timesteps if isinstance(timesteps, torch.Tensor) else None
        self._last_timestep = timestep
        self.step_index = self._offset + self.calls

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        pipe = self._pipe()
        original = self.fn_ref.original_forward
        bound = self._signature.bind(*args, **kwargs)
        names = list(bound.arguments)
        sample = bound.arguments[names[0]]
        timestep = bound.arguments.get("timestep")
        rows = sample.shape[0]
        first_t = float(torch.as_tensor(timestep).reshape(-1)[0]) if timestep is not None else 0.0

        if bound.arguments.get("skip_layers") is not None:
            raise RuntimeError(
                "skip-layer guidance (SD3's skip_guidance_layers) adds its own denoiser call that a diffguide "
                "rule cannot see; call the pipeline without it, or dg.remove(pipe) first"
            )
        guidance_scale = float(getattr(pipe, "_guidance_scale", 1.0))
        cfg_active = getattr(pipe, "do_classifier_free_guidance", guidance_scale > 1)
        scheduler = pipe.scheduler
        if not cfg_active:
            self._start_call_if_new(scheduler, first_t, rows)
            self.nfe_per_sample += 1
            self.calls += 1
            return original(*args, **kwargs)
        if rows % 2:
            raise RuntimeError(
                f"{type(pipe).__name__} called its denoiser with {rows} rows under CFG; diffguide needs the "
                "[uncond, cond] batch of one call"
            )
        batch = rows // 2
        self._start_call_if_new(scheduler, first_t, batch)

        timesteps = getattr(scheduler, "timesteps", None)
        try:
            kind = prediction_kind(scheduler)
            alpha, sigma = alpha_sigma(scheduler, timestep if timestep is not None else 0.0)
        except ValueError as err:
            if self.rule.space == "denoised":
                raise ValueError(
                    f"{self.rule!r} works on denoised (x0) predictions, which need one alpha/sigma per "
                    f"timestep ({err}); use the rule with space='model_output'"
                ) from None
            kind, alpha = None, torch.full((1,), float("nan"), dtype=torch.float64)
            sigma = alpha
        if alpha.numel() == rows:
            alpha, sigma = alpha[batch:], sigma[batch:]
        alpha, sigma = alpha.expand(batch), sigma.expand(batch)
        step = GuidanceStep(
            step_index=self.step_index,
            num_steps=len(timesteps) if timesteps is not None else None,
            timestep=first_t,
            guidance_scale=guidance_scale,
            alpha=alpha,
            sigma=sigma,
        )
        uncond_mask = self.rule.uncond_mask(batch, step).bool().cpu()
        uncond_rows = uncond_mask.nonzero().flatten()
        index = torch.cat([uncond_rows, torch.arange(batch, rows)])
        for name in names:
            bound.arguments[name] = _select_rows(bound.arguments[name], rows, index)
        output = original(*bound.args, **bound.kwargs)
        self.nfe_per_sample += 1 + uncond_mask.long()
        self.calls += 1

        prediction = _prediction_of(output)
        # learned-variance models output [prediction, variance]; inputs may carry extra
        # conditioning channels after the latents (inpainting), so x_t is the first channels
        learned_variance = prediction.shape[1] == 2 * sample.shape[1]
        channels = sample.shape[1] if learned_variance else prediction.shape[1]
        extra = prediction[len(uncond_rows) :, channels:] if learned_variance else None
        prediction = prediction[:, :channels] if learned_variance else prediction
        cond = prediction[len(uncond_rows) :]
        uncond = cond.clone()
        uncond[uncond_mask.to(cond.device)] = prediction[: len(uncond_rows)]
        x_t = sample[batch:, :channels]

        if self.rule.space == "denoised":
            to_x0 = [to_denoised(p.double(), x_t.double(), alpha, sigma, kind) for p in (cond, uncond)]
            guided_x0 = self.rule.combine(to_x0[0], to_x0[1], uncond_mask, step)
            guided = from_denoised(guided_x0, x_t.double(), alpha, sigma, kind).to(cond.dtype)
        else:
            guided = self.rule.combine(cond, uncond, uncond_mask, step)

        rescale = float(getattr(pipe, "guidance_rescale", 0.0) or 0.0)
        if rescale > 0:
            from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

            guided = rescale_noise_cfg(guided, cond, guidance_rescale=rescale)
        if learned_variance:
            guided = torch.cat([guided, extra], dim=1)
        return _with_prediction(output, torch.cat([guided, guided]))


def _hook(pipe) -> GuidanceHook | None:
    registry = getattr(_denoiser(pipe), "_diffusers_hook", None)
    return registry.get_hook(HOOK_NAME) if registry is not None else None


def apply(pipe, rule: GuidanceRule):
    """Attach ``rule`` to ``pipe`` (replacing any rule attached before); returns ``pipe``."""
    if not isinstance(rule, GuidanceRule):
        raise TypeError(
            f"expected a diffguide guidance rule (CFG, APG, AdaptiveGuidance, LinearAG), got {rule!r}"
        )
    check_pipeline(pipe)
    remove(pipe)
    registry = HookRegistry.check_if_exists_or_initialize(_denoiser(pipe))
    registry.register_hook(GuidanceHook(pipe, rule), HOOK_NAME)
    return pipe


def remove(pipe):
    """Detach diffguide's rule from ``pipe``, restoring the denoiser's forward; returns ``pipe``."""
    registry = getattr(_denoiser(pipe), "_diffusers_hook", None)
    if registry is not None and registry.get_hook(HOOK_NAME) is not None:
        registry.remove_hook(HOOK_NAME, recurse=False)
    return pipe


def stats(pipe) -> dict:
    """Network evaluations of the last sampling call: ``nfe`` (mean per sample),
    ``nfe_per_sample``, ``steps``, and the attached ``rule``."""
    hook = _hook(pipe)
    if hook is None:
        raise ValueError("no diffguide rule is attached to this pipeline; use dg.apply(pipe, rule) first")
    counts = hook.nfe_per_sample
    return {
        "nfe": float(counts.double().mean()) if len(counts) else 0.0,
        "nfe_per_sample": counts.tolist(),
        "steps": hook.calls,
        "rule": hook.rule,
    }


@contextmanager
def guided(pipe, rule: GuidanceRule) -> Iterator:
    """``with dg.guided(pipe, rule): pipe(...)``: the rule is attached inside the block only,
    and any rule attached before is restored after it."""
    previous = _hook(pipe)
    apply(pipe, rule)
    try:
        yield pipe
    finally:
        remove(pipe)
        if previous is not None:
            apply(pipe, previous.rule)
