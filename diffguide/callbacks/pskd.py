"""PS-KD: progressive self-knowledge distillation (Kim, Ji, Yoon & Hwang, "Self-Knowledge
Distillation with Progressive Refinement of Targets", ICCV 2021, arXiv 2006.12000).

The model is its own teacher: at epoch ``t`` (1-based, of ``T``) sample ``i`` is trained on the
soft target

    y~_i^t = (1 - alpha_t) y_i + alpha_t p_i^{t-1},      alpha_t = alpha_T * t / T

where ``y_i`` is the one-hot label and ``p_i^{t-1}`` the model's own softmax prediction for
sample ``i`` recorded while training on it in epoch ``t - 1``. The loss is the soft-target
cross-entropy ``-(1/B) sum_i sum_c y~_ic log softmax(z_i)_c``, which replaces the hard-label
cross-entropy. In the first epoch there are no past predictions and the targets are the hard
labels (the authors' code stores one-hot rows as epoch 0's "predictions", which is the same).

Predictions are recorded per dataset index, so the batch must carry the indices of its samples
(``indices_from_batch``; default ``batch["index"]`` for a mapping, ``batch[2]`` for a tuple such
as ``(x, y, index)``). Each training step writes its detached softmax into the current epoch's
buffer; ``on_epoch_end`` makes it the previous epoch's. A sample not seen in the last epoch
(e.g. dropped by ``drop_last``) falls back to its hard label. The buffers are per process: under
data-parallel training each rank only records its own shard, so a sample that a distributed
sampler sends to another rank next epoch gets its hard label (gathering the predictions across
ranks is not implemented).

Because PS-KD *replaces* the task loss, :class:`PSKD` has two modes:

- ``replaces_task_loss=True`` (default): the term ``"pskd"`` is the whole PS-KD loss; pass a zero
  task loss (``runner.total_loss(torch.zeros(()))``), or skip the runner's sum and call
  :func:`pskd_loss` yourself. A non-zero task loss triggers a warning (it would be counted twice).
- ``replaces_task_loss=False``: for loops whose task loss is *exactly* the mean hard-label
  ``F.cross_entropy(logits, y)`` and cannot be removed (e.g. the Hugging Face ``Trainer``, whose
  model returns its own loss). The term is ``pskd_loss - CE(logits, y)``, so task + term is
  the PS-KD loss. Soft-target CE is linear in the target, hence the term equals
  ``(1/B) sum_i alpha_t [CE(z_i, p_i^{t-1}) - CE(z_i, y_i)]`` over samples with a past prediction.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from .base import Callback, TrainContext


def default_indices(batch: Any) -> torch.Tensor:
    """``batch["index"]`` for a mapping, ``batch[2]`` for a tuple/list ``(x, y, index)``."""
    if isinstance(batch, Mapping):
        return batch["index"]
    return batch[2]


def default_labels(batch: Any) -> torch.Tensor:
    """``batch["label"]`` (or ``"labels"``) for a mapping, ``batch[1]`` for a tuple/list."""
    if isinstance(batch, Mapping):
        return batch["label"] if "label" in batch else batch["labels"]
    return batch[1]


def default_logits(outputs: Any) -> torch.Tensor:
    """``outputs`` itself when it is a tensor, else ``outputs.logits`` / ``outputs["logits"]``."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, dict):
        return outputs["logits"]
    return outputs.logits


def pskd_alpha(epoch: int, total_epochs: int, alpha_T: float = 0.8) -> float:
    """``alpha_t = alpha_T * t / T`` for the 1-based epoch ``t`` of ``T``."""
    if total_epochs <= 0:
        raise ValueError(f"total_epochs must be positive, got {total_epochs}")
    if epoch < 1:
        raise ValueError(f"epoch is 1-based, got {epoch}")
    return alpha_T * epoch / total_epochs


