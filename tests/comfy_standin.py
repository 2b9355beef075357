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
``SAMPLERS`` re-derives ComfyUI's k-diffusion samplers on top of that, and :func:`sample` runs
one as ComfyUI's CFGGuider does (``transformer_options["sample_sigmas"]`` set per run).
``install()`` registers this module as ``comfy`` / ``comfy.samplers`` / ``comfy.model_patcher``.
"""

from __future__ import annotations

import copy
import math
import sys
import types

import pytest
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


def set_model_options_post_cfg_function(model_options, post_cfg_function, disable_cfg1_optimization=False):
    """``comfy.model_patcher``'s helper: appends to a new list, so the caller's list is untouched."""
    model_options["sampler_post_cfg_function"] = model_options.get("sampler_post_cfg_function", []) + [
        post_cfg_function
    ]
    if disable_cfg1_optimization:
        model_options["disable_cfg1_optimization"] = True
    return model_options


# -- samplers ----------------------------------------------------------------------------------
#
# Re-derived from the algorithms of ComfyUI's ``comfy/k_diffusion/sampling.py`` (k-diffusion's
# parametrization ``x = x0 + sigma eps``, no churn, ``eta = 1`` for the ancestral ones), written
# against a small interface: ``evaluate(x, sigma, model_options, i)`` is one model evaluation
# (ComfyUI's ``model(x, sigma * s_in, **extra_args)``) inside loop iteration ``i``; ``noise`` is
# k-diffusion's ``noise_sampler(sigma, sigma_next)``. What matters for the hooks is kept: the
# order and levels of the evaluations (float32 arithmetic, so midpoints land a rounding error
# off the schedule), and the CFG++ samplers reading ``uncond_denoised`` through a post-CFG
# function set on a copy of that run's ``model_options``.


def to_d(x, sigma, denoised):
    return (x - denoised) / sigma


def ancestral_step(sigma_from, sigma_to, eta=1.0):
    """k-diffusion's ``get_ancestral_step``: (sigma_down, sigma_up)."""
    if not eta:
        return sigma_to, torch.zeros_like(sigma_to)
    sigma_up = torch.minimum(
        sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
    )
    return (sigma_to**2 - sigma_up**2) ** 0.5, sigma_up


def _ones(x):
    return x.new_ones([x.shape[0]])


def _euler(evaluate, x, sigmas, options, noise):
    for i in range(len(sigmas) - 1):
        denoised = evaluate(x, sigmas[i] * _ones(x), options, i)
        x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
    return x


def _euler_ancestral(evaluate, x, sigmas, options, noise):
    for i in range(len(sigmas) - 1):
        denoised = evaluate(x, sigmas[i] * _ones(x), options, i)
        down, up = ancestral_step(sigmas[i], sigmas[i + 1])
        if down == 0:
            x = denoised
        else:
            x = x + to_d(x, sigmas[i], denoised) * (down - sigmas[i]) + noise(sigmas[i], sigmas[i + 1]) * up
    return x


def _heun(evaluate, x, sigmas, options, noise):
    for i in range(len(sigmas) - 1):
        denoised = evaluate(x, sigmas[i] * _ones(x), options, i)
        d, dt = to_d(x, sigmas[i], denoised), sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:  # the corrector evaluates at sigmas[i + 1], the level the next step starts at
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigmas[i + 1], evaluate(x_2, sigmas[i + 1] * _ones(x), options, i))
            x = x + (d + d_2) / 2 * dt
    return x


def _dpm_2(evaluate, x, sigmas, options, noise):
    for i in range(len(sigmas) - 1):
        denoised = evaluate(x, sigmas[i] * _ones(x), options, i)
        d = to_d(x, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigmas[i])
        else:  # the midpoint lies strictly between sigmas[i + 1] and sigmas[i]
            mid = sigmas[i].log().lerp(sigmas[i + 1].log(), 0.5).exp()
            x_2 = x + d * (mid - sigmas[i])
            d_2 = to_d(x_2, mid, evaluate(x_2, mid * _ones(x), options, i))
            x = x + d_2 * (sigmas[i + 1] - sigmas[i])
    return x


def _dpm_2_ancestral(evaluate, x, sigmas, options, noise):
    for i in range(len(sigmas) - 1):
        denoised = evaluate(x, sigmas[i] * _ones(x), options, i)
        down, up = ancestral_step(sigmas[i], sigmas[i + 1])
        d = to_d(x, sigmas[i], denoised)
        if down == 0:
            x = x + d * (down - sigmas[i])
        else:  # at eta = 1, sigma_down = s1^2 / s0, so the midpoint is sigmas[i + 1] up to rounding
            mid = sigmas[i].log().lerp(down.log(), 0.5).exp()
            x_2 = x + d * (mid - sigmas[i])
            d_2 = to_d(x_2, mid, evaluate(x_2, mid * _ones(x), options, i))
            x = x + d_2 * (down - sigmas[i]) + noise(sigmas[i], sigmas[i + 1]) * up
    return x


