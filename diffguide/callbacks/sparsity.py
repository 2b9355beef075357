"""Weight sparsity by projection onto an L0 ball, and an attention-sparsity penalty.

L0 projection: Seo, Yun & Yang, "TEDDY: Trimming Edges with Degree-based Discrimination strategY",
ICLR 2024 (arXiv:2402.01261). Besides its edge sparsification, TEDDY reaches a target parameter
sparsity within one training run by projected gradient descent onto the L0 ball::

    w <- P_k(w - lr * grad),   P_k(w) = argmin_{||v||_0 <= k} ||v - w||_2

whose solution keeps the k entries of largest magnitude and zeroes the rest. :class:`L0Projection`
applies P_k after every optimizer step, per tensor (default) or over all projected tensors together,
and at the end (or at ``freeze_at_step``) fixes the final support with
``torch.nn.utils.prune.custom_from_mask`` so the zeros stay zero under further updates.

Attention sparsity: Prasetyo, Yudistira & Widodo, "Sparse then Prune: Toward Efficient Vision
Transformers", arXiv:2307.11988 (2023). Their sparse regularisation adds, to the task loss, a
log penalty on the softmax attention probabilities A (formula from the authors' code, Sparse-ViT
``model.py`` / ``train.py``)::

    L = L_task + weight * mean(log(1 + A^2)),   weight = 0.01

followed by magnitude pruning (``torch.nn.utils.prune.global_unstructured`` with L1 there).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import nn
from torch.nn.utils import prune

from .base import Callback, TrainContext


def l0_mask(weight: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` largest ``|weight|`` entries; ties go to the lower flat index."""
    numel = weight.numel()
    if not 0 <= k <= numel:
        raise ValueError(f"k must be in [0, {numel}], got {k}")
    flat = weight.detach().reshape(-1).abs()
    # a stable descending sort keeps equal magnitudes in index order, which makes ties deterministic
    order = torch.sort(flat, descending=True, stable=True).indices
    mask = torch.zeros(numel, dtype=torch.bool, device=weight.device)
    mask[order[:k]] = True
    return mask.reshape(weight.shape)


def l0_project(weight: torch.Tensor, k: int) -> torch.Tensor:
    """The Euclidean projection of ``weight`` onto ``{v : ||v||_0 <= k}``: its k largest-magnitude entries."""
    return torch.where(l0_mask(weight, k), weight, torch.zeros_like(weight))


def global_l0_masks(weights: Sequence[torch.Tensor], k: int) -> list[torch.Tensor]:
    """:func:`l0_mask` over the concatenation of ``weights`` (ties to the earlier tensor, then index)."""
    flat = torch.cat([w.detach().reshape(-1) for w in weights])
    mask = l0_mask(flat, k)
    return [
        part.reshape(w.shape)
        for part, w in zip(mask.split([w.numel() for w in weights]), weights, strict=True)
    ]


def keep_count(numel: int, sparsity: float | None, k: int | None) -> int:
    """Entries of ``numel`` to keep: ``k`` (capped at ``numel``) or ``round((1 - sparsity) * numel)``."""
    if k is not None:
        return min(int(k), numel)
    return int(round((1.0 - sparsity) * numel))


