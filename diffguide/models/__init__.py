"""The embedded models: the digits model (the default) and the Fashion-MNIST flow transformer,
their data, pipelines, weights and judges."""

from __future__ import annotations

from pathlib import Path

import torch

from .data import load_digits, load_fashion
from .judge import DigitJudge, load_judge_from
from .pipeline import ClassConditionalTransformerPipeline, DigitsPipeline

DEFAULT_MODEL_DIR = Path(__file__).parent / "default"
FASHION_MODEL_DIR = Path(__file__).parent / "fashion"
#: embedded model name -> its folder in the package
EMBEDDED = {"digits": DEFAULT_MODEL_DIR, "default": DEFAULT_MODEL_DIR, "fashion": FASHION_MODEL_DIR}
#: diffguide's own pipeline classes, by the name model_index.json gives them
PIPELINE_CLASSES = {cls.__name__: cls for cls in (DigitsPipeline, ClassConditionalTransformerPipeline)}
JUDGE_DIR = Path(__file__).parent / "judge"
FASHION_JUDGE_DIR = Path(__file__).parent / "fashion_judge"
JUDGE_DIRS = {"digits": JUDGE_DIR, "default": JUDGE_DIR, "fashion": FASHION_JUDGE_DIR}


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


def load_pipeline(
    name_or_folder: str | Path = "digits",
    device: str | torch.device = "cpu",
    torch_dtype: torch.dtype | None = None,
):
    """An embedded model by name (a string: ``"digits"``, also ``"default"``; ``"fashion"``) or any
    pipeline folder that ``DiffusionPipeline.from_pretrained`` loads offline (a
    ``save_pretrained`` output), diffguide's own pipeline classes loaded as such, in
    ``torch_dtype`` if given. Raises ``FileNotFoundError`` for a folder that is not a pipeline,
    naming what is missing."""
    embedded = isinstance(name_or_folder, str) and name_or_folder in EMBEDDED  # a Path is always a folder
    if embedded and EMBEDDED[name_or_folder] == DEFAULT_MODEL_DIR:
        pipe = load_default_pipeline(device)
        return pipe if torch_dtype in (None, pipe.dtype) else pipe.to(dtype=torch_dtype)
    import json

    folder = EMBEDDED[name_or_folder] if embedded else Path(name_or_folder)
    if embedded and not (folder / "model_index.json").is_file():
        raise FileNotFoundError(
            f"the embedded {name_or_folder} model is missing from {folder}; train it with "
            f"`diffguide train {name_or_folder}`"
        )
    index = folder / "model_index.json"
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder} is not a folder; name an embedded model (digits) or a pipeline folder"
        )
    if not index.is_file():
        raise FileNotFoundError(
            f"{folder} is not a diffusers pipeline folder: no model_index.json (save one with pipe.save_pretrained)"
        )
    own = PIPELINE_CLASSES.get(json.loads(index.read_text()).get("_class_name"))
    if own is not None:
        pipe = own.from_pretrained(folder, torch_dtype=torch_dtype)
    else:
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True, torch_dtype=torch_dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_judge(name: str = "digits", device: str | torch.device = "cpu") -> DigitJudge:
    """The judge CNN shipped with an embedded model (``"digits"``, ``"fashion"``): images
    (B, 1, 28, 28) in [0, 1] -> logits."""
    if name not in JUDGE_DIRS:
        raise ValueError(f"unknown judge {name!r}; choose from digits, fashion")
    return load_judge_from(JUDGE_DIRS[name]).to(device)


__all__ = [
    "DigitJudge",
    "ClassConditionalTransformerPipeline",
    "DigitsPipeline",
    "load_default_pipeline",
    "load_digits",
    "load_fashion",
    "load_judge",
    "load_pipeline",
]
