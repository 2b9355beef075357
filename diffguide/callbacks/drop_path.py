"""ScheduledDropPath: drop-path whose probability grows linearly over training.

Zoph, Vasudevan, Shlens & Le, "Learning Transferable Architectures for Scalable Image Recognition",
CVPR 2018 (arXiv:1707.07012), NASNet. Each path (residual branch) is dropped per sample with a
probability that rises linearly from 0 to its final value over training; as in the NASNet reference
code (and the stochastic-depth rule of Huang et al. 2016), deeper blocks also get a larger share::

    p(step, layer) = drop_prob * min(1, step / total_steps) * (layer_index + 1) / num_layers

The depth factor is optional (``scale_with_depth``, default on); without it every block gets
``drop_prob * min(1, step / total_steps)``. A kept sample is scaled by ``1 / (1 - p)`` so the
expected output is unchanged; in eval mode drop-path is the identity.

:class:`ScheduledDropPath` drives drop-path modules a model already has, found by duck typing
(timm's ``DropPath`` with ``drop_prob``, torchvision's ``StochasticDepth`` with ``p``), and/or wraps
residual-branch modules named in ``wrap`` with :class:`DropPathWrapper`. ``layer_index`` is the
module's position in ``model.named_modules()`` (registration order, which is depth order for the
usual stacks of blocks) and ``num_layers`` the number of drop-path modules found.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .base import Callback, TrainContext

#: class name -> the attribute that holds its drop probability
DROP_PATH_ATTRIBUTES: dict[str, str] = {
    "DropPath": "drop_prob",
    "DropPathWrapper": "drop_prob",
    "StochasticDepth": "p",
}


def drop_probability(
    step: int,
    total_steps: int,
    drop_prob: float,
    layer_index: int,
    num_layers: int,
    scale_with_depth: bool = True,
) -> float:
    """``drop_prob * min(1, step / total_steps) * (layer_index + 1) / num_layers``; without
    ``scale_with_depth`` the last factor is 1."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if not 0.0 <= drop_prob < 1.0:
        raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob}")
    if not 0 <= layer_index < num_layers:
        raise ValueError(f"layer_index {layer_index} is outside [0, {num_layers})")
    # clamped like the NASNet code, so running past total_steps keeps the final probability
    progress = min(1.0, max(0.0, step / total_steps))
    depth = (layer_index + 1) / num_layers if scale_with_depth else 1.0
    return drop_prob * progress * depth


def drop_path(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Zero whole samples (dim 0) with probability ``p`` and scale the kept ones by ``1 / (1 - p)``."""
    if not training or p <= 0.0:
        return x
    if p >= 1.0:
        raise ValueError(f"drop probability must be below 1, got {p}")
    keep = 1.0 - p
    # one Bernoulli draw per sample, broadcast over the remaining dimensions
    mask = torch.empty((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device).bernoulli_(keep)
    return x * mask / keep


class DropPathWrapper(nn.Module):
    """Runs ``module`` and applies :func:`drop_path` to its output with probability ``drop_prob``.

    Wrap the residual *branch* (not the block with its skip connection): dropping the branch leaves
    the identity path, which is what drop-path means."""

    def __init__(self, module: nn.Module, drop_prob: float = 0.0):
        super().__init__()
        self.module = module
        self.drop_prob = float(drop_prob)

    def forward(self, *args, **kwargs):
        return drop_path(self.module(*args, **kwargs), self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.4f}"


def find_drop_path_modules(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """``(name, module, attribute)`` for each drop-path module in ``model``, in registration order.

    Duck-typed by class name and attribute, so neither timm nor torchvision needs to be installed."""
    found = []
    for name, module in model.named_modules():
        attribute = DROP_PATH_ATTRIBUTES.get(type(module).__name__)
        if attribute is not None and isinstance(getattr(module, attribute, None), (float, int)):
            found.append((name, module, attribute))
    return found


def wrap_modules(model: nn.Module, names: Sequence[str]) -> None:
    """Replace each named submodule of ``model`` by ``DropPathWrapper(submodule)`` (once)."""
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, DropPathWrapper):
            continue  # setup ran before (e.g. a second adapter): do not wrap twice
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, DropPathWrapper(module))


def unwrap_modules(model: nn.Module, names: Sequence[str]) -> None:
    """Put back the modules :func:`wrap_modules` wrapped, so the model saves and loads as before."""
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, DropPathWrapper):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.module)


class ScheduledDropPath(Callback):
    """Set every drop-path module's probability from :func:`drop_probability` at each step.

    Args:
        drop_prob: the final probability (of the deepest block with ``scale_with_depth``).
        wrap: names of residual-branch modules to wrap with :class:`DropPathWrapper`.
        scale_with_depth: multiply by ``(layer_index + 1) / num_layers`` (default True).

    The schedule is a function of ``ctx.step`` and ``ctx.total_steps`` only, so there is no state
    to checkpoint: a resumed runner restores ``ctx.step`` and the probabilities follow. The values
    set here replace whatever the modules were built with (timm's per-block ``drop_path_rate``
    ramp included); note that timm builds ``nn.Identity`` instead of ``DropPath`` when
    ``drop_path_rate=0``, so create such models with a positive rate or use ``wrap``.
    """

    def __init__(self, drop_prob: float = 0.1, wrap: Sequence[str] = (), scale_with_depth: bool = True):
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob}")
        self.drop_prob = float(drop_prob)
        self.wrap = list(wrap)
        self.scale_with_depth = scale_with_depth
        self.drop_modules: list[tuple[str, nn.Module, str]] = []

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        wrap_modules(model, self.wrap)
        self.drop_modules = find_drop_path_modules(model)
        if not self.drop_modules:
            raise ValueError(
                "ScheduledDropPath found no drop-path modules (timm DropPath, torchvision StochasticDepth); "
                "name the residual branches to wrap with wrap=[...]"
            )

    def probabilities(self, step: int, total_steps: int) -> dict[str, float]:
        """The probability each module gets at ``step``, by module name."""
        n = len(self.drop_modules)
        return {
            name: drop_probability(step, total_steps, self.drop_prob, i, n, self.scale_with_depth)
            for i, (name, _, _) in enumerate(self.drop_modules)
        }

    def on_step_begin(self, ctx: TrainContext) -> None:
        if ctx.total_steps is None:
            raise ValueError(
                "ScheduledDropPath needs the planned number of steps: pass total_steps to the runner"
            )
        probabilities = self.probabilities(ctx.step, ctx.total_steps)
        for name, module, attribute in self.drop_modules:
            setattr(module, attribute, probabilities[name])

    def on_train_end(self, ctx: TrainContext) -> None:
        """Unwrap what ``setup`` wrapped: the trained model keeps its own module tree (and
        state-dict keys), so ``save_pretrained`` / ``from_pretrained`` work unchanged."""
        unwrap_modules(ctx.model, self.wrap)
