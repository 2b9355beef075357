"""A guidance rule attached to a ComfyUI model through its sampler hooks (no math here).

ComfyUI runs one sampling step as: ``sampler_calc_cond_batch_function`` (or its own
``calc_cond_batch``) -> the denoised predictions ``[cond, uncond]``; each
``sampler_pre_cfg_function`` -> new ``[cond, uncond]``; then ``u + (c - u) * cond_scale``.

:class:`ComfyGuidance` uses the first hook to evaluate the unconditional batch only on the
samples the rule asks for (``rule.uncond_mask``), and the second to call ``rule.combine``.
ComfyUI then applies its own CFG formula, so the pre-CFG hook returns
``[u + (G - u) / w, u]``, for which that formula gives the rule's prediction ``G``. Later
hooks see the real unconditional prediction but this stand-in conditional one, so post-CFG
hooks that recombine ``cond_denoised`` and ``uncond_denoised`` (RescaleCFG, PAG, SAG) see the
rule's guidance as if it were CFG's.

ComfyUI's predictions are denoised (x0) in k-diffusion's parametrization
``x = x0 + sigma * eps``: a rule in ``"denoised"`` space gets them as they are, one in
``"model_output"`` space gets ``eps = (x - x0) / sigma``; the step has ``alpha = 1``.
"""

from __future__ import annotations

import torch

from ..guidance.base import GuidanceRule, GuidanceStep


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
        """Start the step of this model evaluation. A new run starts when ComfyUI hands over
        another ``sample_sigmas`` tensor (it sets one per sampling run), when sigma is back at
        the schedule's first level (no sampler evaluates it twice in a run; a cached sigmas
        tensor can be the same object in two runs), when sigma rises (samplers only lower it
        within a run) or when the batch size changes."""
        level = float(sigma.max())
        sample_sigmas = model_options.get("transformer_options", {}).get("sample_sigmas")
        at_start = sample_sigmas is not None and abs(level - float(sample_sigmas[0])) <= 1e-6 * max(
            1.0, level
        )
        new_run = (
            self._last_sigma is None
            or level > self._last_sigma
            or x.shape[0] != self._batch
            or (sample_sigmas is not None and sample_sigmas is not self._sample_sigmas)
            or (at_start and self._evaluations > 0)
        )
        if new_run:
            self.rule.reset()
            self._evaluations = 0
            self.uncond_rows = []
        self._last_sigma, self._batch, self._sample_sigmas = level, x.shape[0], sample_sigmas
        if sample_sigmas is not None and len(sample_sigmas) > 1:
            schedule = (
                torch.as_tensor(sample_sigmas).detach().cpu().double()[:-1]
            )  # cpu first: no float64 on MPS
            step_index, num_steps = int((schedule - level).abs().argmin()), len(schedule)
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
        cond, uncond = out[0], out[1]
        if self.rule.space == "model_output":
            sig = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x)
            guided = x - sig * self.rule.combine((x - cond) / sig, (x - uncond) / sig, mask, step)
        else:
            guided = self.rule.combine(cond, uncond, mask, step)
        guided = guided.to(cond.dtype)
        self._step = None  # the next evaluation starts afresh
        if scale == 0:  # ComfyUI's formula returns u whatever c is: hand it G twice
            return [guided, guided, *out[2:]]
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
