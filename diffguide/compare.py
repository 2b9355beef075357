"""Run several guidance rules on the same seeds and compare cost and outcome, on any pipeline.

``build_rule(name, pipe, ...)`` turns a method name into a rule from the registry
(``diffguide/guidance/registry.py``), at the preset of the pipeline's model family when the
method has one (``preset="auto"``: the digits model's measured APG cap, the paper's SDXL values).
``compare`` samples each rule with identical seeds, on class labels (the embedded digits model)
or prompts (any text-to-image pipeline), and reports NFE per image, wall time and, when a judge
is given, how many samples show the class asked for. The CLI's ``sample`` / ``compare`` and the
Gradio demo are thin over this module.
"""

from __future__ import annotations

import inspect
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .adapters.calibration import calibrate_linear_ag
from .adapters.support import support_for
from .generation import generate_samples
from .guidance import GuidanceRule, LinearAG, method
from .hooks import guided, stats

#: precision and recall of benchmark points (written by evals/frontier.py): the few samples a
#: comparison shows are too few for k-NN metrics, so those come from the benchmark, labelled so
FRONTIER_POINTS = Path(__file__).resolve().parent / "frontier_points.json"

#: LinearAG coefficients shipped with the default model, keyed by (guidance scale, steps)
SHIPPED_LINEAR_AG = {(3.0, 20): "linear_ag_w3_20steps.safetensors"}
CALIBRATION_SEED = 100_000


def family_of(pipe) -> str | None:
    """The model family whose presets suit ``pipe`` (``"digits"``, ``"sdxl"``), if known."""
    family = getattr(pipe, "guidance_family", None)
    if family is None and "StableDiffusionXL" in type(pipe).__name__:
        family = "sdxl"
    return family


def is_class_conditional(pipe) -> bool:
    """Whether ``pipe`` is called with class labels (the digits pipelines) rather than prompts."""
    return "class_labels" in _call_parameters(pipe)


def _call_parameters(pipe) -> set[str]:
    return set(inspect.signature(type(pipe).__call__).parameters)


def scale_argument(pipe) -> str:
    """The call argument holding the CFG scale diffguide's rules see (``true_cfg_scale`` on
    Flux and Qwen-Image, ``guidance_scale`` elsewhere)."""
    if is_class_conditional(pipe):
        return "guidance_scale"
    where, name = support_for(pipe)[1].scale_source("*").split(":", 1)
    return name if where == "call" else name.lstrip("_")


def calibrate_on_labels(
    pipe,
    guidance_scale: float,
    num_inference_steps: int,
    trajectories: int = 200,
    space: str = "model_output",
) -> LinearAG:
    """LinearAG fitted on ``trajectories`` CFG runs of a class-conditional pipeline (classes
    cycled, seeds from ``CALIBRATION_SEED`` so they never overlap evaluation seeds), in ``space``."""
    labels = [i % pipe.num_classes for i in range(trajectories)]
    calls = [
        {
            "class_labels": labels[start : start + 100],
            "generator": [torch.Generator().manual_seed(CALIBRATION_SEED + i) for i in range(start, min(start + 100, trajectories))],
            "guidance_scale": guidance_scale,
            "num_inference_steps": num_inference_steps,
            "output_type": "pt",
        }
        for start in range(0, trajectories, 100)
    ]  # fmt: skip
    return calibrate_linear_ag(pipe, calls, space=space)


def resolve_preset(name: str, pipe, preset: str | None = "auto") -> str | None:
    """The preset ``build_rule`` uses: ``"auto"`` picks the pipeline family's, if the method has
    one; a named preset applies to the methods that have it (the others keep their defaults);
    ``None`` or ``"none"``: the registry's defaults."""
    if preset in (None, "none"):
        return None
    if preset != "auto":
        return preset if preset in method(name).presets else None
    family = family_of(pipe)
    return family if family in method(name).presets else None


def build_rule(
    name: str,
    pipe,
    guidance_scale: float,
    num_inference_steps: int,
    preset: str | None = "auto",
    **params,
) -> GuidanceRule:
    """The rule ``name`` from the registry, at ``preset`` (see :func:`resolve_preset`) and
    ``params``. LinearAG without ``coefficients`` uses the coefficients shipped with the default
    model, or calibrates on a class-conditional pipeline (about 200 CFG runs)."""
    entry = method(name)
    preset = resolve_preset(name, pipe, preset)
    if name == "linear-ag" and params.get("coefficients") in (None, ""):
        entry.settings(preset, **{k: v for k, v in params.items() if k != "coefficients"})
        return _linear_ag_for(pipe, guidance_scale, num_inference_steps)
    return entry.make(preset, **params)


