"""LinearAG (Castillo et al., "Adaptive Guidance: Training-free Acceleration of Conditional
Diffusion Models", arXiv 2312.12487, AAAI 2025, Sec. on linear estimation).

At some steps the unconditional prediction is not computed but estimated as an affine
combination of quantities already known at that step:

    u_hat_t = sum_k a_{t,k} r_{t,k},   r in (c_t, u_{t-1}, c_{t-1}, 1, ...)

with per-step scalar coefficients ``a_t`` fitted offline by ordinary least squares over
calibration trajectories sampled with CFG (:func:`fit_per_step` here; running a pipeline for
them is the adapters' job, ``diffguide.calibrate_linear_ag``). The guided
prediction is then CFG with ``u_hat_t``. A schedule says, per step, whether the
unconditional pass is real (``"cfg"``), estimated (``"estimate"``) or dropped with the
conditional prediction used alone (``"cond"``). The paper's schedule at 20 steps alternates
real and estimated steps in the first half and is conditional-only in the second: 25 network
evaluations instead of 40. The regressor set of the paper is not stated precisely; ours is
configurable, and ``u_{t-1}`` is the previous step's real or estimated value.

Our addition, combining the paper's two methods: with ``switch_threshold`` set, AG's switch runs
on the real steps. Where ``cos(c_t, u_t) >= switch_threshold`` for a sample, it takes the
conditional prediction alone from then on (no more real or estimated unconditional terms for
it). The cosine is measured in the rule's space; calibrate with ``space="denoised"`` to measure
it on x0 as AG does by default (in epsilon space it is near 1 at high noise and fires at once).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from .adaptive import cosine_similarity
from .base import GuidanceRule, GuidanceStep, cfg_combine, check_space, per_sample

REGRESSORS = ("cond", "prev_cond", "prev_uncond", "prev2_cond", "prev2_uncond", "bias")
DEFAULT_REGRESSORS = ("cond", "prev_uncond", "prev_cond", "bias")
STEP_KINDS = ("cfg", "estimate", "cond")


def paper_schedule(num_steps: int, guided_fraction: float = 0.5, real_every: int = 2) -> list[str]:
    """Real CFG every ``real_every`` steps (from step 0) and estimates in between, for the first
    ``guided_fraction`` of the steps; conditional-only after that."""
    if num_steps < 1 or real_every < 1 or not 0 <= guided_fraction <= 1:
        raise ValueError("need num_steps >= 1, real_every >= 1 and 0 <= guided_fraction <= 1")
    guided = round(num_steps * guided_fraction)
    return [
        ("cfg" if i % real_every == 0 else "estimate") if i < guided else "cond" for i in range(num_steps)
    ]


def schedule_nfe(schedule: Sequence[str]) -> int:
    """Network evaluations per sample of a schedule (2 for a real CFG step, 1 otherwise)."""
    return sum(2 if kind == "cfg" else 1 for kind in schedule)


def regressor_stack(
    names: Sequence[str], cond: torch.Tensor, history: Sequence[tuple[torch.Tensor, torch.Tensor]]
) -> torch.Tensor:
    """(K, *cond.shape) regressors; ``history[-1]`` is the previous step's (cond, uncond).
    Missing history (the first steps) gives zeros, in calibration and use alike."""
    zeros = torch.zeros_like(cond)

    def past(lag: int, which: int) -> torch.Tensor:
        return history[-lag][which] if len(history) >= lag else zeros

    values = {
        "cond": lambda: cond,
        "prev_cond": lambda: past(1, 0),
        "prev_uncond": lambda: past(1, 1),
        "prev2_cond": lambda: past(2, 0),
        "prev2_uncond": lambda: past(2, 1),
        "bias": lambda: torch.ones_like(cond),
    }
    return torch.stack([values[name]() for name in names])


def fit_coefficients(regressors: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Least-squares ``a`` (K,) minimising ``||sum_k a_k regressors[k] - target||^2`` over all
    elements, in float64; the pseudo-inverse handles regressors that are all zero."""
    design = regressors.reshape(regressors.shape[0], -1).double()
    gram = design @ design.T
    return torch.linalg.pinv(gram) @ (design @ target.reshape(-1).double())


