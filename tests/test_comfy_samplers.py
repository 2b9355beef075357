"""Every node on every sampler of the stand-in (``comfy_standin.SAMPLERS``, re-derived from
ComfyUI's k-diffusion samplers): per-run state resets once per run, a sample gets in a batch
what it gets alone, and the result is the rule applied by hand on the same sampler loop.

The nodes are built generically from ``NODE_CLASS_MAPPINGS`` with each input's declared
default, so nodes added to the registry are covered as they come.
"""

from __future__ import annotations

import copy

import comfy_standin as comfy
import pytest
import torch
from comfy_standin import comfy_modules  # noqa: F401 (autouse: the stand-in for every test here)

from diffguide.comfy import NODE_CLASS_MAPPINGS
from diffguide.guidance import APG, LinearAG
from diffguide.guidance.base import GuidanceStep, per_sample

SCALE = 5.0
#: at this AG threshold the three samples of :func:`_start` switch at different steps mid-run
MID_RUN_THRESHOLD = 0.99996


def _karras(steps: int, sigma_min: float = 0.03, sigma_max: float = 14.6, rho: float = 7.0) -> torch.Tensor:
    ramp = torch.linspace(0, 1, steps)
    levels = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([levels, levels.new_zeros(1)])


SIGMAS = _karras(6)
STEPS = len(SIGMAS) - 1
AG_NODE = next(name for name, node in NODE_CLASS_MAPPINGS.items() if "AdaptiveGuidance" in name)
APG_NODE = next(name for name, node in NODE_CLASS_MAPPINGS.items() if name.endswith("APG"))
LINEAR_AG_NODE = next(name for name, node in NODE_CLASS_MAPPINGS.items() if "LinearAG" in name)


_conds = comfy.conditions


