"""What the guidance rules buy in seconds at full model size, under SDPA and xformers.

    python evals/gpu_walltime.py --all          # one CUDA GPU: SDXL, FLUX.1 [dev], SD3 (<= ~8 min, budgeted)
    python evals/gpu_walltime.py --tiny         # the same code on CPU in seconds (tiny configs)
    python evals/gpu_walltime.py --report FILE  # a results file from a GPU run -> docs/BENCHMARKS.md
    evals/gpu_walltime.sh                       # the prepared GPU run (see its header)

**Models.** The denoisers are built from their published configs with random weights, so their
compute is the real models' and nothing is downloaded: SDXL base 1.0's UNet (fp16, 1024x1024,
batched CFG), FLUX.1 [dev]'s transformer (bf16, 512x512, true CFG: two calls per step) and SD3
medium's (fp16, 1024x1024, batched). Each runs inside its real diffusers pipeline with tiny text
encoders of the right widths, prompts encoded once beforehand and ``output_type="latent"``: the
seconds are the denoising loop's (denoiser, scheduler, the rule and diffguide's hook), not the
text encoders' or the VAE decode's, which a rule does not change.

**Variants** (NFE per image at ``N`` steps in brackets): ``untouched``, the pipeline's own CFG
without diffguide (2N); ``CFG`` through diffguide's hook (2N: its time over ``untouched`` is the
hook's overhead at equal NFE); ``APG`` at its defaults (2N); ``AG@k``, Adaptive Guidance whose
switch is forced to fire so that step ``k`` is the first without the unconditional call (N + k;
the cosine is still computed, so the cost is AG's); at batch 4 ``AG staggered``, the four
samples switching at four different steps (the fragmented batch); ``LinearAG`` on the paper's
schedule (coefficients ``u_hat = previous u``: timing only); ``interval``, the guidance interval
at its defaults (whatever NFE the schedule's noise levels give).

**Timing.** Every variant runs once to warm up; then ``--repeats`` rounds (one fewer at batch 4)
run every variant once, in an order rotated each round so drift hits all alike; a call is timed
with CUDA events (``perf_counter`` on CPU) and the median of the rounds is kept. Time saved and
NFE saved are both against ``untouched``.

**Backends.** ``untouched`` and ``CFG`` are timed interleaved under SDPA and under xformers
(``pipe.enable_xformers_memory_efficient_attention()``; :func:`diffguide.attention.attention_backends`
confirms which backend every module runs, and the operator xformers dispatches to is recorded).
At the smallest batch one variant per rule has its final latents under xformers, and under
SDPA's math kernel (the reference floor), compared with SDPA's by relative L2 error. Where
xformers cannot run (no CUDA, or a build that does not load) the reason is recorded and the rest
still runs.

The results file is written after every block; an error is recorded against its block; a block
predicted to end past ``--budget-s`` (its untouched call's time times its number of calls) is
skipped and named, so a slow GPU returns a partial file rather than nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from report import RESULTS, markdown_table, write_section  # noqa: E402
from tiny_pipelines import _clip_tokenizer, _t5_encoder, _t5_tokenizer, _vae  # noqa: E402

import diffguide as dg  # noqa: E402
from diffguide.attention import (  # noqa: E402
    attention_backends,
    attention_modules,
    restore_attention,
    snapshot_attention,
)
from diffguide.guidance.base import GuidanceStep  # noqa: E402
from diffguide.guidance.linear_ag import DEFAULT_REGRESSORS, paper_schedule  # noqa: E402

# -- published denoiser configs (config.json of each model's diffusers repository) --------------

#: stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (2.6 B parameters)
SDXL_UNET = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "use_linear_projection": True,
    "norm_num_groups": 32,
}
#: black-forest-labs/FLUX.1-dev, transformer/config.json (11.9 B parameters)
FLUX_TRANSFORMER = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}
#: stabilityai/stable-diffusion-3-medium-diffusers, transformer/config.json (2.0 B parameters)
SD3_TRANSFORMER = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 192,
}

#: the same layouts shrunk for --tiny (a few channels, one layer per block)
TINY = {
    "sdxl": {
        **SDXL_UNET,
        "layers_per_block": 1,
        "block_out_channels": (16, 32, 32),
        "transformer_layers_per_block": (1, 1, 1),
        "attention_head_dim": (2, 4, 4),
        "cross_attention_dim": 64,
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 6 * 8 + 40,  # time ids + CLIP-G-like pooled width
        "norm_num_groups": 8,
    },
    "flux": {
        **FLUX_TRANSFORMER,
        "num_layers": 1,
        "num_single_layers": 1,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "joint_attention_dim": 32,
        "pooled_projection_dim": 32,
        "axes_dims_rope": (4, 4, 8),
    },
    "sd3": {
        **SD3_TRANSFORMER,
        "num_layers": 2,
        "attention_head_dim": 8,
        "num_attention_heads": 2,
        "joint_attention_dim": 64,
        "caption_projection_dim": 16,
        "pooled_projection_dim": 64,
        "pos_embed_max_size": 16,
    },
}

# -- pipelines around them -------------------------------------------------------------------------


def _clip(hidden: int, projection: int | None = None):
    """A one-layer CLIP text encoder of width ``hidden`` (with a projection: ``...WithProjection``)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=514,
        hidden_size=hidden,
        intermediate_size=64,
        projection_dim=projection or hidden,
        num_hidden_layers=1,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