#: one recorded step of a CFG trajectory: (cond, history of (cond, uncond) before it), uncond
Observation = tuple[tuple[torch.Tensor, Sequence[tuple[torch.Tensor, torch.Tensor]]], torch.Tensor]


def fit_per_step(
    observations: Sequence[Sequence[Observation]], regressors: Sequence[str], num_steps: int
) -> torch.Tensor:
    """(num_steps, K) coefficients: per step, :func:`fit_coefficients` over every trajectory
    observed there. Steps without observations (an img2img call never runs its first steps)
    keep zeros; they are never used."""
    coefficients = torch.zeros(num_steps, len(regressors), dtype=torch.float64)
    for i, step in enumerate(observations[:num_steps]):
        if step:
            stacks = [regressor_stack(regressors, cond, history) for (cond, history), _ in step]
            coefficients[i] = fit_coefficients(torch.cat(stacks, dim=1), torch.cat([u for _, u in step]))
    return coefficients


class LinearAG(GuidanceRule):
    """CFG whose unconditional prediction is estimated at some steps by a fitted linear model.

    Args:
        coefficients: (num_steps, K) per-step coefficients, from :func:`fit_per_step` or :meth:`load`.
        regressors: names of the K regressors (see ``REGRESSORS``).
        schedule: per step ``"cfg"``, ``"estimate"`` or ``"cond"``; default :func:`paper_schedule`.
        space: space of the predictions regressed and combined (``"model_output"`` default).
        switch_threshold: AG's switch on the real steps (see the module docstring); None: off.
    """

    def __init__(
        self,
        coefficients: torch.Tensor,
        regressors: Sequence[str] = DEFAULT_REGRESSORS,
        schedule: Sequence[str] | None = None,
        space: str = "model_output",
        guidance_scale: float | None = None,
        switch_threshold: float | None = None,
    ):
        unknown = set(regressors) - set(REGRESSORS)
        if unknown:
            raise ValueError(f"unknown regressors {sorted(unknown)}; choose from {REGRESSORS}")
        coefficients = torch.as_tensor(coefficients, dtype=torch.float64)
        if coefficients.ndim != 2 or coefficients.shape[1] != len(regressors):
            raise ValueError(
                f"coefficients must be (num_steps, {len(regressors)}), got {tuple(coefficients.shape)}"
            )
        self.coefficients = coefficients
        self.regressors = tuple(regressors)
        self.num_steps = coefficients.shape[0]
        self.schedule = list(schedule) if schedule is not None else paper_schedule(self.num_steps)
        if len(self.schedule) != self.num_steps or set(self.schedule) - set(STEP_KINDS):
            raise ValueError(f"schedule must be {self.num_steps} entries from {STEP_KINDS}")
        self.space = check_space(space)
        #: the guidance scale of the calibration trajectories (estimates are fitted for it)
        self.guidance_scale = guidance_scale
        self.switch_threshold = switch_threshold
        self._history: list[tuple[torch.Tensor, torch.Tensor]] = []
        #: per sample, whether AG's switch has fired (only with ``switch_threshold``)
        self.converged: torch.Tensor | None = None

    needs_every_step = True  # its estimates regress on the previous steps' predictions

    def with_schedule(self, schedule: Sequence[str]) -> LinearAG:
        """The same coefficients under another schedule."""
        return LinearAG(
            self.coefficients,
            self.regressors,
            schedule,
            self.space,
            self.guidance_scale,
            self.switch_threshold,
        )

    def with_switch(self, threshold: float | None) -> LinearAG:
        """The same coefficients and schedule with AG's switch at ``threshold`` (None: off)."""
        return LinearAG(
            self.coefficients, self.regressors, self.schedule, self.space, self.guidance_scale, threshold
        )

    @property
    def nfe(self) -> int:
        """Network evaluations per sample of one call."""
        return schedule_nfe(self.schedule)

    def reset(self) -> None:
        self._history = []
        self.converged = None

    def _switched(self, batch_size: int) -> torch.Tensor:
        if self.converged is None or len(self.converged) != batch_size:
            self.converged = torch.zeros(batch_size, dtype=torch.bool)
        return self.converged

    def _kind(self, step: GuidanceStep) -> str:
        if step.num_steps is not None and step.num_steps != self.num_steps:
            raise ValueError(
                f"LinearAG was calibrated for {self.num_steps} steps but the pipeline runs {step.num_steps}; "
                f"calibrate again with num_inference_steps={step.num_steps}"
            )
        if self.guidance_scale is not None and abs(step.guidance_scale - self.guidance_scale) > 1e-9:
            raise ValueError(
                f"LinearAG was calibrated at guidance_scale={self.guidance_scale:g} but the pipeline runs "
                f"{step.guidance_scale:g}; calibrate again at that scale"
            )
        return self.schedule[min(step.step_index, self.num_steps - 1)]

    def uncond_mask(self, batch_size: int, step: GuidanceStep) -> torch.Tensor:
        real = torch.full((batch_size,), self._kind(step) == "cfg", dtype=torch.bool)
        return real & ~self._switched(batch_size) if self.switch_threshold is not None else real

    def estimate(self, cond: torch.Tensor, step_index: int) -> torch.Tensor:
        """``u_hat`` at ``step_index`` from ``cond`` and the recorded history."""
        stack = regressor_stack(self.regressors, cond, self._history)
        weights = self.coefficients[step_index].to(stack)
        return torch.tensordot(weights, stack, dims=1)

    def combine(
        self, cond: torch.Tensor, uncond: torch.Tensor, uncond_mask: torch.Tensor, step: GuidanceStep
    ) -> torch.Tensor:
        kind = self._kind(step)
        if kind == "estimate":
            uncond = self.estimate(cond, step.step_index)
        elif kind == "cond":
            uncond = cond  # no guidance: u = c makes CFG return c
        if self.switch_threshold is None:
            self._history = [*self._history[-1:], (cond, uncond)]
            return cfg_combine(cond, uncond, step.guidance_scale) if kind != "cond" else cond
        switched = per_sample(self._switched(len(cond)).to(cond.device), cond).bool()
        uncond = torch.where(switched, cond, uncond)  # switched samples: u = c, as on "cond" steps
        self._history = [*self._history[-1:], (cond, uncond)]
        if kind == "cfg":  # AG's test, on the samples that had a real unconditional pass
            gamma = cosine_similarity(cond, uncond).cpu()
            self.converged = self.converged | (uncond_mask.cpu() & (gamma >= self.switch_threshold))
        return cfg_combine(cond, uncond, step.guidance_scale) if kind != "cond" else cond

    # -- files ------------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write coefficients and settings to ``.safetensors`` or ``.json``."""
        path = Path(path)
        meta = {
            "regressors": list(self.regressors),
            "schedule": self.schedule,
            "space": self.space,
            "guidance_scale": self.guidance_scale,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".json":
            path.write_text(json.dumps({**meta, "coefficients": self.coefficients.tolist()}, indent=1))
        else:
            from safetensors.torch import save_file

            save_file(
                {"coefficients": self.coefficients.contiguous()},
                str(path),
                metadata={k: json.dumps(v) for k, v in meta.items()},
            )
        return path

    @classmethod
    def load(cls, path: str | Path, schedule: Sequence[str] | None = None) -> LinearAG:
        """Read a file written by :meth:`save`; ``schedule`` overrides the saved one."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"LinearAG coefficients file {path} does not exist")
        try:
            if path.suffix == ".json":
                data = json.loads(path.read_text())
                coefficients = torch.tensor(data.pop("coefficients"), dtype=torch.float64)
            else:
                from safetensors import safe_open

                with safe_open(str(path), framework="pt") as handle:
                    coefficients = handle.get_tensor("coefficients")
                    data = {k: json.loads(v) for k, v in handle.metadata().items()}
            return cls(
                coefficients,
                data["regressors"],
                schedule if schedule is not None else data["schedule"],
                data["space"],
                data.get("guidance_scale"),
            )
        except Exception as err:  # safetensors raises its own error type for a corrupt header
            raise ValueError(f"{path} is not a LinearAG coefficients file: {err}") from None

    def __repr__(self) -> str:
        digest = hashlib.sha1(self.coefficients.contiguous().numpy().tobytes()).hexdigest()[:8]
        return (
            f"LinearAG(steps={self.num_steps}, regressors={self.regressors}, nfe={self.nfe}, space={self.space!r}, "
            f"coefficients=sha1:{digest}"
            + (f", switch_threshold={self.switch_threshold}" if self.switch_threshold is not None else "")
            + ")"
        )
