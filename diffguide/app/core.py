"""What the demo does, without Gradio: models, sampling, comparison, interpolation, classification.

Every function here is plain Python over the package's public API, so the tests call them
directly and the Gradio layer (:mod:`diffguide.app.ui`) only lays them out. Bad input raises
:class:`AppError`, whose message the page shows as it is.

Concurrency: guidance hooks keep per-call state on the pipeline they are attached to, so each
model has one lock and its requests queue on it (one sampling call per model at a time);
requests for different models run side by side.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch

from ..compare import build_rule, is_class_conditional, prompt_call, resolve_preset
from ..guidance import METHODS, GuidanceRule, Param
from ..hooks import guided, stats
from ..images import labelled_grid, to_pil

DEFAULT_MODEL = "default"
#: the second embedded model (the Fashion-MNIST flow transformer), offered when its weights ship
FASHION_MODEL = "fashion"
#: every method of the registry (``diffguide/guidance/registry.py``), in its order
METHOD_NAMES = tuple(METHODS)
#: (method, parameter) of every control the page makes, in the order the handlers take them
PARAM_KEYS = tuple((entry.name, param.name) for entry in METHODS.values() for param in entry.params)
STEPS_RANGE = (1, 200)
SCALE_RANGE = (1.0, 30.0)
SEED_RANGE = (0, 2**31 - 1)
#: the Smooth-LoRA shipped with the default model (``diffguide train smooth-lora``)
SHIPPED_SMOOTH_LORA = "smooth_lora"


class AppError(ValueError):
    """Bad input from the page: the message names the problem and what to do instead."""


@dataclass
class LoadedModel:
    """A pipeline and the lock its requests queue on."""

    name: str
    pipe: object
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: LinearAG rules by (scale, steps): calibration costs ~200 CFG runs, so it runs once
    linear_ag: dict = field(default_factory=dict)

    @property
    def is_class_conditional(self) -> bool:
        """A class-label model (digits UNet, fashion transformer): conditions are class numbers."""
        from ..models.pipeline import ClassConditionalPipeline

        return isinstance(self.pipe, ClassConditionalPipeline)

    @property
    def judge_name(self) -> str:
        """The embedded judge for this model's data (``load_judge``'s name)."""
        return "fashion" if getattr(self.pipe, "guidance_family", None) == "fashion" else "digits"


class ModelRegistry:
    """The models a running app may use: the embedded default plus the folders named when the
    app was started (``diffguide app --model PATH``). Pages pick by name, never by path."""

    def __init__(self, folders: Sequence[str | Path] = ()):
        self.folders: dict[str, Path] = {}
        for folder in folders:
            path = Path(folder)
            name = path.name or str(path)
            if name == DEFAULT_MODEL or name in self.folders:
                name = str(path)
            self.folders[name] = path
        self._loaded: dict[str, LoadedModel] = {}
        self._guard = threading.Lock()  # held only to look up or create the per-name locks
        self._loading: dict[str, threading.Lock] = {}
        self._judges: dict[str, object] = {}

    @property
    def names(self) -> list[str]:
        from ..models import FASHION_MODEL_DIR

        fashion = [FASHION_MODEL] if (FASHION_MODEL_DIR / "model_index.json").is_file() else []
        return [DEFAULT_MODEL, *[n for n in fashion if n not in self.folders], *self.folders]

    def _once(self, key: str, load) -> LoadedModel:
        """``self._loaded[key]``, loading it once; loading one model blocks only its own callers."""
        loaded = self._loaded.get(key)
        if loaded is not None:
            return loaded
        with self._guard:
            lock = self._loading.setdefault(key, threading.Lock())
        with lock:
            if key not in self._loaded:
                self._loaded[key] = LoadedModel(key, load())
            return self._loaded[key]

    def get(self, name: str) -> LoadedModel:
        """The loaded model called ``name`` (loaded on first use); AppError if it cannot load."""
        return self._once(name, lambda: self._load(name))

    def judge(self, name: str = "digits"):
        """The judge network for ``name``'s data (``"digits"``, ``"fashion"``), loaded once."""
        if name not in self._judges:
            from ..models import load_judge

            self._judges[name] = load_judge(name)
        return self._judges[name]

    def get_with_lora(self, lora: str | Path) -> LoadedModel:
        """The default model with the LoRA at ``lora`` loaded (a copy of its own, loaded once)."""

        def load():
            from ..models import load_default_pipeline

            pipe = load_default_pipeline()
            try:
                pipe.load_lora_weights(lora)
            except (FileNotFoundError, ValueError) as err:
                raise AppError(f"the Smooth-LoRA at {lora} failed to load: {err}") from None
            return pipe

        return self._once(f"{DEFAULT_MODEL}+{Path(lora).resolve()}", load)

    def _load(self, name: str):
        if name == DEFAULT_MODEL:
            from ..models import load_default_pipeline

            return load_default_pipeline()
        if name not in self.names:
            raise AppError(f"unknown model {name!r}; this app was started with: {', '.join(self.names)}")
        from ..models import load_pipeline

        # a started folder (a Path), else the embedded fashion model by its name
        source = self.folders.get(name, name)
        what = f"the model folder {source}" if name in self.folders else f"the embedded {name} model"
        try:
            return load_pipeline(source)
        except Exception as err:  # any failure of a model folder is reported, not raised
            raise AppError(f"{what} failed to load: {err}") from None


