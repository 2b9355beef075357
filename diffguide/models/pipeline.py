"""The embedded models as diffusers pipelines: class-conditional pixel-space diffusion.

:class:`ClassConditionalPipeline` is the sampling loop both share: a denoiser with a class
embedding of ``num_classes + 1`` rows, the last row being the null class that classifier-free
guidance uses as its unconditional input (the models are trained with label dropout).
Guidance follows ``StableDiffusionPipeline`` exactly: one denoiser call on the batch
``[uncond, cond]`` per step, then ``u + w (c - u)``, so guidance hooks that work on Stable
Diffusion attach unchanged.

- :class:`DigitsPipeline`: a ``UNet2DModel`` predicting epsilon (the digits model).
- :class:`ClassConditionalTransformerPipeline`: a ``DiTTransformer2DModel`` predicting the
  flow-matching velocity ``noise - x0``, sampled with ``FlowMatchEulerDiscreteScheduler``
  (the Fashion-MNIST model), the family of SD3, Flux and Wan.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    DiTTransformer2DModel,
    FlowMatchEulerDiscreteScheduler,
    UNet2DModel,
)
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.hooks import HookRegistry
from diffusers.models.cache_utils import CacheMixin
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ..versions import forget_child_hooks

OUTPUT_TYPES = ("pil", "np", "pt")


@dataclass
class DigitsPipelineOutput(BaseOutput):
    """Output of :class:`DigitsPipeline`.

    Attributes:
        images: a list of PIL ``L`` images, a numpy array (B, H, W, C) or a tensor
            (B, C, H, W), all with values in [0, 1] (PIL: 0-255).
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


def _label_tensor(class_labels: int | Sequence[int] | torch.Tensor, num_classes: int) -> torch.Tensor:
    labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
    if labels.numel() == 0:
        raise ValueError("class_labels is empty: pass at least one class label")
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.numel():
        raise ValueError(
            f"class label {bad[0].item()} is out of range: this model knows classes 0-{num_classes - 1}"
        )
    return labels


