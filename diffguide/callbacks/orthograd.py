"""OrthoGrad and StableMax.

Prieto, Barsbey, Mediano & Birdal, "Grokking at the Edge of Numerical Stability", ICLR 2025
(arXiv:2501.04697).

OrthoGrad (their ⊥Grad) removes, per parameter tensor w with gradient g (both flattened), the
component of g along w, and restores the original norm::

    g_perp = g - (<w, g> / (<w, w> + eps)) w
    g_new  = g_perp * ||g|| / (||g_perp|| + eps)

so the optimizer cannot lower the loss merely by scaling the weights up (naive loss minimisation).
As in the authors' code it applies to every parameter with a gradient (biases and norm scales
included) and ``eps = 1e-30``.

StableMax replaces exp in softmax by a function that grows linearly instead of exponentially::

    s(x) = x + 1 for x >= 0,   1 / (1 - x) for x < 0
    StableMax(x)_i = s(x_i) / sum_j s(x_j)

and the paper's StableMax cross-entropy is -log StableMax(x)_y, evaluated as the log-stablemax
``log s(x_y) - log sum_j s(x_j)`` in float64 (the paper's recommendation against the floating-point
absorption that causes softmax collapse).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from .base import Callback, TrainContext

EPS = 1e-30


def orthogonalize_gradient(weight: torch.Tensor, grad: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """``grad`` with its component along ``weight`` removed, rescaled to ``grad``'s norm.

    Computed in at least float32 (``eps = 1e-30`` underflows in half precision), returned in
    ``grad``'s dtype and shape."""
    if grad.is_sparse:
        raise ValueError("OrthoGrad does not support sparse gradients")
    dtype = torch.promote_types(grad.dtype, torch.float32)
    w = weight.detach().reshape(-1).to(dtype)
    g = grad.reshape(-1).to(dtype)
    projection = torch.dot(w, g) / (torch.dot(w, w) + eps)
    g_perp = g - projection * w
    g_perp = g_perp * (torch.linalg.vector_norm(g) / (torch.linalg.vector_norm(g_perp) + eps))
    return g_perp.reshape(grad.shape).to(grad.dtype)


@torch.no_grad()
def orthogonalize_gradients_(params: Iterable[torch.Tensor], eps: float = EPS, skip_1d: bool = False) -> None:
    """Replace each parameter's ``.grad`` in place by :func:`orthogonalize_gradient`."""
    for p in params:
        if p.grad is None or (skip_1d and p.ndim <= 1):
            continue
        p.grad.copy_(orthogonalize_gradient(p, p.grad, eps))


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


class OrthoGrad(Callback):
    """Orthogonalise the gradients of every parameter the optimizer steps, just before it steps.

    Args:
        eps: the stabiliser in both divisions (the authors' 1e-30).
        skip_1d: leave 1-D parameters (biases, norm scales) alone; off by default, as in the paper.

    Use this or :class:`OrthoGradOptimizer`, not both: the map is idempotent, so a second pass
    only costs time.
    """

    def __init__(self, eps: float = EPS, skip_1d: bool = False):
        self.eps = eps
        self.skip_1d = skip_1d

    def before_optimizer_step(self, ctx: TrainContext) -> None:
        if ctx.optimizer is not None:
            params = _optimizer_params(ctx.optimizer)
        elif ctx.model is not None:
            params = list(ctx.model.parameters())
        else:
            raise ValueError("OrthoGrad needs the optimizer (or the model) in the TrainContext")
        orthogonalize_gradients_(params, self.eps, self.skip_1d)


class OrthoGradOptimizer(torch.optim.Optimizer):
    """Wrap any torch optimizer: ``step()`` orthogonalises the gradients, then steps the inner one.

    ``param_groups``, ``state`` and ``defaults`` are the inner optimizer's own objects, so learning-rate
    schedulers and ``state_dict`` / ``load_state_dict`` act on the inner optimizer.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, eps: float = EPS, skip_1d: bool = False):
        self.optimizer = optimizer
        self.eps = eps
        self.skip_1d = skip_1d
        # initialise the base class's bookkeeping (hooks), then share the inner containers
        super().__init__(optimizer.param_groups, optimizer.defaults)
        self.param_groups = optimizer.param_groups
        self.defaults = optimizer.defaults
        self.state = optimizer.state
        self._shares_inner = True

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            # the closure computes the gradients, so it must run before they are orthogonalised
            with torch.enable_grad():
                loss = closure()
        orthogonalize_gradients_(_optimizer_params(self.optimizer), self.eps, self.skip_1d)
        self.optimizer.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.optimizer.load_state_dict(state_dict)
        # load_state_dict rebuilds the inner containers: share the new ones
        self.param_groups, self.state = self.optimizer.param_groups, self.optimizer.state

    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "_shares_inner", False):
            self.optimizer.add_param_group(param_group)
        else:  # the base __init__ registering the inner optimizer's own groups
            super().add_param_group(param_group)

    def __repr__(self) -> str:
        return f"OrthoGradOptimizer({self.optimizer!r})"


def _stablemax_s(x: torch.Tensor) -> torch.Tensor:
    # evaluate each branch only on its own half-line, so neither produces inf (or a NaN gradient)
    positive = x.clamp(min=0) + 1
    negative = 1 / (1 - x.clamp(max=0))
    return torch.where(x >= 0, positive, negative)


def stablemax(logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``s(x_i) / sum_j s(x_j)`` along ``dim``."""
    s = _stablemax_s(logits)
    return s / s.sum(dim=dim, keepdim=True)


def log_stablemax(logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``log s(x_i) - log sum_j s(x_j)``: the log of :func:`stablemax`, without forming the ratio."""
    s = _stablemax_s(logits)
    return torch.log(s) - torch.log(s.sum(dim=dim, keepdim=True))


def stablemax_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """``-log StableMax(logits)[target]``, computed in float64 and cast back to ``logits.dtype``.

    Classes are on the last dimension (as in the authors' code, unlike ``F.cross_entropy``);
    ``targets`` holds class indices with shape ``logits.shape[:-1]``. ``reduction``: mean, sum, none.
    """
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets {tuple(targets.shape)} must have the logits' shape without the class dim")
    logprobs = log_stablemax(logits.to(torch.float64), dim=-1)
    nll = -logprobs.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    if reduction == "mean":
        nll = nll.mean()
    elif reduction == "sum":
        nll = nll.sum()
    elif reduction != "none":
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    return nll.to(logits.dtype)


class StableMaxCrossEntropy(nn.Module):
    """Module form of :func:`stablemax_cross_entropy`, a drop-in for a cross-entropy criterion."""

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return stablemax_cross_entropy(logits, targets, self.reduction)
