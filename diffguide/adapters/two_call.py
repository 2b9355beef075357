"""The adapter for pipelines that call the denoiser twice per step: conditional, then unconditional.

Flux (true CFG), Flux2-Klein, Qwen-Image, HunyuanVideo, CogView4, Wan, Chroma, Lumina2, Cosmos 2
and Kandinsky 5 run ``c = f(x, cond)`` and ``u = f(x, uncond)`` as separate calls and combine
``u + s (c - u)`` themselves (then, on Qwen-Image and Lumina2, renormalise per token to ``|c|``).

Branches are told apart by the ``cache_context`` name diffusers pushes into stateful hooks
(``"cond"``/``"uncond"``, or a guider's ``"pred_cond"``/``"pred_uncond"``); where a pipeline sets
none, the first call at a timestep is the conditional one and a second call at the same
timestep the unconditional one.

On the conditional call the hook asks the rule which samples need ``u`` and returns ``c``
untouched. On the unconditional call it runs the network on those samples only (none at all
when no sample needs it), lets the rule form ``g``, and returns

    u' = (g - s c) / (1 - s)          (s > 1, computed in float64)

so that the pipeline's own ``u' + s (c - u')`` is ``g``. Two cases are exact: a sample whose
``g`` is ``c`` gets ``u' = c``, and one whose ``g`` is bit for bit CFG's ``u + s (c - u)`` gets
its real ``u`` back, so CFG through diffguide is the pipeline's own output in any dtype. The pipeline's later steps (renormalisation, negation, the scheduler) run on
``g`` as they would on CFG's result. Rounding: casting ``u'`` to the model dtype adds
``(s - 1) eps |u'|`` to ``g`` (measured in docs/pipelines.md: about 1e-7 relative in fp32,
1e-2 in bf16 at s = 5, the size of the pipeline's own bf16 CFG rounding).
"""

from __future__ import annotations

import math

import torch
from diffusers.hooks.hooks import BaseState, StateManager

from ..guidance.base import cfg_combine
from ..versions import cache_context_name
from .core import DenoiserCall, GuidanceSession, RuleHook, leading, prediction_of, with_prediction

COND_NAMES = ("cond", "pred_cond")
UNCOND_NAMES = ("uncond", "pred_uncond")


class _NoState(BaseState):
    def reset(self, *args, **kwargs) -> None:
        pass


def _rows(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like.device).reshape(-1, *([1] * (like.ndim - 1)))


def return_through_formula(
    guided: torch.Tensor, cond: torch.Tensor, scale: float, uncond: torch.Tensor | None = None
) -> torch.Tensor:
    """``u'`` with ``u' + scale (cond - u') == guided``, per sample: ``cond`` where ``guided`` is
    ``cond``; the real ``uncond`` where ``guided`` is bit for bit CFG's ``uncond + scale (cond -
    uncond)`` (so CFG's samples are the pipeline's own, in any dtype); elsewhere
    ``(guided - scale cond) / (1 - scale)``, computed in float64."""
    if scale == 1:
        raise ValueError("a pipeline applying CFG at scale 1 ignores its unconditional prediction")
    is_cond = (guided == cond).flatten(1).all(dim=1)
    is_cfg = torch.zeros_like(is_cond)
    if uncond is not None:
        is_cfg = (guided == cfg_combine(cond, uncond, scale)).flatten(1).all(dim=1) & ~is_cond
    exact = torch.where(_rows(is_cfg, cond), uncond, cond) if bool(is_cfg.any()) else cond
    if bool((is_cond | is_cfg).all()):
        return exact
    inverted = ((guided.double() - scale * cond.double()) / (1 - scale)).to(cond.dtype)
    return torch.where(_rows(is_cond | is_cfg, cond), exact, inverted)


