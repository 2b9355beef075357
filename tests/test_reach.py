"""Every rule on every pipeline diffguide serves: tiny offline builds of each pipeline kind.

For each pipeline (2 prompts, negative prompts, 2 images per prompt where it takes them):
CFG through diffguide is bit-identical to the untouched pipeline (two-call pipelines get their
real unconditional prediction back where the rule's result is CFG's); APG at eta=1 without
cap or momentum and AG above 1 equal CFG to 1e-5 relative; ``remove`` restores bit-identical
output; NFE counts equal a count of the rows the network's first layer sees; a sample whose
unconditional branch is skipped gets the image it gets when every sample skips, while the others
keep CFG's. ``measured`` collects the errors for docs/pipelines.md (evals/pipelines_matrix.py).
"""

from __future__ import annotations

import math

import pytest
import tiny_batched
import tiny_flow_two_call
import tiny_video_two_call
import torch
from tiny_pipelines import tiny_pixart, tiny_sd, tiny_sd3, tiny_sdxl

import diffguide as dg
from diffguide.adapters.support import PIPELINES, support_for
from diffguide.guidance.base import GuidanceRule, cfg_combine

NO_CAP = math.inf
STEPS = 4
_TEXT = {"prompt": ["a cat", "a dog"], "negative_prompt": ["bad", "ugly"], "num_images_per_prompt": 2}

ZOO = {
    "sd": (tiny_sd, {**_TEXT, "guidance_scale": 5.0, "output_type": "latent"}),
    "sd-v": (lambda: tiny_sd("v_prediction"), {**_TEXT, "guidance_scale": 5.0, "output_type": "latent"}),
    "sdxl": (tiny_sdxl, {**_TEXT, "guidance_scale": 5.0, "output_type": "latent"}),
    "sd3": (tiny_sd3, {**_TEXT, "guidance_scale": 5.0, "output_type": "latent"}),
    "pixart-alpha": (tiny_pixart, {**_TEXT, "guidance_scale": 5.0, "output_type": "latent"}),
    **tiny_batched.CASES,
    **tiny_flow_two_call.CASES,
    **tiny_video_two_call.CASES,
}
#: what the tests measured, per case and check: max |error| / max |reference|
measured: dict[str, dict[str, float]] = {}
_BUILT: dict[str, object] = {}


def _output(result) -> torch.Tensor:
    for name in ("images", "frames", "videos"):
        value = getattr(result, name, None)
        if value is not None:
            return torch.as_tensor(value) if not isinstance(value, torch.Tensor) else value
    return result[0]


class Case:
    """A built pipeline, one call's arguments, and a row counter on its network's first layer."""

    def __init__(self, name: str):
        self.name = name
        if name not in _BUILT:
            _BUILT[name] = ZOO[name][0]()
        self.pipe = _BUILT[name]
        dg.remove(self.pipe)
        self.kwargs = dict(ZOO[name][1])
        support = support_for(self.pipe)[1]
        self.kind = support.kind
        #: where x0 rules are refused (Cosmos 2), the rules run on the model output instead
        self.space = "model_output" if support.x0_refused else "denoised"
        self.rows = 0
        self._handles = []
        self._first_layers()

    def _first_layers(self) -> None:
        """Find, for each denoiser, the first submodule its forward runs, and count its rows."""
        names = ("unet", "transformer", "transformer_2")
        denoisers = [
            getattr(self.pipe, n) for n in names if isinstance(getattr(self.pipe, n, None), torch.nn.Module)
        ]
        orders: list[list[torch.nn.Module]] = [[] for _ in denoisers]
        probes = [
            module.register_forward_pre_hook(lambda m, a, k, order=order: order.append(m), with_kwargs=True)
            for denoiser, order in zip(denoisers, orders, strict=True)
            for module in denoiser.modules()
            if module is not denoiser
        ]
        try:
            self.run()
        finally:
            for probe in probes:
                probe.remove()
        for order in orders:
            assert order, f"{self.name}: a denoiser never ran"
            self._handles.append(order[0].register_forward_pre_hook(self._count, with_kwargs=True))

    def _count(self, module, args, kwargs):
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.ndim > 0]
        self.rows += tensors[0].shape[0]

    def run(self, steps: int = STEPS, **extra) -> torch.Tensor:
        self.rows = 0
        kwargs = {**self.kwargs, "num_inference_steps": steps, **extra}
        return _output(self.pipe(**kwargs, generator=torch.Generator().manual_seed(0)))

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        dg.remove(self.pipe)


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    return float(
        (output.double() - reference.double()).abs().max() / reference.double().abs().max().clamp_min(1e-12)
    )


