"""diffguide rules as a diffusers guider, for modular pipelines (and classic ones with a ``guider``).

Modular pipelines do CFG through a ``guider`` component (``diffusers.guiders.BaseGuidance``) instead of
inline code, so there a rule is not attached with hooks: :func:`as_guider` wraps it in a
:class:`DiffguideGuidance` and ``pipe.update_components(guider=dg.as_guider(rule, scheduler=pipe))``
installs it. Per step the denoise block calls ``set_state(step, num_inference_steps, timestep)``, then
``prepare_inputs`` (one batch per entry of ``num_conditions``), per batch ``prepare_models(denoiser)``,
the denoiser and ``cleanup_models(denoiser)``, and finally ``guider(batches)``, which reaches ``forward``.

How the rule contract (``diffguide/guidance/base.py``) is met:

- **Per-call reset.** diffusers has no reset hook; the rule (and the NFE counts) start afresh when
  ``set_state`` is given step 0, *or a step not after the last one seen*: Wan 2.2 hands the low-noise
  steps to ``guider_2``, which never sees step 0.
- **Skipping is batch-level.** A guider decides how many batches run, not which rows are in them. At each
  step the rule's ``uncond_mask`` is asked once; ``num_conditions`` is 1 when no sample asks for an
  unconditional evaluation (AG after every sample converged, an interval outside its band, LinearAG's
  estimate and conditional steps), else 2 and every sample gets a real one. Rows the rule did not ask
  for still reach ``combine`` as a copy of the conditional prediction with ``uncond_mask`` unset, so the
  result is what the per-sample adapters of ``dg.apply`` give; only the evaluation count can be higher.
  ``nfe_per_sample`` / :meth:`DiffguideGuidance.stats` count the evaluations actually run.
- **Before the loop** (encoders ask ``num_conditions`` to decide whether to encode the negative prompt),
  the answer is 2 whenever guidance is enabled and ``guidance_scale != 1``: a rule cannot be asked
  before its steps. "Before the loop" is any moment outside a step (``set_state`` opens one and
  ``forward`` closes it), since diffusers leaves the previous call's ``_step`` in place.
- **Outside** ``[start, stop)`` **, disabled, or at** ``guidance_scale == 1`` the guider behaves as
  diffusers' ``ClassifierFreeGuidance``: one batch, the conditional prediction, the rule not consulted.

**x_t and the noise level.** Rules in the denoised (x0) space (APG and AG by default) need ``x_t`` and
the step's (alpha, sigma), ``GuidanceInterval`` needs the noise level for its band, and a guider is given
neither (only SD3's block happens to route the latents through ``prepare_inputs``; the ``timestep`` it
gets has a per-pipeline convention; it never sees the pipeline).

- ``x_t``: ``prepare_models(denoiser)`` runs right before each batch, so it registers a forward pre-hook
  recording the denoiser's first input (positional, or ``sample`` / ``hidden_states`` / ``x``) and
  ``cleanup_models`` removes it. That input is exactly the ``x_t`` the scheduler's noise level
  describes: on SDXL it is the latents after Euler's ``scale_model_input`` (``x / sqrt(1 + s^2)``,
  i.e. ``alpha x0 + sigma eps`` with the alpha and sigma of :func:`diffguide.prediction.noise_level`),
  and on the flow models (SD3, QwenImage's packed tokens, Wan) it is the unscaled latents
  ``(1 - s) x0 + s noise``. It is also what the hook adapters of ``dg.apply`` convert with. Extra
  channels or tokens (image conditioning) are cut off as in ``dg.apply``.
- The noise level is read from the scheduler, never from the ``timestep`` the guider is given (its
  convention varies by pipeline): :func:`~diffguide.prediction.noise_level` at the scheduler's
  ``step_index`` (else ``begin_index`` plus the step), and the prediction type from its config. The
  guider therefore has to be *bound* to the scheduler: ``as_guider(rule, scheduler=pipe)`` or, after
  ``from_pretrained``, ``guider.bind(pipe)``. Binding the pipeline (kept by weak reference) rather
  than the scheduler object follows a later ``pipe.update_components(scheduler=...)``. A rule that
  needs the noise level raises a one-line error naming the fix when the guider is unbound.
- The conversion itself is :func:`diffguide.adapters.core.combine_in_space`, shared with ``dg.apply``.

**Config.** ``method`` (a :data:`diffguide.guidance.METHODS` name) and ``params`` (the rule's constructor
arguments, read from its signature and attributes; JSON, ``inf`` included, LinearAG's coefficients as
nested lists) plus diffusers' ``guidance_scale``, ``start``, ``stop`` and ``enabled``, so
``save_pretrained`` writes ``guider_config.json`` and ``from_pretrained`` rebuilds an equal rule. The
binding to a scheduler is not config and must be redone after ``from_pretrained`` (and ``new()``).
``as_guider`` runs the very rule object it is given, so its state (AG's ``similarities``) stays readable.

Known limits: the denoiser's first input must be a tensor (Z-Image's transformer takes a list of
latents, so x0-space rules cannot run there); ``guidance_rescale`` is not offered (a rule of its own
would be the place); pipelines that guide without their guider (Ideogram 4) are out of reach.
"""

