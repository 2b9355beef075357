"""The rules as pure tensor code, checked against independent step-by-step references."""

import numpy as np
import pytest
import torch

import diffguide as dg
from diffguide.guidance.adaptive import cosine_similarity
from diffguide.guidance.base import GuidanceStep, cfg_combine
from diffguide.guidance.linear_ag import fit_coefficients, paper_schedule, regressor_stack, schedule_nfe


def _step(index: int, scale: float = 4.0, batch: int = 3, num_steps: int = 10) -> GuidanceStep:
    ones = torch.ones(batch, dtype=torch.float64)
    return GuidanceStep(index, num_steps, 999.0 - index, scale, ones * 0.8, ones * 0.6)


def _predictions(batch: int = 3, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    cond = torch.randn(batch, 2, 4, 4, generator=generator, dtype=torch.float64)
    uncond = cond + 0.7 * torch.randn(batch, 2, 4, 4, generator=generator, dtype=torch.float64)
    return cond, uncond


def _all(batch: int = 3) -> torch.Tensor:
    return torch.ones(batch, dtype=torch.bool)


def test_apg_reduces_to_cfg():
    rule = dg.APG(eta=1.0, norm_threshold=float("inf"), momentum=0.0)
    for index in range(3):
        cond, uncond = _predictions(seed=index)
        guided = rule.combine(cond, uncond, _all(), _step(index))
        torch.testing.assert_close(guided, cfg_combine(cond, uncond, 4.0), rtol=0, atol=1e-12)


def _apg_reference(conds, unconds, scale, eta, r, beta):
    """The paper's five steps, one sample and one step at a time, in numpy float64."""
    outputs, momentum = [], [np.zeros_like(conds[0][b].numpy()) for b in range(len(conds[0]))]
    for cond, uncond in zip(conds, unconds, strict=True):
        step_out = []
        for b in range(len(cond)):
            c, u = cond[b].numpy().ravel(), uncond[b].numpy().ravel()
            g = c - u
            momentum[b] = g + beta * momentum[b].ravel()
            g = momentum[b]
            norm = np.sqrt((g * g).sum())
            g = g * min(1.0, r / norm)
            g_par = (g @ c) / (c @ c) * c
            g_orth = g - g_par
            step_out.append((c + (scale - 1) * (g_orth + eta * g_par)).reshape(cond[b].shape))
        outputs.append(np.stack(step_out))
    return outputs


def test_apg_matches_step_by_step_reference_of_the_paper():
    conds, unconds = zip(*[_predictions(seed=s) for s in range(4)], strict=True)
    rule = dg.APG(eta=0.3, norm_threshold=2.5, momentum=-0.5)
    rule.reset()
    ours = [
        rule.combine(c, u, _all(), _step(i, scale=7.0))
        for i, (c, u) in enumerate(zip(conds, unconds, strict=True))
    ]
    reference = _apg_reference(conds, unconds, 7.0, 0.3, 2.5, -0.5)
    for got, expected in zip(ours, reference, strict=True):
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10, atol=1e-12)
    # the cap is active in this setting, so the test covers it
    assert any((c - u).flatten(1).norm(dim=1).max() > 2.5 for c, u in zip(conds, unconds, strict=True))


def test_apg_diffusers_formulation_is_u_plus_w_update():
    cond, uncond = _predictions()
    paper = dg.APG(eta=0.0, norm_threshold=float("inf"), momentum=0.0)
    diffusers_like = dg.APG(eta=0.0, norm_threshold=float("inf"), momentum=0.0, formulation="diffusers")
    update = (paper.combine(cond, uncond, _all(), _step(0)) - cond) / 3.0  # (w - 1) N with w = 4
    torch.testing.assert_close(diffusers_like.combine(cond, uncond, _all(), _step(0)), uncond + 4.0 * update)


def test_apg_momentum_starts_again_after_reset():
    rule = dg.APG(eta=0.0, norm_threshold=float("inf"), momentum=-0.5)
    cond, uncond = _predictions()
    first = rule.combine(cond, uncond, _all(), _step(0))
    rule.combine(cond, uncond, _all(), _step(1))
    rule.reset()
    torch.testing.assert_close(rule.combine(cond, uncond, _all(), _step(0)), first)


