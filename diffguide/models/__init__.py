"""The embedded default model: digits data, ``DigitsPipeline``, its weights and the judge."""

from __future__ import annotations

from pathlib import Path

import torch

from .data import load_digits
from .judge import DigitJudge, load_judge_from
from .pipeline import DigitsPipeline

DEFAULT_MODEL_DIR = Path(__file__).parent / "default"
JUDGE_DIR = Path(__file__).parent / "judge"


def load_default_pipeline(device: str | torch.device = "cpu") -> DigitsPipeline:
    """The embedded digits model, loaded offline from the installed package."""
    if not (DEFAULT_MODEL_DIR / "model_index.json").exists():
        raise FileNotFoundError(
            f"the default model is missing from {DEFAULT_MODEL_DIR}; "
            "reinstall diffguide or train it with `diffguide train default`"
        )
    from diffusers.utils import logging as diffusers_logging

    # two small local files: diffusers' "Loading pipeline components" bar is only noise here
    bar_was_on = diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()
    try:
        pipe = DigitsPipeline.from_pretrained(DEFAULT_MODEL_DIR)
    finally:
        if bar_was_on:
            diffusers_logging.enable_progress_bar()
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_judge(device: str | torch.device = "cpu") -> DigitJudge:
    """The judge CNN shipped with the default model: images (B, 1, 28, 28) in [0, 1] -> logits."""
    return load_judge_from(JUDGE_DIR).to(device)


__all__ = ["DigitJudge", "DigitsPipeline", "load_default_pipeline", "load_digits", "load_judge"]