def _dpmpp_2s_ancestral(evaluate, x, sigmas, options, noise):
    for i in range(len(sigmas) - 1):
        denoised = evaluate(x, sigmas[i] * _ones(x), options, i)
        down, up = ancestral_step(sigmas[i], sigmas[i + 1])
        if down == 0:
            x = x + to_d(x, sigmas[i], denoised) * (down - sigmas[i])
        else:  # DPM-Solver++(2S): the intermediate level is exp(-(t + h / 2)), again ~sigmas[i + 1]
            t, t_next = -sigmas[i].log(), -down.log()
            h = t_next - t
            s = t + h / 2
            x_2 = ((-s).exp() / (-t).exp()) * x - (-h / 2).expm1() * denoised
            denoised_2 = evaluate(x_2, (-s).exp() * _ones(x), options, i)
            x = ((-t_next).exp() / (-t).exp()) * x - (-h).expm1() * denoised_2
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * up
    return x


def _dpmpp_2m(evaluate, x, sigmas, options, noise):
    old = None
    for i in range(len(sigmas) - 1):
        denoised = evaluate(x, sigmas[i] * _ones(x), options, i)
        t, t_next = -sigmas[i].log(), -sigmas[i + 1].log()
        h = t_next - t
        if old is None or sigmas[i + 1] == 0:
            mixed = denoised
        else:
            r = (t + sigmas[i - 1].log()) / h
            mixed = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
        x = (sigmas[i + 1] / sigmas[i]) * x - (-h).expm1() * mixed
        old = denoised
    return x


def _heunpp2(evaluate, x, sigmas, options, noise):
    end = sigmas[-1]
    for i in range(len(sigmas) - 1):
        denoised = evaluate(x, sigmas[i] * _ones(x), options, i)
        d, dt = to_d(x, sigmas[i], denoised), sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == end:
            x = x + d * dt
        elif sigmas[i + 2] == end:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigmas[i + 1], evaluate(x_2, sigmas[i + 1] * _ones(x), options, i))
            w2 = sigmas[i + 1] / (2 * sigmas[0])
            x = x + (d * (1 - w2) + d_2 * w2) * dt
        else:  # looks ahead to sigmas[i + 2]; the next step steps back up to sigmas[i + 1]
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigmas[i + 1], evaluate(x_2, sigmas[i + 1] * _ones(x), options, i))
            x_3 = x_2 + d_2 * (sigmas[i + 2] - sigmas[i + 1])
            d_3 = to_d(x_3, sigmas[i + 2], evaluate(x_3, sigmas[i + 2] * _ones(x), options, i))
            w2, w3 = sigmas[i + 1] / (3 * sigmas[0]), sigmas[i + 2] / (3 * sigmas[0])
            x = x + ((1 - w2 - w3) * d + w2 * d_2 + w3 * d_3) * dt
    return x


def _capture_uncond(options):
    """What ComfyUI's CFG++ samplers do before their loop: a post-CFG function on a copy of the
    run's model_options that keeps ``args["uncond_denoised"]`` (and disables the cfg=1 skip)."""
    captured = {}

    def post_cfg_function(args):
        captured["uncond"] = args["uncond_denoised"]
        return args["denoised"]

    return set_model_options_post_cfg_function(dict(options), post_cfg_function, True), captured


def _euler_ancestral_cfg_pp(evaluate, x, sigmas, options, noise, eta=1.0):
    options, captured = _capture_uncond(options)
    for i in range(len(sigmas) - 1):
        denoised = evaluate(x, sigmas[i] * _ones(x), options, i)
        if sigmas[i + 1] == 0:
            x = denoised
        else:  # steps along the unconditional prediction's direction from the guided x0
            down, up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
            x = denoised + down * to_d(x, sigmas[i], captured["uncond"])
            if eta > 0:
                x = x + noise(sigmas[i], sigmas[i + 1]) * up
    return x


def _euler_cfg_pp(evaluate, x, sigmas, options, noise):
    return _euler_ancestral_cfg_pp(evaluate, x, sigmas, options, noise, eta=0.0)


def _dpmpp_2m_cfg_pp(evaluate, x, sigmas, options, noise):
    options, captured = _capture_uncond(options)
    old_uncond = None
    for i in range(len(sigmas) - 1):
        denoised = evaluate(x, sigmas[i] * _ones(x), options, i)
        uncond = captured["uncond"]
        t, t_next = -sigmas[i].log(), -sigmas[i + 1].log()
        h = t_next - t
        if old_uncond is None or sigmas[i + 1] == 0:
            mixed = -torch.exp(-h) * uncond
        else:
            r = (t + sigmas[i - 1].log()) / h
            mixed = -torch.exp(-h) * uncond - torch.expm1(-h) * (1 / (2 * r)) * (denoised - old_uncond)
        x = denoised + mixed + torch.exp(-h) * x
        old_uncond = uncond
    return x


