"""diffusers' caching hooks under diffguide rules (``diffguide/adapters/caches.py``).

Two tiny pipelines: the fashion model's class-conditional DiT (batched ``[uncond, cond]``, two
blocks so that FirstBlockCache has a head and a tail) and FLUX.1 (true CFG, a call per branch,
``cache_context`` names). Caches are attached with diffusers' own ``apply_*`` functions.

- CFG and APG compose with FirstBlockCache, TaylorSeerCache, MagCache and PyramidAttentionBroadcast:
  with the cache set never to skip, the output and NFE are the rule's alone; with it skipping, CFG
  through diffguide is the cache alone, and NFE still counts denoiser calls.
- AG, LinearAG and GuidanceInterval skip unconditional evaluations, so they are refused with each
  of those caches; FasterCache is refused with every rule. Both at ``apply`` and, for a cache
  enabled after it, at the first call, before the denoiser runs.
"""

from __future__ import annotations

import pytest
import torch
from diffusers.hooks import (
    FasterCacheConfig,
    FirstBlockCacheConfig,
    MagCacheConfig,
    PyramidAttentionBroadcastConfig,
    TaylorSeerCacheConfig,
    apply_faster_cache,
    apply_first_block_cache,
    apply_mag_cache,
    apply_pyramid_attention_broadcast,
    apply_taylorseer_cache,
)
from tiny_flow_two_call import CASES as TWO_CALL_CASES
from tiny_pipelines import _seeded

import diffguide as dg
import diffguide.hooks
from diffguide.adapters.caches import caches_on, skips_unconditional
from diffguide.guidance.linear_ag import DEFAULT_REGRESSORS
from diffguide.models.pipeline import (
    ClassConditionalTransformerPipeline,
    fashion_scheduler,
    fashion_transformer,
)

STEPS = 4
#: the attention layers TaylorSeer caches: its default patterns end in "attn", which misses DiT's attn1
TAYLOR_LAYERS = [r"(single_)?transformer_blocks\.\d+\.attn1?"]


def tiny_dit() -> ClassConditionalTransformerPipeline:
    transformer = _seeded(
        lambda: fashion_transformer(num_layers=2, num_attention_heads=2, attention_head_dim=8)
    )
    pipe = ClassConditionalTransformerPipeline(transformer=transformer, scheduler=fashion_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run_dit(pipe) -> torch.Tensor:
    """The final latents (the images are clamped to [0, 1], which could hide a difference)."""
    final = {}

    def keep(pipe, step, timestep, tensors):
        final["latents"] = tensors["latents"]
        return tensors

    pipe(
        class_labels=[1, 2, 3, 4],
        guidance_scale=4.0,
        num_inference_steps=STEPS,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
        callback_on_step_end=keep,
    )
    return final["latents"]


def _run_flux(pipe) -> torch.Tensor:
    kwargs = TWO_CALL_CASES["flux"][1]
    return pipe(**kwargs, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0)).images


PIPELINES = {"dit": (tiny_dit, _run_dit), "flux": (TWO_CALL_CASES["flux"][0], _run_flux)}

RULES = {
    "CFG": lambda: dg.CFG(),
    "APG": lambda: dg.APG(),
    "AG": lambda: dg.AdaptiveGuidance(threshold=0.0, space="model_output"),
    "LinearAG": lambda: dg.LinearAG(
        torch.zeros(STEPS, len(DEFAULT_REGRESSORS)), schedule=["cfg", "estimate", "cfg", "cond"]
    ),
    "GuidanceInterval": lambda: dg.GuidanceInterval(sigma_lo=0.5, sigma_hi=2.0),
}
COMPOSING_RULES = ["CFG", "APG"]
SKIPPING_RULES = ["AG", "LinearAG", "GuidanceInterval"]


def _timestep() -> float:
    return 500.0  # inside every timestep range below: the block skip range alone decides


