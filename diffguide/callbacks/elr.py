"""ELR: early-learning regularization (Liu, Niles-Weed, Razavian & Fernandez-Granda,
"Early-Learning Regularization Prevents Memorization of Noisy Labels", NeurIPS 2020,
arXiv 2007.00151).

Each sample ``i`` keeps a target ``t_i``, a running average of the model's own predictions
(temporal ensembling), updated whenever the sample is trained on:

    p_i = clamp(softmax(z_i), 1e-4, 1 - 1e-4)
    t_i <- beta t_i + (1 - beta) p_i / sum_c p_ic            (detached)
    L   = CE(z, y) + lambda (1/B) sum_i log(1 - <p_i, t_i>)

Early in training the predictions are mostly right even on mislabelled samples, so the targets
remember them; the regularizer pulls ``p_i`` towards ``t_i`` (its gradient cancels the CE gradient
that would otherwise memorize a wrong label). As in the authors' code the target update uses the
clamped and renormalized, detached probabilities, while the penalty uses the clamped
probabilities with their gradient; the targets start at zero and are updated before the penalty
is computed. Defaults are the paper's CIFAR-10 setting, ``beta = 0.7``, ``lambda = 3``.

The hard-label CE stays the task loss; :class:`ELR` adds the ``"elr"`` term. The batch must
carry dataset indices (see :func:`diffguide.callbacks.pskd.default_indices`). The targets are per
process: under data-parallel training each rank averages only the samples it sees (not gathered
across ranks). ELR+ (two networks, weight averaging and mixup) is not implemented.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from .base import Callback, TrainContext
from .pskd import default_indices, default_logits

#: the clamp of the authors' code: keeps log(1 - <p, t>) finite and the targets off 0 and 1
PROB_CLAMP = 1e-4


def clamped_probabilities(logits: torch.Tensor, clamp: float = PROB_CLAMP) -> torch.Tensor:
    """``clamp(softmax(logits), clamp, 1 - clamp)`` (not renormalized, keeps the gradient)."""
    return F.softmax(logits, dim=-1).clamp(clamp, 1.0 - clamp)


def elr_update_targets(targets: torch.Tensor, probs: torch.Tensor, beta: float) -> torch.Tensor:
    """``beta t + (1 - beta) p / sum(p)`` per row, with ``p`` detached."""
    probs = probs.detach()
    return beta * targets + (1.0 - beta) * probs / probs.sum(dim=-1, keepdim=True)


def elr_regularizer(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``(1/B) sum_i log(1 - <p_i, t_i>)`` (negative; minimizing it raises ``<p_i, t_i>``)."""
    return torch.log(1.0 - (probs * targets.detach()).sum(dim=-1)).mean()


class ELR(Callback):
    """Early-learning regularization.

    Args:
        num_samples: dataset size (one target row per dataset index).
        num_classes: width of the targets; ``None`` takes it from the first logits seen.
        beta: momentum of the target average (paper, CIFAR-10: 0.7).
        weight: ``lambda`` (paper, CIFAR-10: 3).
        indices_from_batch / logits_from_outputs: how to read dataset indices off ``ctx.batch``
            and logits off ``ctx.outputs``.
    """

    def __init__(
        self,
        num_samples: int,
        num_classes: int | None = None,
        beta: float = 0.7,
        weight: float = 3.0,
        indices_from_batch: Callable[[Any], torch.Tensor] = default_indices,
        logits_from_outputs: Callable[[Any], torch.Tensor] = default_logits,
    ):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        self.num_samples = int(num_samples)
        self.num_classes = num_classes
        self.beta = float(beta)
        self.weight = float(weight)
        self.indices_from_batch = indices_from_batch
        self.logits_from_outputs = logits_from_outputs
        self.targets: torch.Tensor | None = None  # (num_samples, C), zeros until a sample is seen

    def loss_terms(self, ctx: TrainContext) -> dict[str, torch.Tensor]:
        logits = self.logits_from_outputs(ctx.outputs)
        if self.targets is None:
            self.targets = torch.zeros(
                self.num_samples, self.num_classes or logits.shape[-1], device=logits.device
            )
            self.num_classes = self.targets.shape[-1]
        index = self.indices_from_batch(ctx.batch).to(self.targets.device).long()
        probs = clamped_probabilities(logits.float())
        targets = elr_update_targets(self.targets[index].to(probs.device), probs, self.beta)
        self.targets[index] = targets.to(self.targets.device)
        return {"elr": self.weight * elr_regularizer(probs, targets)}

    def state_dict(self) -> dict:
        return {"targets": self.targets}

    def load_state_dict(self, state: dict) -> None:
        targets = state["targets"]
        self.targets = None if targets is None else targets.clone()
        if self.targets is not None:
            self.num_classes = self.targets.shape[-1]
