"""The ComfyUI nodes against diffguide's rules, through a stand-in of ComfyUI's CFG call order."""

from __future__ import annotations

import importlib.util
import math
import sys

import comfy_standin as comfy
import pytest
import torch
from comfy_standin import comfy_modules  # noqa: F401 (autouse: the stand-in for every test here)

from diffguide import cli
from diffguide.comfy import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from diffguide.guidance import APG, AdaptiveGuidance, LinearAG
from diffguide.guidance.base import GuidanceStep, cfg_combine

_conds = comfy.conditions


def _patcher():
    return comfy.ModelPatcher(comfy.CountingDenoiser())


SIGMAS = torch.tensor([14.6, 6.0, 2.5, 1.0, 0.4, 0.0])


def _run(patcher, cond_scale=5.0, batch=3, sigmas=SIGMAS):
    cond, uncond = _conds()
    x = torch.randn(batch, 4, 6, 6, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    patcher.model.rows = {}
    return comfy.sample_euler(patcher, x, sigmas, cond, uncond, cond_scale)


def test_apg_node_equals_diffguides_apg_on_the_same_tensors():
    (patched,) = NODE_CLASS_MAPPINGS["DiffguideAPG"]().patch(
        _patcher(), eta=0.0, norm_threshold=1.5, momentum=-0.5, space="denoised", formulation="paper"
    )
    cond, uncond = _conds()
    torch.manual_seed(1)
    x, sigma = torch.randn(2, 4, 6, 6), torch.full((2,), 3.0)
    reference_rule = APG(eta=0.0, norm_threshold=1.5, momentum=-0.5)
    for step in range(3):  # momentum carries across steps within one run
        sigma = sigma * 0.5
        model = patched.model
        c, u = model(x, sigma, cond[0]), model(x, sigma, uncond[0])
        ones = torch.ones(2, dtype=torch.float64)
        expected = reference_rule.combine(c, u, torch.ones(2, dtype=torch.bool),
                                          GuidanceStep(step, None, float(sigma[0]), 4.0, ones, sigma.double()))  # fmt: skip
        got = comfy.sampling_function(model, x, sigma, uncond, cond, 4.0, patched.model_options)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_apg_node_reduces_to_comfys_plain_cfg():
    plain = _run(_patcher())
    (patched,) = NODE_CLASS_MAPPINGS["DiffguideAPG"]().patch(
        _patcher(), eta=1.0, norm_threshold=0.0, momentum=0.0, space="denoised", formulation="paper"
    )
    torch.testing.assert_close(_run(patched), plain, rtol=1e-5, atol=1e-5)


def test_comfys_own_apg_formula_applies_one_unit_more_guidance_than_the_paper():
    """ComfyUI's APG node returns ``u + N + (c - u) / w`` to its CFG formula, which gives
    ``c + w N``; the paper (and our node) give ``c + (w - 1) N``."""
    cond, uncond = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    w, diff = 4.0, cond - uncond
    unit = torch.nn.functional.normalize(cond.flatten(1), dim=1).reshape(cond.shape)
    parallel = (diff * unit).sum(dim=(1, 2, 3), keepdim=True) * unit
    orthogonal = diff - parallel
    comfy_cond = uncond + orthogonal + diff / w  # eta = 0, no cap, no momentum
    comfy_result = cfg_combine(comfy_cond, uncond, w)
    ones = torch.ones(2, dtype=torch.float64)
    paper = APG(eta=0.0, norm_threshold=math.inf, momentum=0.0).combine(
        cond, uncond, torch.ones(2, dtype=torch.bool), GuidanceStep(0, None, 1.0, w, ones, ones)
    )
    torch.testing.assert_close(comfy_result - paper, orthogonal, rtol=1e-4, atol=1e-5)


def test_ag_node_stops_calling_the_model_for_uncond_after_the_switch():
    plain = _patcher()
    _run(plain)
    assert plain.model.rows == {"cond": 15, "uncond": 15}  # 5 steps x 3 samples
    (patched,) = NODE_CLASS_MAPPINGS["DiffguideAdaptiveGuidance"]().patch(
        _patcher(), threshold=-1.0, space="denoised", min_steps=2
    )
    _run(patched)
    assert patched.model.rows == {"cond": 15, "uncond": 3 * 3}  # guided at steps 0-2, switched after step 2


def test_ag_node_matches_diffguides_rule_sample_by_sample():
    threshold = 0.9995
    (patched,) = NODE_CLASS_MAPPINGS["DiffguideAdaptiveGuidance"]().patch(
        _patcher(), threshold=threshold, space="denoised", min_steps=0
    )
    result = _run(patched)
    # reference: the rule by hand on the same Euler loop, uncond evaluated for every row
    rule, model = AdaptiveGuidance(threshold=threshold), _patcher().model
    cond, uncond = _conds()
    x = torch.randn(3, 4, 6, 6, generator=torch.Generator().manual_seed(0)) * SIGMAS[0]
    uncond_rows = []
    for i in range(len(SIGMAS) - 1):
        sigma = SIGMAS[i] * torch.ones(3)
        ones = torch.ones(3, dtype=torch.float64)
        step = GuidanceStep(i, 5, float(SIGMAS[i]), 5.0, ones, sigma.double())
        mask = rule.uncond_mask(3, step)
        uncond_rows.append(int(mask.sum()))
        c = model(x, sigma, cond[0])
        u = torch.where(mask[:, None, None, None], model(x, sigma, uncond[0]), c)
        denoised = rule.combine(c, u, mask, step)
        x = x + (x - denoised) / SIGMAS[i] * (SIGMAS[i + 1] - SIGMAS[i])
    # the unconditional pass runs on the whole batch while any sample still needs it
    assert patched.model.rows["uncond"] == 3 * sum(rows > 0 for rows in uncond_rows) < 15
    torch.testing.assert_close(result, x, rtol=1e-5, atol=1e-5)


def test_uncond_keeps_its_position_so_comfy_labels_it_uncond():
    (patched,) = NODE_CLASS_MAPPINGS["DiffguideAdaptiveGuidance"]().patch(
        _patcher(), threshold=-1.0, space="denoised", min_steps=2
    )
    _run(patched)
    assert {name for position, name in patched.model.positions if position == 1} == {"uncond"}
    assert {name for position, name in patched.model.positions if position == 0} == {"cond"}


def test_two_skipping_nodes_chain_without_losing_state():
    ag = NODE_CLASS_MAPPINGS["DiffguideAdaptiveGuidance"]()
    (patched,) = ag.patch(_patcher(), threshold=-1.0, space="denoised", min_steps=2)
    (patched,) = NODE_CLASS_MAPPINGS["DiffguideGuidanceInterval"]().patch(
        patched, sigma_lo=0.0, sigma_hi=10000.0, space="model_output"
    )
    result = _run(patched)
    assert torch.isfinite(result).all()
    assert patched.model.rows == {"cond": 15, "uncond": 9}  # the inner AG still skips after its switch
    (alone,) = ag.patch(_patcher(), threshold=-1.0, space="denoised", min_steps=2)
    torch.testing.assert_close(result, _run(alone), rtol=1e-5, atol=1e-5)  # AG's switch still decides


def test_consecutive_one_step_runs_each_start_afresh():
    (patched,) = NODE_CLASS_MAPPINGS["DiffguideAdaptiveGuidance"]().patch(
        _patcher(), threshold=-1.0, space="denoised", min_steps=0
    )
    sigmas = torch.tensor([2.0, 0.0])
    first, second = _run(patched, sigmas=sigmas), _run(patched, sigmas=sigmas)
    torch.testing.assert_close(first, second)
    assert patched.model.rows == {"cond": 3, "uncond": 3}  # the second run guided its step too


def test_state_resets_between_runs():
    (patched,) = NODE_CLASS_MAPPINGS["DiffguideAdaptiveGuidance"]().patch(
        _patcher(), threshold=-1.0, space="denoised", min_steps=2
    )
    first = _run(patched)
    second = _run(patched)
    torch.testing.assert_close(first, second)
    assert patched.model.rows == {"cond": 15, "uncond": 9}


def test_cfg_scale_one_passes_through_without_uncond():
    (patched,) = NODE_CLASS_MAPPINGS["DiffguideAdaptiveGuidance"]().patch(
        _patcher(), threshold=0.99, space="denoised", min_steps=0
    )
    plain = _patcher()
    torch.testing.assert_close(_run(patched, cond_scale=1.0), _run(plain, cond_scale=1.0))
    assert "uncond" not in patched.model.rows


def test_interval_node_guides_only_inside_and_skips_uncond_outside():
    (patched,) = NODE_CLASS_MAPPINGS["DiffguideGuidanceInterval"]().patch(
        _patcher(), sigma_lo=1.0, sigma_hi=6.0, space="model_output"
    )
    _run(patched)
    assert patched.model.rows["uncond"] == 2 * 3  # sigma 6.0 and 2.5 lie in (1, 6]
    (everywhere,) = NODE_CLASS_MAPPINGS["DiffguideGuidanceInterval"]().patch(
        _patcher(), sigma_lo=0.0, sigma_hi=10000.0, space="model_output"
    )
    torch.testing.assert_close(_run(everywhere), _run(_patcher()), rtol=1e-5, atol=1e-5)


def test_linear_ag_node_runs_a_saved_schedule(tmp_path):
    steps = len(SIGMAS) - 1
    schedule = ["cfg", "estimate", "cfg", "cond", "cond"]
    rule = LinearAG(torch.zeros(steps, 3), ("cond", "prev_cond", "prev_uncond"), schedule, "denoised", 5.0)
    path = rule.save(tmp_path / "coefficients.safetensors")
    (patched,) = NODE_CLASS_MAPPINGS["DiffguideLinearAG"]().patch(_patcher(), coefficients=str(path))
    _run(patched)
    assert patched.model.rows == {"cond": 15, "uncond": 2 * 3}
    # with the saved all-"cfg" schedule it is ComfyUI's CFG
    all_cfg = LinearAG(
        torch.zeros(steps, 3), ("cond", "prev_cond", "prev_uncond"), ["cfg"] * steps, "denoised", 5.0
    )
    (patched,) = NODE_CLASS_MAPPINGS["DiffguideLinearAG"]().patch(
        _patcher(), coefficients=str(all_cfg.save(tmp_path / "cfg.json"))
    )
    torch.testing.assert_close(_run(patched), _run(_patcher()), rtol=1e-5, atol=1e-5)


def test_the_input_model_is_not_modified():
    original = _patcher()
    NODE_CLASS_MAPPINGS["DiffguideAdaptiveGuidance"]().patch(
        original, threshold=0.99, space="denoised", min_steps=0
    )
    assert "sampler_calc_cond_batch_function" not in original.model_options
    assert "sampler_pre_cfg_function" not in original.model_options


def _validate(node_id: str, inputs: dict) -> list[str]:
    """ComfyUI's input checks (execution.py's validate_inputs): the declared min/max for inputs
    that VALIDATE_INPUTS does not name, unless it takes **kwargs (then it gets them all and
    ComfyUI checks none itself), then VALIDATE_INPUTS with the inputs it receives."""
    import inspect

    node = NODE_CLASS_MAPPINGS[node_id]
    spec = inspect.getfullargspec(node.VALIDATE_INPUTS)
    named, has_kwargs = set(spec.args), spec.varkw is not None
    errors = []
    for name, spec_ in node.INPUT_TYPES()["required"].items():
        if name not in inputs or name in named or has_kwargs or spec_[0] not in ("FLOAT", "INT"):
            continue
        options, value = spec_[1], inputs[name]
        if "min" in options and value < options["min"]:
            errors.append(f"Value {value} smaller than min of {options['min']}")
        if "max" in options and value > options["max"]:
            errors.append(f"Value {value} bigger than max of {options['max']}")
    verdict = node.VALIDATE_INPUTS(**{k: v for k, v in inputs.items() if k in named or has_kwargs})
    if verdict is not True:
        errors.append(verdict)
    return errors


@pytest.mark.parametrize(
    ("node_id", "inputs", "message"),
    [
        ("DiffguideAPG", {"eta": 0.0, "norm_threshold": -1.0, "momentum": 0.0}, "norm_threshold must be from 0 to 1000, or inf"),
        ("DiffguideAPG", {"eta": 0.0, "norm_threshold": 1.0, "momentum": 1.0}, "momentum must be from -0.99 to 0.99"),
        ("DiffguideAPG", {"space": "latent"}, "space must be one of model_output, denoised"),
        ("DiffguideLinearAG", {"coefficients": ""}, "linear-ag needs calibrated coefficients"),
        ("DiffguideLinearAG", {"coefficients": "/nonexistent.safetensors"}, "does not exist"),
        ("DiffguideGuidanceInterval", {"sigma_lo": 2.0, "sigma_hi": 1.0}, "need 0 <= sigma_lo < sigma_hi"),
        ("DiffguideGuidanceInterval", {"sigma_lo": -1.0, "sigma_hi": 5.0}, "sigma_lo must be from 0 to 10000"),
        ("DiffguideAdaptiveGuidance", {"threshold": 2.0, "min_steps": 0}, "threshold must be from -1 to 1.5"),
        ("DiffguideAdaptiveGuidance", {"threshold": float("nan"), "min_steps": 0}, "threshold must be from -1"),
        ("DiffguideAdaptiveGuidance", {"threshold": 0.99, "min_steps": 1.5}, "min_steps must be a whole number"),
    ],
)  # fmt: skip
def test_bad_node_inputs_get_comfy_style_validation_errors(node_id, inputs, message):
    errors = _validate(node_id, inputs)
    assert errors and message in errors[0]


def test_a_linked_input_is_left_to_run_time():
    """ComfyUI validates a linked input as None (its value is known only when the graph runs)."""
    assert _validate("DiffguideAPG", {"eta": None, "norm_threshold": 1.0, "momentum": -0.5}) == []
    assert "eta must be a number" in _validate("DiffguideAPG", {"eta": "x"})[0]


def test_a_corrupt_coefficients_file_is_refused(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    assert (
        "is not a LinearAG coefficients file" in _validate("DiffguideLinearAG", {"coefficients": str(bad)})[0]
    )


def test_every_node_declares_the_v1_contract():
    assert set(NODE_DISPLAY_NAME_MAPPINGS) == set(NODE_CLASS_MAPPINGS)
    for node in NODE_CLASS_MAPPINGS.values():
        assert node.RETURN_TYPES == ("MODEL",) and node.CATEGORY.startswith("sampling")
        assert callable(getattr(node(), node.FUNCTION))
        assert node.INPUT_TYPES()["required"]["model"] == ("MODEL",)


def _load_like_comfyui(folder):
    """ComfyUI's load_custom_node for a folder: the module from its __init__.py, by location."""
    name = folder.name
    spec = importlib.util.spec_from_file_location(name, folder / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(name, None)
    return module


def test_exported_folder_loads_through_comfyuis_loading_rule(tmp_path, capsys):
    folder = tmp_path / "custom_nodes" / "diffguide-nodes"
    assert cli.main(["export-comfy", str(folder)]) == 0
    assert {p.name for p in folder.iterdir()} == {"__init__.py", "pyproject.toml", "README.md"}
    assert "[tool.comfy]" in (folder / "pyproject.toml").read_text()
    module = _load_like_comfyui(folder)
    assert module.NODE_CLASS_MAPPINGS is NODE_CLASS_MAPPINGS
    assert module.NODE_DISPLAY_NAME_MAPPINGS == NODE_DISPLAY_NAME_MAPPINGS
    assert not hasattr(module, "comfy_entrypoint")  # no V3 API outside ComfyUI
    # a second export into the same folder is refused unless asked
    assert cli.main(["export-comfy", str(folder)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert cli.main(["export-comfy", str(folder), "--overwrite"]) == 0


def test_v3_wrappers_build_from_the_v1_nodes_when_comfy_api_is_present(monkeypatch):
    """A minimal stand-in of ``comfy_api.latest`` (``io`` schema classes, ``ComfyExtension``)."""
    import asyncio
    import importlib
    import types

    class _Input:
        def __init__(self, kind):
            self.kind = kind

        def Input(self, name, **options):  # noqa: N802
            return (self.kind, name, options)

        def Output(self):  # noqa: N802
            return (self.kind, "output")

    io = types.SimpleNamespace(
        ComfyNode=type("ComfyNode", (), {}),
        Schema=lambda **fields: fields,
        NodeOutput=lambda *values: values,
        Model=_Input("MODEL"), Float=_Input("FLOAT"), Int=_Input("INT"), String=_Input("STRING"),
        Combo=_Input("COMBO"),
    )  # fmt: skip
    latest = types.ModuleType("comfy_api.latest")
    latest.io, latest.ComfyExtension = io, type("ComfyExtension", (), {})
    monkeypatch.setitem(sys.modules, "comfy_api", types.ModuleType("comfy_api"))
    monkeypatch.setitem(sys.modules, "comfy_api.latest", latest)
    import diffguide.comfy.v3 as v3

    v3 = importlib.reload(v3)
    try:
        nodes = asyncio.run(asyncio.run(v3.comfy_entrypoint()).get_node_list())
        schemas = {node.define_schema()["node_id"]: node for node in nodes}
        assert set(schemas) == set(NODE_CLASS_MAPPINGS)
        apg = schemas["DiffguideAPG"]
        assert ("FLOAT", "momentum") == apg.define_schema()["inputs"][3][:2]
        assert "momentum" in apg.validate_inputs(eta=0.0, norm_threshold=1.0, momentum=2.0)
        (patched,) = apg.execute(model=_patcher(), eta=0.0, norm_threshold=1.0, momentum=-0.5)
        assert len(patched.model_options["sampler_pre_cfg_function"]) == 1
    finally:
        monkeypatch.undo()
        importlib.reload(v3)