#: cache name -> (apply function, config that never skips, config that skips)
CACHES = {
    "FirstBlockCache": (
        apply_first_block_cache,
        lambda: FirstBlockCacheConfig(threshold=0.0),
        lambda: FirstBlockCacheConfig(threshold=10.0),
    ),
    "TaylorSeerCache": (
        apply_taylorseer_cache,
        lambda: TaylorSeerCacheConfig(disable_cache_before_step=STEPS + 1, cache_identifiers=TAYLOR_LAYERS),
        lambda: TaylorSeerCacheConfig(
            disable_cache_before_step=1,
            cache_interval=2,
            cache_identifiers=TAYLOR_LAYERS,
            taylor_factors_dtype=torch.float32,
        ),
    ),
    "MagCache": (
        apply_mag_cache,
        lambda: MagCacheConfig(mag_ratios=[1.0] * STEPS, num_inference_steps=STEPS, max_skip_steps=0),
        lambda: MagCacheConfig(
            mag_ratios=[1.0] * STEPS,
            num_inference_steps=STEPS,
            retention_ratio=0.0,
            threshold=10.0,
            max_skip_steps=5,
        ),
    ),
    "PyramidAttentionBroadcast": (
        apply_pyramid_attention_broadcast,
        lambda: PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=1, current_timestep_callback=_timestep
        ),
        lambda: PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2,
            spatial_attention_timestep_skip_range=(-1, 2000),
            current_timestep_callback=_timestep,
        ),
    ),
}


def faster_cache(skip_unconditional: bool = True) -> FasterCacheConfig:
    return FasterCacheConfig(
        unconditional_batch_skip_range=5 if skip_unconditional else 1,
        current_timestep_callback=_timestep,
        attention_weight_callback=lambda _: 0.5,
        tensor_format="BCHW",
    )


def with_cache(pipeline: str, cache: str, skipping: bool = False):
    build, _ = PIPELINES[pipeline]
    pipe = build()
    apply, never_skips, skips = CACHES[cache]
    apply(pipe.transformer, (skips if skipping else never_skips)())
    assert caches_on(pipe.transformer) == [cache]  # hooked into the model, not a silent no-op
    return pipe


_ALONE: dict[tuple[str, str], tuple[torch.Tensor, float]] = {}


def rule_alone(pipeline: str, rule: str) -> tuple[torch.Tensor, float]:
    """(output, NFE) of the rule on the pipeline without a cache."""
    if (pipeline, rule) not in _ALONE:
        build, run = PIPELINES[pipeline]
        pipe = build()
        with dg.guided(pipe, RULES[rule]()):
            _ALONE[pipeline, rule] = run(pipe), dg.stats(pipe)["nfe"]
    return _ALONE[pipeline, rule]


def assert_close(output: torch.Tensor, reference: torch.Tensor) -> None:
    tolerance = 1e-6 * max(1.0, float(reference.abs().max()))
    assert float((output - reference).abs().max()) <= tolerance


@pytest.mark.parametrize("rule", COMPOSING_RULES)
@pytest.mark.parametrize("cache", list(CACHES))
@pytest.mark.parametrize("pipeline", list(PIPELINES))
def test_a_never_skipping_cache_leaves_cfg_and_apg_output_and_nfe_as_the_rule_alone(pipeline, cache, rule):
    reference, nfe = rule_alone(pipeline, rule)
    pipe = with_cache(pipeline, cache)
    with dg.guided(pipe, RULES[rule]()):
        assert_close(PIPELINES[pipeline][1](pipe), reference)
        assert dg.stats(pipe)["nfe"] == nfe == 2 * STEPS


@pytest.mark.parametrize("cache", list(CACHES))
@pytest.mark.parametrize("pipeline", list(PIPELINES))
def test_cfg_through_diffguide_with_a_skipping_cache_is_the_cache_alone_and_counts_every_call(
    pipeline, cache
):
    run = PIPELINES[pipeline][1]
    pipe = with_cache(pipeline, cache, skipping=True)
    cache_alone = run(pipe)
    assert not torch.equal(cache_alone, rule_alone(pipeline, "CFG")[0])  # the cache did skip work
    with dg.guided(pipe, dg.CFG()):
        assert torch.equal(run(pipe), cache_alone)
        assert dg.stats(pipe)["nfe"] == 2 * STEPS  # a cache makes calls cheaper, it does not remove them


