"""The method registry is the one source of every face: make_rule, the CLI, the ComfyUI nodes
and the guider build the same rule from the same settings, and guidance/ stands alone."""

from __future__ import annotations

import inspect
import math
import re
import subprocess
import sys
from pathlib import Path

import comfy_standin
import pytest
import torch

import diffguide as dg
from diffguide import cli
from diffguide.adapters.guider import rule_config, rule_from_config
from diffguide.comfy import NODE_CLASS_MAPPINGS
from diffguide.comfy.nodes import node_id
from diffguide.guidance import METHODS, LinearAG, make_rule

ROOT = Path(__file__).resolve().parents[1]
STEPS = 2

#: per method, one changed setting for each parameter (values as a user types them)
CHANGES = {
    "cfg": [{"space": "denoised"}],
    "apg": [
        {"eta": "0.5"},
        {"norm_threshold": "0"},  # 0 means no cap: inf
        {"momentum": "0.25"},
        {"space": "model_output"},
        {"formulation": "diffusers"},
    ],
    "ag": [{"threshold": "0.994"}, {"space": "model_output"}, {"min_steps": "3"}],
    "linear-ag": [{"coefficients": "other"}],
    "interval": [{"sigma_lo": "0.5"}, {"sigma_hi": "10000"}, {"space": "denoised"}],  # 10000: from the start
}
SETTINGS = [(name, {}) for name in METHODS] + [(name, c) for name, cs in CHANGES.items() for c in cs]


def test_every_parameter_is_changed_once_below():
    assert {name: {k for c in cs for k in c} for name, cs in CHANGES.items()} == {
        name: {p.name for p in entry.params} for name, entry in METHODS.items()
    }


@pytest.fixture(scope="module")
def coefficient_files(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("coefficients")
    files = {}
    for name, value in (("default", 0.0), ("other", 0.5)):
        rule = LinearAG(torch.full((STEPS, 4), value), schedule=["cfg", "estimate"], guidance_scale=3.0)
        files[name] = str(rule.save(folder / f"{name}.safetensors"))
    return files


def _typed(name: str, texts: dict[str, str], files: dict[str, str]) -> dict:
    """``texts`` as the Python values make_rule takes."""
    entry = METHODS[name]
    values = {key: entry.param(key).parse(text) for key, text in texts.items()}
    if name == "linear-ag":
        values["coefficients"] = files[texts.get("coefficients", "default")]
    return values


def test_every_rule_class_keeps_the_registry_defaults_in_its_signature():
    for entry in METHODS.values():
        if entry.build is not None:  # LinearAG is built from a file
            continue
        signature = inspect.signature(entry.rule.__init__).parameters
        assert [p.name for p in entry.params] == [n for n in signature if n != "self"], entry.name
        for param in entry.params:
            assert signature[param.name].default == param.default, (entry.name, param.name)


def test_every_preset_is_in_range_and_names_real_parameters():
    for entry in METHODS.values():
        for preset in entry.presets:
            entry.make(preset)  # raises on an unknown name or an out-of-range value


@pytest.mark.parametrize(
    ("name", "texts"), SETTINGS, ids=[f"{n}-{','.join(t) or 'defaults'}" for n, t in SETTINGS]
)
def test_every_face_builds_the_same_rule(name, texts, coefficient_files, tiny_pipe):
    expected = repr(make_rule(name, **_typed(name, texts, coefficient_files)))

    # the CLI's --param parsing and rule building (no preset: the registry's defaults)
    cli_texts = {
        **texts,
        **(
            {"coefficients": coefficient_files[texts.get("coefficients", "default")]}
            if name == "linear-ag"
            else {}
        ),
    }
    params = cli.parse_params([f"{name}.{k}={v}" for k, v in cli_texts.items()], [name])[name]
    from diffguide.compare import build_rule

    assert repr(build_rule(name, tiny_pipe, 3.0, STEPS, preset="none", **params)) == expected

    # the ComfyUI node, its untouched widgets at their defaults
    node = NODE_CLASS_MAPPINGS[node_id(METHODS[name])]
    widgets = {
        key: spec[1]["default"] for key, spec in node.INPUT_TYPES()["required"].items() if key != "model"
    }
    for key, value in _typed(name, texts, coefficient_files).items():
        widgets[key] = METHODS[name].param(key).widget_value(value)
    if name == "linear-ag" and not texts:
        widgets["coefficients"] = coefficient_files["default"]
    assert node.VALIDATE_INPUTS(**widgets) is True
    comfy_standin.install()
    try:
        (patched,) = node().patch(comfy_standin.ModelPatcher(comfy_standin.CountingDenoiser()), **widgets)
    finally:
        comfy_standin.uninstall()
    assert repr(patched.model_options["sampler_pre_cfg_function"][0].__self__.rule) == expected

    # the guider's config round trip
    assert (
        repr(rule_from_config(*rule_config(make_rule(name, **_typed(name, texts, coefficient_files)))))
        == expected
    )


def test_comfy_inputs_are_the_registry_parameters_with_its_defaults_and_ranges():
    for entry in METHODS.values():
        inputs = NODE_CLASS_MAPPINGS[node_id(entry)].INPUT_TYPES()["required"]
        assert list(inputs) == ["model", *(p.name for p in entry.params)]
        for param in entry.params:
            kind, options = inputs[param.name]
            if param.kind == "choice":
                assert kind == list(param.choices) and options["default"] == param.default
            elif param.kind == "path":
                assert kind == "STRING" and options["default"] == ""
            else:
                assert (options["default"], options["min"], options["max"]) == (
                    param.widget_value(param.default),
                    param.low,
                    param.high,
                )


def test_cli_flags_reach_every_method(tiny_pipe, tmp_path, capsys, coefficient_files):
    """`diffguide compare` on a saved digits folder prints each rule: at defaults and with each
    parameter changed, each equals make_rule's."""
    folder = tmp_path / "digits"
    tiny_pipe.save_pretrained(folder)
    rounds = max(len(cs) for cs in CHANGES.values())
    for round_ in range(-1, rounds):
        chosen = {n: ({} if round_ < 0 else cs[round_]) for n, cs in CHANGES.items() if round_ < len(cs)}
        args = ["compare", "--pipeline", str(folder), "--preset", "none", "--methods", ",".join(chosen)]
        args += ["--labels", "1", "--steps", str(STEPS), "--out", str(tmp_path / "c.png")]
        for name, texts in chosen.items():
            if name == "linear-ag":
                texts = {"coefficients": coefficient_files[texts.get("coefficients", "default")]}
            args += [arg for k, v in texts.items() for arg in ("--param", f"{name}.{k}={v}")]
        assert cli.main(args) == 0, capsys.readouterr().err
        printed = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[2:]}
        for name, texts in chosen.items():
            expected = repr(make_rule(name, **_typed(name, texts, coefficient_files)))
            assert printed[name].endswith(expected), (name, printed[name])


