"""Fitting LinearAG against a pipeline: the one step of LinearAG that runs a pipeline, so it
lives with the adapters and the rule stays tensor math (``guidance/linear_ag.py``).

:func:`calibrate_linear_ag` samples CFG trajectories through the hook with a recorder rule
that keeps, per step, the conditional prediction, the history before it and the real
unconditional prediction, then fits per-step coefficients with
:func:`~diffguide.guidance.linear_ag.fit_per_step`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from ..guidance.base import GuidanceRule, GuidanceStep, cfg_combine, check_space
from ..guidance.linear_ag import DEFAULT_REGRESSORS, LinearAG, Observation, fit_per_step
from ..hooks import guided


class TrajectoryRecorder(GuidanceRule):
    """CFG that records, per step, each call's ``((cond, history), uncond)`` for the fit."""

    def __init__(self, space: str = "model_output"):
        self.space = check_space(space)
        self.observations: list[list[Observation]] = []
        self._history: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.num_steps = 0
        self.guidance_scale: float | None = None

    def reset(self) -> None:
        self._history = []

    def combine(
        self, cond: torch.Tensor, uncond: torch.Tensor, uncond_mask: torch.Tensor, step: GuidanceStep
    ) -> torch.Tensor:
        i = step.step_index
        while len(self.observations) <= i:
            self.observations.append([])
        cond64, uncond64 = cond.detach().double().cpu(), uncond.detach().double().cpu()
        self.observations[i].append(((cond64, list(self._history)), uncond64))
        self._history = [*self._history[-1:], (cond64, uncond64)]
        self.num_steps = max(self.num_steps, step.num_steps or 0, i + 1)
        self.guidance_scale = step.guidance_scale
        return cfg_combine(cond, uncond, step.guidance_scale)


def calibrate_linear_ag(
    pipe,
    calls: dict | Iterable[dict],
    regressors: Sequence[str] = DEFAULT_REGRESSORS,
    schedule: Sequence[str] | None = None,
    space: str = "model_output",
) -> LinearAG:
    """LinearAG fitted on CFG trajectories of ``pipe``.

    ``calls`` are keyword arguments of pipeline calls (one dict or several), e.g.
    ``{"class_labels": list(range(10)) * 20, "num_inference_steps": 20, "guidance_scale": 3}``;
    all must use the same number of steps and guidance scale, which the rule then requires.
    """
    calls = [calls] if isinstance(calls, dict) else list(calls)
    if not calls:
        raise ValueError("calibrate_linear_ag needs at least one pipeline call")
    for key in ("num_inference_steps", "guidance_scale", "true_cfg_scale"):
        if len({call.get(key) for call in calls}) > 1:
            raise ValueError(f"all calibration calls must use the same {key}")
    recorder = TrajectoryRecorder(space)
    with guided(pipe, recorder):
        for kwargs in calls:
            pipe(**kwargs)
    coefficients = fit_per_step(recorder.observations, regressors, recorder.num_steps)
    return LinearAG(coefficients, regressors, schedule, space, recorder.guidance_scale)
