"""The Monge gap regularizer (Uscidda & Cuturi, "The Monge Gap: A Regularizer to Learn All
Transport Maps", ICML 2023, arXiv 2302.04953).

For a map ``T``, a cost ``c`` and samples ``x_1..x_n`` of the reference measure ``rho``, the
(entropic) Monge gap on the empirical measure ``rho_n`` is

    M(T) = (1/n) sum_i c(x_i, T(x_i)) - W_{c,eps}(rho_n, T#rho_n)

the excess of ``T``'s displacement cost over the OT cost between ``rho_n`` and its image (both
uniform). It is zero iff ``T`` is ``c``-optimal on the samples (eps -> 0), so adding
``lambda * M(T)`` to a fitting loss biases the map towards optimal transport maps. Default cost:
squared Euclidean, ``c(x, y) = ||x - y||^2``.

Which entropic value. The three usual definitions differ by constants in ``eps``, hence give
the *same gradients*, but only one keeps ``M >= 0`` with ``M ~ 0`` at optimal maps. With
``P`` a coupling of ``a = b = 1/n`` and ``H`` the Shannon entropy (``log n <= H(P) <= 2 log n``):

- ``<P, C> - eps H(P)`` (OTT-JAX's ``ent_reg_cost``, which its ``monge_gap_from_samples`` uses) makes
  ``M >= eps log n``: never near zero;
- ``<P, C> + eps KL(P | a b^T)`` (``= ... + eps (2 log n - H(P))``) can make ``M`` negative, down
  to ``-eps log n``;
- here: ``W_{c,eps} = min_P <P, C> - eps (H(P) - log n)``, i.e. minus ``eps`` times the conditional
  entropy of ``P`` given its first marginal. A coupling induced by a map has zero conditional
  entropy, so ``W_{c,eps} <= (1/n) sum_i c(x_i, T(x_i))`` and ``M >= 0`` for every ``T``; and
  ``W_{c,eps} >= W_0 - eps log n``, so an optimal map has ``0 <= M <= eps log n`` (which vanishes
  as eps -> 0, and is ~0 once the samples are eps-separated).

``W_{c,eps}`` is evaluated with the dual objective of entropic OT at the potentials that POT's
log-domain Sinkhorn (torch backend, run on detached float64 copies) returns:
``<f, a> + <g, b> - eps (sum_ij P_ij - 1) - eps log n``. By weak duality this is a lower bound of
the minimum for *any* potentials, so the computed gap stays ``>= 0`` even when Sinkhorn stops
early; at convergence it is the minimum. Its gradient with respect to the cost matrix is the
plan ``P`` (Danskin), so no backward pass runs through the Sinkhorn iterations. Sinkhorn runs
on the double-centered cost (separable terms change neither the plan nor the gap; a translated
map then converges like the identity) with eps-scaling (eps halved from the cost's range down to
the target, warm-started), since the default eps is small against the cost.

``eps`` defaults to ``0.01 * mean|C_c|``, ``C_c`` the double-centered ``n x n`` cost between
``x`` and ``T(x)`` (detached): entropic regularization is only meaningful relative to the
scale of the cost, as in OTT-JAX's ``relative_epsilon``, but ``mean(C)`` itself would grow with
a translation of ``T`` (by ``|b|^2`` for the squared Euclidean cost) and, in high dimension, is
dominated by the near-constant part of the distances. The factor 0.01 is this library's
default (the paper's own value was not checked).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .base import Callback, TrainContext

CostFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: eps-scaling: each Sinkhorn stage uses this fraction of the previous stage's eps
ANNEALING_FACTOR = 0.5


def sqeuclidean_cost(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``C_ij = ||x_i - y_j||^2`` for ``x`` ``(n, d)`` and ``y`` ``(m, d)``, without an
    ``(n, m, d)`` intermediate."""
    cost = (x * x).sum(-1)[:, None] + (y * y).sum(-1)[None, :] - 2.0 * x @ y.T
    return cost.clamp_min(0.0)


COSTS: dict[str, CostFn] = {"sqeuclidean": sqeuclidean_cost}