from __future__ import annotations

import inspect
import math
import weakref
from typing import Any

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.guiders.guider_utils import BaseGuidance, GuiderOutput

from ..guidance import CFG, GuidanceRule, GuidanceStep, LinearAG, make_rule, method_of
from ..prediction import noise_level, prediction_kind
from .core import combine_in_space, leading, nfe_stats

#: names under which denoisers take their noisy input when it is passed by keyword
_SAMPLE_NAMES = ("sample", "hidden_states", "x")


def _jsonable(name: str, value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, tuple | list):
        return [_jsonable(name, item) for item in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"parameter {name}={value!r} of the rule cannot be written to a guider config")


def rule_config(rule: GuidanceRule) -> tuple[str, dict[str, Any]]:
    """``(method, params)`` of a built-in rule: its method name and constructor arguments, read from
    the signature and the attributes of the same names (JSON-able)."""
    try:
        method = method_of(rule).name
    except ValueError as err:
        raise TypeError(
            f"as_guider runs diffguide's own rules: {err}; a guider config must rebuild the rule"
        ) from None
    params = {}
    for name, parameter in inspect.signature(type(rule).__init__).parameters.items():
        if name == "self" or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        if not hasattr(rule, name):
            raise TypeError(
                f"{type(rule).__name__} keeps no attribute {name!r} for its argument of that name"
            )
        params[name] = _jsonable(name, getattr(rule, name))
    return method, params


def rule_from_config(method: str, params: dict[str, Any]) -> GuidanceRule:
    """The rule that :func:`rule_config` describes."""
    params = dict(params)
    if method == "linear-ag":  # make_rule reads LinearAG from a file; the config holds the numbers
        return LinearAG(**params)
    return make_rule(method, **params)