#: the tests' tiny VAE with four 8-channel levels: the real downsampling factor (8), next to no compute
_VAE_LEVELS = (8, 8, 8, 8)


def build_sdxl(config: dict):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    first = config["cross_attention_dim"] * 3 // 8  # CLIP-L's share of the 768 + 1280 = 2048 concat
    second = config["cross_attention_dim"] - first
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
        timestep_spacing="leading",
    )  # fmt: skip
    return StableDiffusionXLPipeline(
        vae=_vae(4, _VAE_LEVELS, scaling_factor=0.13025),
        text_encoder=_clip(first),
        text_encoder_2=_clip(second, projection=second),
        tokenizer=_clip_tokenizer(),
        tokenizer_2=_clip_tokenizer(),
        unet=UNet2DConditionModel(**config),
        scheduler=scheduler,
    )


def build_flux(config: dict):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tokenizer_2 = _t5_tokenizer(512)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )  # fmt: skip
    return FluxPipeline(
        scheduler=scheduler,
        vae=_vae(config["in_channels"] // 4, _VAE_LEVELS, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=_clip(config["pooled_projection_dim"]),
        tokenizer=_clip_tokenizer(),
        text_encoder_2=_t5_encoder(len(tokenizer_2), config["joint_attention_dim"]),
        tokenizer_2=tokenizer_2,
        transformer=FluxTransformer2DModel(**config),
    )


def build_sd3(config: dict):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    first = config["pooled_projection_dim"] * 3 // 8  # CLIP-L 768 + CLIP-G 1280 = 2048 pooled
    second = config["pooled_projection_dim"] - first
    tokenizer_3 = _t5_tokenizer(256)
    return StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(**config),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(16, _VAE_LEVELS, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=_clip(first, projection=first),
        tokenizer=_clip_tokenizer(),
        text_encoder_2=_clip(second, projection=second),
        tokenizer_2=_clip_tokenizer(),
        text_encoder_3=_t5_encoder(len(tokenizer_3), config["joint_attention_dim"]),
        tokenizer_3=tokenizer_3,
    )


@dataclasses.dataclass(frozen=True)
class ModelRun:
    """One denoiser's benchmark settings."""

    name: str
    build: Callable[[dict], object]
    config: dict
    dtype: torch.dtype
    resolution: int
    steps: int
    call: dict  # the pipeline's guidance arguments

    @property
    def denoiser(self) -> str:
        return "unet" if self.name == "sdxl" else "transformer"


def model_runs(tiny: bool) -> dict[str, ModelRun]:
    """The three models at full size on a GPU, or their tiny layouts on CPU."""
    runs = {
        "sdxl": ModelRun("sdxl", build_sdxl, SDXL_UNET, torch.float16, 1024, 10, {"guidance_scale": 5.0}),
        "flux": ModelRun(
            "flux",
            build_flux,
            FLUX_TRANSFORMER,
            torch.bfloat16,
            512,
            8,
            {"true_cfg_scale": 4.0, "guidance_scale": 3.5},
        ),  # fmt: skip
        "sd3": ModelRun("sd3", build_sd3, SD3_TRANSFORMER, torch.float16, 1024, 8, {"guidance_scale": 5.0}),
    }
    if tiny:
        runs = {
            name: dataclasses.replace(run, config=TINY[name], dtype=torch.float32, resolution=64, steps=6)
            for name, run in runs.items()
        }
    return runs


def build_pipeline(run: ModelRun, device: torch.device):
    """The pipeline with random weights made directly on ``device`` in ``run.dtype`` (seeded)."""
    previous = torch.get_default_dtype()
    torch.manual_seed(0)
    try:
        torch.set_default_dtype(run.dtype)  # a 12 B model is never materialised in fp32
        with torch.device(device):
            pipe = run.build(run.config)
    finally:
        torch.set_default_dtype(previous)
    # schedulers keep float tables: rebuild outside the half-precision default
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()  # as from_pretrained leaves them
    return pipe.to(device)


# -- the variants --------------------------------------------------------------------------------------


class ForcedSwitchAG(dg.AdaptiveGuidance):
    """Adaptive Guidance whose switch fires at known steps: sample ``i``'s first step without the
    unconditional call is ``first_unguided[i % len]``, so its NFE is ``N + k``. The cosine is
    still computed (AG's cost); only the decision is forced."""

    def __init__(self, first_unguided: Sequence[int]):
        super().__init__(threshold=0.5)
        self.first_unguided = list(first_unguided)

    def similarity(self, cond: torch.Tensor, uncond: torch.Tensor, step: GuidanceStep) -> torch.Tensor:
        gamma = super().similarity(cond, uncond, step)
        switch = torch.tensor([self.first_unguided[i % len(self.first_unguided)] for i in range(len(gamma))])
        return (step.step_index + 1 >= switch.to(gamma.device)).to(gamma.dtype)


def ag_steps(steps: int) -> list[int]:
    """The forced first unguided steps: about 30%, 50% and 70% of the way."""
    return sorted({max(1, round(steps * fraction)) for fraction in (0.3, 0.5, 0.7)})


def variants(steps: int, batch: int) -> dict[str, Callable[[], object] | None]:
    """Variant name -> a rule factory (``None``: the untouched pipeline)."""
    table: dict[str, Callable[[], object] | None] = {"untouched": None, "CFG": dg.CFG, "APG": dg.APG}
    for k in ag_steps(steps):
        table[f"AG@{k}"] = lambda k=k: ForcedSwitchAG([k])
    if batch > 1:
        spread = [max(1, round(steps * f)) for f in (0.3, 0.5, 0.7, 0.9)]
        table["AG staggered"] = lambda: ForcedSwitchAG(spread)
    coefficients = torch.zeros(steps, len(DEFAULT_REGRESSORS))
    coefficients[:, DEFAULT_REGRESSORS.index("prev_uncond")] = 1.0
    table["LinearAG"] = lambda: dg.LinearAG(coefficients, schedule=paper_schedule(steps))
    table["interval"] = dg.GuidanceInterval
    return table


# -- timing -------------------------------------------------------------------------------------------


def prompt_kwargs(pipe, run: ModelRun, batch: int) -> dict:
    """The prompt and negative prompt encoded once, so the timed calls run only the denoising loop
    (and the SDPA-math floor touches only the denoiser's attention, not the text encoders')."""
    prompt = ["a photograph of an astronaut riding a horse"] * batch
    negative = ["blurry, low quality"] * batch
    device = pipe._execution_device
    with torch.no_grad():
        if run.name == "flux":
            embeds, pooled, _ = pipe.encode_prompt(prompt=prompt, prompt_2=None, device=device)
            negative_embeds, negative_pooled, _ = pipe.encode_prompt(
                prompt=negative, prompt_2=None, device=device
            )
        elif run.name == "sd3":
            embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
                prompt=prompt, prompt_2=None, prompt_3=None, device=device, negative_prompt=negative,
                do_classifier_free_guidance=True,
            )  # fmt: skip
        else:
            embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
                prompt=prompt, device=device, negative_prompt=negative, do_classifier_free_guidance=True
            )
    return {
        "prompt_embeds": embeds,
        "negative_prompt_embeds": negative_embeds,
        "pooled_prompt_embeds": pooled,
        "negative_pooled_prompt_embeds": negative_pooled,
    }