def pskd_targets(
    labels: torch.Tensor,
    past_predictions: torch.Tensor,
    alpha: float,
    has_past: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(1 - alpha) onehot(y) + alpha p_past`` per row; rows with ``has_past`` False keep the
    one-hot label (no past prediction yet)."""
    onehot = F.one_hot(labels.long(), past_predictions.shape[-1]).to(past_predictions.dtype)
    soft = (1.0 - alpha) * onehot + alpha * past_predictions
    if has_past is None:
        return soft
    return torch.where(has_past[:, None], soft, onehot)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``-(1/B) sum_i sum_c targets_ic log softmax(logits_i)_c``."""
    return -(targets * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


def pskd_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    past_predictions: torch.Tensor,
    alpha: float,
    has_past: torch.Tensor | None = None,
) -> torch.Tensor:
    """The PS-KD loss for one batch: soft-target cross-entropy against :func:`pskd_targets`.
    ``past_predictions`` are the rows of the previous epoch's softmax for this batch."""
    targets = pskd_targets(labels, past_predictions.to(logits.dtype), alpha, has_past)
    return soft_cross_entropy(logits, targets.detach())


class PSKD(Callback):
    """Progressive self-knowledge distillation.

    Args:
        num_samples: dataset size (the buffers hold one row per dataset index).
        total_epochs: ``T`` in ``alpha_t = alpha_T * t / T``.
        alpha_T: final weight of the past prediction (paper: 0.8).
        num_classes: width of the buffers; ``None`` takes it from the first logits seen.
        replaces_task_loss: see the module docstring.
        indices_from_batch / labels_from_batch / logits_from_outputs: how to read dataset indices
            and integer labels off ``ctx.batch`` and logits off ``ctx.outputs``.

    The epoch ``t`` is this callback's own count of ``on_epoch_end`` calls plus one (carried in
    ``state_dict``), so the loop must call ``runner.epoch_end()`` once per pass over the data.
    """

    def __init__(
        self,
        num_samples: int,
        total_epochs: int,
        alpha_T: float = 0.8,
        num_classes: int | None = None,
        replaces_task_loss: bool = True,
        indices_from_batch: Callable[[Any], torch.Tensor] = default_indices,
        labels_from_batch: Callable[[Any], torch.Tensor] = default_labels,
        logits_from_outputs: Callable[[Any], torch.Tensor] = default_logits,
    ):
        if not 0.0 <= alpha_T <= 1.0:
            raise ValueError(f"alpha_T must be in [0, 1], got {alpha_T}")
        pskd_alpha(1, total_epochs, alpha_T)  # validates total_epochs
        self.num_samples = int(num_samples)
        self.total_epochs = int(total_epochs)
        self.alpha_T = float(alpha_T)
        self.num_classes = num_classes
        self.replaces_task_loss = replaces_task_loss
        self.indices_from_batch = indices_from_batch
        self.labels_from_batch = labels_from_batch
        self.logits_from_outputs = logits_from_outputs
        self.epoch = 0  # completed epochs
        self.past: torch.Tensor | None = None  # (num_samples, C) softmax from the previous epoch
        self.has_past: torch.Tensor | None = None  # (num_samples,) bool
        self.current: torch.Tensor | None = None  # being filled this epoch
        self.has_current: torch.Tensor | None = None
        self._checked_task_loss = False

    @property
    def alpha(self) -> float:
        """``alpha_t`` of the epoch in progress (held at ``alpha_T`` past epoch ``T``)."""
        return pskd_alpha(min(self.epoch + 1, self.total_epochs), self.total_epochs, self.alpha_T)

    def _allocate(self, num_classes: int, device: torch.device) -> None:
        self.num_classes = num_classes
        self.past = torch.zeros(self.num_samples, num_classes, device=device)
        self.current = torch.zeros_like(self.past)
        self.has_past = torch.zeros(self.num_samples, dtype=torch.bool, device=device)
        self.has_current = torch.zeros_like(self.has_past)

    def loss_terms(self, ctx: TrainContext) -> dict[str, torch.Tensor]:
        logits = self.logits_from_outputs(ctx.outputs)
        labels = self.labels_from_batch(ctx.batch).to(logits.device)
        if self.past is None:
            self._allocate(self.num_classes or logits.shape[-1], logits.device)
        index = self.indices_from_batch(ctx.batch).to(self.past.device).long()
        alpha = self.alpha
        past = self.past[index].to(logits.device)
        has_past = self.has_past[index].to(logits.device)
        loss = pskd_loss(logits, labels, past, alpha, has_past)
        # recorded after reading, so a sample seen twice in one epoch still uses last epoch's row
        self.current[index] = F.softmax(logits.detach().float(), dim=-1).to(self.current.device)
        self.has_current[index] = True
        if not self.replaces_task_loss:
            return {"pskd": loss - F.cross_entropy(logits, labels.long())}
        if not self._checked_task_loss and ctx.loss is not None:
            # checked once: float() syncs the device
            self._checked_task_loss = True
            if float(ctx.loss.detach()) != 0.0:
                warnings.warn(
                    "PSKD replaces the task loss but the task loss is non-zero: pass a zero task loss, "
                    "or use PSKD(replaces_task_loss=False) when the task loss is the hard-label CE",
                    stacklevel=2,
                )
        return {"pskd": loss}

    def on_epoch_end(self, ctx: TrainContext) -> None:
        if self.current is not None:
            # this epoch's predictions become the teacher; the old buffer is reused for the next
            self.past, self.current = self.current, self.past
            self.has_past, self.has_current = self.has_current, self.has_past
            self.current.zero_()
            self.has_current.zero_()
        self.epoch += 1

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "past": self.past,
            "has_past": self.has_past,
            "current": self.current,
            "has_current": self.has_current,
        }

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        for name in ("past", "has_past", "current", "has_current"):
            value = state[name]
            setattr(self, name, None if value is None else value.clone())
        if self.past is not None:
            self.num_classes = self.past.shape[-1]
