"""A guidance rule attached to a ComfyUI model through its sampler hooks (no math here).

ComfyUI runs one sampling step as: ``sampler_calc_cond_batch_function`` (or its own
``calc_cond_batch``) -> the denoised predictions ``[cond, uncond]``; each
``sampler_pre_cfg_function`` -> new ``[cond, uncond]``; then ``u + (c - u) * cond_scale``;
then each ``sampler_post_cfg_function`` (the CFG++ samplers read ``uncond_denoised`` there).

:class:`ComfyGuidance` uses the first hook to evaluate the unconditional batch only on the
samples the rule asks for (``rule.uncond_mask``), and the second to call ``rule.combine``.
ComfyUI then applies its own CFG formula, so the pre-CFG hook returns
``[u' + (G - u') / w, u']``, for which that formula gives the rule's prediction ``G``; ``u'``
is the rule's view of the unconditional prediction: the real one for the samples the rule
asked for, a copy of ``cond`` for the others. Later hooks see that ``u'`` and this stand-in
conditional one, so post-CFG hooks that recombine ``cond_denoised`` and ``uncond_denoised``
(RescaleCFG, PAG, SAG) see the rule's guidance as if it were CFG's, and a CFG++ sampler steps
along ``u'``, so a sample gets the same whether it is sampled alone or in a batch.

Per-run state is keyed to the run's ``transformer_options["sample_sigmas"]`` (ComfyUI's
CFGGuider sets it for each sampling run): see :meth:`ComfyGuidance._advance`.

ComfyUI's predictions are denoised (x0) in k-diffusion's parametrization
``x = x0 + sigma * eps``: a rule in ``"denoised"`` space gets them as they are, one in
``"model_output"`` space gets ``eps = (x - x0) / sigma``; the step has ``alpha = 1``.
"""

from __future__ import annotations

import torch

from ..guidance.base import GuidanceRule, GuidanceStep, per_sample

#: relative distance within which an evaluated sigma counts as a level of ``sample_sigmas``:
#: samplers compute their intermediate levels in float32 (an ancestral midpoint meant to be
#: ``sigmas[i + 1]`` comes out ~1e-7 off), while schedule levels lie far more apart
LEVEL_TOLERANCE = 1e-4
#: the same for "back at the first level" (a new run on a reused ``sample_sigmas``); wider
#: because the flow-model SDE samplers start a hair below a first sigma of 1
#: (``offset_first_sigma_for_snr``: ``percent_to_sigma(1e-4)``)
START_TOLERANCE = 1e-3


def _default_calc_cond_batch():
    from comfy.samplers import calc_cond_batch

    return calc_cond_batch


