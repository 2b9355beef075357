"""Representational alignment ("guidance") with a frozen guide network, by linear CKA.

Subramaniam, Mayo, Conwell, Poggio, Katz, Cheung & Barbu, "Training the Untrainable: Introducing
Inductive Bias via Representational Alignment", arXiv:2410.20035 (2024; NeurIPS 2025). The target
network minimises its task loss plus a layer-wise representational distance to a frozen guide::

    L = L_task + alpha * sum_{(i, j) in pairs} (1 - CKA(A_i, G_j))

with A_i the target's activations at layer i and G_j the guide's at layer j on the same batch,
each flattened to (batch, features). Linear CKA (Kornblith, Norouzi, Lee & Hinton, ICML 2019), on
features centred over the batch::

    CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)

Layers are matched by relative depth. With N target layers and M guide layers, target layer i is
paired with guide layer ``round(i * (M - 1) / (N - 1))`` (``match="target"``, default; Python's
``round``, half to even, as in the authors' code; a single target layer pairs with guide layer 0).
The authors' code loops the other way, over guide layers, pairing guide layer j with target layer
``round(j * (N - 1) / (M - 1))``: ``match="guide"``. Both give the identity pairing when N == M.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from .base import Callback, TrainContext


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Linear CKA between two representations of the same batch (dim 0), each flattened per sample.

    Computed in at least float32. Uses the (batch x batch) Gram form when the batch is the smaller
    side, which is the same number: ||Y^T X||_F^2 = <X X^T, Y Y^T>_F and ||X^T X||_F = ||X X^T||_F.
    A constant representation (zero variance) gives 0 rather than NaN."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA needs the same batch on both sides, got {x.shape[0]} and {y.shape[0]}")
    if x.shape[0] < 2:
        raise ValueError("CKA needs at least 2 samples (features are centred over the batch)")
    dtype = torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)
    x = x.reshape(x.shape[0], -1).to(dtype)
    y = y.reshape(y.shape[0], -1).to(dtype)
    x = x - x.mean(dim=0, keepdim=True)
    y = y - y.mean(dim=0, keepdim=True)
    if x.shape[0] <= max(x.shape[1], y.shape[1]):
        gram_x, gram_y = x @ x.T, y @ y.T
        cross = (gram_x * gram_y).sum()
        norm_x, norm_y = torch.linalg.matrix_norm(gram_x), torch.linalg.matrix_norm(gram_y)
    else:
        cross = (y.T @ x).pow(2).sum()
        norm_x, norm_y = torch.linalg.matrix_norm(x.T @ x), torch.linalg.matrix_norm(y.T @ y)
    return cross / (norm_x * norm_y).clamp_min(torch.finfo(dtype).tiny)


def match_layers_by_depth(n_from: int, n_to: int) -> list[int]:
    """For each of ``n_from`` layers, the index among ``n_to`` layers at the same relative depth:
    ``round(i * (n_to - 1) / (n_from - 1))`` (0 when ``n_from == 1``)."""
    if n_from < 1 or n_to < 1:
        raise ValueError(f"need at least one layer on each side, got {n_from} and {n_to}")
    if n_from == 1:
        return [0]
    step = (n_to - 1) / (n_from - 1)
    return [min(round(i * step), n_to - 1) for i in range(n_from)]


def default_inputs(batch: Any) -> Any:
    """The model input in a batch: the tensor itself, ``batch[0]`` of a tuple/list, or ``batch["x"]``."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)):
        return batch[0]
    if isinstance(batch, Mapping):
        return batch["x"]
    raise TypeError(f"cannot find the model input in a {type(batch).__name__}; pass inputs_from_batch=")


def _first_tensor(output: Any) -> torch.Tensor:
    # modules such as nn.RNN / attention return tuples: the representation is the first tensor
    while isinstance(output, (tuple, list)):
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"cannot align a module output of type {type(output).__name__}")
    return output