def _start(sigmas=SIGMAS) -> torch.Tensor:
    """Three starting latents of different scales, so their cond/uncond cosines differ."""
    x = torch.randn(3, 4, 6, 6, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    return x * torch.tensor([1.0, 0.5, 0.25]).reshape(3, 1, 1, 1)


def _inputs(node: type, steps: int, folder) -> dict:
    """Each required input at its declared default; a coefficients file for LinearAG-style
    path inputs (a real CFG step, an estimated one, then conditional-only steps)."""
    inputs = {}
    for name, spec in node.INPUT_TYPES()["required"].items():
        if name == "model":
            continue
        options = spec[1] if len(spec) > 1 else {}
        if isinstance(spec[0], list):  # COMBO
            inputs[name] = options.get("default", spec[0][0])
        elif spec[0] == "STRING" and "coefficients" in name:
            schedule = (["cfg", "estimate", "cfg"] + ["cond"] * steps)[:steps]
            rule = LinearAG(
                torch.zeros(steps, 3), ("cond", "prev_cond", "prev_uncond"), schedule, "denoised", SCALE
            )
            inputs[name] = str(rule.save(folder / f"linear_ag_{steps}.safetensors"))
        else:
            inputs[name] = options["default"]
    return inputs


def _build(node_id: str, folder, steps: int = STEPS, **override):
    node = NODE_CLASS_MAPPINGS[node_id]
    model = comfy.ModelPatcher(comfy.CountingDenoiser())
    (patched,) = getattr(node(), node.FUNCTION)(model=model, **{**_inputs(node, steps, folder), **override})
    return patched


def _guidance(patched):
    """The ComfyGuidance object behind the node's pre-CFG hook (every node registers one)."""
    return patched.model_options["sampler_pre_cfg_function"][-1].__self__


def _count_resets(rule) -> list[int]:
    count = [0]
    reset = rule.reset

    def counting():
        count[0] += 1
        reset()

    rule.reset = counting
    return count


def _run(sampler, patched, x, sigmas=SIGMAS, sample_ids=None, trace=None):
    cond, uncond = _conds()
    return comfy.sample(sampler, patched, x, sigmas, cond, uncond, SCALE, sample_ids=sample_ids, trace=trace)


def _step_of(level: float, sigmas: torch.Tensor) -> int:
    """The documented mapping: the last schedule level at or above sigma (relative 1e-4)."""
    levels = sigmas[:-1].double().tolist()
    return max([i for i, s in enumerate(levels) if s >= level * (1 - 1e-4)], default=0)


def _by_hand(rule, sampler, x, sigmas=SIGMAS, sample_ids=None, rows=None):
    """``sampler`` with ``rule`` applied by hand per evaluation (no ComfyUI hooks): reset once,
    the network on every row, ``uncond`` a copy of ``cond`` where the rule did not ask for it,
    and a CFG++ sampler's post-CFG function handed that ``uncond``. ``rows`` collects the
    unconditional rows ComfyUI's whole-batch pass computes per evaluation."""
    model, (cond, uncond) = comfy.CountingDenoiser(), _conds()
    rule.reset()

    def evaluate(x, sigma, model_options, i):
        level, batch = float(sigma.max()), x.shape[0]
        s = sigma.double()
        step = GuidanceStep(_step_of(level, sigmas), len(sigmas) - 1, level, SCALE, torch.ones_like(s), s)
        mask = rule.uncond_mask(batch, step).bool()
        c = model(x, sigma, cond[0])
        u = torch.where(per_sample(mask, c).bool(), model(x, sigma, uncond[0]), c)
        if rows is not None:
            rows.append(batch if bool(mask.any()) else 0)
        if rule.space == "model_output":
            sig = per_sample(sigma, x)
            guided = x - sig * rule.combine((x - c) / sig, (x - u) / sig, mask, step)
        else:
            guided = rule.combine(c, u, mask, step)
        for fn in model_options.get("sampler_post_cfg_function", []):
            guided = fn(
                {"denoised": guided, "uncond_denoised": u, "cond_denoised": c, "sigma": sigma, "input": x}
            )
        return guided

    return comfy.SAMPLERS[sampler](evaluate, x, sigmas, {}, comfy.PerSampleNoise(x, 0, sample_ids))


NODES = sorted(NODE_CLASS_MAPPINGS)
SAMPLERS = sorted(comfy.SAMPLERS)
EVERY = pytest.mark.parametrize("sampler", SAMPLERS)
EVERY_NODE = pytest.mark.parametrize("node_id", NODES)


# -- per-run state ---------------------------------------------------------------------------


@EVERY_NODE
@EVERY
def test_the_rule_resets_exactly_once_per_run(node_id, sampler, tmp_path):
    patched = _build(node_id, tmp_path)
    resets = _count_resets(_guidance(patched).rule)
    first = _run(sampler, patched, _start())
    assert resets[0] == 1
    second = _run(sampler, patched, _start())  # the same sample_sigmas tensor again (a cached SIGMAS)
    assert resets[0] == 2
    torch.testing.assert_close(second, first)  # nothing carried over from the first run
    _run(sampler, patched, _start(), sigmas=SIGMAS.clone())  # a new tensor, as each KSampler makes
    assert resets[0] == 3


@EVERY_NODE
@EVERY
def test_each_node_is_its_rule_applied_by_hand(node_id, sampler, tmp_path):
    patched = _build(node_id, tmp_path)
    reference_rule = copy.deepcopy(_guidance(patched).rule)  # same settings, not yet run
    result = _run(sampler, patched, _start())
    torch.testing.assert_close(result, _by_hand(reference_rule, sampler, _start()), rtol=1e-4, atol=1e-4)


@EVERY
def test_apg_momentum_carries_across_every_evaluation_of_a_run(sampler, tmp_path):
    """Step by step: each evaluation's output against APG's by hand on the same x, so a reset
    inside the run (momentum lost at an ancestral midpoint or heunpp2's step back up) shows
    where it happens."""
    patched = _build(APG_NODE, tmp_path, momentum=-0.5, norm_threshold=0.0, eta=0.0)
    rule = APG(eta=0.0, norm_threshold=float("inf"), momentum=-0.5)
    model, (cond, uncond) = comfy.CountingDenoiser(), _conds()
    worst = []

    def evaluate(x, sigma, model_options, i):
        got = comfy.sampling_function(patched.model, x, sigma, uncond, cond, SCALE, model_options)
        c, u = model(x, sigma, cond[0]), model(x, sigma, uncond[0])
        s = sigma.double()
        step = GuidanceStep(0, None, float(sigma[0]), SCALE, torch.ones_like(s), s)  # APG reads only w
        expected = rule.combine(c, u, torch.ones(x.shape[0], dtype=torch.bool), step)
        worst.append(float((got - expected).abs().max()))
        return got

    options = {**patched.model_options, "transformer_options": {"sample_sigmas": SIGMAS}}
    comfy.SAMPLERS[sampler](evaluate, _start(), SIGMAS, options, comfy.PerSampleNoise(_start()))
    assert max(worst) < 1e-4, worst


# -- batches ---------------------------------------------------------------------------------


def _batch_vs_alone(sampler, patched) -> float:
    batch = _run(sampler, patched, _start())
    alone = [_run(sampler, patched, _start()[k : k + 1], sample_ids=[k]) for k in range(3)]
    return float((batch - torch.cat(alone)).abs().max())


@EVERY_NODE
@EVERY
def test_each_sample_gets_in_a_batch_what_it_gets_alone(node_id, sampler, tmp_path):
    assert _batch_vs_alone(sampler, _build(node_id, tmp_path)) < 1e-4


@EVERY
def test_ag_switching_per_sample_mid_run_batch_equals_alone(sampler, tmp_path):
    """The samples switch at different steps, so the whole batch's unconditional pass keeps
    running for samples that switched: they must still get the rule's uncond (their cond),
    which the CFG++ samplers step along."""
    assert _batch_vs_alone(sampler, _build(AG_NODE, tmp_path, threshold=MID_RUN_THRESHOLD)) < 1e-4


@EVERY
def test_ag_computes_the_uncond_rows_of_the_rule_by_hand(sampler, tmp_path):
    patched = _build(AG_NODE, tmp_path, threshold=MID_RUN_THRESHOLD)
    reference_rule = copy.deepcopy(_guidance(patched).rule)
    expected_rows: list[int] = []
    expected = _by_hand(reference_rule, sampler, _start(), rows=expected_rows)
    evaluations = len(expected_rows)
    assert 3 < sum(expected_rows) < 3 * evaluations  # switches mid-run, not at once nor never
    result = _run(sampler, patched, _start())
    assert patched.model.rows == {"cond": 3 * evaluations, "uncond": sum(expected_rows)}
    torch.testing.assert_close(result, expected, rtol=1e-4, atol=1e-4)


# -- step indices ----------------------------------------------------------------------------


@EVERY
def test_step_index_is_the_loop_that_made_the_evaluation_where_sigma_tells(sampler, tmp_path):
    """The first evaluation of loop ``i`` (at ``sigmas[i]``) is step ``i``; one strictly between
    ``sigmas[i + 1]`` and ``sigmas[i]`` (dpm_2's midpoint) is step ``i``; one at a later
    schedule level (a corrector, an ancestral midpoint, heunpp2's look-ahead) is that level's
    step, since from sigma alone it cannot be told from that step's own evaluation."""
    patched = _build(APG_NODE, tmp_path)
    rule = _guidance(patched).rule
    steps = []
    combine = rule.combine

    def recording(cond, uncond, mask, step):
        steps.append((step.step_index, step.num_steps))
        return combine(cond, uncond, mask, step)

    rule.combine = recording
    trace: list[tuple[int, float]] = []
    _run(sampler, patched, _start(), trace=trace)
    levels = SIGMAS.tolist()
    assert len(steps) == len(trace) and {n for _, n in steps} == {STEPS}
    first_of_loop = set()
    for (loop, sigma), (index, _) in zip(trace, steps, strict=True):
        at_level = [j for j, s in enumerate(levels[:-1]) if abs(sigma - s) <= 1e-4 * s]
        if loop not in first_of_loop:
            first_of_loop.add(loop)
            assert index == loop
        elif at_level:
            assert index == at_level[0] > loop
        else:
            assert levels[loop + 1] < sigma < levels[loop] and index == loop


# -- a run split over two KSamplerAdvanced nodes --------------------------------------------


def _split(sampler, patched, at: int):
    """KSamplerAdvanced twice, as ComfyUI's KSampler.sample slices: end_at_step=at with leftover
    noise (``sigmas[:at + 1]``), then start_at_step=at without added noise (``sigmas[at:]``).
    Each is its own sampling run with its own sample_sigmas."""
    first = SIGMAS[: at + 1]
    x = _run(sampler, patched, _start(), sigmas=first)
    return _run(sampler, patched, x, sigmas=SIGMAS[at:])


@pytest.mark.parametrize("sampler", ["euler", "dpm_2_ancestral", "heunpp2", "dpmpp_2m_cfg_pp"])
def test_a_split_run_starts_per_run_state_afresh_in_the_second_node(sampler, tmp_path):
    at = 3
    patched = _build(AG_NODE, tmp_path, threshold=-1.0)  # every sample switches at its first step
    resets = _count_resets(_guidance(patched).rule)
    _run(sampler, patched, _start())
    whole_rows = patched.model.rows["uncond"]
    assert whole_rows == 3  # one guided evaluation, then conditional only
    patched.model.rows = {}
    _split(sampler, patched, at)
    assert resets[0] == 3  # the whole run, then each node of the split
    assert patched.model.rows["uncond"] == 2 * whole_rows  # the second node guides its first step again

    # APG: the momentum restarts in the second node, exactly as a reset there by hand
    patched = _build(APG_NODE, tmp_path)
    rule = copy.deepcopy(_guidance(patched).rule)
    by_hand = _by_hand(rule, sampler, _start(), sigmas=SIGMAS[: at + 1])
    by_hand = _by_hand(rule, sampler, by_hand, sigmas=SIGMAS[at:])
    torch.testing.assert_close(_split(sampler, patched, at), by_hand, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(_run(sampler, patched, _start()), by_hand, atol=1e-3)


def test_linear_ag_refuses_a_split_run(tmp_path):
    """Each node of a split runs fewer steps than the coefficients were calibrated for."""
    patched = _build(LINEAR_AG_NODE, tmp_path)
    with pytest.raises(ValueError, match="steps"):
        _split("euler", patched, 3)


# -- without sample_sigmas, and a start just below it ------------------------------------------


def _evaluate_at(patched, sigmas_seen, batch=3, sample_sigmas=None):
    cond, uncond = _conds()
    options = dict(patched.model_options)
    if sample_sigmas is not None:
        options["transformer_options"] = {"sample_sigmas": sample_sigmas}
    for level, size in sigmas_seen:
        x = _start()[:size]
        comfy.sampling_function(patched.model, x, torch.full((size,), level), uncond, cond, SCALE, options)


def test_without_sample_sigmas_a_run_starts_when_sigma_rises_or_the_batch_changes(tmp_path):
    patched = _build(APG_NODE, tmp_path)
    resets = _count_resets(_guidance(patched).rule)
    _evaluate_at(patched, [(14.6, 3), (6.0, 3), (2.5, 3)])
    assert resets[0] == 1
    _evaluate_at(patched, [(6.0, 3)])  # sigma rose
    assert resets[0] == 2
    _evaluate_at(patched, [(2.5, 2)])  # another batch size
    assert resets[0] == 3


def test_a_reused_schedule_restarts_at_a_first_level_offset_below_sigmas_0(tmp_path):
    """ComfyUI's flow-model SDE samplers replace a first sigma of 1 by percent_to_sigma(1e-4)
    (``offset_first_sigma_for_snr``) on their own copy; sample_sigmas keeps the 1."""
    patched = _build(APG_NODE, tmp_path)
    resets = _count_resets(_guidance(patched).rule)
    schedule = torch.tensor([1.0, 0.6, 0.3, 0.0])
    run = [(0.9999, 3), (0.6, 3), (0.3, 3)]
    _evaluate_at(patched, run, sample_sigmas=schedule)
    _evaluate_at(patched, run, sample_sigmas=schedule)
    assert resets[0] == 2
