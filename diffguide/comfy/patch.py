"""A guidance rule attached to a ComfyUI model through its sampler hooks (no math here).

ComfyUI runs one sampling step as: ``sampler_calc_cond_batch_function`` (or its own
``calc_cond_batch``) -> the denoised predictions ``[cond, uncond]``; each
``sampler_pre_cfg_function`` -> new ``[cond, uncond]``; then ``u + (c - u) * cond_scale``.

:class:`ComfyGuidance` uses the first hook to evaluate the unconditional batch only on the
samples the rule asks for (``rule.uncond_mask``), and the second to call ``rule.combine``.
ComfyUI then applies its own CFG formula, so the pre-CFG hook returns
``[u + (G - u) / w, u]``, for which that formula gives the rule's prediction ``G`` while
later hooks still see the real unconditional prediction.

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
        self._evaluations = 0
        self._step: GuidanceStep | None = None
        self._mask: torch.Tensor | None = None
        #: per model evaluation of the current run, how many samples got an unconditional row
        self.uncond_rows: list[int] = []

    # -- step bookkeeping ---------------------------------------------------------------------

    def _advance(self, x: torch.Tensor, sigma: torch.Tensor, model_options: dict) -> GuidanceStep:
        """Start the step of this model evaluation (a new run when sigma rises or the batch
        changes: samplers only lower sigma within a run)."""
        level = float(sigma.max())
        if self._last_sigma is None or level > self._last_sigma or x.shape[0] != self._batch:
            self.rule.reset()
            self._evaluations = 0
            self.uncond_rows = []
        self._last_sigma, self._batch = level, x.shape[0]
        sample_sigmas = model_options.get("transformer_options", {}).get("sample_sigmas")
        if sample_sigmas is not None and len(sample_sigmas) > 1:
            schedule = torch.as_tensor(sample_sigmas, dtype=torch.float64)[:-1]
            step_index, num_steps = int((schedule - level).abs().argmin()), len(schedule)
        else:
            step_index, num_steps = self._evaluations, None
        self._evaluations += 1
        sigmas = sigma.reshape(-1).double().cpu().expand(x.shape[0])
        # the scale is not passed to this hook; the pre-CFG hook fills it in before combine
        self._step = GuidanceStep(step_index, num_steps, level, float("nan"), torch.ones_like(sigmas), sigmas)
        self._mask = None
        return self._step

    # -- the hooks ----------------------------------------------------------------------------

    def calc_cond_batch(self, args: dict) -> list[torch.Tensor]:
        conds, x, sigma = args["conds"], args["input"], args["sigma"]
        model, options = args["model"], args["model_options"]

        def evaluate(which: list, rows: torch.Tensor | None = None) -> list[torch.Tensor]:
            x_rows = x if rows is None else x[rows]
            sigma_rows = sigma if rows is None else sigma[rows]
            if self.previous_calc is not None:
                sub = {**args, "conds": which, "input": x_rows, "sigma": sigma_rows}
                return self.previous_calc(sub)
            return _default_calc_cond_batch()(model, which, x_rows, sigma_rows, options)

        if len(conds) < 2 or conds[1] is None:  # cond_scale == 1: ComfyUI skips uncond itself
            return evaluate(conds)
        step = self._advance(x, sigma, options)
        mask = self.rule.uncond_mask(x.shape[0], step).to(torch.bool).cpu()
        self._mask = mask
        self.uncond_rows.append(int(mask.sum()))
        if bool(mask.all()):
            return evaluate(conds)
        cond = evaluate([conds[0]])[0]
        uncond = cond.clone()
        if bool(mask.any()):
            rows = mask.to(x.device)
            uncond[rows] = evaluate([conds[1]], rows)[0]
        return [cond, uncond, *evaluate(conds[2:])] if len(conds) > 2 else [cond, uncond]

    def pre_cfg(self, args: dict) -> list[torch.Tensor]:
        out = args["conds_out"]
        if len(out) < 2 or args["conds"][1] is None:
            return out
        x, sigma, scale = args["input"], args["sigma"], float(args["cond_scale"])
        if not self.skips_uncond or self._step is None:
            self._advance(x, sigma, args["model_options"])
        step = GuidanceStep(
            self._step.step_index,
            self._step.num_steps,
            self._step.timestep,
            scale,
            self._step.alpha,
            self._step.sigma,
        )
        mask = self._mask if self._mask is not None else torch.ones(x.shape[0], dtype=torch.bool)
        cond, uncond = out[0], out[1]
        if self.rule.space == "model_output":
            sig = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x)
            guided = x - sig * self.rule.combine((x - cond) / sig, (x - uncond) / sig, mask, step)
        else:
            guided = self.rule.combine(cond, uncond, mask, step)
        guided = guided.to(cond.dtype)
        if self.skips_uncond:
            self._step = None  # the next evaluation starts in calc_cond_batch again
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