def record(case: Case, check: str, value: float) -> None:
    measured.setdefault(case.name, {})[check] = value


@pytest.fixture(params=list(ZOO))
def case(request) -> Case:
    built = Case(request.param)
    yield built
    built.close()


def test_cfg_through_diffguide_equals_the_pipeline(case):
    reference = case.run()
    with dg.guided(case.pipe, dg.CFG()):
        guided = case.run()
    record(case, "cfg", relative_error(guided, reference))
    assert torch.equal(guided, reference)


def test_cfg_matters_in_every_case(case):
    """Guards the identities below against a build whose cond equals its uncond."""
    with dg.guided(case.pipe, dg.GuidanceInterval(sigma_lo=1e8, sigma_hi=1e9)):  # never guides
        unguided = case.run()
    assert relative_error(unguided, case.run()) > 1e-3


@pytest.mark.parametrize(
    "make_rule",
    [
        lambda space: dg.APG(eta=1.0, norm_threshold=NO_CAP, momentum=0.0, space=space),
        lambda space: dg.AdaptiveGuidance(threshold=1.01, space=space),
    ],
    ids=["apg-off", "ag-never"],
)
def test_rules_at_their_off_settings_equal_cfg(case, make_rule):
    rule = make_rule(case.space)
    reference = case.run()
    with dg.guided(case.pipe, rule):
        guided = case.run()
        nfe = dg.stats(case.pipe)["nfe"]
    error = relative_error(guided, reference)
    record(case, type(rule).__name__, error)
    assert error <= 1e-5
    assert nfe == 2 * STEPS


def test_remove_restores_the_untouched_pipeline(case):
    reference = case.run()
    cls = type(case.pipe)
    dg.apply(case.pipe, dg.APG(space=case.space))
    case.run()
    dg.remove(case.pipe)
    assert type(case.pipe) is cls
    assert torch.equal(case.run(), reference)


def test_nfe_counts_equal_the_rows_the_network_sees(case):
    rule = dg.AdaptiveGuidance(threshold=-1.0, min_steps=2, space=case.space)  # guides steps 0-2, then stops
    with dg.guided(case.pipe, rule):
        case.run()
        stats = dg.stats(case.pipe)
    batch = len(stats["nfe_per_sample"])
    assert stats["nfe_per_sample"] == [2 * 3 + (STEPS - 3)] * batch
    assert case.rows == sum(stats["nfe_per_sample"])
    assert stats["steps"] == STEPS


class _SkipOddSamples(GuidanceRule):
    """CFG for even samples; odd samples never get an unconditional evaluation (guided = cond)."""

    def uncond_mask(self, batch_size, step):
        return torch.arange(batch_size) % 2 == 0

    def combine(self, cond, uncond, uncond_mask, step):
        mask = uncond_mask.to(cond.device).reshape(-1, *([1] * (cond.ndim - 1)))
        return torch.where(mask, cfg_combine(cond, uncond, step.guidance_scale), cond)


def test_per_sample_skipping_gives_each_sample_its_own_image(case):
    with dg.guided(case.pipe, dg.CFG()):
        guided = case.run()
    with dg.guided(case.pipe, dg.GuidanceInterval(sigma_lo=1e8, sigma_hi=1e9)):
        unguided = case.run()
    with dg.guided(case.pipe, _SkipOddSamples()):
        mixed = case.run()
        nfe = dg.stats(case.pipe)["nfe_per_sample"]
    assert nfe == [2 * STEPS if i % 2 == 0 else STEPS for i in range(len(nfe))]
    assert case.rows == sum(nfe)
    even, odd = slice(0, None, 2), slice(1, None, 2)
    error = max(relative_error(mixed[even], guided[even]), relative_error(mixed[odd], unguided[odd]))
    record(case, "skipping", error)
    assert error <= 1e-5


class _ConditionalX0(GuidanceRule):
    """Returns the conditional x0 prediction and keeps it: a flow model's last Euler (or
    DPM-Solver) step lands on the x0 the scheduler derives, so the pipeline's final latents
    equal it only if diffguide's noise level is the scheduler's."""

    space = "denoised"

    def uncond_mask(self, batch_size, step):
        return torch.zeros(batch_size, dtype=torch.bool)

    def combine(self, cond, uncond, uncond_mask, step):
        self.last = cond
        return cond


