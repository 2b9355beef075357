"""Run several guidance rules on the same seeds and compare cost and outcome.

``build_rule(name, pipe, ...)`` turns a method name (``cfg``, ``apg``, ``ag``, ``linear-ag``)
into a rule with this project's defaults for the embedded digits model; ``compare`` samples
each rule with identical seeds and reports NFE per image, wall time and, when a judge is
given, how many samples show the class asked for. The CLI's ``compare`` and the Gradio demo
are thin over this module.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .generation import generate_samples
from .guidance import APG, CFG, AdaptiveGuidance, GuidanceRule, LinearAG

#: the rules with defaults chosen for the digits model (``build_rule``)
METHODS = ("cfg", "apg", "ag", "linear-ag")
#: LinearAG coefficients shipped with the default model, keyed by (guidance scale, steps)
SHIPPED_LINEAR_AG = {(3.0, 20): "linear_ag_w3_20steps.safetensors"}
CALIBRATION_SEED = 100_000


def calibrate_linear_ag(
    pipe, guidance_scale: float, num_inference_steps: int, trajectories: int = 200
) -> LinearAG:
    """LinearAG fitted on ``trajectories`` CFG runs of a class-conditional pipeline (classes
    cycled, seeds from ``CALIBRATION_SEED`` so they never overlap evaluation seeds)."""
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
    return LinearAG.calibrate(pipe, calls)


def build_rule(name: str, pipe, guidance_scale: float, num_inference_steps: int) -> GuidanceRule:
    """The rule called ``name`` with the defaults chosen for the digits model (docs/guidance.md)."""
    if name == "cfg":
        return CFG()
    if name == "apg":
        # the paper's recipe with the cap set for this model's x0 scale (docs/guidance.md)
        return APG(eta=0.0, norm_threshold=2.0, momentum=-0.5)
    if name == "ag":
        return AdaptiveGuidance(threshold=0.991)
    if name == "linear-ag":
        shipped = SHIPPED_LINEAR_AG.get((float(guidance_scale), int(num_inference_steps)))
        from .models import DEFAULT_MODEL_DIR

        if shipped is not None and (Path(DEFAULT_MODEL_DIR) / shipped).is_file():
            return LinearAG.load(Path(DEFAULT_MODEL_DIR) / shipped)
        return calibrate_linear_ag(pipe, guidance_scale, num_inference_steps)
    raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")


@dataclass
class MethodResult:
    """One rule's samples and costs in a comparison."""

    name: str
    images: torch.Tensor
    nfe_per_image: float
    seconds: float
    judge_accuracy: float | None = None


def compare(
    pipe,
    rules: dict[str, GuidanceRule],
    class_labels: Sequence[int],
    seed: int = 0,
    judge=None,
    **pipe_kwargs,
) -> list[MethodResult]:
    """Sample ``class_labels`` under each rule with the same seeds (sample i: ``seed + i``)."""
    results = []
    labels = torch.as_tensor(list(class_labels))
    for name, rule in rules.items():
        nfe: list[int] = []
        started = time.perf_counter()
        images = generate_samples(
            pipe, labels, seed=seed, batch_size=len(labels), guidance=rule, nfe_per_sample=nfe, **pipe_kwargs
        )
        seconds = time.perf_counter() - started
        accuracy = None
        if judge is not None:
            with torch.no_grad():
                accuracy = (judge(images).argmax(1) == labels).float().mean().item()
        results.append(MethodResult(name, images, sum(nfe) / len(nfe), seconds, accuracy))
    return results
