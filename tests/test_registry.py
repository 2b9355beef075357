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

#: one setting per method that differs from its default (values as a user types them)
CHANGED = {
    "cfg": {"space": "denoised"},
    "apg": {"norm_threshold": "0"},  # 0 means no cap: inf
    "ag": {"threshold": "0.994"},
    "linear-ag": {"coefficients": "other"},
    "interval": {"sigma_hi": "10000"},  # 10000 means from the start: inf
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


def _settings(name: str, changed: bool) -> dict[str, str]:
    return dict(CHANGED[name]) if changed else {}


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


@pytest.mark.parametrize("changed", [False, True], ids=["defaults", "one-change"])
@pytest.mark.parametrize("name", list(METHODS))
def test_every_face_builds_the_same_rule(name, changed, coefficient_files, tiny_pipe):
    texts = _settings(name, changed)
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
    """`diffguide compare` on a saved digits folder prints each rule: at defaults and with one
    change per method, each equals make_rule's."""
    folder = tmp_path / "digits"
    tiny_pipe.save_pretrained(folder)
    for changed in (False, True):
        args = ["compare", "--pipeline", str(folder), "--preset", "none", "--methods", ",".join(METHODS)]
        args += ["--labels", "1", "--steps", str(STEPS), "--out", str(tmp_path / "c.png")]
        for name in METHODS:
            texts = _settings(name, changed)
            if name == "linear-ag":
                texts = {"coefficients": coefficient_files[texts.get("coefficients", "default")]}
            args += [arg for k, v in texts.items() for arg in ("--param", f"{name}.{k}={v}")]
        assert cli.main(args) == 0, capsys.readouterr().err
        printed = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[2:]}
        for name in METHODS:
            expected = repr(make_rule(name, **_typed(name, _settings(name, changed), coefficient_files)))
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


def test_no_file_under_guidance_imports_an_adapter_or_a_face():
    faces = re.compile(
        r"^\s*(from|import)\s+(\.\.|diffguide\.)(hooks|adapters|cli|app|comfy|compare|models)\b", re.M
    )
    for path in (ROOT / "diffguide" / "guidance").glob("*.py"):
        assert not faces.search(path.read_text()), path.name
