"""What every guidance adapter needs, whatever way its pipeline does CFG.

A :class:`GuidanceSession` belongs to one pipeline with a rule attached. Per sampling call it
resets the rule; per denoising step it builds the :class:`~diffguide.guidance.base.GuidanceStep`
(step index, CFG scale from where the support table says it lives, the noise level from the
scheduler's own sigmas), asks the rule which samples need an unconditional evaluation, converts
predictions to the rule's space and back, and counts network evaluations per sample.

The noise level is never derived from the denoiser's ``timestep`` argument, whose convention
varies by pipeline (t/1000 on Flux and Qwen, 1 - t/1000 on Lumina2, t x scale on Sana): it is
``scheduler.sigmas[i]`` with ``i`` the scheduler's ``step_index`` (or ``begin_index`` before the
first step, or the step counted here), ``alphas_cumprod`` at ``timesteps[i]`` where a scheduler
keeps no sigmas (DDIM, DDPM).
"""

from __future__ import annotations

import inspect
import math
import weakref
from typing import Any

import torch
from diffusers.hooks import ModelHook

from ..guidance.base import GuidanceRule, GuidanceStep
from ..guidance.cfg import CFG
from ..prediction import from_denoised, noise_level, prediction_kind, to_denoised
from .support import PipelineSupport


def select_rows(value: Any, rows: int, index: torch.Tensor) -> Any:
    """``value`` with every batch-sized tensor (first dim ``rows``) restricted to ``index``."""
    if isinstance(value, torch.Tensor):
        return value[index.to(value.device)] if value.ndim > 0 and value.shape[0] == rows else value
    if isinstance(value, dict):
        return {key: select_rows(item, rows, index) for key, item in value.items()}
    if isinstance(value, list | tuple):  # e.g. IP-Adapter's image_embeds, a list of batch tensors
        return type(value)(select_rows(item, rows, index) for item in value)
    return value


def select_arguments(
    arguments: dict[str, Any], rows: int, index: torch.Tensor, support: PipelineSupport
) -> dict[str, Any]:
    """The denoiser's bound arguments restricted to the rows ``index``: batch tensors, nested in
    dicts and lists too; the table's unbatched arguments (Flux's position ids) untouched."""
    return {
        name: value if name in support.unbatched else select_rows(value, rows, index)
        for name, value in arguments.items()
    }


class DenoiserCall:
    """The arguments of one denoiser call, read without binding them (the hot path) and
    bound only to restrict them to some rows."""

    def __init__(self, signature: inspect.Signature, args: tuple, kwargs: dict):
        self.signature, self.args, self.kwargs = signature, args, kwargs
        self._names = list(signature.parameters)

    def get(self, name: str, default: Any = None) -> Any:
        if name in self.kwargs:
            return self.kwargs[name]
        position = self._names.index(name) if name in self._names else len(self.args)
        return self.args[position] if position < len(self.args) else default

    @property
    def sample(self) -> torch.Tensor:
        """The noisy input x_t (the first argument), with any extra channels or tokens."""
        return self.args[0] if self.args else self.kwargs[self._names[0]]

    @property
    def first_timestep(self) -> float:
        timestep = self.get("timestep", self.get("timesteps"))
        return float(torch.as_tensor(timestep).reshape(-1)[0]) if timestep is not None else 0.0

    def restricted(self, rows: int, index: torch.Tensor, support: PipelineSupport) -> tuple[tuple, dict]:
        """``(args, kwargs)`` with every batch argument restricted to the rows ``index``."""
        bound = self.signature.bind(*self.args, **self.kwargs)
        bound.arguments.update(select_arguments(dict(bound.arguments), rows, index, support))
        return bound.args, bound.kwargs


def prediction_of(output: Any) -> torch.Tensor:
    """The prediction tensor of a denoiser's output (tuple or ``*Output`` dataclass)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple):
        return output[0]
    return output.sample


def with_prediction(output: Any, prediction: torch.Tensor) -> Any:
    """``output`` (same type) carrying ``prediction`` instead."""
    if isinstance(output, torch.Tensor):
        return prediction
    if isinstance(output, tuple):
        return (prediction, *output[1:])
    return type(output)(sample=prediction)


def leading(sample: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The part of the denoiser input ``sample`` that the prediction ``like`` covers: its first
    channels (inpainting adds mask channels) or tokens (edit pipelines add image tokens)."""
    return sample[:, : like.shape[1]] if sample.shape[1] != like.shape[1] else sample