class RepresentationalAlignment(Callback):
    """Adds ``{"alignment": alpha * sum(1 - linear_cka(target_i, guide_j))}`` to the loss.

    Args:
        guide: the guide network; frozen here (``requires_grad_(False)``, eval mode).
        target_layers: names (``model.named_modules()``) of the target's modules to align, shallow to deep.
        guide_layers: names of the guide's modules, shallow to deep.
        alpha: the weight of the term (the authors' default is 1).
        inputs_from_batch: maps ``ctx.batch`` to the input the guide is called with
            (default :func:`default_inputs`); a dict result is passed as keyword arguments.
        match: ``"target"`` (each target layer gets a guide layer) or ``"guide"`` (each guide layer
            gets a target layer, as in the authors' code).

    The target's activations are captured by forward hooks during the loop's own forward pass;
    ``loss_terms`` then runs the guide on the same batch under ``torch.no_grad()``.
    """

    def __init__(
        self,
        guide: nn.Module,
        target_layers: Sequence[str],
        guide_layers: Sequence[str],
        alpha: float = 1.0,
        inputs_from_batch: Callable[[Any], Any] | None = None,
        match: Literal["target", "guide"] = "target",
    ):
        if not target_layers or not guide_layers:
            raise ValueError("name at least one layer in both the target and the guide")
        if match not in ("target", "guide"):
            raise ValueError(f"match must be 'target' or 'guide', got {match!r}")
        self.guide = guide
        self.target_layers = list(target_layers)
        self.guide_layers = list(guide_layers)
        self.alpha = float(alpha)
        self.inputs_from_batch = inputs_from_batch or default_inputs
        if match == "target":
            self.pairs = list(
                zip(self.target_layers, [self.guide_layers[j] for j in self._match(match)], strict=True)
            )
        else:
            self.pairs = list(
                zip([self.target_layers[i] for i in self._match(match)], self.guide_layers, strict=True)
            )
        self._target_outputs: dict[str, torch.Tensor] = {}
        self._guide_outputs: dict[str, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _match(self, match: str) -> list[int]:
        n_target, n_guide = len(self.target_layers), len(self.guide_layers)
        return (
            match_layers_by_depth(n_target, n_guide)
            if match == "target"
            else match_layers_by_depth(n_guide, n_target)
        )

    @staticmethod
    def _recorder(store: dict[str, torch.Tensor], name: str):
        def hook(module, args, output):
            store[name] = _first_tensor(output)

        return hook

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        self.remove_hooks()
        self.guide.requires_grad_(False)
        self.guide.eval()
        for name in dict.fromkeys(target for target, _ in self.pairs):
            self._handles.append(
                model.get_submodule(name).register_forward_hook(self._recorder(self._target_outputs, name))
            )
        for name in dict.fromkeys(guide for _, guide in self.pairs):
            self._handles.append(
                self.guide.get_submodule(name).register_forward_hook(
                    self._recorder(self._guide_outputs, name)
                )
            )

    def remove_hooks(self) -> None:
        """Detach the forward hooks from the target and the guide (``on_train_end`` does this)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._target_outputs.clear()
        self._guide_outputs.clear()

    def on_train_end(self, ctx: TrainContext) -> None:
        self.remove_hooks()

    def loss_terms(self, ctx: TrainContext) -> dict[str, torch.Tensor]:
        missing = [name for name, _ in self.pairs if name not in self._target_outputs]
        if missing:
            raise RuntimeError(
                f"no activations captured for target layers {missing}: run the model's forward first"
            )
        inputs = self.inputs_from_batch(ctx.batch)
        self.guide.eval()  # a loop that calls .train() on everything must not un-freeze the guide
        with torch.no_grad():
            if isinstance(inputs, Mapping):
                self.guide(**inputs)
            else:
                self.guide(inputs)
        total = sum(
            1.0 - linear_cka(self._target_outputs[target], self._guide_outputs[guide])
            for target, guide in self.pairs
        )
        # drop the references so the next step cannot reuse stale activations (and memory is freed)
        self._target_outputs.clear()
        self._guide_outputs.clear()
        return {"alignment": self.alpha * total}