def test_apg_refuses_a_non_positive_cap():
    with pytest.raises(ValueError, match="norm_threshold"):
        dg.APG(norm_threshold=0.0)


def test_ag_skips_uncond_after_convergence():
    rule = dg.AdaptiveGuidance(threshold=0.99)
    cond, uncond = _predictions()
    uncond[1] = cond[1] * 1.001  # sample 1 has converged: cosine 1
    assert rule.uncond_mask(3, _step(0)).all()
    guided = rule.combine(cond, uncond, _all(), _step(0))
    torch.testing.assert_close(guided, cfg_combine(cond, uncond, 4.0))  # this step is still CFG
    mask = rule.uncond_mask(3, _step(1))
    assert mask.tolist() == [True, False, True]
    placeholder = torch.where(mask.reshape(-1, 1, 1, 1), uncond, cond)
    guided = rule.combine(cond, placeholder, mask, _step(1))
    torch.testing.assert_close(guided[1], cond[1])  # conditional prediction alone
    # one-way: sample 1 stays off even if it would no longer pass the threshold
    rule.combine(cond, uncond, rule.uncond_mask(3, _step(2)), _step(2))
    assert rule.uncond_mask(3, _step(3)).tolist() == [True, False, True]


def test_ag_min_steps_delays_the_switch():
    rule = dg.AdaptiveGuidance(threshold=0.5, min_steps=2)
    cond, _ = _predictions()
    for index in range(2):
        rule.combine(cond, cond, rule.uncond_mask(3, _step(index)), _step(index))
    assert rule.uncond_mask(3, _step(2)).all()
    rule.combine(cond, cond, rule.uncond_mask(3, _step(2)), _step(2))
    assert not rule.uncond_mask(3, _step(3)).any()


def test_ag_cosine_is_per_sample():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[0.0, 1.0], [2.0, 2.0]])
    torch.testing.assert_close(cosine_similarity(a, b), torch.tensor([0.0, 1.0], dtype=torch.float64))


def test_linear_ag_fit_recovers_planted_coefficients():
    generator = torch.Generator().manual_seed(0)
    cond, prev_cond, prev_uncond = (torch.randn(50, 1, 4, 4, generator=generator) for _ in range(3))
    target = 0.6 * cond + 0.3 * prev_uncond - 0.2 * prev_cond + 0.05
    stack = regressor_stack(("cond", "prev_uncond", "prev_cond", "bias"), cond, [(prev_cond, prev_uncond)])
    coefficients = fit_coefficients(stack, target)
    np.testing.assert_allclose(coefficients.numpy(), [0.6, 0.3, -0.2, 0.05], atol=1e-6)


def test_linear_ag_paper_schedule_costs_25_of_40_nfe():
    schedule = paper_schedule(20)
    assert schedule[:4] == ["cfg", "estimate", "cfg", "estimate"] and set(schedule[10:]) == {"cond"}
    assert schedule_nfe(schedule) == 25


def test_linear_ag_estimates_with_its_coefficients():
    coefficients = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.5, 1.0, 0.0, 0.1]], dtype=torch.float64)
    rule = dg.LinearAG(coefficients, schedule=["cfg", "estimate"])
    cond0, uncond0 = _predictions(seed=0)
    cond1, _ = _predictions(seed=1)
    rule.reset()
    rule.combine(cond0, uncond0, _all(), _step(0, num_steps=2))
    guided = rule.combine(cond1, cond1, ~_all(), _step(1, num_steps=2))
    estimate = 0.5 * cond1 + 1.0 * uncond0 + 0.1
    torch.testing.assert_close(guided, cfg_combine(cond1, estimate, 4.0))