def nfe_stats(counts: torch.Tensor, steps: int, rule: GuidanceRule) -> dict:
    """``dg.stats``' answer: ``nfe`` (mean per sample), ``nfe_per_sample``, ``steps``, ``rule``."""
    return {
        "nfe": float(counts.double().mean()) if len(counts) else 0.0,
        "nfe_per_sample": counts.tolist(),
        "steps": steps,
        "rule": rule,
    }


class RuleHook(ModelHook):
    """What the batched and two-call hooks share: the session, the denoiser component they sit
    on, and the signature through which they read the denoiser's arguments."""

    def __init__(self, session: GuidanceSession, component: str):
        super().__init__()
        self.session = session
        self.component = component
        self._signature: inspect.Signature | None = None

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        self._signature = inspect.signature(module.forward)
        return module

    def read_call(self, args: tuple, kwargs: dict) -> DenoiserCall:
        """The denoiser call about to run, refused outside a call of the rule's pipeline."""
        self.session.require_call()
        return DenoiserCall(self._signature, args, kwargs)


class GuidanceSession:
    """One rule on one pipeline: per-call reset, per-step :class:`GuidanceStep`, NFE counts."""

    def __init__(self, pipe, rule: GuidanceRule, support: PipelineSupport, class_name: str):
        self.rule = rule
        #: plain CFG: where every sample is guided the pipeline's own output is the rule's, as is
        self.is_plain_cfg = type(rule) is CFG
        self.support = support
        self.class_name = class_name
        self._pipe = weakref.ref(pipe)
        #: arguments of the pipeline call in progress (defaults filled), ``None`` outside one
        self.call_arguments: dict[str, Any] | None = None
        self._timesteps_seen: torch.Tensor | None = None
        self._last_timestep: float | None = None
        self.batch_size: int | None = None
        self.steps = 0
        self.offset = 0
        self.nfe_per_sample = torch.zeros(0, dtype=torch.long)
        #: two-call pipelines: the conditional half of the step in progress
        self.pending: dict[str, Any] | None = None
        #: the denoiser components the rule is attached to (set by ``dg.apply``)
        self.components: list[str] = []

    @property
    def pipe(self):
        pipe = self._pipe()
        if pipe is None:
            raise RuntimeError("the pipeline this diffguide rule was attached to no longer exists")
        return pipe

    # -- calls ------------------------------------------------------------------------------------

    def begin_call(self, arguments: dict[str, Any]) -> None:
        """A pipeline call starts: the rule and the counts start afresh at its first step."""
        self.call_arguments = arguments
        self._timesteps_seen = None
        self._last_timestep = None
        self.batch_size = None
        self.pending = None
        try:
            self.check_call()
        except Exception:
            self.call_arguments = None
            raise

    def end_call(self, failed: bool = False) -> None:
        """The pipeline call ended (``failed``: by an exception, which no check may mask)."""
        try:
            if failed:
                self.pending = None
            else:
                self.finish_pending()
        finally:
            self.call_arguments = None

    def finish_pending(self) -> None:
        """Close a two-call step whose pipeline made no unconditional call (Lumina2's truncation)."""
        pending, self.pending = self.pending, None
        if pending is None or pending.get("passthrough") is not None:
            return
        self.end_step(None)
        if self.support.needs_negative:  # the call's arguments promised true CFG
            raise RuntimeError(
                f"{self.class_name} made no unconditional call at step {self.step_index - 1}, so its true CFG is "
                f"off and {self.rule!r} has no effect: pass true_cfg_scale > 1 and a negative_prompt (or every "
                "negative embedding the pipeline asks for, pooled ones included)"
            )

    def require_call(self) -> None:
        """Refuse a denoiser call outside a call of the pipeline the rule was applied to: the
        rule would read another pipeline's scale and scheduler."""
        if self.call_arguments is None:
            raise RuntimeError(
                f"the diffguide rule on this denoiser was applied to a {self.class_name}, and the denoiser ran "
                "outside a call of it (another pipeline sharing it, e.g. from_pipe, or a direct call): "
                "dg.apply the rule to the pipeline you call"
            )

    def check_call(self) -> None:
        """Refuse a call the adapter cannot serve, or in which the pipeline will not run CFG
        although the rule needs it."""
        args = self.call_arguments
        for name, reason in self.support.refused_arguments.items():
            if args.get(name) is not None:
                raise ValueError(f"{self.class_name} with {name}= {reason}")
        if not self.support.needs_negative:
            return
        scale = self.pipeline_scale("*")
        has_negative = (
            args.get("negative_prompt") is not None or args.get("negative_prompt_embeds") is not None
        )
        if not (scale > 1 and has_negative):
            raise ValueError(
                f"{self.class_name} runs true CFG only with true_cfg_scale > 1 and a negative prompt "
                f"(got true_cfg_scale={scale:g}, negative prompt {'given' if has_negative else 'missing'}), "
                f"so {self.rule!r} would have no effect: pass true_cfg_scale > 1 and a negative_prompt"
            )

    def start_step(self, timestep: float, batch_size: int) -> None:
        """Start a denoising step; a new sampling call is detected here when no call wrapper told
        us (new ``scheduler.timesteps`` tensor, a rising timestep, or another batch size)."""
        scheduler = self.pipe.scheduler
        timesteps = getattr(scheduler, "timesteps", None)
        if isinstance(timesteps, torch.Tensor):
            new_call = timesteps is not self._timesteps_seen
        else:
            new_call = self._last_timestep is None or timestep > self._last_timestep
        if new_call or batch_size != self.batch_size:
            self.rule.reset()
            self.steps = 0
            self.batch_size = batch_size
            self.nfe_per_sample = torch.zeros(batch_size, dtype=torch.long)
            self.offset = self._first_step_index(scheduler, timestep)
        self._timesteps_seen = timesteps if isinstance(timesteps, torch.Tensor) else None
        self._last_timestep = timestep

    @staticmethod
    def _first_step_index(scheduler, timestep: float) -> int:
        """Where in the schedule the first step of a call is (img2img starts part-way down)."""
        begin = getattr(scheduler, "begin_index", None)
        if begin is not None:
            return int(begin)
        timesteps = getattr(scheduler, "timesteps", None)
        if isinstance(timesteps, torch.Tensor):
            matches = (timesteps.detach().cpu().double() == timestep).nonzero().flatten()
            if len(matches):
                return int(matches[0])
        return 0

    @property
    def step_index(self) -> int:
        return self.offset + self.steps

    def unguided_step(self, component: str, timestep: float, batch_size: int) -> None:
        """A step in which the pipeline runs no CFG on ``component``: every rule gives the
        conditional prediction there. A rule other than CFG on a call in which no denoiser runs
        CFG would have no effect at all, so that is refused (Wan 2.2 may guide one expert only)."""
        if not self.is_plain_cfg and not any(
            self.cfg_active(name) for name in self.components or [component]
        ):
            where, name = self.support.scale_source(component).split(":", 1)
            name = name if where == "call" else name.lstrip("_")
            raise ValueError(
                f"{self.class_name} runs no CFG in this call ({name}={self.pipeline_scale(component):g}), so "
                f"{self.rule!r} would have no effect: pass {name} > 1, or call the pipeline without the rule"
            )
        self.start_step(timestep, batch_size)
        self.end_step(None)

    def end_step(self, uncond_mask: torch.Tensor | None) -> None:
        """Count this step's evaluations: one conditional per sample, plus the unconditional ones."""
        self.nfe_per_sample += 1 if uncond_mask is None else 1 + uncond_mask.long()
        self.steps += 1

    # -- the step ---------------------------------------------------------------------------------

    def pipeline_scale(self, component: str) -> float:
        """The CFG scale the pipeline itself applies, read where the table says it lives."""
        where, name = self.support.scale_source(component).split(":", 1)
        if where == "call":
            if self.call_arguments is None:
                raise RuntimeError(
                    f"{self.class_name} keeps its CFG scale in the {name!r} argument of its call, which "
                    "diffguide reads when the pipeline is called as pipe(...); call it that way"
                )
            value = self.call_arguments.get(name)
        else:
            value = getattr(self.pipe, name, None)
            if value is None and name.endswith("_2"):  # Wan 2.2 without guidance_scale_2 uses the first
                value = getattr(self.pipe, name[:-2], None)
        return float(value) if value is not None else 1.0

    def cfg_active(self, component: str) -> bool:
        """Whether CFG acts in this call on ``component``: the pipeline's own
        ``do_classifier_free_guidance`` where it has one, and a scale above 1 (Wan 2.2 makes the
        unconditional call at ``guidance_scale_2=1`` too, where it changes nothing)."""
        prop = getattr(type(self.pipe), "do_classifier_free_guidance", None)
        if isinstance(prop, property) and not self.pipe.do_classifier_free_guidance:
            return False
        return self.effective_scale(component) > self.support.min_scale

    def effective_scale(self, component: str) -> float:
        """The scale ``s`` of the pipeline's CFG written as ``u + s (c - u)``: its own scale,
        plus one where it combines ``c + w (c - u)`` (Cosmos, Kandinsky 3)."""
        return self.pipeline_scale(component) + self.support.scale_offset

    def guidance_step(self, component: str, batch_size: int, timestep: float) -> GuidanceStep:
        """The step as the rule sees it; alpha/sigma are NaN where the scheduler gives none."""
        scheduler = self.pipe.scheduler
        index = getattr(scheduler, "step_index", None)
        index = self.step_index if index is None else index
        try:
            if self.support.edm_sigmas:  # the denoiser sees (x0 + sigma noise) / (1 + sigma)
                edm = float(scheduler.sigmas[index])
                alpha = torch.tensor([1 / (1 + edm)], dtype=torch.float64)
                sigma = torch.tensor([edm / (1 + edm)], dtype=torch.float64)
            else:
                alpha, sigma = noise_level(scheduler, index)
        except ValueError as err:
            if self.rule.uses_noise_level:
                raise ValueError(
                    f"{self.rule!r} needs the noise level of each step, which {type(scheduler).__name__} does not "
                    f"give ({err}); use a rule that does not read it: CFG, LinearAG, or APG/AG with space='model_output'"
                ) from None
            alpha = sigma = torch.full((1,), math.nan, dtype=torch.float64)
        timesteps = getattr(scheduler, "timesteps", None)
        return GuidanceStep(
            step_index=self.step_index,
            num_steps=len(timesteps) if timesteps is not None else None,
            timestep=timestep,
            guidance_scale=self.effective_scale(component),
            alpha=alpha.expand(batch_size),
            sigma=sigma.expand(batch_size),
        )

    def uncond_mask(self, step: GuidanceStep) -> torch.Tensor:
        """Bool (B,) on the CPU: which samples need a real unconditional evaluation."""
        mask = self.rule.uncond_mask(len(step.alpha), step).bool().cpu()
        if mask.shape != (len(step.alpha),):
            raise ValueError(f"{self.rule!r}.uncond_mask returned shape {tuple(mask.shape)}")
        return mask

    def combine(
        self,
        cond: torch.Tensor,
        uncond: torch.Tensor,
        uncond_mask: torch.Tensor,
        x_t: torch.Tensor,
        step: GuidanceStep,
    ) -> torch.Tensor:
        """The rule's guided model output (see :func:`combine_in_space`)."""
        if self.rule.space == "denoised" and self.support.x0_refused:
            raise ValueError(
                f"{self.rule!r} works on denoised (x0) predictions, which diffguide cannot form on "
                f"{self.class_name}: {self.support.x0_refused}; use the rule with space='model_output'"
            )
        kind = "reverse_flow" if self.support.negated_output else prediction_kind(self.pipe.scheduler)
        return combine_in_space(self.rule, cond, uncond, uncond_mask, x_t, step, kind)


def combine_in_space(
    rule: GuidanceRule,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    uncond_mask: torch.Tensor,
    x_t: torch.Tensor,
    step: GuidanceStep,
    kind: str,
) -> torch.Tensor:
    """``rule.combine`` in the rule's space, returned as a model output: x0-space rules get
    float64 denoised predictions of the ``kind`` model at ``x_t`` (step's alpha/sigma)."""
    if rule.space != "denoised":
        return rule.combine(cond, uncond, uncond_mask, step)
    x_t = x_t.double()
    c0, u0 = (to_denoised(p.double(), x_t, step.alpha, step.sigma, kind) for p in (cond, uncond))
    guided = rule.combine(c0, u0, uncond_mask, step)
    return from_denoised(guided, x_t, step.alpha, step.sigma, kind).to(cond.dtype)