class ComfyGuidance:
    """``rule`` as ComfyUI hooks. ``skips_uncond`` registers the calc-cond-batch hook too, for
    rules that leave out unconditional evaluations (AG, LinearAG, the interval)."""

    def __init__(self, rule: GuidanceRule, skips_uncond: bool, previous_calc=None):
        self.rule = rule
        self.skips_uncond = skips_uncond
        self.previous_calc = previous_calc
        self._last_sigma: float | None = None
        self._batch: int | None = None
        self._sample_sigmas = None
        self._evaluations = 0
        self._step: GuidanceStep | None = None
        self._mask: torch.Tensor | None = None
        #: per model evaluation of the current run, the rows of the unconditional pass (0 = skipped)
        self.uncond_rows: list[int] = []

    # -- step bookkeeping ---------------------------------------------------------------------

    def _advance(self, x: torch.Tensor, sigma: torch.Tensor, model_options: dict) -> GuidanceStep:
        """Start the step of this model evaluation.

        With ``sample_sigmas`` (every ComfyUI sampling run), a new run starts when it is another
        tensor than the last evaluation's, or when sigma is back at its first level after
        evaluations of this run: a cached SIGMAS output can be the same tensor in two runs, and
        no sampler evaluates the first level twice in a run (second-order samplers evaluate it
        once, then lower levels). Sigma rising says nothing within such a run: the ancestral
        samplers' second evaluation lands a rounding error below the next level, heunpp2 looks
        two levels ahead and steps back up. The step index is the last entry of
        ``sample_sigmas`` at or above sigma (to a relative ``LEVEL_TOLERANCE``): a midpoint
        strictly between ``sigmas[i + 1]`` and ``sigmas[i]`` counts for step ``i``; an
        evaluation at a schedule level counts for the step that starts there, also when it is
        the previous step's corrector (Heun, heunpp2) or midpoint (the ancestral samplers,
        whose midpoint is ``sigmas[i + 1]`` up to rounding): from sigma alone the two cannot
        be told apart.

        Without ``sample_sigmas`` (a caller outside ComfyUI's samplers), the fallback: a new run
        at the first evaluation, when sigma rises or when the batch size changes; the step
        index is a count of evaluations.
        """
        level = float(sigma.max())
        sample_sigmas = model_options.get("transformer_options", {}).get("sample_sigmas")
        if sample_sigmas is not None and len(sample_sigmas) > 0:
            schedule = torch.as_tensor(sample_sigmas).detach().cpu().double()  # cpu first: no float64 on MPS
            start = float(schedule[0])
            new_run = sample_sigmas is not self._sample_sigmas or (
                self._evaluations > 0 and abs(level - start) <= START_TOLERANCE * start
            )
        else:
            schedule = None
            new_run = self._last_sigma is None or level > self._last_sigma or x.shape[0] != self._batch
        if new_run:
            self.rule.reset()
            self._evaluations = 0
            self.uncond_rows = []
        self._last_sigma, self._batch, self._sample_sigmas = level, x.shape[0], sample_sigmas
        if schedule is not None and len(schedule) > 1:
            levels = schedule[:-1]  # the last entry is where the run ends, not a step
            at_or_above = (levels >= level * (1 - LEVEL_TOLERANCE)).nonzero()
            step_index = int(at_or_above.max()) if len(at_or_above) else 0  # above sigmas[0]: step 0
            num_steps = len(levels)
        else:
            step_index, num_steps = self._evaluations, None
        self._evaluations += 1
        sigmas = sigma.detach().reshape(-1).cpu().double().expand(x.shape[0])
        # the scale is not passed to calc_cond_batch; pre_cfg fills it in before combine
        self._step = GuidanceStep(step_index, num_steps, level, float("nan"), torch.ones_like(sigmas), sigmas)
        self._mask = None
        return self._step

    # -- the hooks ----------------------------------------------------------------------------

    def calc_cond_batch(self, args: dict) -> list[torch.Tensor]:
        """Evaluate the unconditional batch only when the rule needs it for some sample.

        Each entry keeps its position in ``conds`` (ComfyUI labels position 1 as the
        unconditional pass for attention patches), and the unconditional pass always runs on
        the whole batch, so batch-indexed conditioning (masks, ControlNet hints, video frames)
        lines up. When only some samples need it, the others' rows are computed and then
        ignored by the rule: the saving is exact once every sample has switched.
        """
        conds = args["conds"]
        if len(conds) < 2 or conds[1] is None:  # cond_scale == 1: ComfyUI skips uncond itself
            return self._evaluate(args, conds)
        x = args["input"]
        step = self._advance(x, args["sigma"], args["model_options"])
        mask = self.rule.uncond_mask(x.shape[0], step).to(torch.bool).cpu()
        self._mask = mask
        if bool(mask.any()):
            self.uncond_rows.append(x.shape[0])
            return self._evaluate(args, conds)
        self.uncond_rows.append(0)
        out = self._evaluate(args, [conds[0], None, *conds[2:]])
        return [out[0], out[0].clone(), *out[2:]]  # uncond rows are a copy of cond, flagged by the mask

    def _evaluate(self, args: dict, conds: list) -> list[torch.Tensor]:
        if self.previous_calc is not None:
            return self.previous_calc({**args, "conds": conds})
        return _default_calc_cond_batch()(
            args["model"], conds, args["input"], args["sigma"], args["model_options"]
        )

    def pre_cfg(self, args: dict) -> list[torch.Tensor]:
        out = args["conds_out"]
        if len(out) < 2 or args["conds"][1] is None:
            return out
        x, sigma, scale = args["input"], args["sigma"], float(args["cond_scale"])
        if self._step is None or not self.skips_uncond:
            # our calc_cond_batch did not run for this evaluation (APG registers none; another
            # node may have replaced ours): every uncond row is real, the rule still decides
            step = self._advance(x, sigma, args["model_options"])
            self._mask = self.rule.uncond_mask(x.shape[0], step).to(torch.bool).cpu()
        step = GuidanceStep(
            self._step.step_index,
            self._step.num_steps,
            self._step.timestep,
            scale,
            self._step.alpha,
            self._step.sigma,
        )
        mask = self._mask
        cond = out[0]
        # the rule's view of uncond: real where it asked, a copy of cond elsewhere (the rule's
        # contract), also where the whole batch's unconditional pass computed the row anyway
        uncond = torch.where(per_sample(mask.to(cond.device), cond).bool(), out[1], cond)
        if self.rule.space == "model_output":
            sig = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x)
            guided = x - sig * self.rule.combine((x - cond) / sig, (x - uncond) / sig, mask, step)
        else:
            guided = self.rule.combine(cond, uncond, mask, step)
        guided = guided.to(cond.dtype)
        self._step = None  # the next evaluation starts afresh
        if scale == 0:  # ComfyUI's formula returns u whatever c is: hand it G twice
            return [guided, guided, *out[2:]]
        # ComfyUI's u' + (c' - u') * w is G; post-CFG hooks (CFG++ samplers) read u'
        return [uncond + (guided - uncond) / scale, uncond, *out[2:]]


def attach(model, rule: GuidanceRule, skips_uncond: bool):
    """A clone of the ComfyUI ``model`` (a ModelPatcher) with ``rule`` registered; the input
    model is left as it was, as ComfyUI nodes do."""
    patched = model.clone()
    previous = patched.model_options.get("sampler_calc_cond_batch_function") if skips_uncond else None
    guidance = ComfyGuidance(rule, skips_uncond, previous)
    if skips_uncond:
        patched.set_model_sampler_calc_cond_batch_function(guidance.calc_cond_batch)
    patched.set_model_sampler_pre_cfg_function(guidance.pre_cfg)
    return patched