@pytest.mark.parametrize("suffix", [".safetensors", ".json"])
def test_linear_ag_save_load_round_trip(tmp_path, suffix):
    coefficients = torch.randn(6, 4, dtype=torch.float64)
    rule = dg.LinearAG(coefficients, schedule=paper_schedule(6, real_every=3), guidance_scale=3.0)
    loaded = dg.LinearAG.load(rule.save(tmp_path / f"coefficients{suffix}"))
    torch.testing.assert_close(loaded.coefficients, coefficients)
    assert loaded.schedule == rule.schedule and loaded.regressors == rule.regressors
    assert loaded.guidance_scale == 3.0


def test_linear_ag_refuses_bad_files_and_settings(tmp_path):
    with pytest.raises(FileNotFoundError):
        dg.LinearAG.load(tmp_path / "missing.safetensors")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a LinearAG coefficients file"):
        dg.LinearAG.load(corrupt)
    with pytest.raises(ValueError, match="unknown regressors"):
        dg.LinearAG(torch.zeros(4, 1), regressors=("future",))
    with pytest.raises(ValueError, match="schedule"):
        dg.LinearAG(torch.zeros(4, 4), schedule=["cfg"] * 3)


def test_apg_diffusers_formulation_matches_diffusers_normalized_guidance():
    from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer, normalized_guidance

    ours = dg.APG(eta=0.3, norm_threshold=2.0, momentum=-0.5, space="model_output", formulation="diffusers")
    buffer = MomentumBuffer(-0.5)
    for index in range(3):
        cond, uncond = (p.float() for p in _predictions(seed=10 + index))
        expected = normalized_guidance(cond, uncond, 4.0, buffer, eta=0.3, norm_threshold=2.0)
        torch.testing.assert_close(ours.combine(cond, uncond, _all(), _step(index)), expected)


def test_linear_ag_refuses_another_guidance_scale():
    rule = dg.LinearAG(torch.zeros(10, 4), guidance_scale=3.0)
    with pytest.raises(ValueError, match="calibrated at guidance_scale=3"):
        rule.uncond_mask(3, _step(0, scale=5.0))


def test_interval_guides_only_noise_levels_inside_it():
    torch.manual_seed(0)
    cond, uncond = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    alpha = torch.tensor([0.9, 0.6, 0.2])  # sigma / alpha = 0.48, 1.33, 4.9
    step = GuidanceStep(0, 10, 500.0, 4.0, alpha, (1 - alpha**2).sqrt())
    rule = dg.GuidanceInterval(sigma_lo=0.5, sigma_hi=4.9)  # (0.5, 4.9]: the last two
    mask = rule.uncond_mask(3, step)
    assert mask.tolist() == [False, True, True]
    guided = rule.combine(cond, torch.where(mask[:, None, None, None], uncond, cond), mask, step)
    torch.testing.assert_close(guided[0], cond[0])
    torch.testing.assert_close(guided[1:], cfg_combine(cond[1:], uncond[1:], 4.0))
    with pytest.raises(ValueError, match="sigma_lo < sigma_hi"):
        dg.GuidanceInterval(sigma_lo=2.0, sigma_hi=1.0)


def _run_rule(rule, steps, cond_uncond):
    """Drive a rule over steps as an adapter would; the masked-out uncond rows are cond copies."""
    rule.reset()
    outputs, masks = [], []
    for step, (cond, uncond) in zip(steps, cond_uncond, strict=True):
        mask = rule.uncond_mask(len(cond), step)
        masks.append(mask.clone())
        outputs.append(rule.combine(cond, torch.where(mask[:, None, None, None], uncond, cond), mask, step))
    return outputs, masks


def _descending_steps(num_steps: int = 6, batch: int = 3):
    levels = torch.linspace(3.0, 0.2, num_steps, dtype=torch.float64)  # sigma / alpha per step
    alphas = 1 / (1 + levels**2).sqrt()
    return [
        GuidanceStep(
            i, num_steps, 999.0 - i, 4.0, alphas[i].expand(batch), (alphas[i] * levels[i]).expand(batch)
        )
        for i in range(num_steps)
    ]


