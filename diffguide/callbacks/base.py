"""One protocol for training-time methods, and the adapters that drive it.

A :class:`Callback` may touch a training run at these points (all optional):

- ``setup(model, optimizer)``: module surgery or wrappers, once, before training;
- ``on_train_begin / on_epoch_begin / on_step_begin / on_epoch_end / on_train_end(ctx)``;
  ``on_step_begin`` fires for every micro-batch (before its forward pass);
- ``loss_terms(ctx) -> {name: tensor}``: extra terms, weighted by the runner and added to
  the task loss (each is logged under its name);
- ``before_optimizer_step(ctx)`` with the accumulated, unscaled gradients in ``.grad``, and
  ``after_optimizer_step(ctx)``;
- ``state_dict()`` / ``load_state_dict()`` so that a resumed run continues exactly.

:class:`TrainContext` carries what a callback may read: step (optimizer steps taken), epoch,
model, optimizer, the batch, the model's outputs, the task loss and, for diffusion training,
noise, timesteps and the noise scheduler.

Adapters:

- :class:`CallbackRunner` for plain PyTorch and accelerate loops. The optimizer-step hooks
  fire once per optimizer step: with ``accelerator.accumulate`` only when
  ``accelerator.sync_gradients``. With an accelerator the runner registers itself for
  checkpointing, so ``accelerator.save_state`` / ``load_state`` carry the callbacks' state,
  and under fp16 it unscales the gradients before ``before_optimizer_step``.
- :func:`trainer_callback` for the Hugging Face ``Trainer``, with :class:`CallbackTrainerMixin`
  adding the loss terms in ``compute_loss`` (training batches only). The callbacks' state is
  written into every ``checkpoint-N`` folder and read back on ``resume_from_checkpoint``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class TrainContext:
    """What callbacks see. ``step`` counts optimizer steps taken so far; ``total_steps`` is
    the planned number (schedules need it)."""

    model: torch.nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    step: int = 0
    epoch: int = 0
    total_steps: int | None = None
    batch: Any = None
    outputs: Any = None
    loss: torch.Tensor | None = None
    noise: torch.Tensor | None = None
    timesteps: torch.Tensor | None = None
    noise_scheduler: Any = None
    #: the last step's loss terms and total, as floats (for logging)
    logs: dict[str, float] = field(default_factory=dict)
    #: anything else a loop wants to hand to its callbacks
    extras: dict[str, Any] = field(default_factory=dict)


class Callback:
    """Base class: every hook is a no-op. Subclasses override what they need."""

    def setup(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        """Once, before training: wrap modules, register hooks, wrap the optimizer."""

    def on_train_begin(self, ctx: TrainContext) -> None: ...
    def on_epoch_begin(self, ctx: TrainContext) -> None: ...
    def on_step_begin(self, ctx: TrainContext) -> None: ...
    def on_epoch_end(self, ctx: TrainContext) -> None: ...
    def on_train_end(self, ctx: TrainContext) -> None: ...

    def loss_terms(self, ctx: TrainContext) -> dict[str, torch.Tensor]:
        """Named loss terms for this micro-batch (already weighted by the callback's own
        coefficient; the runner may scale them further with ``weights``)."""
        return {}

    def before_optimizer_step(self, ctx: TrainContext) -> None:
        """Gradients are accumulated and unscaled; the optimizer has not stepped."""

    def after_optimizer_step(self, ctx: TrainContext) -> None: ...

    def state_dict(self) -> dict:
        """What a resumed run needs to continue exactly (tensors, numbers, lists, dicts)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state but was given {sorted(state)}")