class ClassConditionalPipeline(DiffusionPipeline):
    """The sampling loop of a class-conditional model with classifier-free guidance; subclasses
    name their denoiser component and say how it is called (:meth:`predict`)."""

    _callback_tensor_inputs = ["latents"]
    #: the model family whose guidance presets suit these models (``diffguide.guidance.registry``)
    guidance_family: str | None = None

    @property
    def denoiser(self) -> torch.nn.Module:
        """The network (``unet`` or ``transformer``)."""
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        """Number of real classes; the class index ``num_classes`` is the null class."""
        raise NotImplementedError

    def predict(
        self, model_input: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor
    ) -> torch.Tensor:
        """The denoiser's raw prediction for ``model_input`` at the scheduler ``timestep``."""
        raise NotImplementedError

    @property
    def null_class(self) -> int:
        """The class index the unconditional half of the CFG batch uses."""
        return self.num_classes

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images this model generates."""
        size = self.denoiser.config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return (self.denoiser.config.in_channels, height, width)

    def _step_kwargs(self, generator: torch.Generator | None, eta: float) -> dict[str, Any]:
        accepted = set(inspect.signature(self.scheduler.step).parameters)
        kwargs: dict[str, Any] = {}
        if "eta" in accepted:
            kwargs["eta"] = eta
        if "generator" in accepted:
            kwargs["generator"] = generator
        return kwargs

    @property
    def guidance_scale(self) -> float:
        """The CFG scale of the current (or last) call."""
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        """Whether the current call batches ``[uncond, cond]`` (``guidance_scale > 1``)."""
        return self._guidance_scale > 1.0

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | Sequence[int] | torch.Tensor,
        guidance_scale: float = 3.0,
        num_inference_steps: int = 50,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        eta: float = 0.0,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[..., dict] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> DigitsPipelineOutput | tuple:
        """Generate one image per entry of ``class_labels``.

        Args:
            class_labels: class(es), 0 to ``num_classes - 1``.
            guidance_scale: CFG scale ``w`` in ``u + w (c - u)``; ``w <= 1`` skips the
                unconditional half (one network evaluation per step), as diffusers does.
            num_inference_steps: denoising steps (>= 1).
            generator: torch generator(s) for reproducible noise.
            latents: optional starting noise (B, C, H, W).
            eta: DDIM's eta (ignored by schedulers without it).
            output_type: ``"pil"``, ``"np"`` (B, H, W, C) or ``"pt"`` (B, C, H, W), in [0, 1].
            return_dict: return a :class:`DigitsPipelineOutput` rather than a tuple.
            callback_on_step_end: ``fn(pipe, step, timestep, callback_kwargs) -> dict`` called
                after each step; returning ``{"latents": ...}`` replaces the latents.
            callback_on_step_end_tensor_inputs: tensors passed in ``callback_kwargs``.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"unknown output_type {output_type!r}; choose one of {OUTPUT_TYPES}")
        if int(num_inference_steps) != num_inference_steps or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps}")
        if not np.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale must be finite, got {guidance_scale}")
        if isinstance(callback_on_step_end, PipelineCallback | MultiPipelineCallbacks):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        unknown = set(callback_on_step_end_tensor_inputs) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs {sorted(unknown)} not available; "
                f"choose from {self._callback_tensor_inputs}"
            )

        device = self._execution_device
        labels = _label_tensor(class_labels, self.num_classes).to(device)
        batch_size = labels.shape[0]
        do_cfg = guidance_scale > 1.0
        self._guidance_scale = guidance_scale
        if do_cfg:
            # [uncond, cond], the layout StableDiffusionPipeline uses.
            model_labels = torch.cat([torch.full_like(labels, self.null_class), labels])
        else:
            model_labels = labels

        shape = (batch_size, *self.image_shape)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=self.denoiser.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {shape}")
        else:
            latents = latents.to(device=device, dtype=self.denoiser.dtype)

        self.scheduler.set_timesteps(int(num_inference_steps), device=device)
        timesteps = self.scheduler.timesteps
        latents = latents * getattr(
            self.scheduler, "init_noise_sigma", 1.0
        )  # flow schedulers start at x = noise
        step_kwargs = self._step_kwargs(generator, eta)
        self._num_timesteps = len(timesteps)

        # diffusers' caches (apply_first_block_cache, ...) keep state across the steps of a call, keyed
        # by a cache context where they read one (LTX, Mochi and CogVideoX name it "cond_uncond" for their
        # batched CFG). UNet2DModel and DiT have no CacheMixin: the context is set through the mixin's
        # method, and the state reset here (maybe_free_model_hooks resets CacheMixin models only). Block
        # hooks added since the last call are found afresh (only enable_cache refreshes that list).
        context = "cond_uncond" if do_cfg else "cond"
        hooks = HookRegistry.check_if_exists_or_initialize(self.denoiser)
        forget_child_hooks(self.denoiser)
        hooks.reset_stateful_hooks()

        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                model_input = torch.cat([latents] * 2) if do_cfg else latents
                if hasattr(self.scheduler, "scale_model_input"):  # flow schedulers have none
                    model_input = self.scheduler.scale_model_input(model_input, t)
                with CacheMixin.cache_context(self.denoiser, context):
                    noise_pred = self.predict(model_input, t, model_labels)
                if do_cfg:
                    noise_uncond, noise_cond = noise_pred.chunk(2)
                    noise_pred = noise_uncond + guidance_scale * (noise_cond - noise_uncond)
                latents = self.scheduler.step(noise_pred, t, latents, **step_kwargs).prev_sample

                if callback_on_step_end is not None:
                    available = {"latents": latents}
                    callback_kwargs = {name: available[name] for name in callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs) or {}
                    latents = callback_outputs.get("latents", latents)
                progress_bar.update()

        images = (latents / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            output = images
        else:
            array = images.permute(0, 2, 3, 1).float().cpu().numpy()
            output = array if output_type == "np" else self.numpy_to_pil(array)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (output,)
        return DigitsPipelineOutput(images=output)


class DigitsPipeline(ClassConditionalPipeline):
    """Class-conditional digit generation with classifier-free guidance.

    Args:
        unet: a ``UNet2DModel`` with ``num_class_embeds = num_classes + 1``; the last class
            index is the null (unconditional) class.
        scheduler: any diffusers scheduler; swap with
            ``pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)``.
    """

    model_cpu_offload_seq = "unet"
    guidance_family = "digits"

    def __init__(self, unet: UNet2DModel, scheduler: SchedulerMixin):
        super().__init__()
        if unet.config.num_class_embeds is None or unet.config.num_class_embeds < 2:
            raise ValueError(
                "DigitsPipeline needs a class-conditional UNet2DModel (num_class_embeds = classes + 1)"
            )
        self.register_modules(unet=unet, scheduler=scheduler)
        self._guidance_scale = 1.0

    @property
    def denoiser(self) -> UNet2DModel:
        return self.unet

    @property
    def num_classes(self) -> int:
        return self.unet.config.num_class_embeds - 1

    def predict(
        self, model_input: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor
    ) -> torch.Tensor:
        return self.unet(model_input, timestep, class_labels=class_labels).sample

    def load_lora_weights(self, path) -> None:
        """Load a LoRA written by ``diffguide.smooth.save_lora`` (e.g. a Smooth-LoRA) into the UNet,
        the counterpart of diffusers' ``load_lora_weights`` on SD-type pipelines."""
        from ..smooth import load_lora_into

        self.unload_lora_weights()
        load_lora_into(self.unet, path)

    def unload_lora_weights(self) -> None:
        """Remove any LoRA from the UNet, restoring the base model exactly."""
        from ..smooth import remove_lora

        remove_lora(self.unet)


class ClassConditionalTransformerPipeline(ClassConditionalPipeline):
    """Class-conditional flow matching with classifier-free guidance: a ``DiTTransformer2DModel``
    predicting the velocity ``noise - x0`` at ``x_t = (1 - s) x0 + s noise``, called with the
    scheduler's timestep ``1000 s``; sampled with ``FlowMatchEulerDiscreteScheduler``.

    Args:
        transformer: a ``DiTTransformer2DModel`` with ``num_embeds_ada_norm = num_classes``; its
            label tables hold one more row, the null class (diffusers adds it for label dropout,
            which the training here does itself: the model's own random dropout is switched off).
        scheduler: a flow-matching scheduler (``FlowMatchEulerDiscreteScheduler``).
    """

    model_cpu_offload_seq = "transformer"
    guidance_family = "fashion"

    def __init__(self, transformer: DiTTransformer2DModel, scheduler: SchedulerMixin):
        super().__init__()
        if transformer.config.num_embeds_ada_norm is None:
            raise ValueError(
                "ClassConditionalTransformerPipeline needs a DiT with num_embeds_ada_norm = classes"
            )
        disable_label_dropout(transformer)
        self.register_modules(transformer=transformer, scheduler=scheduler)
        self._guidance_scale = 1.0

    @property
    def denoiser(self) -> DiTTransformer2DModel:
        return self.transformer

    @property
    def num_classes(self) -> int:
        return self.transformer.config.num_embeds_ada_norm

    def predict(
        self, model_input: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor
    ) -> torch.Tensor:
        timesteps = (
            torch.as_tensor(timestep, device=model_input.device).reshape(-1).expand(model_input.shape[0])
        )
        return self.transformer(model_input, timestep=timesteps, class_labels=class_labels).sample


def disable_label_dropout(transformer: torch.nn.Module) -> torch.nn.Module:
    """Switch off the random label dropout diffusers' ``LabelEmbedding`` applies in training mode
    (its null-class row stays): our training drops labels itself, from its seeded generator."""
    from diffusers.models.embeddings import LabelEmbedding

    for module in transformer.modules():
        if isinstance(module, LabelEmbedding):
            if module.embedding_table.num_embeddings != module.num_classes + 1:
                raise ValueError(
                    "the transformer's label embedding has no null-class row (build it with dropout > 0)"
                )
            module.dropout_prob = 0.0
    return transformer


def fashion_transformer(
    num_layers: int = 8, num_attention_heads: int = 6, attention_head_dim: int = 32, patch_size: int = 4
) -> DiTTransformer2DModel:
    """The Fashion-MNIST model's DiT (about 6.1M parameters): 28 x 28 x 1 pixels in 4 x 4
    patches (49 tokens), width 192, AdaLN-Zero conditioning on timestep and class (10 classes
    plus the null one), velocity out. Patches of 4 rather than 2 make a step 4x cheaper, which
    is what a 90-minute CPU budget allows."""
    return DiTTransformer2DModel(
        num_attention_heads=num_attention_heads,
        attention_head_dim=attention_head_dim,
        in_channels=1,
        out_channels=1,
        num_layers=num_layers,
        sample_size=28,
        patch_size=patch_size,
        num_embeds_ada_norm=10,
        norm_num_groups=1,
    )


def fashion_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """The Fashion-MNIST model's sampler: Euler on the flow ODE, sigmas from 1 to 0, no shift."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


def default_unet(sample_size: int = 28, num_classes: int = 10) -> UNet2DModel:
    """The architecture of the embedded default model (about 1.6M parameters at 28x28)."""
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=1,
        out_channels=1,
        block_out_channels=(32, 64, 96),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=32,
        num_class_embeds=num_classes + 1,
    )


def default_scheduler_config(beta_schedule: str = "squaredcos_cap_v2") -> dict[str, Any]:
    """The noise schedule the default model is trained with (1,000 steps, cosine; another
    diffusers ``beta_schedule`` such as ``"linear"`` for other digits models)."""
    return {"num_train_timesteps": 1000, "beta_schedule": beta_schedule, "prediction_type": "epsilon"}


def default_sampling_scheduler(beta_schedule: str = "squaredcos_cap_v2") -> DDIMScheduler:
    """DDIM over the training schedule (``default_scheduler_config(beta_schedule)``): the
    pipeline's default sampler.

    The cosine schedule ends at ``alpha_bar(999) = 2.4e-9``. An epsilon model's x0 estimate
    there divides the prediction error by ``sqrt(alpha_bar)`` (x20,000), so samplers that start
    at t=999 ("trailing" spacing) blow the latent up. "leading" spacing with
    ``steps_offset=1``, as Stable Diffusion ships, starts at t=981 (``alpha_bar = 8.8e-4``).
    x0 clipping stays off: DDIM does not recompute epsilon from the clipped x0, and on this
    model the mismatch greys the background.
    """
    return DDIMScheduler(
        **default_scheduler_config(beta_schedule),
        timestep_spacing="leading",
        steps_offset=1,
        clip_sample=False,
    )


SAMPLERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
}


def use_sampler(pipe: DiffusionPipeline, name: str) -> DiffusionPipeline:
    """Swap the pipeline's scheduler for a diffusers one by short name, keeping its noise schedule."""
    import diffusers

    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    scheduler_class = getattr(diffusers, SAMPLERS[name])
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
    return pipe