@pytest.mark.parametrize("pipeline", list(PIPELINES))
def test_the_refused_rules_skip_unconditional_evaluations_and_the_composing_ones_do_not(pipeline):
    for rule in SKIPPING_RULES:
        assert skips_unconditional(RULES[rule]())
        assert STEPS < rule_alone(pipeline, rule)[1] < 2 * STEPS
    for rule in COMPOSING_RULES:
        assert not skips_unconditional(RULES[rule]())


@pytest.mark.parametrize("rule", SKIPPING_RULES)
@pytest.mark.parametrize("cache", list(CACHES))
@pytest.mark.parametrize("pipeline", list(PIPELINES))
def test_a_rule_that_skips_unconditional_evaluations_is_refused_with_every_cache(pipeline, cache, rule):
    pipe = with_cache(pipeline, cache)
    with pytest.raises(ValueError) as refusal:
        dg.apply(pipe, RULES[rule]())
    message = str(refusal.value)
    assert "\n" not in message
    assert f"cannot run with {cache} on the transformer: it skips unconditional evaluations" in message
    assert "use CFG or APG with the cache" in message
    assert diffguide.hooks._session(pipe) is None  # nothing attached


@pytest.mark.parametrize("skip_unconditional", [True, False])
@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("pipeline", list(PIPELINES))
def test_faster_cache_is_refused_with_every_rule(pipeline, rule, skip_unconditional):
    pipe = PIPELINES[pipeline][0]()
    apply_faster_cache(pipe.transformer, faster_cache(skip_unconditional))
    fix = (
        "pipe.transformer.disable_cache()" if pipeline == "flux" else "remove its hooks from pipe.transformer"
    )
    with pytest.raises(
        ValueError, match=r"FasterCache on the transformer cannot run under a diffguide rule: .*"
    ) as refusal:
        dg.apply(pipe, RULES[rule]())
    assert "in place of the evaluations" in str(refusal.value) and str(refusal.value).endswith(f"{fix} first")


def test_a_cache_enabled_after_apply_is_refused_at_the_first_call_before_the_denoiser_runs():
    pipe = PIPELINES["flux"][0]()
    dg.apply(pipe, RULES["AG"]())
    _, never_skips, _ = CACHES["MagCache"]
    pipe.transformer.enable_cache(never_skips())
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda module, args: calls.append(1))
    with pytest.raises(ValueError, match="cannot run with MagCache on the transformer.*disable_cache"):
        _run_flux(pipe)
    assert calls == []
    pipe.transformer.disable_cache()
    output = _run_flux(pipe)
    reference, nfe = rule_alone("flux", "AG")
    assert_close(output, reference)
    assert dg.stats(pipe)["nfe"] == nfe


def test_without_the_refusal_a_skipping_cache_breaks_when_the_batch_changes(monkeypatch):
    monkeypatch.setattr(diffguide.hooks, "check_caches", lambda rule, denoisers: None)
    pipe = with_cache("dit", "PyramidAttentionBroadcast", skipping=True)
    with dg.guided(pipe, RULES["GuidanceInterval"]()):  # 4 rows outside the interval, 8 inside
        with pytest.raises(RuntimeError, match="size of tensor"):
            _run_dit(pipe)


def test_the_dit_pipeline_gives_caches_a_context_and_fresh_state_at_every_call():
    pipe = with_cache("dit", "FirstBlockCache", skipping=True)  # keyed by cache context
    first = _run_dit(pipe)  # FirstBlockCache raises without a context
    assert torch.equal(_run_dit(pipe), first)  # no residual left over from the last call
