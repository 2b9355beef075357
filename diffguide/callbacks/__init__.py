"""Training callbacks: the seed papers' training-time methods behind one protocol
(:mod:`diffguide.callbacks.base`). See docs/callbacks.md."""

from .base import Callback, CallbackRunner, CallbackTrainerMixin, TrainContext, trainer_callback

__all__ = ["Callback", "CallbackRunner", "CallbackTrainerMixin", "TrainContext", "trainer_callback"]
