"""A stand-in for the parts of ComfyUI our nodes touch (ComfyUI is not on PyPI).

It re-implements, from ComfyUI's ``comfy/samplers.py`` and ``comfy/model_patcher.py``, the
order in which a sampling step calls the hooks and the argument dicts each hook receives:

1. ``sampler_calc_cond_batch_function({"conds", "input", "sigma", "model", "model_options"})``
   if registered, else ``calc_cond_batch(model, conds, x, sigma, model_options)``: the
   denoised prediction per entry of ``conds = [cond, uncond]`` (``uncond`` is ``None`` at
   ``cond_scale == 1`` unless ``disable_cfg1_optimization``);
2. each ``sampler_pre_cfg_function({"conds", "conds_out", "cond_scale", "timestep", "input",
   "sigma", "model", "model_options"})`` in order, returning the new ``conds_out``;
3. ``cfg_function``: ``sampler_cfg_function`` if set, else ``u + (c - u) * cond_scale``;
4. each ``sampler_post_cfg_function({"denoised", "cond", "uncond", "cond_scale", "model",
   "uncond_denoised", "cond_denoised", "sigma", "model_options", "input"})``.

The "model" is a callable ``denoise(x, sigma, cond) -> x0`` that counts its rows per cond.
``install()`` registers this module as ``comfy`` / ``comfy.samplers`` / ``comfy.model_patcher``.
"""

from __future__ import annotations

import copy
import math
import sys
import types

import torch


class CountingDenoiser:
    """``x0 = (x - sigma * tanh(W x + bias_c)) / 1``-style stand-in network: a fixed random
    map per condition, so cond and uncond differ, with a count of rows evaluated per cond."""

    def __init__(self, channels: int = 4, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(channels, channels, generator=generator) * 0.5
        self.rows: dict[str, int] = {}
        #: (position in conds, cond name) per evaluation: ComfyUI labels position 1 "uncond"
        self.positions: list[tuple[int, str]] = []

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict) -> torch.Tensor:
        self.rows[cond["name"]] = self.rows.get(cond["name"], 0) + x.shape[0]
        mixed = torch.einsum("oc,bchw->bohw", self.weight, x) + cond["bias"]
        return x - sigma.reshape(-1, 1, 1, 1) * torch.tanh(mixed) / (1 + sigma.reshape(-1, 1, 1, 1))


def calc_cond_batch(model, conds, x_in, timestep, model_options):
    """Denoised predictions, one per entry of ``conds`` (zeros for a ``None`` entry, as
    ComfyUI's ``out_conds / out_counts`` with nothing added gives)."""
    out = []
    for position, cond in enumerate(conds):
        if cond is None:
            out.append(torch.zeros_like(x_in))
            continue
        if hasattr(model, "positions"):
            model.positions.append((position, cond[0]["name"]))
        out.append(model(x_in, timestep, cond[0]))  # ComfyUI conds are lists of cond dicts
    return out


def cfg_function(
    model, cond_pred, uncond_pred, cond_scale, x, timestep, model_options=None, cond=None, uncond=None
):
    model_options = model_options or {}
    if "sampler_cfg_function" in model_options:
        args = {
            "cond": x - cond_pred, "uncond": x - uncond_pred, "cond_scale": cond_scale, "timestep": timestep,
            "input": x, "sigma": timestep, "cond_denoised": cond_pred, "uncond_denoised": uncond_pred,
            "model": model, "model_options": model_options,
        }  # fmt: skip
        cfg_result = x - model_options["sampler_cfg_function"](args)
    else:
        cfg_result = uncond_pred + (cond_pred - uncond_pred) * cond_scale
    for fn in model_options.get("sampler_post_cfg_function", []):
        args = {
            "denoised": cfg_result, "cond": cond, "uncond": uncond, "cond_scale": cond_scale, "model": model,
            "uncond_denoised": uncond_pred, "cond_denoised": cond_pred, "sigma": timestep,
            "model_options": model_options, "input": x,
        }  # fmt: skip
        cfg_result = fn(args)
    return cfg_result