def call_kwargs(pipe, run: ModelRun, batch: int) -> dict:
    return {
        **prompt_kwargs(pipe, run, batch),
        "height": run.resolution,
        "width": run.resolution,
        "num_inference_steps": run.steps,
        "output_type": "latent",
        **run.call,
    }


def timed_call(pipe, kwargs: dict, device: torch.device) -> tuple[float, torch.Tensor]:
    """Wall seconds of one seeded pipeline call and its output latents. On a GPU the CUDA events
    bracket the call on an idle stream, so the time includes the CPU's work (the hook's too)."""
    generator = torch.Generator(device).manual_seed(0)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        output = pipe(**kwargs, generator=generator).images
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000.0, output
    begin = time.perf_counter()
    output = pipe(**kwargs, generator=generator).images
    return time.perf_counter() - begin, output


def run_variant(pipe, factory, kwargs: dict, device: torch.device) -> tuple[float, torch.Tensor, float]:
    """(seconds, latents, NFE per image) of one call of a variant."""
    if factory is None:
        seconds, output = timed_call(pipe, kwargs, device)
        return seconds, output, 2.0 * kwargs["num_inference_steps"]
    with dg.guided(pipe, factory()):
        seconds, output = timed_call(pipe, kwargs, device)
        return seconds, output, dg.stats(pipe)["nfe"]


