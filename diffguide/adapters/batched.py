"""The adapter for pipelines that batch CFG into one denoiser call per step.

SD, SDXL, SD3, PixArt, Sana, AuraFlow, HunyuanDiT, LTX, Mochi and Kandinsky call the denoiser on
``[uncond, cond]`` rows (DiT on ``[cond, uncond]``). The hook evaluates only the unconditional
rows the rule asks for and every conditional row (slicing every batch-sized argument, including
nested ones such as SDXL's ``added_cond_kwargs``), lets the rule combine, and returns ``[g, g]``
in the pipeline's row order, so that the pipeline's own ``u + w (c - u)`` yields exactly ``g``.
Where the pipeline rescales guidance (``guidance_rescale``) the hook applies the same rescaling
to ``g`` against the conditional prediction, and the pipeline's own pass becomes the identity.
Learned-variance channels (PixArt, DiT, Kandinsky) pass through from the conditional rows.
"""

from __future__ import annotations

import torch

from .core import DenoiserCall, RuleHook, leading, prediction_of, with_prediction


class BatchedGuidanceHook(RuleHook):
    """``ModelHook`` running a session's rule on a batched-CFG denoiser."""

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        session = self.session
        call = self.read_call(args, kwargs)
        self._refuse_hidden_calls(call)
        if not session.cfg_active(self.component):  # the pipeline runs the conditional rows alone
            session.unguided_step(self.component, call.first_timestep, call.sample.shape[0])
            return self.fn_ref.original_forward(*args, **kwargs)
        batch = self._batch_size(call)
        session.start_step(call.first_timestep, batch)
        step = session.guidance_step(self.component, batch, call.first_timestep)
        uncond_mask = session.uncond_mask(step)
        if uncond_mask.all() and session.is_plain_cfg:  # the pipeline's own formula is the rule
            session.end_step(uncond_mask)
            return self.fn_ref.original_forward(*args, **kwargs)
        output, cond_prediction, uncond_prediction = self._evaluate(call, batch, uncond_mask)
        session.end_step(uncond_mask)
        guided = self._guided(call, cond_prediction, uncond_prediction, uncond_mask, step)
        return with_prediction(output, torch.cat([guided, guided]))

    # -- the steps of one denoiser call -----------------------------------------------------------

    @staticmethod
    def _refuse_hidden_calls(call: DenoiserCall) -> None:
        if call.get("skip_layers") is not None:
            raise RuntimeError(
                "skip-layer guidance (SD3's skip_guidance_layers) adds its own denoiser call that a diffguide "
                "rule cannot see; call the pipeline without it, or dg.remove(pipe) first"
            )

    def _batch_size(self, call: DenoiserCall) -> int:
        rows = call.sample.shape[0]
        if rows % 2:
            raise RuntimeError(
                f"{self.session.class_name} called its denoiser with {rows} rows under CFG; diffguide needs the "
                "[uncond, cond] rows of one call"
            )
        return rows // 2

    def _cond_rows(self, batch: int) -> torch.Tensor:
        """Indices of the conditional rows in the pipeline's batch."""
        cond_first = self.session.support.order == "cond_first"
        return torch.arange(0, batch) if cond_first else torch.arange(batch, 2 * batch)

    def _evaluate(self, call: DenoiserCall, batch: int, uncond_mask: torch.Tensor):
        """``(output, cond prediction, uncond prediction)``: the pipeline's own batch where every
        sample needs ``u``, else the unconditional rows asked for and every conditional row."""
        original = self.fn_ref.original_forward
        cond_first = self.session.support.order == "cond_first"
        if uncond_mask.all():
            output = original(*call.args, **call.kwargs)
            prediction = prediction_of(output)
            cond, uncond = (
                (prediction[:batch], prediction[batch:])
                if cond_first
                else (prediction[batch:], prediction[:batch])
            )
            return output, cond, uncond
        uncond_rows = uncond_mask.nonzero().flatten() + (batch if cond_first else 0)
        index = torch.cat([uncond_rows, self._cond_rows(batch)])
        args, kwargs = call.restricted(2 * batch, index, self.session.support)
        output = original(*args, **kwargs)
        prediction = prediction_of(output)
        return output, prediction[len(uncond_rows) :], prediction[: len(uncond_rows)]

    def _guided(
        self,
        call: DenoiserCall,
        cond_prediction: torch.Tensor,
        uncond_prediction: torch.Tensor,
        uncond_mask: torch.Tensor,
        step,
    ) -> torch.Tensor:
        """The rule's prediction, with the pipeline's guidance rescaling and any learned-variance
        channels (which the rule does not see) from the conditional rows."""
        session, sample = self.session, call.sample
        learned_variance = cond_prediction.shape[1] == 2 * sample.shape[1]
        channels = sample.shape[1] if learned_variance else cond_prediction.shape[1]
        cond = cond_prediction[:, :channels]
        if uncond_mask.all():
            uncond = uncond_prediction[:, :channels]
        else:
            uncond = cond.clone()  # the contract: rows not asked for are a copy of cond
            uncond[uncond_mask.to(cond.device)] = uncond_prediction[:, :channels]
        x_t = leading(sample[self._cond_rows(len(uncond_mask)).to(sample.device)], cond)
        guided = session.combine(cond, uncond, uncond_mask, x_t, step)
        rescale = float(getattr(session.pipe, "guidance_rescale", 0.0) or 0.0)
        if rescale > 0:
            from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

            guided = rescale_noise_cfg(guided, cond, guidance_rescale=rescale)
        if learned_variance:
            guided = torch.cat([guided, cond_prediction[:, channels:]], dim=1)
        return guided