def test_ag_inside_an_interval_guides_inside_only_and_switches_there():
    steps = _descending_steps()  # levels 3.0, 2.44, 1.88, 1.32, 0.76, 0.2
    cond_uncond = [_predictions(seed=10 + i) for i in range(len(steps))]
    cond_uncond[3] = (cond_uncond[3][0], cond_uncond[3][0] * 1.0001)  # cos ~ 1 at step 3: AG switches
    outputs, masks = _run_rule(dg.WithinInterval(dg.AdaptiveGuidance(0.99), 1.0, 2.5), steps, cond_uncond)
    assert [bool(m.any()) for m in masks] == [False, True, True, True, False, False]
    for index, (cond, uncond) in enumerate(cond_uncond):
        expected = cfg_combine(cond, uncond, 4.0) if index in (1, 2, 3) else cond
        torch.testing.assert_close(outputs[index], expected)
    # against the interval's own CFG: the same where AG has not switched
    plain, _ = _run_rule(dg.GuidanceInterval(1.0, 2.5), steps, cond_uncond)
    torch.testing.assert_close(outputs[:4], plain[:4])


def test_an_interval_over_everything_around_ag_is_ag():
    steps = _descending_steps()
    cond_uncond = [_predictions(seed=20 + i) for i in range(len(steps))]
    cond_uncond[2] = (cond_uncond[2][0], cond_uncond[2][0] * 1.0001)
    wrapped, wrapped_masks = _run_rule(
        dg.WithinInterval(dg.AdaptiveGuidance(0.99), 0.0, float("inf")), steps, cond_uncond
    )
    alone, alone_masks = _run_rule(dg.AdaptiveGuidance(0.99), steps, cond_uncond)
    assert [m.tolist() for m in wrapped_masks] == [m.tolist() for m in alone_masks]
    assert not alone_masks[3].any()  # the switch fired, so the identity tests the switch too
    for a, b in zip(wrapped, alone, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_an_interval_refuses_linear_ag_inside():
    with pytest.raises(ValueError, match="miss the steps outside"):
        dg.WithinInterval(dg.LinearAG(torch.zeros(10, 4)), 1.0, 2.0)


def _linear_ag(switch_threshold=None):
    coefficients = torch.randn(6, 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * 0.3
    schedule = ["cfg", "estimate", "cfg", "estimate", "cond", "cond"]
    return dg.LinearAG(coefficients, schedule=schedule, switch_threshold=switch_threshold)


def test_linear_ag_with_a_switch_that_never_fires_is_linear_ag():
    steps = _descending_steps()
    cond_uncond = [_predictions(seed=30 + i) for i in range(len(steps))]
    plain, plain_masks = _run_rule(_linear_ag(), steps, cond_uncond)
    never, never_masks = _run_rule(_linear_ag(switch_threshold=1.5), steps, cond_uncond)
    assert [m.tolist() for m in plain_masks] == [m.tolist() for m in never_masks]
    for a, b in zip(plain, never, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_linear_ag_switch_gives_the_conditional_prediction_after_a_real_step_reaches_the_threshold():
    steps = _descending_steps()
    cond_uncond = [_predictions(seed=40 + i) for i in range(len(steps))]
    cond0, uncond0 = cond_uncond[0]
    uncond0 = uncond0.clone()
    uncond0[1] = cond0[1] * 1.0001  # sample 1 converged at step 0 (cos ~ 1); the others not
    cond_uncond[0] = (cond0, uncond0)
    outputs, masks = _run_rule(_linear_ag(switch_threshold=0.99), steps, cond_uncond)
    assert masks[0].tolist() == [True, True, True] and masks[2].tolist() == [True, False, True]
    for index in range(1, len(steps)):
        torch.testing.assert_close(outputs[index][1], cond_uncond[index][0][1])
    # the samples still guided follow LinearAG alone, sample by sample
    for sample in (0, 2):
        alone, _ = _run_rule(
            _linear_ag(), steps, [(c[sample : sample + 1], u[sample : sample + 1]) for c, u in cond_uncond]
        )
        for index in range(len(steps)):
            torch.testing.assert_close(outputs[index][sample : sample + 1], alone[index])
    assert (
        "switch_threshold=0.99" in repr(_linear_ag(0.99))
        and _linear_ag().with_switch(0.99).switch_threshold == 0.99
    )
