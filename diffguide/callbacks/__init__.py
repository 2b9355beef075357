"""Training callbacks: the seed papers' training-time methods behind one protocol
(:mod:`diffguide.callbacks.base`). See docs/callbacks.md."""

from .alignment import RepresentationalAlignment, linear_cka
from .base import (
    TRAINER_STATE_FILE,
    Callback,
    CallbackRunner,
    CallbackTrainerMixin,
    TrainContext,
    trainer_callback,
)
from .drop_path import DropPathWrapper, ScheduledDropPath
from .elr import ELR
from .monge_gap import MongeGap, monge_gap
from .orthograd import (
    OrthoGrad,
    OrthoGradOptimizer,
    StableMaxCrossEntropy,
    stablemax,
    stablemax_cross_entropy,
)
from .pskd import PSKD
from .smooth_diffusion import SmoothVariation
from .sparsity import AttentionSparsityPenalty, L0Projection
from .ssa import SubsampledAttention, SubsampledAttnProcessor

__all__ = [
    "ELR",
    "PSKD",
    "AttentionSparsityPenalty",
    "Callback",
    "CallbackRunner",
    "CallbackTrainerMixin",
    "DropPathWrapper",
    "L0Projection",
    "MongeGap",
    "OrthoGrad",
    "OrthoGradOptimizer",
    "RepresentationalAlignment",
    "ScheduledDropPath",
    "SmoothVariation",
    "StableMaxCrossEntropy",
    "SubsampledAttention",
    "SubsampledAttnProcessor",
    "TRAINER_STATE_FILE",
    "TrainContext",
    "linear_cka",
    "monge_gap",
    "stablemax",
    "stablemax_cross_entropy",
    "trainer_callback",
]