def check_settings(steps: int, guidance_scale: float, seed: int) -> tuple[int, float, int]:
    """Steps, scale and seed as numbers in range, or an AppError naming the allowed range."""
    try:
        steps, guidance_scale, seed = int(steps), float(guidance_scale), int(seed)
    except (TypeError, ValueError, OverflowError):
        raise AppError(
            f"steps, scale and seed must be finite numbers, got {steps!r}, {guidance_scale!r}, {seed!r}"
        ) from None
    if not STEPS_RANGE[0] <= steps <= STEPS_RANGE[1]:
        raise AppError(f"steps must be between {STEPS_RANGE[0]} and {STEPS_RANGE[1]}, got {steps}")
    if not SCALE_RANGE[0] <= guidance_scale <= SCALE_RANGE[1]:
        raise AppError(
            f"the guidance scale must be between {SCALE_RANGE[0]} and {SCALE_RANGE[1]}, got {guidance_scale}"
        )
    if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise AppError(f"the seed must be between {SEED_RANGE[0]} and {SEED_RANGE[1]}, got {seed}")
    return steps, guidance_scale, seed


def parse_condition(model: LoadedModel, condition: str | int) -> int | str:
    """A class number for class-label models, a prompt for text pipelines."""
    if model.is_class_conditional:
        try:
            label = int(str(condition).strip())
        except ValueError:
            label = -1
        if not 0 <= label < model.pipe.num_classes:
            raise AppError(
                f"the {model.name} model takes a class from 0 to {model.pipe.num_classes - 1}, got {condition!r}"
            )
        return label
    prompt = str(condition).strip()
    if not prompt:
        raise AppError("type a prompt for this model")
    return prompt


def page_preset(name: str, model: LoadedModel) -> str | None:
    """The preset the page starts ``name`` at for ``model``: its family's, if the method has one
    (what :func:`~diffguide.compare.build_rule` picks with ``preset="auto"``)."""
    return resolve_preset(name, model.pipe)


def preset_values(name: str, preset: str | None = None) -> dict[str, Any]:
    """Method ``name``'s settings at ``preset`` (None: the registry defaults) as the page's
    controls hold them: ``inf`` as the parameter's in-range stand-in (``Param.widget_value``), an
    unset path as ``""``."""
    entry = METHODS[name]
    settings = entry.settings(preset)
    return {p.name: control_value(p, settings[p.name]) for p in entry.params}