def rotated(names: list[str], round_index: int) -> list[str]:
    shift = round_index % len(names)
    return names[shift:] + names[:shift]


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    """``||output - reference|| / ||reference||`` in float32; NaN where either is not finite."""
    output, reference = output.float(), reference.float()
    if not (torch.isfinite(output).all() and torch.isfinite(reference).all()):
        return math.nan
    return float((output - reference).norm() / reference.norm().clamp_min(1e-12))


def time_block(pipe, run: ModelRun, kwargs: dict, batch: int, repeats: int, device: torch.device) -> dict:
    """Every variant at one batch size: median seconds per image, NFE, savings, and its latents."""
    table = variants(run.steps, batch)
    times: dict[str, list[float]] = {name: [] for name in table}
    outputs, nfe = {}, {}
    for name, factory in table.items():  # warm-up
        _, outputs[name], nfe[name] = run_variant(pipe, factory, kwargs, device)
    for round_index in range(repeats):
        for name in rotated(list(table), round_index):
            seconds, _, _ = run_variant(pipe, table[name], kwargs, device)
            times[name].append(seconds)
    base_seconds = statistics.median(times["untouched"])
    base_nfe = nfe["untouched"]
    rows = {}
    for name in table:
        seconds = statistics.median(times[name])
        nfe_saved = 1.0 - nfe[name] / base_nfe
        time_saved = 1.0 - seconds / base_seconds
        rows[name] = {
            "seconds_per_image": seconds / batch,
            "nfe_per_image": nfe[name],
            "nfe_saved": nfe_saved,
            "time_saved": time_saved,
            "time_per_nfe_saved": time_saved / nfe_saved if nfe_saved > 0 else None,
            "finite": bool(torch.isfinite(outputs[name].float()).all()),
            "rounds": times[name],
        }
    rows["CFG"]["output_rel_to_untouched"] = relative_error(outputs["CFG"], outputs["untouched"])
    return {"batch": batch, "repeats": repeats, "variants": rows, "_outputs": outputs}


# -- attention backends -------------------------------------------------------------------------------


#: one variant per rule for the output comparisons (the forced AG at its middle switch)
def accuracy_variants(steps: int) -> list[str]:
    return [
        "untouched",
        "CFG",
        "APG",
        f"AG@{ag_steps(steps)[len(ag_steps(steps)) // 2]}",
        "LinearAG",
        "interval",
    ]


