"""One protocol for training-time methods, and the adapters that drive it.

A :class:`Callback` may touch a training run at these points (all optional):

- ``setup(model, optimizer)``: module surgery or wrappers, once, before training;
- ``on_train_begin / on_epoch_begin / on_step_begin / on_epoch_end / on_train_end(ctx)``;
- ``loss_terms(ctx) -> {name: tensor}``: extra terms, weighted by the runner and added to
  the task loss (each is logged under its name);
- ``before_optimizer_step(ctx)`` with the accumulated, unscaled gradients in ``.grad``, and
  ``after_optimizer_step(ctx)``;
- ``state_dict()`` / ``load_state_dict()`` so that a resumed run continues exactly.

:class:`TrainContext` carries what a callback may read: step (optimizer steps taken), epoch,
model, optimizer, the batch, the model's outputs, the task loss and, for diffusion training,
noise, timesteps and the noise scheduler.

Adapters:

- :class:`CallbackRunner` for plain PyTorch and accelerate loops. Step hooks fire once per
  optimizer step: with ``accelerator.accumulate`` only when ``accelerator.sync_gradients``.
  With an accelerator the runner registers itself for checkpointing, so
  ``accelerator.save_state`` / ``load_state`` carry the callbacks' state.
- :func:`trainer_callback` for the Hugging Face ``Trainer``, with :class:`CallbackTrainerMixin`
  adding the loss terms in ``compute_loss``.
"""

from __future__ import annotations

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
        return {}

    def load_state_dict(self, state: dict) -> None:
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
        accelerator=None,
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
        self._each("on_train_begin")

    def epoch_begin(self, epoch: int | None = None) -> None:
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

    def total_loss(self, task_loss: torch.Tensor) -> torch.Tensor:
        """``task_loss`` plus every callback's weighted terms; logs each in ``ctx.logs``."""
        self.ctx.loss = task_loss
        total, logs = task_loss, {"loss": float(task_loss.detach())}
        for callback in self.callbacks:
            for name, term in callback.loss_terms(self.ctx).items():
                term = term * self.weights.get(name, 1.0)
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
            self._each("before_optimizer_step")
        self.ctx.optimizer.step()
        if zero_grad:
            self.ctx.optimizer.zero_grad(set_to_none=True)
        if syncing:
            self._each("after_optimizer_step")
            self.ctx.step += 1
        return syncing

    def epoch_end(self) -> None:
        self._each("on_epoch_end")

    def train_end(self) -> None:
        self._each("on_train_end")

    def state_dict(self) -> dict:
        return {
            "step": self.ctx.step,
            "epoch": self.ctx.epoch,
            "callbacks": [callback.state_dict() for callback in self.callbacks],
        }

    def load_state_dict(self, state: dict) -> None:
        if len(state["callbacks"]) != len(self.callbacks):
            raise ValueError(
                f"the checkpoint holds {len(state['callbacks'])} callbacks' state, this runner has {len(self.callbacks)}"
            )
        self.ctx.step, self.ctx.epoch = int(state["step"]), int(state["epoch"])
        for callback, callback_state in zip(self.callbacks, state["callbacks"], strict=True):
            callback.load_state_dict(callback_state)


def trainer_callback(callbacks: Sequence[Callback], total_steps: int | None = None):
    """A ``transformers.TrainerCallback`` that drives ``callbacks`` inside ``Trainer``.

    Use it with :class:`CallbackTrainerMixin` so ``loss_terms`` reach the loss::

        class MyTrainer(CallbackTrainerMixin, Trainer): ...
        adapter = trainer_callback([OrthoGrad()])
        trainer = MyTrainer(model=model, args=args, train_dataset=data, callbacks=[adapter])
    """
    from transformers import TrainerCallback

    class DiffguideCallbacks(TrainerCallback):
        def __init__(self):
            self.runner: CallbackRunner | None = None
            self.callbacks = list(callbacks)

        def _ensure(self, model, optimizer, state) -> CallbackRunner:
            if self.runner is None:
                self.runner = CallbackRunner(self.callbacks, model, optimizer, total_steps or state.max_steps)
            self.runner.ctx.model, self.runner.ctx.optimizer = model, optimizer
            self.runner.ctx.step = state.global_step
            self.runner.ctx.epoch = int(state.epoch or 0)
            return self.runner

        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            self._ensure(model, optimizer, state).train_begin()

        def on_epoch_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            self._ensure(model, optimizer, state).epoch_begin()

        def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            self._ensure(model, optimizer, state)._each("on_step_begin")

        def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
            self._ensure(model, optimizer, state)._each("before_optimizer_step")

        def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
            runner = self._ensure(model, optimizer, state)
            runner._each("after_optimizer_step")

        def on_epoch_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            self._ensure(model, optimizer, state).epoch_end()

        def on_train_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            self._ensure(model, optimizer, state).train_end()

    return DiffguideCallbacks()


class CallbackTrainerMixin:
    """Mix into ``transformers.Trainer`` (before it) so the callbacks' ``loss_terms`` are added
    to the loss; the adapter made by :func:`trainer_callback` must be in ``callbacks``."""

    def _diffguide_adapter(self):
        for callback in self.callback_handler.callbacks:
            if hasattr(callback, "runner") and hasattr(callback, "callbacks"):
                return callback
        raise ValueError("add diffguide.callbacks.trainer_callback([...]) to the Trainer's callbacks")

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, **kwargs)
        adapter = self._diffguide_adapter()
        runner = adapter._ensure(model, self.optimizer, self.state)
        runner.ctx.batch, runner.ctx.outputs = inputs, outputs
        loss = runner.total_loss(loss)
        return (loss, outputs) if return_outputs else loss