def page_values(name: str, model: LoadedModel) -> dict[str, Any]:
    """What method ``name``'s controls show for ``model``: the registry's values at the preset of
    the model's family (:func:`page_preset`). Sent back untouched, they build the same rule as
    ``build_rule(name, model.pipe, scale, steps)``."""
    return preset_values(name, page_preset(name, model))


def control_value(param: Param, value: Any) -> Any:
    """A rule's parameter value as the page's control holds it (``inf`` -> ``param.infinite``,
    no path -> ``""``)."""
    value = param.widget_value(value)
    return "" if param.kind == "path" and value is None else value


def split_params(values: Sequence[Any]) -> dict[str, dict[str, Any]]:
    """The page's parameter controls, flat in ``PARAM_KEYS`` order, as method -> param -> value."""
    if len(values) != len(PARAM_KEYS):
        raise AppError(f"expected {len(PARAM_KEYS)} method parameter values, got {len(values)}")
    params: dict[str, dict[str, Any]] = {name: {} for name in METHODS}
    for (name, param), value in zip(PARAM_KEYS, values, strict=True):
        params[name][param] = value
    return params


def make_method(
    name: str, model: LoadedModel, guidance_scale: float, steps: int, params: dict | None = None
) -> GuidanceRule:
    """The rule ``name`` from the registry (:func:`~diffguide.compare.build_rule`, ``preset="auto"``:
    the model family's preset where the method has one), with the page's ``params`` by registry
    name on top. Bad values raise an AppError with the registry's message."""
    if name not in METHODS:
        raise AppError(f"unknown method {name!r}; choose from {', '.join(METHOD_NAMES)}")
    params = dict(params or {})
    try:
        if name == "linear-ag" and params.get("coefficients") in (None, ""):
            return _linear_ag(model, guidance_scale, steps, params)
        return build_rule(name, model.pipe, guidance_scale, steps, preset="auto", **params)
    except (ValueError, OSError) as err:  # OSError: a coefficients file that cannot be read
        message = str(err)
        named = message.startswith(f"{name} ") or f"'{name}'" in message  # the registry's own wording
        raise AppError(message if named else f"{name}: {message}") from None


def _linear_ag(model: LoadedModel, guidance_scale: float, steps: int, params: dict) -> GuidanceRule:
    """LinearAG without a coefficients file: the shipped coefficients on the default model, else
    calibrated once per (model, scale, steps) under the model's lock, since calibration samples
    with the pipeline. A text model is refused: it needs a file calibrated on it."""
    if not is_class_conditional(model.pipe):
        try:
            return build_rule("linear-ag", model.pipe, guidance_scale, steps, preset="auto", **params)
        except ValueError as err:
            raise AppError(f"{err}. In this page, type FILE into LinearAG's coefficients box") from None
    key = (float(guidance_scale), int(steps))
    with model.lock:
        if key not in model.linear_ag:
            model.linear_ag[key] = build_rule(
                "linear-ag", model.pipe, guidance_scale, steps, preset="auto", **params
            )
        return model.linear_ag[key]


@dataclass
class Sample:
    """One generated image with its cost."""

    method: str
    image: PIL.Image.Image
    nfe: float
    seconds: float

    @property
    def caption(self) -> str:
        return f"{self.method} · {self.nfe:g} NFE · {self.seconds:.2f} s"


def _sample(
    model: LoadedModel, condition, rule: GuidanceRule, name: str, scale: float, steps: int, seed: int
) -> Sample:
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    with model.lock, torch.no_grad(), guided(model.pipe, rule):
        if model.is_class_conditional:
            output = model.pipe(
                class_labels=[condition], guidance_scale=scale, num_inference_steps=steps, generator=generator
            )
        else:  # the scale where this pipeline's CFG reads it (Flux, Qwen-Image: true_cfg_scale)
            call = prompt_call(model.pipe, [condition], None, seed, scale, steps)
            output = model.pipe(**{**call, "output_type": "pil"})
        nfe = stats(model.pipe)["nfe"]
    seconds = time.perf_counter() - started
    image = output.images[0]
    if model.is_class_conditional:  # 28 x 28 is too small to see in a page
        image = image.resize((image.width * 8, image.height * 8), PIL.Image.NEAREST)
    return Sample(name, image, nfe, seconds)