@contextlib.contextmanager
def sdpa_math():
    """SDPA restricted to its math kernel (which computes half-precision inputs in float32): the
    reference floor."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


def enable_xformers(pipe, denoiser: torch.nn.Module) -> str | None:
    """Switch to xformers; ``None`` when every attention module then runs it, else the reason."""
    try:
        pipe.enable_xformers_memory_efficient_attention()
    except Exception as error:  # ModuleNotFoundError, a CUDA-less machine, a build that fails to load
        return _error(error)
    backends = attention_backends(denoiser)
    if set(backends) != {"xformers"}:
        return f"enable_xformers_memory_efficient_attention left {backends}"
    return None


def xformers_kernel(denoiser: torch.nn.Module, dtype: torch.dtype, device: torch.device, tokens: int) -> str:
    """The operator xformers' dispatcher picks for one of the model's attention shapes. Without
    the flash_attn packages, xformers 0.0.35 runs torch's own flash kernel (``fmha.flash`` with
    ``_USE_PT_FLASH_ATTN``) or torch's copy of its cutlass kernel (``aten._efficient_attention``)."""
    try:
        from xformers.ops import fmha

        module = next(module for _, module in attention_modules(denoiser))
        heads = module.heads
        head_dim = module.to_q.out_features // heads
        query = torch.empty(1, tokens, heads, head_dim, dtype=dtype, device=device)
        op = fmha.dispatch._dispatch_fw(fmha.Inputs(query, query, query), False)
        torch_flash = op is fmha.flash.FwOp and getattr(fmha.flash, "_USE_PT_FLASH_ATTN", False)
        return f"{op.NAME}" + (" (torch's flash kernel)" if torch_flash else "")
    except Exception as error:
        return f"unknown ({type(error).__name__}: {error})"[:200]


def backend_block(
    pipe, run: ModelRun, block: dict, kwargs: dict, repeats: int, device: torch.device, accuracy: bool
) -> dict:
    """At ``block``'s batch: untouched / CFG seconds under SDPA and xformers, interleaved; with
    ``accuracy``, also one variant per rule's latents under xformers and under SDPA's math
    kernel against SDPA's."""
    denoiser = getattr(pipe, run.denoiser)
    batch = block["batch"]
    table = variants(run.steps, batch)
    sdpa_outputs = block["_outputs"]
    compared = accuracy_variants(run.steps) if accuracy else []
    result: dict = {"batch": batch, "sdpa_modules": attention_backends(denoiser), "variants": {}}
    with sdpa_math():
        for name in compared:
            _, output, _ = run_variant(pipe, table[name], kwargs, device)
            result["variants"][name] = {"math_rel": relative_error(output, sdpa_outputs[name])}
    snapshot = snapshot_attention(denoiser)
    reason = enable_xformers(pipe, denoiser)
    try:
        if reason is not None:
            result["xformers"] = f"unavailable: {reason}"
            return result
        result["xformers"] = "ok"
        result["xformers_modules"] = attention_backends(denoiser)
        tokens = (run.resolution // 16) ** 2 if run.name != "sdxl" else (run.resolution // 8) ** 2
        result["xformers_kernel"] = xformers_kernel(denoiser, run.dtype, device, tokens)
        for name in compared:
            _, output, _ = run_variant(pipe, table[name], kwargs, device)
            result["variants"][name]["xformers_rel"] = relative_error(output, sdpa_outputs[name])
        speeds: dict[str, list[float]] = {}
        for name in ("untouched", "CFG"):
            run_variant(pipe, table[name], kwargs, device)  # warm-up of xformers' kernels
        for _ in range(repeats):
            for name in ("untouched", "CFG"):
                for backend in ("sdpa", "xformers"):
                    restore_attention(snapshot)
                    if backend == "xformers" and enable_xformers(pipe, denoiser) is not None:
                        raise RuntimeError("xformers could not be enabled again")
                    seconds, _, _ = run_variant(pipe, table[name], kwargs, device)
                    speeds.setdefault(f"{name} {backend}", []).append(seconds)
        result["seconds_per_image"] = {
            key: statistics.median(values) / batch for key, values in speeds.items()
        }
    finally:
        restore_attention(snapshot)
    return result


# -- the run ------------------------------------------------------------------------------------------


def versions() -> dict:
    import diffusers

    try:
        import xformers

        xformers_version = xformers.__version__
    except ImportError:
        xformers_version = None
    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "xformers": xformers_version}