class L0Projection(Callback):
    """Project weights onto the L0 ball after each optimizer step; freeze the support at the end.

    Args:
        sparsity: fraction of entries to zero (give this or ``k``).
        k: entries to keep (per tensor, or in total with ``scope="global"``).
        params: names of the parameters to project (``model.named_parameters()``); default: every
            trainable parameter with ``ndim >= 2`` (weight matrices and kernels, not biases or norms).
        scope: ``"tensor"`` (k per tensor, default) or ``"global"`` (k over all of them together).
        freeze_at_step: freeze after this many optimizer steps; otherwise at ``on_train_end``.

    Freezing calls ``prune.custom_from_mask(module, name, mask)`` for each parameter: the module
    then holds ``<name>_orig`` (the trained Parameter, still the optimizer's) and the buffer
    ``<name>_mask``, and computes ``<name> = <name>_orig * <name>_mask``, so masked entries stay zero
    whatever the optimizer does. ``prune.remove(module, name)`` makes it permanent. To resume a run
    saved after the freeze, load the runner's state before the model's: it re-applies the masks,
    so the model has the ``_orig`` / ``_mask`` entries its checkpoint holds.
    """

    def __init__(
        self,
        sparsity: float | None = None,
        k: int | None = None,
        params: Sequence[str] | None = None,
        scope: Literal["tensor", "global"] = "tensor",
        freeze_at_step: int | None = None,
    ):
        if (sparsity is None) == (k is None):
            raise ValueError("give exactly one of sparsity and k")
        if sparsity is not None and not 0.0 <= sparsity <= 1.0:
            raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
        if k is not None and k < 0:
            raise ValueError(f"k must be non-negative, got {k}")
        if scope not in ("tensor", "global"):
            raise ValueError(f"scope must be 'tensor' or 'global', got {scope!r}")
        self.sparsity, self.k, self.scope = sparsity, k, scope
        self.param_names = list(params) if params is not None else None
        self.freeze_at_step = freeze_at_step
        self.model: nn.Module | None = None
        self.frozen = False
        self.masks: dict[str, torch.Tensor] = {}

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        self.model = model
        if self.param_names is None:
            self.param_names = [n for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
        if not self.param_names:
            raise ValueError("L0Projection found no parameters to project")
        if self.frozen and self.masks:  # state was loaded before setup
            self._freeze(self.masks)

    def _parameters(self) -> list[torch.Tensor]:
        return [self.model.get_parameter(name) for name in self.param_names]

    def compute_masks(self) -> dict[str, torch.Tensor]:
        """The current L0 masks, by parameter name."""
        weights = self._parameters()
        if self.scope == "global":
            k = keep_count(sum(w.numel() for w in weights), self.sparsity, self.k)
            masks = global_l0_masks(weights, k)
        else:
            masks = [l0_mask(w, keep_count(w.numel(), self.sparsity, self.k)) for w in weights]
        return dict(zip(self.param_names, masks, strict=True))

    @torch.no_grad()
    def project(self) -> dict[str, torch.Tensor]:
        """Zero every entry outside the L0 masks, in place; returns the masks."""
        masks = self.compute_masks()
        for name, weight in zip(self.param_names, self._parameters(), strict=True):
            weight.masked_fill_(~masks[name], 0)
        return masks

    def _freeze(self, masks: dict[str, torch.Tensor]) -> None:
        for name in self.param_names:
            module_name, _, attribute = name.rpartition(".")
            module = self.model.get_submodule(module_name)
            if prune.is_pruned(module) and hasattr(module, attribute + "_mask"):
                continue  # already frozen (setup or load ran twice)
            weight = getattr(module, attribute)
            prune.custom_from_mask(module, attribute, masks[name].to(weight.device))
        self.masks = {name: mask.detach().cpu() for name, mask in masks.items()}
        self.frozen = True

    def freeze(self) -> None:
        """Project once more and fix the support with ``prune.custom_from_mask``."""
        if not self.frozen:
            self._freeze(self.project())

    def after_optimizer_step(self, ctx: TrainContext) -> None:
        if self.frozen:
            return  # the pruning masks keep the support from here on
        self.project()
        # ctx.step counts the steps taken before this one
        if self.freeze_at_step is not None and ctx.step + 1 >= self.freeze_at_step:
            self.freeze()

    def on_train_end(self, ctx: TrainContext) -> None:
        self.freeze()

    def state_dict(self) -> dict:
        return {"frozen": self.frozen, "masks": dict(self.masks)}

    def load_state_dict(self, state: dict) -> None:
        self.frozen = bool(state["frozen"])
        self.masks = {name: mask.bool() for name, mask in state.get("masks", {}).items()}
        if self.frozen and self.model is not None:
            self.frozen = False
            self._freeze(self.masks)


def attention_sparsity(probabilities: torch.Tensor) -> torch.Tensor:
    """``mean(log(1 + A^2))`` over every entry of an attention-probability map ``A``."""
    return torch.log1p(probabilities.pow(2)).mean()


class AttentionSparsityPenalty(Callback):
    """Adds ``{"attention_sparsity": weight * mean over maps of attention_sparsity(A)}`` to the loss.

    Give either ``modules``: names of modules whose *output* is the attention-probability map (an
    ``nn.Softmax``, or the attention dropout after it), captured by forward hooks during the loop's
    forward; or ``maps``: a callable ``ctx -> sequence of probability tensors`` for models that
    record them some other way. Fused kernels (``scaled_dot_product_attention``) never materialise
    the probabilities, so the model must compute them explicitly for this penalty to see them.

    The authors' code penalises only the last encoder block (its loop keeps the last block's
    value); this averages over every map given — name only the last block's softmax to match it.
    """

    def __init__(
        self,
        modules: Sequence[str] | None = None,
        maps: Callable[[TrainContext], Sequence[torch.Tensor]] | None = None,
        weight: float = 0.01,
    ):
        if (modules is None) == (maps is None):
            raise ValueError("give exactly one of modules and maps")
        self.module_names = list(modules) if modules is not None else None
        self.maps = maps
        self.weight = float(weight)
        self._captured: dict[str, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def remove_hooks(self) -> None:
        """Detach the forward hooks (``on_train_end`` does this)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._captured.clear()

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        self.remove_hooks()
        for name in self.module_names or []:

            def hook(module, args, output, name=name):
                self._captured[name] = output

            self._handles.append(model.get_submodule(name).register_forward_hook(hook))

    def loss_terms(self, ctx: TrainContext) -> dict[str, torch.Tensor]:
        if self.maps is not None:
            maps = list(self.maps(ctx))
        else:
            missing = [name for name in self.module_names if name not in self._captured]
            if missing:
                raise RuntimeError(
                    f"no attention maps captured from {missing}: run the model's forward first"
                )
            maps = [self._captured[name] for name in self.module_names]
            self._captured.clear()
        if not maps:
            raise RuntimeError("AttentionSparsityPenalty got no attention maps")
        penalty = torch.stack([attention_sparsity(a) for a in maps]).mean()
        return {"attention_sparsity": self.weight * penalty}

    def on_train_end(self, ctx: TrainContext) -> None:
        self.remove_hooks()