def _linear_ag_for(pipe, guidance_scale: float, num_inference_steps: int) -> LinearAG:
    from .models import DEFAULT_MODEL_DIR

    if not is_class_conditional(pipe):
        raise ValueError(
            f"linear-ag on {type(pipe).__name__} needs coefficients calibrated on it: "
            "dg.calibrate_linear_ag(pipe, calls).save(FILE), then coefficients=FILE"
        )
    shipped = SHIPPED_LINEAR_AG.get((float(guidance_scale), int(num_inference_steps)))
    same_model = Path(getattr(pipe, "name_or_path", "") or "").resolve() == Path(DEFAULT_MODEL_DIR).resolve()
    if (
        shipped is not None
        and same_model
        and _shipped_sampler(pipe)
        and (Path(DEFAULT_MODEL_DIR) / shipped).is_file()
    ):
        return LinearAG.load(Path(DEFAULT_MODEL_DIR) / shipped)
    return calibrate_on_labels(pipe, guidance_scale, num_inference_steps)


def _shipped_sampler(pipe) -> bool:
    """Whether ``pipe`` samples with the scheduler the shipped LinearAG coefficients were fitted under."""
    from .models import DEFAULT_MODEL_DIR

    shipped = json.loads((Path(DEFAULT_MODEL_DIR) / "scheduler" / "scheduler_config.json").read_text())
    current = dict(pipe.scheduler.config)
    return shipped["_class_name"] == type(pipe.scheduler).__name__ and all(
        current.get(key) == value for key, value in shipped.items() if not key.startswith("_")
    )


@dataclass
class MethodResult:
    """One rule's samples and costs in a comparison."""

    name: str
    rule: GuidanceRule
    images: torch.Tensor
    nfe_per_image: float
    seconds: float
    judge_accuracy: float | None = None


def benchmark_point(
    model: str, rule: GuidanceRule, num_inference_steps: int, guidance_scale: float
) -> dict | None:
    """The benchmark's measures (``samples``, ``precision``, ``recall`` and their standard
    errors) of exactly this rule and setting on an embedded model, or None if not benchmarked."""
    if not FRONTIER_POINTS.is_file():
        return None
    wanted = (model, repr(rule), int(num_inference_steps), float(guidance_scale))
    for point in json.loads(FRONTIER_POINTS.read_text()):
        if (point["model"], point["rule"], point["steps"], point["scale"]) == wanted:
            return point
    return None


def prompt_call(
    pipe,
    prompts: Sequence[str],
    negative_prompt: str | None,
    seed: int,
    guidance_scale: float,
    num_inference_steps: int,
) -> dict:
    """Keyword arguments of one text-to-image call: sample ``i`` seeded ``seed + i``, the scale
    passed where the pipeline takes the scale our rules see, images as tensors in [0, 1]."""
    accepted = _call_parameters(pipe)
    if negative_prompt is None and support_for(pipe)[1].needs_negative:
        negative_prompt = ""  # true CFG runs only with a negative prompt: the empty one is CFG's
    if negative_prompt is not None and "negative_prompt" not in accepted:
        raise ValueError(f"{type(pipe).__name__} takes no negative prompt")
    kwargs = {
        "prompt": list(prompts),
        "generator": [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))],
        "num_inference_steps": num_inference_steps,
        scale_argument(pipe): guidance_scale,
        "output_type": "pt",
    }
    if negative_prompt is not None:
        kwargs["negative_prompt"] = [negative_prompt] * len(prompts)
    return kwargs


def _images_of(output, pipe) -> torch.Tensor:
    images = output.images if hasattr(output, "images") else output[0]
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise ValueError(
            f"{type(pipe).__name__} does not return a batch of images (video pipelines are not served by "
            "diffguide compare); use dg.apply(pipe, rule) in Python"
        )
    return images.float().cpu()


def compare(
    pipe,
    rules: dict[str, GuidanceRule],
    class_labels: Sequence[int] | None = None,
    prompts: Sequence[str] | None = None,
    negative_prompt: str | None = None,
    seed: int = 0,
    judge=None,
    guidance_scale: float = 3.0,
    num_inference_steps: int = 20,
) -> list[MethodResult]:
    """Sample under each rule with the same seeds (sample ``i``: ``seed + i``), on
    ``class_labels`` (class-conditional pipelines) or ``prompts``."""
    if (class_labels is None) == (prompts is None):
        raise ValueError("compare needs class_labels (class-conditional pipelines) or prompts, not both")
    results = []
    for name, rule in rules.items():
        started = time.perf_counter()
        if class_labels is not None:
            nfe: list[int] = []
            labels = torch.as_tensor(list(class_labels))
            images = generate_samples(
                pipe, labels, seed=seed, batch_size=len(labels), guidance=rule, nfe_per_sample=nfe,
                guidance_scale=guidance_scale, num_inference_steps=num_inference_steps,
            ).float()  # fmt: skip
        else:
            call = prompt_call(pipe, prompts, negative_prompt, seed, guidance_scale, num_inference_steps)
            with guided(pipe, rule):
                images = _images_of(pipe(**call), pipe)
                nfe = stats(pipe)["nfe_per_sample"]
        seconds = time.perf_counter() - started
        accuracy = None
        if judge is not None and class_labels is not None:
            with torch.no_grad():
                accuracy = (judge(images).argmax(1) == labels).float().mean().item()
        results.append(MethodResult(name, rule, images, sum(nfe) / len(nfe), seconds, accuracy))
    return results