def block_calls(steps: int, batch: int, repeats: int, accuracy: bool) -> int:
    """Pipeline calls of a timing block and its backend block (for the time budget)."""
    timing = len(variants(steps, batch)) * (1 + repeats)
    return timing + (2 * len(accuracy_variants(steps)) if accuracy else 0) + 2 + 4 * repeats


def _save(record: dict, out: Path | None) -> None:
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=2) + "\n")


def _error(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]


def benchmark(
    models: Sequence[str],
    tiny: bool,
    batches: Sequence[int],
    repeats: int,
    budget_s: float,
    device: torch.device,
    out: Path | None = None,
) -> dict:
    """Every model and batch; the record is saved after every block, an error is recorded
    against its block, and a block predicted (from the untouched call's warm-up time) to end past
    ``budget_s`` is skipped."""
    started = time.perf_counter()
    runs = model_runs(tiny)
    record: dict = {
        "mode": "tiny" if tiny else "full",
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads",
        "versions": versions(),
        "repeats": repeats,
        "models": {},
        "skipped": [],
        "errors": [],
    }

    def elapsed() -> float:
        return time.perf_counter() - started

    for name in models:
        run = runs[name]
        if elapsed() > budget_s:
            record["skipped"].append(f"{name}: over the {budget_s:g} s budget")
            continue
        try:
            pipe = build_pipeline(run, device)
        except Exception as error:  # out of memory, say: the next model may still fit
            record["errors"].append(f"{name} build: {_error(error)}")
            continue
        denoiser = getattr(pipe, run.denoiser)
        entry = {
            "dtype": str(run.dtype).removeprefix("torch."),
            "resolution": run.resolution,
            "steps": run.steps,
            "parameters": sum(p.numel() for p in denoiser.parameters()),
            "blocks": [],
            "backends": [],
        }
        record["models"][name] = entry
        print(
            f"[{elapsed():6.1f} s] {name}: built ({entry['parameters'] / 1e9:.2f} B parameters)", flush=True
        )
        for batch in batches:
            block_repeats = repeats if batch == 1 else max(1, repeats - 1)
            accuracy = batch == min(batches)
            try:
                kwargs = call_kwargs(pipe, run, batch)
                probe, _, _ = run_variant(pipe, None, kwargs, device)
                predicted = probe * block_calls(run.steps, batch, block_repeats, accuracy)
                if elapsed() + predicted > budget_s:
                    record["skipped"].append(
                        f"{name} batch {batch}: predicted {predicted:.0f} s would end past the {budget_s:g} s budget"
                    )
                    continue
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                block = time_block(pipe, run, kwargs, batch, block_repeats, device)
                try:
                    entry["backends"].append(
                        backend_block(pipe, run, block, kwargs, block_repeats, device, accuracy)
                    )
                except Exception as error:
                    record["errors"].append(f"{name} batch {batch} backends: {_error(error)}")
                block.pop("_outputs")
                if device.type == "cuda":
                    block["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                entry["blocks"].append(block)
            except Exception as error:
                record["errors"].append(f"{name} batch {batch}: {_error(error)}")
            record["wall_s"] = elapsed()
            _save(record, out)
            print(f"[{elapsed():6.1f} s] {name} batch {batch} done", flush=True)
        del pipe, denoiser
        gc.collect()  # diffusers' hook registry holds a cycle through the denoiser
        if device.type == "cuda":
            torch.cuda.empty_cache()
    record["wall_s"] = elapsed()
    _save(record, out)
    return record


# -- the report ---------------------------------------------------------------------------------------

#: the issue's goals: |time saved - NFE saved| in points at batch 1 / batch 4, hook overhead,
#: and xformers' outputs within fp16 tolerance of SDPA's
SAVING_GAP_POINTS = {1: 2.0, 4: 5.0}
HOOK_OVERHEAD_MAX = 0.01
#: relative L2 error of xformers' latents against SDPA's that counts as equal: fp16 rounding
#: over a whole trajectory, or twice the error of SDPA's own math kernel, whichever is larger
EQUAL_REL = 0.01


def _count(number: int) -> str:
    return f"{number / 1e9:.2f} B" if number >= 1e8 else f"{number / 1e3:.0f} k"


def _pct(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.1f}%"


def report(record: dict) -> str:
    """The BENCHMARKS section for a results file."""
    tiny = record["mode"] == "tiny"
    versions_line = ", ".join(f"{k} {v}" for k, v in record["versions"].items())
    lines = [
        (
            "**CPU/tiny run**: the tiny layouts on CPU, to show the code path works; its seconds say "
            "nothing about a GPU. A tiny network costs little next to the pipeline's own per-call work "
            "(text encoding, scheduler, hook), so time saved stays far below NFE saved here; the goals "
            "are judged on the GPU run (`evals/gpu_walltime.sh`)."
            if tiny
            else "Full-size denoisers with random weights (compute equals the real models')."
        ),
        "",
        f"Device: {record['device']}; {versions_line}; {record['repeats']} timed rounds per variant at "
        f"batch 1, one fewer at larger batches (median), whole run {record['wall_s']:.0f} s. Seconds are "
        "the denoising loop's (prompts encoded beforehand); savings are against the untouched pipeline. "
        f"Command: `python evals/gpu_walltime.py {'--tiny' if tiny else '--all'}`.",
    ]
    goals = []
    for name, entry in record["models"].items():
        lines += ["", f"**{name}** ({_count(entry['parameters'])} parameters, {entry['dtype']}, "
                  f"{entry['resolution']}x{entry['resolution']}, {entry['steps']} steps)", ""]  # fmt: skip
        rows = []
        for block in entry["blocks"]:
            for variant, row in block["variants"].items():
                ratio = row["time_per_nfe_saved"]
                label = variant if row.get("finite", True) else f"{variant} (non-finite output)"
                rows.append([
                    block["batch"], label, f"{row['seconds_per_image']:.3f}", f"{row['nfe_per_image']:.1f}",
                    _pct(row["nfe_saved"]), _pct(row["time_saved"]), "-" if ratio is None else f"{ratio:.2f}",
                ])  # fmt: skip
                gap_limit = SAVING_GAP_POINTS.get(block["batch"])
                if gap_limit is not None and (variant.startswith("AG") or variant == "LinearAG"):
                    gap = 100 * abs(row["time_saved"] - row["nfe_saved"])
                    goals.append((f"{name} b{block['batch']} {variant}: |time - NFE saved| {gap:.1f} pts "
                                  f"(goal <= {gap_limit:g})", gap <= gap_limit))  # fmt: skip
            overhead = (
                block["variants"]["CFG"]["seconds_per_image"]
                / block["variants"]["untouched"]["seconds_per_image"]
                - 1
            )
            goals.append((f"{name} b{block['batch']} hook overhead at equal NFE {100 * overhead:+.2f}% "
                          f"(goal <= {100 * HOOK_OVERHEAD_MAX:g}%)", overhead <= HOOK_OVERHEAD_MAX))  # fmt: skip
        memory = [
            f"batch {b['batch']} {b['peak_memory_gib']:.1f} GiB"
            for b in entry["blocks"]
            if "peak_memory_gib" in b
        ]
        if memory:
            lines += [f"Peak GPU memory: {', '.join(memory)}.", ""]
        lines.append(markdown_table(
            ["batch", "variant", "s / image", "NFE / image", "NFE saved", "time saved", "time / NFE saved"], rows
        ))  # fmt: skip
        for backends in entry["backends"]:
            lines += ["", f"Attention at batch {backends['batch']}: SDPA modules {backends['sdpa_modules']}; "
                      f"xformers {backends['xformers']}"
                      + (f" ({backends['xformers_modules']}, kernel {backends.get('xformers_kernel', '?')})"
                         if "xformers_modules" in backends else "")]  # fmt: skip
            rows = []
            for variant, errors in backends["variants"].items():
                xformers_rel = errors.get("xformers_rel")
                floor = errors["math_rel"]
                rows.append([variant, f"{floor:.2e}", "-" if xformers_rel is None else f"{xformers_rel:.2e}"])
                if xformers_rel is not None:
                    tolerance = EQUAL_REL if math.isnan(floor) else max(EQUAL_REL, 2 * floor)
                    goals.append((f"{name} b{backends['batch']} {variant}: xformers vs SDPA rel. error "
                                  f"{xformers_rel:.1e} (goal <= {tolerance:.1e})", xformers_rel <= tolerance))  # fmt: skip
            if rows:
                lines += [
                    "",
                    markdown_table(["variant", "SDPA-math vs SDPA (rel. L2)", "xformers vs SDPA"], rows),
                ]
            if "seconds_per_image" in backends:
                speeds = backends["seconds_per_image"]
                lines += ["", "Seconds per image, interleaved: " + "; ".join(
                    f"{key} {value:.3f}" for key, value in speeds.items()
                ) + f" (xformers / SDPA, untouched: {speeds['untouched xformers'] / speeds['untouched sdpa']:.3f})"]  # fmt: skip
    if record["skipped"]:
        lines += ["", "Skipped (time budget): " + "; ".join(record["skipped"])]
    if record.get("errors"):
        lines += ["", "Errors: " + "; ".join(record["errors"])]
    if not tiny:
        lines += ["", "Goals:"] + [f"- {'met' if ok else 'MISSED'}: {text}" for text, ok in goals]
    return "\n".join(lines)


def pending_gpu_section() -> str:
    return (
        "**GPU figures pending**: no CUDA GPU has run `evals/gpu_walltime.sh` yet. It builds SDXL's "
        "UNet, FLUX.1 [dev]'s and SD3 medium's transformers from their published configs and times "
        "every rule at batch 1 and 4 under SDPA and xformers (at most about 8 minutes on one "
        "H100/H200, budget-bound); `python evals/gpu_walltime.py --report FILE` turns its results file "
        "into this section. The CPU/tiny section runs the same code."
    )


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--all", action="store_true", help="the full-size run on a CUDA GPU")
    mode.add_argument("--tiny", action="store_true", help="tiny layouts on CPU (seconds)")
    mode.add_argument("--report", type=Path, help="a results file -> docs/BENCHMARKS.md")
    parser.add_argument("--models", default="sdxl,flux,sd3")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 3 full, 2 tiny)")
    parser.add_argument("--budget-s", type=float, default=390.0, help="start no new block after this")
    parser.add_argument("--out", type=Path, default=None, help="results file (default evals/results/...)")
    parser.add_argument("--no-section", action="store_true", help="do not write docs/BENCHMARKS.md")
    args = parser.parse_args(argv)

    if args.report is not None:
        try:
            record = json.loads(args.report.read_text())
            report(record)
        except (OSError, ValueError, KeyError, TypeError) as error:
            parser.error(f"{args.report} is not a results file of evals/gpu_walltime.py ({error!r})")
        (RESULTS / "gpu_walltime.json").write_text(json.dumps(record, indent=2) + "\n")
        write_section("gpu_walltime", report(record))
        return record
    if args.all and not torch.cuda.is_available():
        parser.error("--all needs a CUDA GPU; use --tiny on CPU")
    device = torch.device("cuda" if args.all else "cpu")
    models = [name.strip() for name in args.models.split(",") if name.strip()]
    unknown = sorted(set(models) - {"sdxl", "flux", "sd3"})
    if unknown:
        parser.error(f"unknown models {unknown}; choose from sdxl, flux, sd3")
    batches = [int(b) for b in args.batches.split(",")]
    repeats = args.repeats if args.repeats is not None else (2 if args.tiny else 3)
    out = args.out or RESULTS / ("gpu_walltime_tiny.json" if args.tiny else "gpu_walltime.json")
    record = benchmark(models, args.tiny, batches, repeats, args.budget_s, device, out)
    if not args.no_section:
        write_section("gpu_walltime_tiny" if args.tiny else "gpu_walltime", report(record))
        if args.tiny and not (RESULTS / "gpu_walltime.json").exists():
            write_section("gpu_walltime", pending_gpu_section())
    print(report(record))
    return record


if __name__ == "__main__":
    main()