def generate(
    registry: ModelRegistry,
    model_name: str,
    condition: str | int,
    method: str,
    guidance_scale: float,
    steps: int,
    seed: int,
    params: dict | None = None,
) -> Sample:
    """One image from ``model_name`` under ``method``."""
    steps, guidance_scale, seed = check_settings(steps, guidance_scale, seed)
    model = registry.get(model_name)
    condition = parse_condition(model, condition)
    rule = make_method(method, model, guidance_scale, steps, params)
    return _sample(model, condition, rule, method, guidance_scale, steps, seed)


def compare(
    registry: ModelRegistry,
    model_name: str,
    condition: str | int,
    methods: Sequence[str],
    guidance_scale: float,
    steps: int,
    seed: int,
    params: dict[str, dict] | None = None,
) -> list[Sample]:
    """Every method in ``methods`` on the same seed, in order; ``params`` maps a method to its
    parameters (as :func:`make_method` takes them)."""
    if not methods:
        raise AppError("pick at least one method to compare")
    steps, guidance_scale, seed = check_settings(steps, guidance_scale, seed)
    model = registry.get(model_name)
    condition = parse_condition(model, condition)
    params = params or {}
    rules = {name: make_method(name, model, guidance_scale, steps, params.get(name)) for name in methods}
    return [
        _sample(model, condition, rule, name, guidance_scale, steps, seed) for name, rule in rules.items()
    ]


def shipped_smooth_lora() -> Path | None:
    """The Smooth-LoRA folder shipped with the default model, if this install has one."""
    from ..models import DEFAULT_MODEL_DIR

    folder = Path(DEFAULT_MODEL_DIR) / SHIPPED_SMOOTH_LORA
    return folder if (folder / "pytorch_lora_weights.safetensors").is_file() else None


@dataclass
class Strip:
    """An interpolation strip and its ISTD."""

    image: PIL.Image.Image
    istd: float


def interpolate(
    registry: ModelRegistry,
    label: int | str,
    guidance_scale: float,
    steps: int,
    seed: int,
    lora: str | Path | None = None,
) -> tuple[Strip, Strip]:
    """Slerp strips of the default model without and with the Smooth-LoRA (same noises)."""
    from ..metrics import interpolation_istd

    steps, guidance_scale, seed = check_settings(steps, guidance_scale, seed)
    base = registry.get(DEFAULT_MODEL)
    label = parse_condition(base, label)
    lora = lora or shipped_smooth_lora()
    if lora is None:
        raise AppError(
            "no Smooth-LoRA is installed with the default model; train one with `diffguide train smooth-lora`"
        )
    strips = []
    for model in (base, registry.get_with_lora(lora)):
        with model.lock, torch.no_grad():
            mean, _, images = interpolation_istd(
                model.pipe, [label], seed=seed, guidance_scale=guidance_scale, num_inference_steps=steps
            )
        strips.append(Strip(labelled_grid(images[0], [str(label)], zoom=3), mean))
    return strips[0], strips[1]