def test_the_no_limit_value_of_a_widget_means_inf():
    assert make_rule("apg", norm_threshold=0).norm_threshold == math.inf
    assert make_rule("apg", norm_threshold=math.inf).norm_threshold == math.inf
    assert make_rule("interval", sigma_lo=0.0, sigma_hi=10000.0).sigma_hi == math.inf
    with pytest.raises(ValueError, match=re.escape("momentum must be from -0.99 to 0.99, got 1.5")):
        make_rule("apg", momentum=1.5)
    with pytest.raises(ValueError, match="eta must be from -10 to 10"):
        make_rule("apg", eta=math.nan)
    with pytest.raises(ValueError, match="apg has no preset 'sd15'; its presets: sdxl, digits"):
        make_rule("apg", preset="sd15")


def test_presets_hold_the_papers_and_the_measured_values():
    assert repr(make_rule("apg", preset="sdxl")) == repr(dg.APG(eta=0.0, norm_threshold=15.0, momentum=-0.5))
    assert make_rule("apg", preset="digits").norm_threshold == 2.0  # docs/guidance.md, measured
    interval = make_rule("interval", preset="edm2-xxl")
    assert (interval.sigma_lo, interval.sigma_hi) == (0.28, 5.42)


BLOCKED_IMPORT = """
import importlib.abc, importlib.util, sys, types

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {"diffusers", "transformers", "gradio", "accelerate"}:
            raise ImportError(f"{name} is blocked")
        return None

sys.meta_path.insert(0, Block())
package = types.ModuleType("diffguide")  # the package's __init__ wires every face: skip it
package.__path__ = [sys.argv[1]]
sys.modules["diffguide"] = package
import diffguide.guidance as guidance
rule = guidance.make_rule("apg", preset="digits")
loaded = sorted(m for m in sys.modules if m.startswith("diffguide."))
assert all(m.startswith("diffguide.guidance") for m in loaded), loaded
print(rule)
"""


def test_guidance_imports_with_diffusers_blocked():
    result = subprocess.run(
        [sys.executable, "-c", BLOCKED_IMPORT, str(ROOT / "diffguide")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("APG(eta=0.0, norm_threshold=2.0")


def test_no_file_under_guidance_imports_outside_it():
    """Every import under guidance/ (at any depth of a function) stays inside it or in the
    standard library, torch and safetensors: no ``from .. import hooks``, no diffusers."""
    import ast

    allowed = {"torch", "safetensors", "numpy"} | set(sys.stdlib_module_names)
    for path in (ROOT / "diffguide" / "guidance").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.level <= 1, f"{path.name}: from {'.' * node.level}{node.module or ''} import ..."
                assert node.level == 1 or node.module.split(".")[0] in allowed, f"{path.name}: {node.module}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    assert alias.name.split(".")[0] in allowed, f"{path.name}: import {alias.name}"
