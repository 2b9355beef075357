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

from .core import RuleHook, leading, prediction_of, with_prediction


class BatchedGuidanceHook(RuleHook):
    """``ModelHook`` running a session's rule on a batched-CFG denoiser."""

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        session = self.session
        call = self.read_call(args, kwargs)
        original = self.fn_ref.original_forward
        sample = call.sample
        rows = sample.shape[0]
        first_t = call.first_timestep

        if call.get("skip_layers") is not None:
            raise RuntimeError(
                "skip-layer guidance (SD3's skip_guidance_layers) adds its own denoiser call that a diffguide "
                "rule cannot see; call the pipeline without it, or dg.remove(pipe) first"
            )
        if not session.cfg_active(self.component):
            # scale <= 1: every rule gives the conditional prediction, which is what the pipeline runs
            session.start_step(first_t, rows)
            session.end_step(None)
            return original(*args, **kwargs)
        if rows % 2:
            raise RuntimeError(
                f"{session.class_name} called its denoiser with {rows} rows under CFG; diffguide needs the "
                "[uncond, cond] rows of one call"
            )
        batch = rows // 2
        cond_first = session.support.order == "cond_first"
        cond_rows = torch.arange(0, batch) if cond_first else torch.arange(batch, rows)
        session.start_step(first_t, batch)
        step = session.guidance_step(self.component, batch, first_t)
        uncond_mask = session.uncond_mask(step)
        if uncond_mask.all():  # the pipeline's own batch, as it is
            output = original(*args, **kwargs)
            if session.is_plain_cfg:  # the pipeline's own formula is the rule
                session.end_step(uncond_mask)
                return output
            prediction = prediction_of(output)
            cond_prediction = prediction[:batch] if cond_first else prediction[batch:]
            uncond_prediction = prediction[batch:] if cond_first else prediction[:batch]
        else:  # only the unconditional rows asked for, then every conditional row
            uncond_rows = uncond_mask.nonzero().flatten() + (batch if cond_first else 0)
            index = torch.cat([uncond_rows, cond_rows])
            sliced_args, sliced_kwargs = call.restricted(rows, index, session.support)
            output = original(*sliced_args, **sliced_kwargs)
            prediction = prediction_of(output)
            cond_prediction, uncond_prediction = (
                prediction[len(uncond_rows) :],
                prediction[: len(uncond_rows)],
            )
        session.end_step(uncond_mask)

        # learned-variance models output [prediction, variance]: the rule sees the first half
        learned_variance = prediction.shape[1] == 2 * sample.shape[1]
        channels = sample.shape[1] if learned_variance else prediction.shape[1]
        cond = cond_prediction[:, :channels]
        if uncond_mask.all():
            uncond = uncond_prediction[:, :channels]
        else:
            uncond = cond.clone()  # the contract: rows not asked for are a copy of cond
            uncond[uncond_mask.to(cond.device)] = uncond_prediction[:, :channels]
        x_t = leading(sample[cond_rows.to(sample.device)], cond)
        guided = session.combine(cond, uncond, uncond_mask, x_t, step)

        rescale = float(getattr(session.pipe, "guidance_rescale", 0.0) or 0.0)
        if rescale > 0:
            from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

            guided = rescale_noise_cfg(guided, cond, guidance_rescale=rescale)
        if learned_variance:
            guided = torch.cat([guided, cond_prediction[:, channels:]], dim=1)
        return with_prediction(output, torch.cat([guided, guided]))