class TwoCallGuidanceHook(RuleHook):
    """``ModelHook`` running a session's rule on a denoiser called once per branch."""

    _is_stateful = True  # so that diffusers pushes cache_context names into ``self.context``

    def __init__(self, session: GuidanceSession, component: str):
        super().__init__(session, component)
        self.context = StateManager(_NoState)

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        return module

    def _branch(self, timestep: float) -> str:
        context = cache_context_name(self.context)
        if context is not None:
            if context in COND_NAMES:
                return "cond"
            if context in UNCOND_NAMES:
                return "uncond"
            raise RuntimeError(
                f"{self.session.class_name} called its denoiser under cache_context({context!r}), which is "
                "neither a conditional nor an unconditional branch; diffguide cannot tell what it guides"
            )
        pending = self.session.pending
        same_step = pending is not None and pending["component"] == self.component
        return "uncond" if same_step and pending["timestep"] == timestep else "cond"

    def _combine(self, cond, uncond, uncond_mask, x_t, step, call: DenoiserCall) -> torch.Tensor:
        """The session's combine over the generated tokens; reference-image tokens (Qwen-Image
        Edit), which the pipeline slices off, keep the conditional prediction."""
        if not self.session.support.reference_tokens:
            return self.session.combine(cond, uncond, uncond_mask, x_t, step)
        tokens = math.prod(call.get("img_shapes")[0][0])
        generated = self.session.combine(
            cond[:, :tokens], uncond[:, :tokens], uncond_mask, x_t[:, :tokens], step
        )
        return torch.cat([generated, cond[:, tokens:]], dim=1)

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        call = self.read_call(args, kwargs)
        if self._branch(call.first_timestep) == "cond":
            return self._conditional_call(call)
        return self._unconditional_call(call)

    # -- the two calls of a step ------------------------------------------------------------------

    def _conditional_call(self, call: DenoiserCall):
        """Run ``c`` as the pipeline asked and keep what the unconditional call needs."""
        session, timestep, rows = self.session, call.first_timestep, call.sample.shape[0]
        session.finish_pending()  # the previous step ran without an unconditional call
        output = self.fn_ref.original_forward(*call.args, **call.kwargs)
        if not session.cfg_active(self.component):
            # every rule gives the conditional prediction; an unconditional call the pipeline still
            # makes (Wan 2.2 at guidance_scale_2=1) gets it back unevaluated
            session.unguided_step(self.component, timestep, rows)
            session.pending = {"component": self.component, "timestep": timestep, "passthrough": output}
            return output
        session.start_step(timestep, rows)
        step = session.guidance_step(self.component, rows, timestep)
        session.pending = {
            "component": self.component,
            "timestep": timestep,
            "step": step,
            "uncond_mask": session.uncond_mask(step),
            "cond": prediction_of(output),
            "x_t": call.sample,
            "output": output,
        }
        return output

    def _unconditional_call(self, call: DenoiserCall):
        """Evaluate ``u`` where the rule asks for it and return ``u'`` that makes the pipeline's
        formula give the rule's ``g``."""
        session, pending = self.session, self.session.pending
        if pending is None:
            raise RuntimeError(
                f"{session.class_name} made an unconditional denoiser call without a conditional one before it"
            )
        session.pending = None
        if pending.get("passthrough") is not None:
            return pending["passthrough"]
        step, uncond_mask, cond = pending["step"], pending["uncond_mask"], pending["cond"]
        if uncond_mask.all() and session.is_plain_cfg:  # the pipeline's own formula is the rule
            session.end_step(uncond_mask)
            return self.fn_ref.original_forward(*call.args, **call.kwargs)
        output, uncond = self._uncond_prediction(call, cond, uncond_mask)
        session.end_step(uncond_mask)
        guided = self._combine(cond, uncond, uncond_mask, leading(pending["x_t"], cond), step, call)
        returned = return_through_formula(guided, cond, step.guidance_scale, uncond)
        if output is None or prediction_of(output).shape != cond.shape:
            output = pending["output"]  # no full unconditional output to reuse: the conditional's type
        return with_prediction(output, returned)

    def _uncond_prediction(self, call: DenoiserCall, cond: torch.Tensor, uncond_mask: torch.Tensor):
        """``(output or None, u)``: the network on the samples asked for only (none when no sample
        needs it); the other rows are a copy of ``cond``, as the rule contract says."""
        original = self.fn_ref.original_forward
        if uncond_mask.all():
            output = original(*call.args, **call.kwargs)
            return output, prediction_of(output)
        uncond, output = cond.clone(), None
        if uncond_mask.any():
            index = uncond_mask.nonzero().flatten()
            args, kwargs = call.restricted(call.sample.shape[0], index, self.session.support)
            output = original(*args, **kwargs)
            uncond[uncond_mask.to(cond.device)] = prediction_of(output)
        return output, uncond
