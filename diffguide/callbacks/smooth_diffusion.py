"""Smooth Diffusion's step-wise variation regularization as a training callback (Guo et al.,
"Smooth Diffusion: Crafting Smooth Latent Spaces in Diffusion Models", CVPR 2024,
arXiv 2312.04410).

    L = MSE + lambda mean_i (v_i - a)^2,   v_i = ||d <x0_hat_i, n_i> / d eps_i||,
    a <- a + 0.01 (mean v - a)

The math (``variation_norms``, the running target ``a``) is :mod:`diffguide.smooth`'s; this
file only reads its inputs off the training context and carries ``a`` in ``state_dict``.
"""

from __future__ import annotations

import warnings

import torch

from ..attention import restore_attention, snapshot_attention, use_twice_differentiable_attention
from ..smooth import (
    BandedVariationRegularizer,
    VariationRegularizer,
    training_alphas_cumprod,
)
from .base import Callback, TrainContext


class SmoothVariation(Callback):
    """The variation penalty for diffusion training loops.

    Reads ``ctx.model`` (the UNet), ``ctx.noise``, ``ctx.timesteps``, ``ctx.noise_scheduler``
    (``alphas_cumprod``, ``config.prediction_type``), ``ctx.extras["x0"]`` (the clean
    images or latents) and ``ctx.extras.get("model_kwargs", {})`` (conditioning such as
    ``class_labels`` or ``encoder_hidden_states``); ``ctx.extras.get("generator")`` draws the
    probe. ``target_bands > 1`` (ours) keeps one running target per band of timesteps
    (:class:`diffguide.smooth.BandedVariationRegularizer`). ``setup`` switches attention to a
    twice-differentiable implementation (the penalty needs a double backward, which torch's fused
    kernels and xformers lack), with a warning where it replaces a backend the user chose
    (xformers, flash ...); a processor it cannot replace is refused
    (:func:`diffguide.attention.use_twice_differentiable_attention`). ``on_train_end`` puts the
    model's own attention back.
    """

    def __init__(
        self, weight: float = 1.0, decay: float = 0.01, min_alpha_bar: float = 0.0, target_bands: int = 1
    ):
        kwargs = {"weight": weight, "decay": decay, "min_alpha_bar": min_alpha_bar}
        self.regularizer = (
            VariationRegularizer(**kwargs)
            if target_bands == 1
            else BandedVariationRegularizer(target_bands, **kwargs)
        )
        self._attention = None  # the model's own attention, put back at on_train_end

    def setup(self, model: torch.nn.Module, optimizer) -> None:
        self._attention = snapshot_attention(model)
        chosen = sorted(set(use_twice_differentiable_attention(model)) - {"sdpa", "plain"})
        if chosen:
            warnings.warn(
                f"SmoothVariation switched attention from {', '.join(chosen)} to a twice-differentiable "
                "implementation: its penalty needs a double backward, which those lack",
                stacklevel=2,
            )

    def on_train_end(self, ctx: TrainContext) -> None:
        if self._attention is not None:
            restore_attention(self._attention)  # the user's attention again, for sampling
            self._attention = None

    def loss_terms(self, ctx: TrainContext) -> dict[str, torch.Tensor]:
        if self.regularizer.weight == 0:
            return {}
        missing = [
            name
            for name, value in (
                ("noise", ctx.noise),
                ("timesteps", ctx.timesteps),
                ("noise_scheduler", ctx.noise_scheduler),
            )
            if value is None
        ] + ([] if "x0" in ctx.extras else ['extras["x0"]'])
        if missing:
            raise ValueError(f"SmoothVariation needs ctx.{', ctx.'.join(missing)} set by the training loop")
        kwargs = ctx.extras.get("model_kwargs", {})
        model = ctx.model
        scheduler = ctx.noise_scheduler
        penalty = self.regularizer.loss(
            lambda x_t, t: model(x_t, t, **kwargs).sample,
            ctx.extras["x0"],
            ctx.noise,
            ctx.timesteps,
            training_alphas_cumprod(scheduler).to(ctx.noise.device),
            scheduler.config.prediction_type,
            ctx.extras.get("generator"),
        )
        return {"variation": penalty}

    def state_dict(self) -> dict:
        return self.regularizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.regularizer.load_state_dict(state)