def sketch_to_digit(
    image: np.ndarray | PIL.Image.Image | dict | None, size: int = 28, inner: int | None = None
) -> torch.Tensor:
    """A drawn or uploaded image as the class-label models see theirs: (1, 1, 28, 28) in [0, 1],
    white on black, the ink's bounding box scaled to ``inner`` pixels (default 20, MNIST's
    convention; Fashion-MNIST's items fill the frame, 28) and centred.

    Accepts Gradio's sketchpad value (a dict with ``composite``), an array or a PIL image; a
    transparent background counts as paper, and dark ink on light paper is inverted.
    """
    if isinstance(image, dict):
        image = image.get("composite")
    if image is None:
        raise AppError("the sketch is empty: draw a digit (or upload an image) first")
    raw = np.asarray(image.convert("RGBA") if isinstance(image, PIL.Image.Image) else image)
    if (
        raw.ndim not in (2, 3)
        or (raw.ndim == 3 and raw.shape[-1] not in (1, 2, 3, 4))
        or min(raw.shape[:2]) < 1
    ):
        raise AppError(f"expected an image (H, W) or (H, W, 1-4 channels), got an array of shape {raw.shape}")
    pixels = np.nan_to_num(raw.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
    if not np.issubdtype(raw.dtype, np.integer) and pixels.max() <= 1.0:
        pixels = pixels * 255.0  # float images in [0, 1]
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.shape[-1] in (2, 4):
        alpha = pixels[..., -1] / 255.0
        pixels = pixels[..., :-1]
    else:
        alpha = np.ones(pixels.shape[:2])
    on_white = pixels.mean(-1) / 255.0 * alpha + (1 - alpha)  # transparent paper reads as white
    border = np.concatenate([on_white[0], on_white[-1], on_white[:, 0], on_white[:, -1]])
    ink = 1 - on_white if np.median(border) > 0.5 else on_white
    if ink.max() < 0.1:
        raise AppError("the sketch is empty: draw a digit (or upload an image) first")
    rows, cols = np.nonzero(ink > 0.1 * ink.max())
    ink = ink[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    inner = inner or size * 20 // 28
    scale = inner / max(ink.shape)
    height, width = max(1, round(ink.shape[0] * scale)), max(1, round(ink.shape[1] * scale))
    small = PIL.Image.fromarray((ink * 255).astype(np.uint8)).resize((width, height), PIL.Image.LANCZOS)
    canvas = np.zeros((size, size), dtype=np.float64)
    top, left = (size - height) // 2, (size - width) // 2
    canvas[top : top + height, left : left + width] = np.asarray(small, dtype=np.float64) / 255.0
    return torch.from_numpy(canvas).float()[None, None]


@dataclass
class Classification:
    """The Diffusion Classifier's per-class errors next to the judge's probabilities."""

    digit: torch.Tensor
    prediction: int
    errors: dict[str, float]
    judge_probabilities: dict[str, float]
    nfe: int


def classify(
    registry: ModelRegistry, image, model_name: str = DEFAULT_MODEL, schedule: str | None = None
) -> Classification:
    """Classify a sketch with the Diffusion Classifier of a class-label model and with the judge
    of its data; ``schedule`` is a preset name, the classifier's default if None."""
    from ..classifier import DEFAULT_SCHEDULE, PRESETS, DiffusionClassifier

    schedule = DEFAULT_SCHEDULE if schedule is None else schedule
    if schedule not in PRESETS:
        raise AppError(f"unknown schedule {schedule!r}; choose from {', '.join(PRESETS)}")
    model = registry.get(model_name)
    if not model.is_class_conditional:
        raise AppError(f"{model_name} is a text-to-image model; the classify tab takes a class-label model")
    digit = sketch_to_digit(image, inner=28 if model.judge_name == "fashion" else None)
    with model.lock, torch.no_grad():
        result = DiffusionClassifier(model.pipe, schedule=schedule).classify(digit)
        probabilities = torch.softmax(registry.judge(model.judge_name)(digit), dim=1)[0]
    errors = result.errors[0]
    return Classification(
        digit=digit,
        prediction=int(result.labels[0]),
        errors={str(c): float(e) for c, e in enumerate(errors) if torch.isfinite(e)},
        judge_probabilities={str(c): float(p) for c, p in enumerate(probabilities)},
        nfe=int(result.nfe[0]),
    )


def digit_preview(digit: torch.Tensor) -> PIL.Image.Image:
    """What the classifier saw, enlarged."""
    return to_pil(digit[0]).resize((28 * 6, 28 * 6), PIL.Image.NEAREST)