class CallbackRunner:
    """Drive callbacks from a plain PyTorch or an accelerate loop::

        runner = CallbackRunner([OrthoGrad()], model, optimizer, total_steps=1000)
        runner.train_begin()
        for epoch in range(epochs):
            runner.epoch_begin(epoch)
            for batch in loader:
                ctx = runner.step_begin(batch)
                ctx.outputs = model(batch["x"])
                loss = runner.total_loss(task_loss(ctx.outputs, batch["y"]))
                loss.backward()                # or accelerator.backward(loss)
                runner.optimizer_step()        # hooks, optimizer.step(), zero_grad()
            runner.epoch_end()
        runner.train_end()

    ``weights`` scales named loss terms (default 1). ``optimizer_step`` returns whether the
    optimizer really stepped (False on accelerate's accumulation micro-steps).
    """

    def __init__(
        self,
        callbacks: Sequence[Callback],
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None,
        total_steps: int | None = None,
        accelerator: Any = None,
        weights: dict[str, float] | None = None,
    ):
        self.callbacks = list(callbacks)
        self.accelerator = accelerator
        self.weights = dict(weights or {})
        self.ctx = TrainContext(model=model, optimizer=optimizer, total_steps=total_steps)
        for callback in self.callbacks:
            callback.setup(model, optimizer)
        if accelerator is not None:
            accelerator.register_for_checkpointing(self)

    def _each(self, hook: str) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self.ctx)

    def train_begin(self) -> None:
        """Before the first step (also after a resume)."""
        self._each("on_train_begin")

    def epoch_begin(self, epoch: int | None = None) -> None:
        """A new epoch; ``epoch`` sets ``ctx.epoch`` (else it is kept)."""
        if epoch is not None:
            self.ctx.epoch = epoch
        self._each("on_epoch_begin")

    def step_begin(self, batch: Any = None, **fields) -> TrainContext:
        """A new micro-batch: sets ``ctx.batch`` (and any ``TrainContext`` field given)."""
        self.ctx.batch, self.ctx.outputs, self.ctx.loss = batch, None, None
        for name, value in fields.items():
            setattr(self.ctx, name, value)
        self._each("on_step_begin")
        return self.ctx

    def total_loss(self, task_loss: torch.Tensor, term_scale: float = 1.0) -> torch.Tensor:
        """``task_loss`` plus every callback's weighted terms; logs each in ``ctx.logs``.

        ``term_scale`` multiplies every term: the Trainer adapter passes
        ``1 / accumulation steps`` when ``task_loss`` is already normalised over the whole
        accumulated batch (the terms are per micro-batch means)."""
        self.ctx.loss = task_loss
        total, logs = task_loss, {"loss": float(task_loss.detach())}
        for callback in self.callbacks:
            for name, term in callback.loss_terms(self.ctx).items():
                term = term * (self.weights.get(name, 1.0) * term_scale)
                logs[name] = float(term.detach())
                total = total + term
        logs["total_loss"] = float(total.detach())
        self.ctx.logs = logs
        return total

    def optimizer_step(self, zero_grad: bool = True) -> bool:
        """Callbacks' ``before_optimizer_step``, ``optimizer.step()``, then
        ``after_optimizer_step`` and the step count; only when gradients are synchronised."""
        syncing = self.accelerator is None or self.accelerator.sync_gradients
        if syncing:
            self._unscale_gradients()
            self._each("before_optimizer_step")
        self.ctx.optimizer.step()
        if zero_grad:
            self.ctx.optimizer.zero_grad(set_to_none=True)
        if syncing:
            self._each("after_optimizer_step")
            self.ctx.step += 1
        return syncing

    def _unscale_gradients(self) -> None:
        # accelerate's fp16 GradScaler would unscale inside optimizer.step(), after the
        # callbacks have read .grad; a no-op without a scaler
        if self.accelerator is None or getattr(self.accelerator, "scaler", None) is None:
            return
        try:
            self.accelerator.unscale_gradients(self.ctx.optimizer)
        except RuntimeError as error:  # the loop already unscaled them (clip_grad_norm_)
            if "already been called" not in str(error):
                raise

    def epoch_end(self) -> None:
        """After the epoch's last step."""
        self._each("on_epoch_end")

    def train_end(self) -> None:
        """After training: callbacks undo their surgery and remove their hooks."""
        self._each("on_train_end")

    def state_dict(self) -> dict:
        """The step and epoch counters and every callback's state, in order."""
        return {
            "step": self.ctx.step,
            "epoch": self.ctx.epoch,
            "callbacks": [callback.state_dict() for callback in self.callbacks],
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; the callbacks must be the same, in the same order."""
        if len(state["callbacks"]) != len(self.callbacks):
            raise ValueError(
                f"the checkpoint holds {len(state['callbacks'])} callbacks' state, this runner has {len(self.callbacks)}"
            )
        self.ctx.step, self.ctx.epoch = int(state["step"]), int(state["epoch"])
        for callback, callback_state in zip(self.callbacks, state["callbacks"], strict=True):
            callback.load_state_dict(callback_state)


#: the file the Trainer adapter writes into every ``checkpoint-N`` folder
TRAINER_STATE_FILE = "diffguide_callbacks.pt"


def trainer_callback(callbacks: Sequence[Callback], total_steps: int | None = None) -> Any:
    """A ``transformers.TrainerCallback`` that drives ``callbacks`` inside ``Trainer``.

    Use it with :class:`CallbackTrainerMixin` so ``loss_terms`` reach the loss::

        class MyTrainer(CallbackTrainerMixin, Trainer): ...
        adapter = trainer_callback([OrthoGrad()])
        trainer = MyTrainer(model=model, args=args, train_dataset=data, callbacks=[adapter])

    The callbacks' state is saved as :data:`TRAINER_STATE_FILE` in each checkpoint folder and
    restored when training resumes from one (a checkpoint without it is an error, not a silent
    fresh start). Callbacks that read ``batch["index"]`` need ``remove_unused_columns=False``.
    """
    from transformers import TrainerCallback

    class DiffguideCallbacks(TrainerCallback):
        def __init__(self):
            self.runner: CallbackRunner | None = None
            self.callbacks = list(callbacks)
            #: set by CallbackTrainerMixin.train: the checkpoint folder being resumed, and
            #: whether compute_loss fires on_step_begin per micro-batch
            self.resume_from: str | None = None
            self.mixin_drives_steps = False

        def _ensure(self, model, optimizer, state) -> CallbackRunner:
            if self.runner is None:
                self.runner = CallbackRunner(self.callbacks, model, optimizer, total_steps or state.max_steps)
            self.runner.ctx.model, self.runner.ctx.optimizer = model, optimizer
            self.runner.ctx.step = state.global_step
            self.runner.ctx.epoch = int(state.epoch or 0)
            return self.runner

        def _restore(self, args, state, runner: CallbackRunner) -> None:
            folder = self.resume_from or os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            path = os.path.join(folder, TRAINER_STATE_FILE)
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"resuming at step {state.global_step}, but {path} does not exist, so the callbacks' "
                    "state would be lost; resume from a checkpoint saved with diffguide's trainer_callback, "
                    "or start training afresh"
                )
            runner.load_state_dict(torch.load(path, weights_only=True))

        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            runner = self._ensure(model, optimizer, state)
            if state.global_step > 0:
                self._restore(args, state, runner)
            runner.train_begin()

        def on_epoch_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            self._ensure(model, optimizer, state).epoch_begin()

        def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            runner = self._ensure(model, optimizer, state)
            if not self.mixin_drives_steps:  # without the mixin: once per optimizer step
                runner._each("on_step_begin")

        def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
            self._ensure(model, optimizer, state)._each("before_optimizer_step")

        def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
            runner = self._ensure(model, optimizer, state)
            runner._each("after_optimizer_step")

        def on_epoch_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            self._ensure(model, optimizer, state).epoch_end()

        def on_train_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            self._ensure(model, optimizer, state).train_end()

        def on_save(self, args, state, control, **kwargs):
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if self.runner is not None and state.is_world_process_zero and os.path.isdir(folder):
                torch.save(self.runner.state_dict(), os.path.join(folder, TRAINER_STATE_FILE))

    return DiffguideCallbacks()


class CallbackTrainerMixin:
    """Mix into ``transformers.Trainer`` (before it) so the callbacks' ``loss_terms`` are added
    to the training loss; the adapter made by :func:`trainer_callback` must be in ``callbacks``.

    Evaluation batches go through ``compute_loss`` too; they get no terms and touch no state.
    When ``Trainer`` leaves the loss un-divided by the accumulation steps (a model that takes
    ``num_items_in_batch`` normalises over the whole accumulated batch), the per-micro-batch
    terms are divided by them here, so the result equals the plain runner's."""

    def _diffguide_adapter(self):
        for callback in self.callback_handler.callbacks:
            if hasattr(callback, "runner") and hasattr(callback, "callbacks"):
                return callback
        raise ValueError("add diffguide.callbacks.trainer_callback([...]) to the Trainer's callbacks")

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """``Trainer.train``, telling the adapter which checkpoint folder it resumes from."""
        adapter = self._diffguide_adapter()
        folder = resume_from_checkpoint
        if folder is True:
            from transformers.trainer_utils import get_last_checkpoint

            folder = get_last_checkpoint(self.args.output_dir)
        adapter.resume_from = folder if isinstance(folder, str) else None
        adapter.mixin_drives_steps = True
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _loss_is_scaled_for_accumulation(self, num_items_in_batch: Any) -> bool:
        # mirrors Trainer.training_step's rule for when it divides the loss itself
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is not None:
            return bool(scaled)
        accepts = getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None
        return bool(accepts or getattr(self, "compute_loss_func", None) is not None)

    def compute_loss(self, model: torch.nn.Module, inputs: Any, return_outputs: bool = False, **kwargs: Any):
        """``Trainer.compute_loss`` plus the callbacks' terms on training batches."""
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        adapter = self._diffguide_adapter()
        runner = adapter._ensure(model, self.optimizer, self.state)
        runner.step_begin(inputs)
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, **kwargs)
        runner.ctx.outputs = outputs
        term_scale = 1.0
        if self._loss_is_scaled_for_accumulation(kwargs.get("num_items_in_batch")):
            term_scale = 1.0 / getattr(self, "current_gradient_accumulation_steps", 1)
        loss = runner.total_loss(loss, term_scale=term_scale)
        return (loss, outputs) if return_outputs else loss