def entropic_ot_lower_value(
    cost: torch.Tensor,
    epsilon: float,
    max_iter: int = 1000,
    tol: float = 1e-6,
) -> torch.Tensor:
    """``min_P <P, C> - eps (H(P) - log n)`` over couplings of uniform ``a`` (n) and ``b`` (m),
    as the entropic dual at POT's Sinkhorn potentials (a lower bound, exact at convergence).
    Differentiable in ``cost``: its gradient is the plan.

    The ``- eps log n`` term uses the first marginal's entropy ``log n``; for ``n == m`` it is
    the value used by :func:`monge_gap`.
    """
    n, m = cost.shape
    a = torch.full((n,), 1.0 / n, dtype=cost.dtype, device=cost.device)
    b = torch.full((m,), 1.0 / m, dtype=cost.dtype, device=cost.device)
    # Double-centering removes the cost's separable part (row and column offsets), which changes
    # neither the plan nor the value but slows Sinkhorn from its zero start (a translated map
    # would converge far slower than the identity); the offsets go back into the potentials.
    detached = cost.detach()
    rows = detached.mean(dim=1) - detached.mean()
    cols = detached.mean(dim=0)
    centered = detached - rows[:, None] - cols[None, :]
    # eps-scaling: Sinkhorn converges slowly when eps is small against the cost (the default
    # eps is 1% of the mean cost), so halve eps from the cost's range down to the target,
    # warm-starting each stage from the last one's potentials.
    schedule, spread = [epsilon], float(centered.abs().max())
    while schedule[-1] / ANNEALING_FACTOR < spread:
        schedule.append(schedule[-1] / ANNEALING_FACTOR)
    schedule.reverse()
    stage_iter = max(1, max_iter // (2 * len(schedule)))  # half the budget for the last stage
    import ot  # POT (the `callbacks` extra), imported here so the package imports without it

    f = g = None
    for k, eps in enumerate(schedule):
        warmstart = None if f is None else (f / eps + a.log(), g / eps + b.log())
        budget = max_iter - stage_iter * (len(schedule) - 1) if k == len(schedule) - 1 else stage_iter
        _, log = ot.sinkhorn(
            a,
            b,
            centered,
            eps,
            method="sinkhorn_log",
            numItermax=max(1, budget),
            stopThr=tol,
            log=True,
            warn=False,
            warmstart=warmstart,
        )
        f, g = eps * (log["log_u"] - a.log()), eps * (log["log_v"] - b.log())
    # POT's plan is exp(log_u + log_v - C / eps) = a b exp((f + g - C) / eps)
    log_u = log["log_u"].detach() + rows / epsilon
    log_v = log["log_v"].detach() + cols / epsilon
    f, g = epsilon * (log_u - a.log()), epsilon * (log_v - b.log())
    plan_mass = torch.logsumexp((log_u[:, None] + log_v[None, :] - cost / epsilon).reshape(-1), dim=0).exp()
    dual = (a * f).sum() + (b * g).sum() - epsilon * (plan_mass - 1.0)
    return dual - epsilon * math.log(n)


def monge_gap(
    x: torch.Tensor,
    mapped: torch.Tensor,
    epsilon: float | None = None,
    cost: str | CostFn = "sqeuclidean",
    relative_epsilon: float = 0.01,
    max_iter: int = 1000,
    tol: float = 1e-6,
) -> torch.Tensor:
    """``(1/n) sum_i c(x_i, T(x_i)) - W_{c,eps}(rho_n, T#rho_n)`` (see the module docstring),
    ``>= 0``, differentiable in ``mapped`` (and ``x``).

    Args:
        x: samples ``(n, ...)`` of the reference measure (flattened to ``(n, d)``).
        mapped: ``T(x)``, same number of samples.
        epsilon: entropic regularization; ``None``: ``relative_epsilon * mean|C_c|`` with
            ``C_c`` the doubly centred cost (see :func:`cost_scale`).
        cost: ``"sqeuclidean"`` or a pairwise cost ``f(x (n, d), y (m, d)) -> (n, m)``.
        max_iter, tol: Sinkhorn's iteration cap and marginal tolerance.
    """
    if x.shape[0] != mapped.shape[0]:
        raise ValueError(
            f"x and mapped need the same number of samples, got {x.shape[0]} and {mapped.shape[0]}"
        )
    cost_fn = COSTS[cost] if isinstance(cost, str) else cost
    # float64: small eps makes C / eps large, and the gap is a difference of close numbers
    matrix = cost_fn(x.reshape(x.shape[0], -1).double(), mapped.reshape(mapped.shape[0], -1).double())
    if epsilon is None:
        # the floor only guards a C with no spread (every coupling optimal)
        epsilon = max(relative_epsilon * cost_scale(matrix), 1e-30)
    displacement = matrix.diagonal().mean()  # same matrix as W, so the M >= 0 bound is exact
    gap = displacement - entropic_ot_lower_value(matrix, epsilon, max_iter, tol)
    return gap.to(mapped.dtype)


def cost_scale(cost: torch.Tensor) -> float:
    """``mean |C - row means - column means + mean|``: the cost's spread without the row and
    column constants, which change no transport plan.

    Scaling epsilon by ``mean(C)`` instead would make it depend on where ``T`` moves the cloud:
    a translation by ``b`` adds ``|b|^2`` to every squared-Euclidean entry, and the gap of that
    optimal map would grow with ``|b|``."""
    cost = cost.detach()
    centred = cost - cost.mean(1, keepdim=True) - cost.mean(0, keepdim=True) + cost.mean()
    return float(centred.abs().mean())


def default_source(batch: Any) -> torch.Tensor:
    """``batch["x"]`` for a mapping, ``batch[0]`` for a tuple/list, else the batch itself."""
    if isinstance(batch, Mapping):
        return batch["x"]
    if isinstance(batch, (tuple, list)):
        return batch[0]
    return batch


def default_mapped(outputs: Any) -> torch.Tensor:
    """``outputs`` when it is a tensor, else ``outputs.sample`` (diffusers) or ``outputs[0]``."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    if hasattr(outputs, "sample"):
        return outputs.sample
    return outputs[0]


class MongeGap(Callback):
    """Adds ``weight * M(T)`` under the name ``"monge_gap"``, with ``x`` read off the batch and
    ``T(x)`` off the model's outputs.

    Args:
        weight: ``lambda`` (default 1).
        epsilon / relative_epsilon / cost / max_iter / tol: as in :func:`monge_gap`.
        source_from_batch: ``ctx.batch -> x`` (default ``batch["x"]`` / ``batch[0]``).
        mapped_from_outputs: ``ctx.outputs -> T(x)`` (default the outputs tensor / ``.sample``).
    """

    def __init__(
        self,
        weight: float = 1.0,
        epsilon: float | None = None,
        relative_epsilon: float = 0.01,
        cost: str | CostFn = "sqeuclidean",
        source_from_batch: Callable[[Any], torch.Tensor] = default_source,
        mapped_from_outputs: Callable[[Any], torch.Tensor] = default_mapped,
        max_iter: int = 1000,
        tol: float = 1e-6,
    ):
        if isinstance(cost, str) and cost not in COSTS:
            raise ValueError(f"unknown cost {cost!r}; use one of {sorted(COSTS)} or a callable")
        self.weight = float(weight)
        self.epsilon = epsilon
        self.relative_epsilon = relative_epsilon
        self.cost = cost
        self.source_from_batch = source_from_batch
        self.mapped_from_outputs = mapped_from_outputs
        self.max_iter = max_iter
        self.tol = tol

    def loss_terms(self, ctx: TrainContext) -> dict[str, torch.Tensor]:
        if self.weight == 0:
            return {}
        gap = monge_gap(
            self.source_from_batch(ctx.batch),
            self.mapped_from_outputs(ctx.outputs),
            epsilon=self.epsilon,
            cost=self.cost,
            relative_epsilon=self.relative_epsilon,
            max_iter=self.max_iter,
            tol=self.tol,
        )
        return {"monge_gap": self.weight * gap}