def _dpmpp_2s_ancestral_cfg_pp(evaluate, x, sigmas, options, noise):
    options, captured = _capture_uncond(options)
    for i in range(len(sigmas) - 1):
        denoised = evaluate(x, sigmas[i] * _ones(x), options, i)
        guidance_vector = denoised - captured["uncond"]
        down, up = ancestral_step(sigmas[i], sigmas[i + 1])
        if down == 0:
            x = x + to_d(x, sigmas[i], captured["uncond"]) * (down - sigmas[i])
        else:  # the second evaluation is only read through the uncond it hands the post-CFG hook
            t, t_next = -sigmas[i].log(), -down.log()
            h = t_next - t
            s = t + h / 2
            x_2 = ((-s).exp() / (-t).exp()) * x - (-h / 2).expm1() * captured["uncond"]
            evaluate(x_2, (-s).exp() * _ones(x), options, i)
            x = ((-t_next).exp() / (-t).exp()) * x - (-h).expm1() * captured["uncond"]
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * up
        x = x + guidance_vector
    return x


#: name -> sampler(evaluate, x, sigmas, model_options, noise), as ComfyUI names them
SAMPLERS = {
    "euler": _euler,
    "euler_ancestral": _euler_ancestral,
    "heun": _heun,
    "dpm_2": _dpm_2,
    "dpm_2_ancestral": _dpm_2_ancestral,
    "dpmpp_2s_ancestral": _dpmpp_2s_ancestral,
    "dpmpp_2m": _dpmpp_2m,
    "heunpp2": _heunpp2,
    "euler_cfg_pp": _euler_cfg_pp,
    "euler_ancestral_cfg_pp": _euler_ancestral_cfg_pp,
    "dpmpp_2m_cfg_pp": _dpmpp_2m_cfg_pp,
    "dpmpp_2s_ancestral_cfg_pp": _dpmpp_2s_ancestral_cfg_pp,
}
CFG_PP_SAMPLERS = {name for name in SAMPLERS if name.endswith("cfg_pp")}


class PerSampleNoise:
    """k-diffusion's ``noise_sampler(sigma, sigma_next)``, drawn per sample: row ``b`` of the
    ``n``-th call comes from a generator seeded by ``(seed, sample_ids[b], n)``, so a sample gets
    the same noise in a batch as alone. (ComfyUI draws one tensor for the whole batch.)"""

    def __init__(self, like: torch.Tensor, seed: int = 0, sample_ids=None):
        self.shape, self.dtype, self.seed = like.shape[1:], like.dtype, seed
        self.ids = list(range(like.shape[0])) if sample_ids is None else list(sample_ids)
        self.calls = 0

    def __call__(self, sigma, sigma_next):
        n, self.calls = self.calls, self.calls + 1
        seeds = [((self.seed * 1_000_003 + k) * 10_007 + n) for k in self.ids]
        rows = [torch.randn(self.shape, generator=torch.Generator().manual_seed(s)) for s in seeds]
        return torch.stack(rows).to(self.dtype)


def sample(
    sampler_name: str,
    patcher: ModelPatcher,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    cond,
    uncond,
    cond_scale: float,
    *,
    seed: int = 0,
    sample_ids=None,
    trace: list | None = None,
):
    """One sampling run as ComfyUI's CFGGuider makes it: a copy of the patcher's
    ``model_options`` with ``transformer_options["sample_sigmas"] = sigmas`` for this run, and
    each evaluation through ``sampling_function``. ``trace`` collects ``(loop index, sigma)``
    per model evaluation."""
    options = copy.copy(patcher.model_options)
    options["transformer_options"] = {**options.get("transformer_options", {}), "sample_sigmas": sigmas}

    def evaluate(x, sigma, model_options, i):
        if trace is not None:
            trace.append((i, float(sigma[0])))
        return sampling_function(patcher.model, x, sigma, uncond, cond, cond_scale, model_options)

    return SAMPLERS[sampler_name](evaluate, x, sigmas, options, PerSampleNoise(x, seed, sample_ids))


def sample_euler(
    patcher: ModelPatcher, x: torch.Tensor, sigmas: torch.Tensor, cond, uncond, cond_scale: float
):
    """k-diffusion's Euler over ``sigmas`` through ``sampling_function``, with ComfyUI's
    ``transformer_options["sample_sigmas"]`` set for the run."""
    return sample("euler", patcher, x, sigmas, cond, uncond, cond_scale)


def conditions() -> tuple[list[dict], list[dict]]:
    """ComfyUI-style ``(cond, uncond)`` lists for :class:`CountingDenoiser`: a bias per condition."""
    cond = [{"name": "cond", "bias": torch.tensor([0.3, -0.2, 0.1, 0.5]).reshape(4, 1, 1)}]
    uncond = [{"name": "uncond", "bias": torch.zeros(4, 1, 1)}]
    return cond, uncond


@pytest.fixture(autouse=True)
def comfy_modules():
    """Import this fixture into a test module to run every test there with the stand-in installed."""
    install()
    yield
    uninstall()


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
    patcher.set_model_options_post_cfg_function = set_model_options_post_cfg_function
    package.samplers, package.model_patcher = samplers, patcher
    sys.modules.update({"comfy": package, "comfy.samplers": samplers, "comfy.model_patcher": patcher})


def uninstall() -> None:
    for name in ("comfy", "comfy.samplers", "comfy.model_patcher"):
        sys.modules.pop(name, None)