@pytest.mark.parametrize("name", ["flux", "qwenimage", "auraflow", "mochi", "sana", "sana-flow", "wan-unipc"])
def test_denoised_prediction_is_the_schedulers_own_x0(name):
    case = Case(name)
    rule = _ConditionalX0()
    try:
        with dg.guided(case.pipe, rule):
            final = case.run()
    finally:
        case.close()
    assert final.shape == rule.last.shape
    error = relative_error(final, rule.last)
    measured.setdefault(name, {})["x0"] = error
    assert error <= 1e-5


@pytest.mark.parametrize("class_name", [n for n, entry in PIPELINES.items() if entry.kind == "refused"])
def test_every_refused_pipeline_gets_one_line_naming_why_and_what_to_do(class_name):
    pipe = type(class_name, (), {})()  # the table is keyed by class name along the MRO
    with pytest.raises(TypeError, match=f"^{class_name} is not supported: ") as error:
        dg.apply(pipe, dg.CFG())
    message = str(error.value)
    assert "\n" not in message
    assert any(word in message for word in ("use ", "call ", "nothing to guide"))


def test_flux_without_true_cfg_is_refused_with_the_fix():
    case = Case("flux")
    try:
        with dg.guided(case.pipe, dg.APG()):
            with pytest.raises(ValueError, match="pass true_cfg_scale > 1 and a negative_prompt"):
                case.run(negative_prompt=None)
            with pytest.raises(ValueError, match="true_cfg_scale=1"):
                case.run(true_cfg_scale=1.0)
    finally:
        case.close()


def test_a_cfg_off_two_call_pipeline_passes_cfg_through_at_scale_one():
    """Wan at guidance_scale=1 runs no unconditional call: CFG is the conditional then, another rule is refused."""
    case = Case("wan")
    try:
        reference = case.run(guidance_scale=1.0)
        with dg.guided(case.pipe, dg.CFG()):
            assert torch.equal(case.run(guidance_scale=1.0), reference)
            assert dg.stats(case.pipe)["nfe"] == STEPS
        with dg.guided(case.pipe, dg.APG()), pytest.raises(ValueError, match="would have no effect"):
            case.run(guidance_scale=1.0)
    finally:
        case.close()


def test_modular_pipelines_are_pointed_to_the_guider_face():
    from diffusers.modular_pipelines import StableDiffusionXLAutoBlocks

    pipe = StableDiffusionXLAutoBlocks().init_pipeline()
    with pytest.raises(
        TypeError, match="update_components\\(guider=dg.as_guider\\(rule, scheduler=pipe\\)\\)"
    ):
        dg.apply(pipe, dg.CFG())


class _Recorder(GuidanceRule):
    """CFG that records the step index and scale it was given at each step."""

    def reset(self):
        self.seen = []

    def combine(self, cond, uncond, uncond_mask, step):
        self.seen.append((step.step_index, step.guidance_scale))
        return cfg_combine(cond, uncond, step.guidance_scale)


def test_wan22_experts_share_one_rule_state_with_their_own_scales():
    case = Case("wan22")
    rule = _Recorder()
    try:
        with dg.guided(case.pipe, rule):
            case.run()
    finally:
        case.close()
    boundary = case.pipe.config.boundary_ratio * case.pipe.scheduler.config.num_train_timesteps
    high_noise = [bool(t >= boundary) for t in case.pipe.scheduler.timesteps]
    assert any(high_noise) and not all(high_noise)  # both experts ran
    expected = [(i, 5.0 if high else 3.0) for i, high in enumerate(high_noise)]
    assert rule.seen == expected


def test_linear_ag_calibrates_and_runs_on_a_two_call_pipeline():
    case = Case("flux")
    try:
        calls = [{**case.kwargs, "num_inference_steps": 6}]
        rule = dg.calibrate_linear_ag(case.pipe, calls)
        assert rule.guidance_scale == case.kwargs["true_cfg_scale"]
        with dg.guided(case.pipe, rule):
            case.run(steps=6)
            assert dg.stats(case.pipe)["nfe"] == rule.nfe < 12
            assert case.rows == sum(dg.stats(case.pipe)["nfe_per_sample"])
        reference = case.run(steps=6)
        with dg.guided(case.pipe, rule.with_schedule(["cfg"] * 6)):
            assert torch.equal(case.run(steps=6), reference)
    finally:
        case.close()