def sampling_function(model, x, timestep, uncond, cond, cond_scale, model_options=None, seed=None):
    model_options = model_options or {}
    if math.isclose(cond_scale, 1.0) and not model_options.get("disable_cfg1_optimization", False):
        uncond_ = None
    else:
        uncond_ = uncond
    conds = [cond, uncond_]
    if "sampler_calc_cond_batch_function" in model_options:
        args = {"conds": conds, "input": x, "sigma": timestep, "model": model, "model_options": model_options}
        out = model_options["sampler_calc_cond_batch_function"](args)
    else:
        out = calc_cond_batch(model, conds, x, timestep, model_options)
    for fn in model_options.get("sampler_pre_cfg_function", []):
        args = {
            "conds": conds, "conds_out": out, "cond_scale": cond_scale, "timestep": timestep, "input": x,
            "sigma": timestep, "model": model, "model_options": model_options,
        }  # fmt: skip
        out = fn(args)
    return cfg_function(
        model, out[0], out[1], cond_scale, x, timestep, model_options=model_options, cond=cond, uncond=uncond_
    )


class ModelPatcher:
    """``clone()`` shares the model and copies ``model_options``; the setters mirror ComfyUI's."""

    def __init__(self, model, model_options: dict | None = None):
        self.model = model
        self.model_options = model_options or {"transformer_options": {}}

    def clone(self) -> ModelPatcher:
        return ModelPatcher(self.model, copy.deepcopy(self.model_options))

    def set_model_sampler_cfg_function(self, fn, disable_cfg1_optimization=False):
        self.model_options["sampler_cfg_function"] = fn
        if disable_cfg1_optimization:
            self.model_options["disable_cfg1_optimization"] = True

    def set_model_sampler_pre_cfg_function(self, fn, disable_cfg1_optimization=False):
        self.model_options["sampler_pre_cfg_function"] = self.model_options.get(
            "sampler_pre_cfg_function", []
        ) + [fn]
        if disable_cfg1_optimization:
            self.model_options["disable_cfg1_optimization"] = True

    def set_model_sampler_post_cfg_function(self, fn, disable_cfg1_optimization=False):
        self.model_options["sampler_post_cfg_function"] = self.model_options.get(
            "sampler_post_cfg_function", []
        ) + [fn]
        if disable_cfg1_optimization:
            self.model_options["disable_cfg1_optimization"] = True

    def set_model_sampler_calc_cond_batch_function(self, fn):
        self.model_options["sampler_calc_cond_batch_function"] = fn


def sample_euler(
    patcher: ModelPatcher, x: torch.Tensor, sigmas: torch.Tensor, cond, uncond, cond_scale: float
):
    """k-diffusion's Euler over ``sigmas`` through ``sampling_function``, with ComfyUI's
    ``transformer_options["sample_sigmas"]`` set for the run."""
    options = copy.copy(patcher.model_options)
    options["transformer_options"] = {**options.get("transformer_options", {}), "sample_sigmas": sigmas}
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i] * x.new_ones(x.shape[0])
        denoised = sampling_function(patcher.model, x, sigma, uncond, cond, cond_scale, options)
        x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
    return x


def install() -> None:
    """Make ``import comfy.samplers`` / ``comfy.model_patcher`` find this stand-in."""
    package = types.ModuleType("comfy")
    package.__path__ = []
    samplers = types.ModuleType("comfy.samplers")
    samplers.calc_cond_batch = calc_cond_batch
    samplers.sampling_function = sampling_function
    samplers.cfg_function = cfg_function
    patcher = types.ModuleType("comfy.model_patcher")
    patcher.ModelPatcher = ModelPatcher
    package.samplers, package.model_patcher = samplers, patcher
    sys.modules.update({"comfy": package, "comfy.samplers": samplers, "comfy.model_patcher": patcher})


def uninstall() -> None:
    for name in ("comfy", "comfy.samplers", "comfy.model_patcher"):
        sys.modules.pop(name, None)
