"""diffguide rules as diffusers guiders (``dg.as_guider``) on tiny offline modular pipelines.

The modular pipelines are assembled from their blocks with the components of the classic tiny builders,
so ``dg.apply`` on the classic pipeline is the reference: a guider must give what the hook adapters give.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers.guiders import ClassifierFreeGuidance
from diffusers.modular_pipelines import (
    QwenImageAutoBlocks,
    StableDiffusionXLAutoBlocks,
    Wan22Blocks,
    WanBlocks,
)
from diffusers.utils import logging as diffusers_logging
from tiny_flow_two_call import CASES as FLOW_CASES
from tiny_pipelines import tiny_sd3, tiny_sdxl
from tiny_video_two_call import CASES as VIDEO_CASES

import diffguide as dg
from diffguide.adapters.guider import DiffguideGuidance, rule_config
from diffguide.guidance import GuidanceRule
from diffguide.guidance.linear_ag import LinearAG

PROMPTS = {"prompt": ["a cat", "a dog"], "negative_prompt": ["bad", "ugly"]}
STEPS = 4
SCALE = 5.0
TOLERANCE = 1e-5


@pytest.fixture(autouse=True)
def _quiet_guiders():
    """BaseGuidance warns 'experimental feature' on every construction."""
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    yield
    diffusers_logging.set_verbosity(level)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).abs().max() / expected.double().abs().max())


def modular(blocks, classic, drop: tuple[str, ...] = ()):
    """A modular pipeline from ``blocks`` (less the sub-blocks ``drop``) with ``classic``'s components."""
    for name in drop:
        blocks.sub_blocks.pop(name)
    pipe = blocks.init_pipeline()
    components = {k: v for k, v in classic.components.items() if k in pipe._component_specs and v is not None}
    pipe.update_components(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def seed() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def conditions_per_step(guider: DiffguideGuidance) -> list[int]:
    """Record how many batches the guider asks for at each step."""
    seen: list[int] = []
    prepare = guider.prepare_inputs

    def recording(data):
        batches = prepare(data)
        seen.append(len(batches))
        return batches

    guider.prepare_inputs = recording
    return seen


# ------------------------------------------------------------------------------------------------ SDXL


@pytest.fixture(scope="module")
def sdxl():
    classic = tiny_sdxl()
    return classic, modular(StableDiffusionXLAutoBlocks(), classic)


SDXL_CALL = {**PROMPTS, "num_inference_steps": STEPS, "height": 16, "width": 16}


def run_modular(pipe, guider, **overrides) -> torch.Tensor:
    pipe.update_components(guider=guider)
    return pipe(**{**SDXL_CALL, **overrides}, generator=seed(), output="latents")


def run_classic(classic, rule: GuidanceRule) -> tuple[torch.Tensor, list[int]]:
    with dg.guided(classic, rule):
        latents = classic(**SDXL_CALL, guidance_scale=SCALE, generator=seed(), output_type="latent").images
        return latents, dg.stats(classic)["nfe_per_sample"]


# AG thresholds are 1 - x: at 4 steps the tiny SDXL's x0 cosines are 1 - (6e-5, 1e-4) at step 0, 1 - (4.1e-6,
# 2.1e-6) at step 1 and 1 - 2e-7 at step 2, so 1 - 2e-5 switches both samples after step 1.
SDXL_RULES = {
    "cfg": lambda: dg.CFG(),
    "apg-as-cfg": lambda: dg.APG(eta=1.0, norm_threshold=math.inf, momentum=0.0),
    "apg": lambda: dg.APG(eta=0.0, norm_threshold=1.0, momentum=-0.5),  # x0 space, cap and momentum active
    "ag": lambda: dg.AdaptiveGuidance(threshold=1 - 2e-5),
    "interval": lambda: dg.GuidanceInterval(sigma_lo=0.5, sigma_hi=2.0),
}


@pytest.mark.parametrize("name", SDXL_RULES)
def test_sdxl_guider_matches_classic_hooks(sdxl, name):
    classic, pipe = sdxl
    guider = dg.as_guider(SDXL_RULES[name](), SCALE, scheduler=pipe)
    latents = run_modular(pipe, guider)
    expected, nfe = run_classic(classic, SDXL_RULES[name]())
    assert relative_error(latents, expected) < TOLERANCE
    assert guider.stats()["nfe_per_sample"] == nfe
    assert guider.stats()["steps"] == STEPS


def test_sdxl_x0_rules_are_not_cfg(sdxl):
    """The real APG setting and the interval differ from CFG, so their identities above test something."""
    _, pipe = sdxl
    cfg = run_modular(pipe, ClassifierFreeGuidance(guidance_scale=SCALE))
    for name in ("apg", "interval"):
        guided = run_modular(pipe, dg.as_guider(SDXL_RULES[name](), SCALE, scheduler=pipe))
        assert relative_error(guided, cfg) > 1e-3


def test_sdxl_guider_cfg_equals_diffusers_cfg(sdxl):
    _, pipe = sdxl
    own = run_modular(pipe, ClassifierFreeGuidance(guidance_scale=SCALE))
    ours = run_modular(pipe, dg.as_guider(dg.CFG(), SCALE))
    assert relative_error(ours, own) < TOLERANCE


def test_sdxl_ag_partial_switch_is_batch_level(sdxl):
    """Sample 1 switches one step before sample 0: the guider still runs its unconditional pass (one batch
    for all), hands it to the rule as a copy of cond, and gives the per-sample adapter's output."""
    classic, pipe = sdxl
    rule = dg.AdaptiveGuidance(threshold=1 - 3e-6)
    guider = dg.as_guider(rule, SCALE, scheduler=pipe)
    latents = run_modular(pipe, guider)
    expected, nfe = run_classic(classic, dg.AdaptiveGuidance(threshold=1 - 3e-6))
    assert nfe[0] != nfe[1], "the tiny model no longer switches the samples at different steps"
    assert relative_error(latents, expected) < TOLERANCE
    assert guider.nfe_per_sample.tolist() == [max(nfe)] * 2
    assert torch.isnan(rule.similarities[2][1]) and not torch.isnan(rule.similarities[2][0])


def test_sdxl_linear_ag_matches_classic(sdxl):
    """LinearAG's estimate and conditional steps run one batch; the result is the hook adapter's."""
    classic, pipe = sdxl
    rule = dg.calibrate_linear_ag(classic, {**SDXL_CALL, "guidance_scale": SCALE, "output_type": "latent"})
    guider = dg.as_guider(rule, SCALE)
    seen = conditions_per_step(guider)
    latents = run_modular(pipe, guider)
    expected, nfe = run_classic(classic, rule.with_schedule(rule.schedule))
    assert seen == [2 if kind == "cfg" else 1 for kind in rule.schedule]
    assert relative_error(latents, expected) < TOLERANCE
    assert guider.stats()["nfe_per_sample"] == nfe == [rule.nfe] * 2


def test_interval_that_never_guides_runs_one_batch(sdxl):
    _, pipe = sdxl
    guider = dg.as_guider(dg.GuidanceInterval(sigma_lo=100.0, sigma_hi=200.0), SCALE, scheduler=pipe)
    seen = conditions_per_step(guider)
    latents = run_modular(pipe, guider)
    conditional = run_modular(pipe, ClassifierFreeGuidance(guidance_scale=1.0))
    assert seen == [1] * STEPS
    assert relative_error(latents, conditional) < TOLERANCE
    assert guider.nfe_per_sample.tolist() == [STEPS, STEPS]


def test_ag_threshold_above_one_is_cfg(sdxl):
    _, pipe = sdxl
    guider = dg.as_guider(dg.AdaptiveGuidance(threshold=1.5), SCALE, scheduler=pipe)
    seen = conditions_per_step(guider)
    latents = run_modular(pipe, guider)
    cfg = run_modular(pipe, ClassifierFreeGuidance(guidance_scale=SCALE))
    assert seen == [2] * STEPS
    assert relative_error(latents, cfg) < TOLERANCE


def test_rule_is_reset_per_call(sdxl):
    """APG's momentum and AG's switch start afresh in every call (diffusers has no reset hook)."""
    _, pipe = sdxl
    for rule in (SDXL_RULES["apg"](), SDXL_RULES["ag"]()):
        guider = dg.as_guider(rule, SCALE, scheduler=pipe)
        first = run_modular(pipe, guider)
        second = run_modular(pipe, guider)
        assert torch.equal(first, second)
        assert guider.num_conditions == 2  # asked before the next loop: not the last step's answer


def test_saved_guider_reloads_to_the_same_rule_and_output(sdxl, tmp_path):
    _, pipe = sdxl
    guider = dg.as_guider(SDXL_RULES["apg"](), SCALE, scheduler=pipe, stop=0.75)
    latents = run_modular(pipe, guider)
    guider.save_pretrained(tmp_path)
    assert (tmp_path / "guider_config.json").is_file()
    loaded = DiffguideGuidance.from_pretrained(tmp_path)
    assert type(loaded.rule) is type(guider.rule)
    assert rule_config(loaded.rule) == rule_config(guider.rule)
    assert (loaded.config.guidance_scale, loaded.config.stop) == (SCALE, 0.75)
    assert torch.equal(run_modular(pipe, loaded.bind(pipe)), latents)


def test_config_round_trips_inf_and_linear_ag(tmp_path):
    interval = dg.as_guider(dg.GuidanceInterval(sigma_lo=0.3, sigma_hi=math.inf), 3.0)
    interval.save_pretrained(tmp_path / "interval")
    assert DiffguideGuidance.from_pretrained(tmp_path / "interval").rule.sigma_hi == math.inf
    coefficients = torch.randn(6, 4, dtype=torch.float64)
    rule = LinearAG(coefficients, schedule=["cfg", "estimate"] * 3, guidance_scale=3.0)
    dg.as_guider(rule, 3.0).save_pretrained(tmp_path / "linear")
    loaded = DiffguideGuidance.from_pretrained(tmp_path / "linear").rule
    assert torch.equal(loaded.coefficients, coefficients)
    assert rule_config(loaded) == rule_config(rule)


def test_unknown_rule_is_refused():
    class Mine(GuidanceRule):
        def combine(self, cond, uncond, uncond_mask, step):
            return cond

    with pytest.raises(TypeError, match="diffguide's own rules"):
        dg.as_guider(Mine())


@pytest.mark.parametrize("rule", [dg.APG(), dg.AdaptiveGuidance(), dg.GuidanceInterval(sigma_lo=0.5)])
def test_rule_needing_noise_level_without_scheduler_names_the_fix(sdxl, rule):
    _, pipe = sdxl
    with pytest.raises(ValueError, match=r"guider\.bind\(pipe\)"):
        run_modular(pipe, dg.as_guider(rule, SCALE))


class _Recorder(GuidanceRule):
    """Asks an unconditional pass for sample 0 only and records what ``combine`` is handed."""

    def __init__(self):
        self.seen = []

    def uncond_mask(self, batch_size, step):
        return torch.arange(batch_size) == 0

    def combine(self, cond, uncond, uncond_mask, step):
        self.seen.append((cond, uncond, uncond_mask))
        return cond


def test_rows_not_asked_for_arrive_as_a_copy_of_cond():
    guider = dg.as_guider(dg.CFG(), SCALE)
    guider.rule = recorder = _Recorder()
    assert guider.num_conditions == 2  # before the loop
    guider.set_state(step=0, num_inference_steps=1, timestep=torch.tensor(999))
    embeds = (torch.zeros(2, 3), torch.ones(2, 3))
    batches = guider.prepare_inputs({"prompt_embeds": embeds})
    assert len(batches) == 2 and torch.equal(batches[1].prompt_embeds, embeds[1])
    cond, uncond = torch.randn(2, 4), torch.randn(2, 4)
    guider.forward(cond, uncond)
    ((seen_cond, seen_uncond, mask),) = recorder.seen
    assert mask.tolist() == [True, False]
    assert torch.equal(seen_uncond[0], uncond[0]) and torch.equal(seen_uncond[1], cond[1])
    assert guider.nfe_per_sample.tolist() == [2, 2]  # both rows were evaluated (one batch)


# ----------------------------------------------------------------------------------- flow pipelines


def _identities(
    pipe, call: dict, unpack=lambda x: x, classic=None, classic_call=None, scale_key="guidance_scale"
):
    """guider CFG == the pipeline's own CFG; guider APG (x0 space) == dg.apply's APG on the classic."""
    pipe.update_components(guider=ClassifierFreeGuidance(guidance_scale=SCALE))
    own = pipe(**call, generator=seed(), output="latents")
    pipe.update_components(guider=dg.as_guider(dg.CFG(), SCALE))
    errors = {"cfg": relative_error(pipe(**call, generator=seed(), output="latents"), own)}
    if classic is not None:
        apg = lambda: dg.APG(eta=0.0, norm_threshold=1.0, momentum=-0.5)  # noqa: E731
        pipe.update_components(guider=dg.as_guider(apg(), SCALE, scheduler=pipe))
        latents = pipe(**call, generator=seed(), output="latents")
        with dg.guided(classic, apg()):
            output = classic(**classic_call, **{scale_key: SCALE}, generator=seed(), output_type="latent")
        expected = unpack(output[0])
        errors["apg"] = relative_error(latents, expected)
        assert relative_error(latents, own) > 1e-3  # APG really differs from CFG here
    return errors


def test_sd3_guider_identities():
    # diffusers' modular SD3 blocks arrive in 0.39; the supported floor (0.37) has none to guide
    modular_pipelines = pytest.importorskip("diffusers.modular_pipelines")
    if not hasattr(modular_pipelines, "StableDiffusion3AutoBlocks"):
        pytest.skip("diffusers' modular SD3 blocks arrive in 0.39")
    StableDiffusion3AutoBlocks = modular_pipelines.StableDiffusion3AutoBlocks
    classic = tiny_sd3()
    pipe = modular(StableDiffusion3AutoBlocks(), classic)
    call = {**PROMPTS, "num_inference_steps": 3, "height": 16, "width": 16}
    errors = _identities(pipe, call, classic=classic, classic_call=call)
    assert max(errors.values()) < TOLERANCE, errors


def test_qwenimage_guider_identities():
    build, kwargs = FLOW_CASES["qwenimage"]
    classic = build()
    pipe = modular(QwenImageAutoBlocks(), classic)
    call = {**PROMPTS, "num_inference_steps": 3, "height": 16, "width": 16, "max_sequence_length": 16}
    assert kwargs["max_sequence_length"] == 16

    def unpack(latents):  # the classic pipeline returns packed 2x2 tokens, the modular one latents
        return classic._unpack_latents(latents, 16, 16, classic.vae_scale_factor)

    errors = _identities(pipe, call, unpack, classic, call, scale_key="true_cfg_scale")
    assert max(errors.values()) < TOLERANCE, errors


def _wan(case: str, blocks):
    """Modular Wan without its text encoder block, whose prompt cleaning needs ftfy unconditionally;
    the prompts are encoded by the classic pipeline and passed as embeddings."""
    build, kwargs = VIDEO_CASES[case]
    classic = build()
    pipe = modular(blocks, classic, drop=("text_encoder", "decode"))
    if classic.config.boundary_ratio is not None:
        pipe.update_components(boundary_ratio=classic.config.boundary_ratio)
    embeds, negative = classic.encode_prompt(
        PROMPTS["prompt"], PROMPTS["negative_prompt"], max_sequence_length=kwargs["max_sequence_length"]
    )
    call = {
        "prompt_embeds": embeds,
        "negative_prompt_embeds": negative,
        "num_inference_steps": STEPS,
        "height": 16,
        "width": 16,
        "num_frames": 1,
    }
    return classic, pipe, call


def test_wan_guider_identities():
    classic, pipe, call = _wan("wan", WanBlocks())
    errors = _identities(pipe, call, classic=classic, classic_call=call)
    assert max(errors.values()) < TOLERANCE, errors


def test_wan22_guider_and_guider_2():
    """Wan 2.2 picks ``guider`` for the high-noise steps and ``guider_2`` for the low-noise ones, each with
    its own scale and rule state; guider_2 never sees step 0 and is still reset per call."""
    classic, pipe, call = _wan("wan22", Wan22Blocks())
    pipe.update_components(
        guider=ClassifierFreeGuidance(guidance_scale=SCALE),
        guider_2=ClassifierFreeGuidance(guidance_scale=3.0),
    )
    own = pipe(**call, generator=seed(), output="latents")
    first, second = dg.as_guider(dg.CFG(), SCALE), dg.as_guider(dg.CFG(), 3.0)
    pipe.update_components(guider=first, guider_2=second)
    assert relative_error(pipe(**call, generator=seed(), output="latents"), own) < TOLERANCE
    assert first.steps == second.steps == STEPS // 2

    # APG without momentum is stateless, so two guiders give dg.apply's single rule exactly
    apg = lambda: dg.APG(eta=0.0, norm_threshold=1.0, momentum=0.0)  # noqa: E731
    pipe.update_components(
        guider=dg.as_guider(apg(), SCALE, scheduler=pipe), guider_2=dg.as_guider(apg(), 3.0, scheduler=pipe)
    )
    latents = pipe(**call, generator=seed(), output="latents")
    with dg.guided(classic, apg()):
        expected = classic(
            **call, guidance_scale=SCALE, guidance_scale_2=3.0, generator=seed(), output_type="latent"
        )
    assert relative_error(latents, expected.frames) < TOLERANCE

    stateful = dg.as_guider(dg.APG(eta=0.0, norm_threshold=1.0, momentum=-0.5), 3.0, scheduler=pipe)
    pipe.update_components(guider_2=stateful)
    once = pipe(**call, generator=seed(), output="latents")
    assert torch.equal(pipe(**call, generator=seed(), output="latents"), once)


# ------------------------------------------------------------------------- HunyuanVideo 1.5 (classic)


def tiny_hunyuanvideo15():
    """HunyuanVideo 1.5 (a classic pipeline with a ``guider`` component) with random weights and no text
    encoders: prompts are passed as embeddings. Its transformer input is ``[latents, cond latents, mask]``
    along channels, which the guider cuts back to the latents for x0-space rules."""
    from diffusers import (
        AutoencoderKLHunyuanVideo15,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideo15Pipeline,
        HunyuanVideo15Transformer3DModel,
    )

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformer = HunyuanVideo15Transformer3DModel(
            in_channels=2 * 4 + 1,
            out_channels=4,
            num_attention_heads=2,
            attention_head_dim=8,
            num_layers=1,
            num_refiner_layers=1,
            text_embed_dim=16,
            text_embed_2_dim=8,
            image_embed_dim=8,
            rope_axes_dim=(2, 2, 4),
            target_size=32,
            task_type="t2v",
        ).eval()
        vae = AutoencoderKLHunyuanVideo15(
            latent_channels=4,
            block_out_channels=(8, 8),
            layers_per_block=1,
            spatial_compression_ratio=2,
            temporal_compression_ratio=1,
        ).eval()
        embeds = {}
        for prefix in ("", "negative_"):
            embeds[f"{prefix}prompt_embeds"] = torch.randn(2, 5, 16)
            embeds[f"{prefix}prompt_embeds_mask"] = torch.ones(2, 5, dtype=torch.long)
            embeds[f"{prefix}prompt_embeds_2"] = torch.randn(2, 3, 8)
            embeds[f"{prefix}prompt_embeds_mask_2"] = torch.ones(2, 3, dtype=torch.long)
    pipe = HunyuanVideo15Pipeline(
        text_encoder=None,
        tokenizer=None,
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
        text_encoder_2=None,
        tokenizer_2=None,
        guider=ClassifierFreeGuidance(guidance_scale=SCALE),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe, {**embeds, "height": 8, "width": 8, "num_frames": 1, "num_inference_steps": 3}


def test_hunyuanvideo15_guider_component():
    pipe, call = tiny_hunyuanvideo15()

    def run():
        return pipe(**call, generator=seed(), output_type="latent").frames

    own = run()
    pipe.guider = dg.as_guider(dg.CFG(), SCALE)
    assert relative_error(run(), own) < TOLERANCE
    pipe.guider = dg.as_guider(dg.APG(eta=1.0, norm_threshold=math.inf, momentum=0.0), SCALE, scheduler=pipe)
    assert relative_error(run(), own) < TOLERANCE  # affine, so this checks the x0 round trip only
    pipe.guider = dg.as_guider(dg.APG(eta=0.0, norm_threshold=1.0), SCALE, scheduler=pipe)
    assert relative_error(run(), own) > 1e-3
    assert pipe.guider.stats()["nfe_per_sample"] == [6, 6]

    # the x0 a denoised-space rule is handed is the flow x0 of the latent channels, x_t - s v
    pipe.guider = dg.as_guider(dg.CFG(), SCALE, scheduler=pipe)
    pipe.guider.rule = recorder = _Recorder()
    recorder.space = "denoised"
    calls = []
    handle = pipe.transformer.register_forward_hook(
        lambda module, args, kwargs, output: calls.append((kwargs["hidden_states"], output[0])),
        with_kwargs=True,
    )
    try:
        run()
    finally:
        handle.remove()
    assert len(recorder.seen) == 3 and len(calls) == 6
    for i, (cond, _, _) in enumerate(recorder.seen):
        x_t, velocity = calls[2 * i]  # the conditional batch runs first
        expected = (
            x_t[:, : velocity.shape[1]].double() - pipe.scheduler.sigmas[i].double() * velocity.double()
        )
        assert relative_error(cond, expected) < 1e-12


def test_a_guider_at_scale_one_refuses_a_rule_without_effect():
    with pytest.raises(ValueError, match="guidance_scale=1 runs no CFG, so APG"):
        dg.as_guider(dg.APG(), guidance_scale=1.0)
    assert dg.as_guider(dg.CFG(), guidance_scale=1.0).guidance_scale == 1.0