def test_a_guided_pipeline_saves_as_its_own_class(tmp_path):
    import json

    case = Case("flux")
    try:
        with dg.guided(case.pipe, dg.CFG()):
            assert type(case.pipe).__name__ == "FluxPipeline"
            case.pipe.save_pretrained(tmp_path)
    finally:
        case.close()
    assert json.loads((tmp_path / "model_index.json").read_text())["_class_name"] == "FluxPipeline"


def test_qwen_edit_rules_see_the_generated_tokens_only():
    case = Case("qwenimage-edit")
    seen = []

    class Shapes(_Recorder):
        def combine(self, cond, uncond, uncond_mask, step):
            seen.append(cond.shape)
            return super().combine(cond, uncond, uncond_mask, step)

    try:
        with dg.guided(case.pipe, Shapes()):
            final = case.run()
    finally:
        case.close()
    assert seen and all(shape[1] == final.shape[1] for shape in seen)  # 4 generated tokens, not 260


def test_cosmos2_noise_level_is_its_edm_sigma():
    """Cosmos 2's scheduler keeps EDM sigmas (80 ... 0.002); the rule sees sigma/alpha = that sigma."""

    class NoiseLevels(_Recorder):
        def combine(self, cond, uncond, uncond_mask, step):
            self.levels.append(float((step.sigma / step.alpha)[0]))
            return super().combine(cond, uncond, uncond_mask, step)

    case = Case("cosmos2")
    rule = NoiseLevels()
    rule.levels = []
    try:
        with dg.guided(case.pipe, rule):
            case.run()
    finally:
        case.close()
    expected = case.pipe.scheduler.sigmas[:STEPS].double().tolist()
    assert rule.levels == pytest.approx(expected, rel=1e-9)
    assert max(rule.levels) > 1  # EDM sigmas, not flow fractions


def test_a_denoiser_shared_with_another_pipeline_refuses_that_pipeline():
    pipe = tiny_sd()
    other = type(pipe)(**pipe.components)  # shares the UNet, as from_pipe does
    other.set_progress_bar_config(disable=True)
    kwargs = {"prompt": "a cat", "num_inference_steps": 2, "output_type": "latent"}
    with dg.guided(pipe, dg.APG()):
        with pytest.raises(RuntimeError, match="dg.apply the rule to the pipeline you call"):
            other(**kwargs)
        with pytest.raises(ValueError, match="no diffguide rule"):
            dg.stats(other)
        pipe(**kwargs)  # the pipeline the rule was applied to still runs


def test_flux2_klein_with_a_reference_image_is_refused():
    case = Case("flux2-klein")
    try:
        with dg.guided(case.pipe, dg.APG()), pytest.raises(ValueError, match="with image= adds reference"):
            case.run(image=torch.zeros(1, 3, 16, 16))
    finally:
        case.close()


def test_wan22_without_guidance_on_the_low_noise_expert():
    """guidance_scale_2=1: Wan still makes the unconditional call, which the hook answers unevaluated."""
    case = Case("wan22")
    try:
        reference = case.run(guidance_scale_2=1.0)
        with dg.guided(case.pipe, dg.APG(eta=1.0, norm_threshold=NO_CAP, momentum=0.0)):
            guided = case.run(guidance_scale_2=1.0)
            nfe = dg.stats(case.pipe)["nfe_per_sample"]
            rows = case.rows
    finally:
        case.close()
    high_noise = sum(bool(t >= case.pipe.config.boundary_ratio * 1000) for t in case.pipe.scheduler.timesteps)
    assert nfe == [2 * high_noise + (STEPS - high_noise)] * len(nfe)
    assert rows == sum(nfe)
    assert relative_error(guided, reference) <= 1e-5


def test_a_failing_call_raises_its_own_error_and_leaves_no_call_open():
    case = Case("flux")
    try:
        with dg.guided(case.pipe, dg.APG()):

            def stop(pipe, i, t, tensors):
                raise KeyboardInterrupt  # a user stopping a run mid-way

            with pytest.raises(KeyboardInterrupt):
                case.run(callback_on_step_end=stop)
            session = case.pipe.transformer._diffusers_hook.get_hook("diffguide_guidance").session
            assert session.call_arguments is None and session.pending is None
            case.run()  # and the next call runs
    finally:
        case.close()