class DiffguideGuidance(BaseGuidance):
    """A diffusers guider running a diffguide rule (see the module docstring for the design).

    Args:
        method: the rule's method name (``"cfg"``, ``"apg"``, ``"ag"``, ``"interval"``, ``"linear-ag"``).
        params: the rule's constructor arguments.
        guidance_scale: the CFG scale ``w`` the rule sees.
        start, stop: fractions of the steps outside of which the conditional prediction is used alone.
        enabled: whether guidance runs at all (some denoise loops call ``enable()`` themselves).
    """

    _input_predictions = ["pred_cond", "pred_uncond"]

    @register_to_config
    def __init__(
        self,
        method: str = "cfg",
        params: dict | None = None,
        guidance_scale: float = 7.5,
        start: float = 0.0,
        stop: float = 1.0,
        enabled: bool = True,
    ):
        super().__init__(start, stop, enabled)
        self.guidance_scale = guidance_scale
        self.rule: GuidanceRule = rule_from_config(method, params or {})
        if enabled and math.isclose(guidance_scale, 1.0) and type(self.rule) is not CFG:
            raise ValueError(
                f"guidance_scale={guidance_scale:g} runs no CFG, so {self.rule!r} would have no effect: "
                "pass another guidance_scale"
            )
        self._source: Any = None  # a scheduler, or a weak reference to a pipeline holding one
        self._hooks: list = []
        self._last_step: int | None = None
        self._live = False  # inside a step: between set_state and forward
        self._guidance_step: GuidanceStep | None = None
        self._mask: torch.Tensor | None = None
        self._x_t: torch.Tensor | None = None
        self._size: int | None = None  # the batch size prepare_inputs saw
        self.steps = 0
        self.nfe_per_sample = torch.zeros(0, dtype=torch.long)

    # -- binding ----------------------------------------------------------------------------------

    def bind(self, source) -> DiffguideGuidance:
        """Give the guider the scheduler its noise levels come from: a scheduler, or a pipeline whose
        ``scheduler`` is read at every step (kept by weak reference). Returns the guider."""
        if hasattr(source, "set_timesteps"):
            self._source = source
        elif hasattr(source, "scheduler"):
            self._source = weakref.ref(source)
        else:
            raise TypeError(
                f"bind needs a scheduler or a pipeline with a scheduler, got {type(source).__name__}"
            )
        return self

    @property
    def scheduler(self):
        """The bound scheduler, or ``None``."""
        if isinstance(self._source, weakref.ref):
            pipe = self._source()
            return None if pipe is None else getattr(pipe, "scheduler", None)
        return self._source

    # -- diffusers' state -------------------------------------------------------------------------

    def set_state(self, step: int, num_inference_steps: int, timestep: torch.LongTensor) -> None:
        super().set_state(step, num_inference_steps, timestep)
        if self._last_step is None or step == 0 or step <= self._last_step:
            self.rule.reset()
            self.steps = 0
            self.nfe_per_sample = torch.zeros(0, dtype=torch.long)
        self._last_step = step
        self._live = True
        self._guidance_step = self._mask = self._x_t = None

    def _guiding(self) -> bool:
        """Whether the rule is consulted at all now (as diffusers' CFG decides whether it runs)."""
        if not self._enabled or math.isclose(self.guidance_scale, 1.0):
            return False
        if self._num_inference_steps is not None and self._step is not None:
            first = int(self._start * self._num_inference_steps)
            end = int(self._stop * self._num_inference_steps)
            return first <= self._step < end
        return True

    @property
    def num_conditions(self) -> int:
        if not self._live:  # before the loop: may the rule need unconditional predictions?
            return 2 if self._enabled and not math.isclose(self.guidance_scale, 1.0) else 1
        if not self._guiding():
            return 1
        return 2 if bool(self._step_mask().any()) else 1

    @property
    def is_conditional(self) -> bool:
        return self._count_prepared == 1

    def get_state(self) -> dict[str, Any]:
        state = {"rule": self.rule, "nfe_per_sample": self.nfe_per_sample.tolist()}
        try:
            return {**super().get_state(), **state}
        except (ValueError, RuntimeError) as err:  # an unbound x0 rule mid-step: show, do not fail
            return {"step": self._step, "error": str(err), **state}

    # -- the step as the rule sees it -------------------------------------------------------------

    def _step_index(self) -> int:
        """The step's index in the scheduler's schedule (img2img starts part-way down)."""
        begin = getattr(self.scheduler, "begin_index", None)
        return (int(begin) if begin is not None else 0) + int(self._step)

    def _build_step(self, batch_size: int) -> GuidanceStep:
        scheduler = self.scheduler
        if scheduler is None:
            if self.rule.uses_noise_level:
                raise ValueError(
                    f"{self.rule!r} needs x_t's noise level, which a guider only gets from the scheduler: "
                    "use dg.as_guider(rule, scheduler=pipe) or guider.bind(pipe)"
                )
            alpha = sigma = torch.full((1,), math.nan, dtype=torch.float64)
            num_steps = self._num_inference_steps
        else:
            index = getattr(scheduler, "step_index", None)
            index = self._step_index() if index is None else int(index)
            try:
                alpha, sigma = noise_level(scheduler, index)
            except ValueError as err:
                if self.rule.uses_noise_level:
                    raise ValueError(f"{self.rule!r} needs the noise level of each step: {err}") from None
                alpha = sigma = torch.full((1,), math.nan, dtype=torch.float64)
            timesteps = getattr(scheduler, "timesteps", None)
            num_steps = len(timesteps) if timesteps is not None else self._num_inference_steps
        timestep = self._timestep
        return GuidanceStep(
            step_index=self._step_index(),
            num_steps=num_steps,
            timestep=float(timestep) if timestep is not None else math.nan,
            guidance_scale=float(self.guidance_scale),
            alpha=alpha.expand(batch_size),
            sigma=sigma.expand(batch_size),
        )

    def _step_mask(self, batch_size: int | None = None) -> torch.Tensor:
        """The rule's ``uncond_mask`` for this step, asked once (again only if the batch size the
        guider guessed turns out wrong)."""
        if self._mask is not None and (batch_size is None or len(self._mask) == batch_size):
            return self._mask
        if batch_size is None:
            batch_size = len(self.nfe_per_sample) or 1
        step = self._build_step(batch_size)
        mask = self.rule.uncond_mask(batch_size, step).bool().cpu()
        if mask.shape != (batch_size,):
            raise ValueError(f"{self.rule!r}.uncond_mask returned shape {tuple(mask.shape)}")
        self._guidance_step, self._mask = step, mask
        return mask

    # -- batches ----------------------------------------------------------------------------------

    @staticmethod
    def _batch_size(values) -> int | None:
        for value in values:
            cond = value[0] if isinstance(value, tuple) else value
            if isinstance(cond, torch.Tensor) and cond.ndim > 0:
                return int(cond.shape[0])
        return None

    def _batches(self, make) -> list:
        if self._live and self._guiding():
            self._step_mask(self._size)
        indices = [0] if self.num_conditions == 1 else [0, 1]
        return [
            make(index, name)
            for index, name in zip(indices, self._input_predictions[: len(indices)], strict=True)
        ]

    def prepare_inputs(self, data: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> list:
        self._size = self._batch_size(data.values())
        return self._batches(lambda index, name: self._prepare_batch(data, index, name))

    def prepare_inputs_from_block_state(self, data, input_fields: dict[str, str | tuple[str, str]]) -> list:
        fields = [
            tuple(getattr(data, n, None) for n in v) if isinstance(v, tuple) else getattr(data, v, None)
            for v in input_fields.values()
        ]
        self._size = self._batch_size(fields)
        return self._batches(
            lambda index, name: self._prepare_batch_from_block_state(input_fields, data, index, name)
        )

    # -- models: recording x_t --------------------------------------------------------------------

    def _record_input(self, module, args, kwargs) -> None:
        sample = args[0] if args else next((kwargs[n] for n in _SAMPLE_NAMES if n in kwargs), None)
        if self._x_t is None and isinstance(sample, torch.Tensor):
            self._x_t = sample

    def prepare_models(self, denoiser: torch.nn.Module) -> None:
        super().prepare_models(denoiser)
        if self.rule.space == "denoised" and isinstance(denoiser, torch.nn.Module):
            self._hooks.append(denoiser.register_forward_pre_hook(self._record_input, with_kwargs=True))

    def cleanup_models(self, denoiser: torch.nn.Module) -> None:
        super().cleanup_models(denoiser)
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    # -- combining --------------------------------------------------------------------------------

    def forward(self, pred_cond: torch.Tensor, pred_uncond: torch.Tensor | None = None) -> GuiderOutput:
        batch_size = pred_cond.shape[0]
        try:
            if len(self.nfe_per_sample) != batch_size:
                self.nfe_per_sample = torch.zeros(batch_size, dtype=torch.long)
            self.nfe_per_sample += 1 if pred_uncond is None else 2
            self.steps += 1
            if not (self._live and self._guiding()):
                return GuiderOutput(pred=pred_cond, pred_cond=pred_cond, pred_uncond=pred_uncond)
            mask = self._step_mask(batch_size)
            if pred_uncond is None:
                if bool(mask.any()):
                    raise RuntimeError(
                        f"{self.rule!r} asked for unconditional predictions the pipeline did not compute"
                    )
                uncond = pred_cond.clone()
            else:
                rows = mask.to(pred_cond.device).reshape(-1, *([1] * (pred_cond.ndim - 1)))
                uncond = torch.where(rows, pred_uncond, pred_cond)
            x_t = None
            if self.rule.space == "denoised":
                if self._x_t is None:
                    raise RuntimeError(
                        "DiffguideGuidance did not see the denoiser's input x_t (it records the first tensor "
                        "argument of the model given to prepare_models); x0-space rules cannot run here"
                    )
                x_t = leading(self._x_t, pred_cond).to(pred_cond.device)
            kind = prediction_kind(self.scheduler) if self.scheduler is not None else "epsilon"
            pred = combine_in_space(self.rule, pred_cond, uncond, mask, x_t, self._guidance_step, kind)
            return GuiderOutput(pred=pred, pred_cond=pred_cond, pred_uncond=pred_uncond)
        finally:
            self._live = False
            self._x_t = None

    # -- counts -----------------------------------------------------------------------------------

    def stats(self) -> dict:
        """Network evaluations of the last sampling call, as ``dg.stats`` gives them: ``nfe`` (mean per
        sample), ``nfe_per_sample``, ``steps`` and the ``rule``."""
        return nfe_stats(self.nfe_per_sample, self.steps, self.rule)


def as_guider(
    rule: GuidanceRule,
    guidance_scale: float = 7.5,
    scheduler=None,
    start: float = 0.0,
    stop: float = 1.0,
    enabled: bool = True,
) -> DiffguideGuidance:
    """``rule`` as a diffusers guider: ``pipe.update_components(guider=dg.as_guider(rule, 5.0, scheduler=pipe))``.

    ``scheduler`` (a scheduler, or the pipeline, whose current scheduler is then used) is needed by
    rules working on denoised predictions (APG, AG by default) and by ``GuidanceInterval``. The guider
    runs ``rule`` itself (its state, e.g. AG's ``similarities``, stays readable there); its config
    rebuilds an equal rule."""
    method, params = rule_config(rule)
    rebuilt = rule_config(rule_from_config(method, params))
    if rebuilt != (method, params):
        raise ValueError(
            f"{rule!r} does not survive a round trip through its config: {params} vs {rebuilt[1]}"
        )
    guider = DiffguideGuidance(
        method=method, params=params, guidance_scale=guidance_scale, start=start, stop=stop, enabled=enabled
    )
    guider.rule = rule
    if scheduler is not None:
        guider.bind(scheduler)
    return guider
