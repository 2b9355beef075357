"""Diffusion Classifier (Li, Prabhudesai, Duggal, Brown & Pathak, "Your Diffusion Model is
Secretly a Zero-Shot Classifier", ICCV 2023, arXiv 2303.16203).

For an image ``x0`` and each candidate condition ``c``:

    err(c) = mean_j  loss(eps_j, eps_theta(sqrt(abar_tj) x0 + sqrt(1 - abar_tj) eps_j, t_j, c))

with the same (t_j, eps_j) pairs for every candidate (the differences between classes are
then paired, which removes most of the variance), and the prediction is ``argmin_c err(c)``.
Models that predict something else are scored on the noise their output implies: for a
flow-matching model, ``x_t = (1 - s) x0 + s eps`` at timestep ``t = s T`` and the velocity ``v``
implies ``eps = x_t + (1 - s) v``, so its error is the velocity error weighted by ``(1 - s)^2``.
Timesteps come from a strided grid, ``t_k = T // n // 2 + k * (T // n)``. Adaptive
elimination runs in stages: after stage ``i`` (``n_samples[i]`` grid timesteps in all) only
the ``keep[i]`` candidates with the lowest mean error go on; errors already computed are
reused. The paper's settings are presets (``PRESETS``).

Beyond the paper (``ClassifierSchedule.t_range`` and ``stop_z``): timesteps can be restricted
to the band where classes differ most, and a stage can end the search early when the
paired error difference between the best candidate and the runner-up is ``stop_z`` standard
errors from zero.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .prediction import alpha_sigma, implied_noise, prediction_kind

LOSSES = ("l2", "l1", "huber")


@dataclass(frozen=True)
class ClassifierSchedule:
    """Stages of adaptive elimination.

    Args:
        n_samples: total grid timesteps evaluated per surviving candidate after each stage
            (increasing).
        keep: candidates kept after each stage (the last is usually 1).
        t_range: ``(low, high)``: the grid spans ``[low, high)`` instead of ``[0, T)``.
        stop_z: stop after any stage where the runner-up's paired error exceeds the best one's
            by ``stop_z`` standard errors (``None``: never stop early).
    """

    n_samples: tuple[int, ...]
    keep: tuple[int, ...]
    t_range: tuple[int, int] | None = None
    stop_z: float | None = None

    def __post_init__(self):
        if not self.n_samples or len(self.n_samples) != len(self.keep):
            raise ValueError("n_samples and keep need one entry per stage")
        if (
            any(b <= a for a, b in zip(self.n_samples, self.n_samples[1:], strict=False))
            or self.n_samples[0] < 1
        ):
            raise ValueError(f"n_samples must increase and start >= 1, got {self.n_samples}")
        if any(k < 1 for k in self.keep):
            raise ValueError(f"keep must be >= 1, got {self.keep}")


PRESETS: dict[str, ClassifierSchedule] = {
    # the paper's CIFAR-10 setting (with l1 there) and its ImageNet setting
    "paper-cifar10": ClassifierSchedule((50, 500), (5, 1)),
    "paper-imagenet": ClassifierSchedule((50, 100, 500, 1000), (500, 50, 10, 1)),
    # every candidate at every one of 500 grid timesteps: the cost every schedule is measured against
    "full": ClassifierSchedule((500,), (1,)),
    # ours: only the band of timesteps where one timestep already separates the classes on the
    # default model's train split (t in [600, 950), evals/classifier.py --probe), three
    # elimination stages, and a stop once the paired margin is 3 standard errors
    "fast": ClassifierSchedule((5, 10, 20), (3, 2, 1), t_range=(600, 950), stop_z=3.0),
}


def timestep_grid(num_train_timesteps: int, n: int, t_range: tuple[int, int] | None = None) -> list[int]:
    """The paper's strided grid of ``n`` timesteps, over ``[0, T)`` or ``t_range``."""
    low, high = t_range if t_range is not None else (0, num_train_timesteps)
    span = high - low
    if n > span:
        raise ValueError(f"cannot place {n} distinct timesteps in [{low}, {high})")
    stride = span // n
    return [low + stride // 2 + k * stride for k in range(n)]


def prediction_error(predicted: torch.Tensor, noise: torch.Tensor, loss: str) -> torch.Tensor:
    """Per-row mean error between predicted and true noise (rows, ...) -> (rows,)."""
    if loss == "l2":
        error = F.mse_loss(predicted, noise, reduction="none")
    elif loss == "l1":
        error = F.l1_loss(predicted, noise, reduction="none")
    elif loss == "huber":
        error = F.huber_loss(predicted, noise, reduction="none")
    else:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    return error.flatten(1).mean(1)


def paired_margin_z(errors: torch.Tensor, best: int, runner_up: int) -> float:
    """z-score of the mean paired difference ``err[runner_up] - err[best]`` over timesteps."""
    diff = errors[runner_up] - errors[best]
    if diff.numel() < 2:
        return 0.0
    standard_error = diff.std(unbiased=True) / math.sqrt(diff.numel())
    return float(diff.mean() / standard_error.clamp_min(1e-12))


@dataclass
class ClassificationResult:
    """Per image: predicted label, mean error of every candidate (``inf`` once eliminated,
    then the error at elimination is kept in ``errors``), margin to the runner-up, and NFE."""

    labels: torch.Tensor
    errors: torch.Tensor
    margins: torch.Tensor
    nfe: torch.Tensor
    timesteps_used: list[list[int]] = field(default_factory=list)


class _Conditioner:
    """How to encode images and query the denoiser for one kind of pipeline."""

    def __init__(self, pipe, prompts: Sequence[str] | None, prompt_template: str, class_names):
        self.pipe = pipe
        self.denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
        if self.denoiser is None:
            raise TypeError(f"{type(pipe).__name__} has no unet or transformer to classify with")
        self.vae = getattr(pipe, "vae", None)
        self.text_embeddings = None
        if hasattr(pipe, "encode_prompt"):
            if prompts is None:
                if class_names is None:
                    raise ValueError(
                        "a text-conditional pipeline needs prompts= or class_names= (one per class)"
                    )
                prompts = [prompt_template.format(name) for name in class_names]
            self.text_embeddings = self._encode_prompts(list(prompts))
            self.num_classes = len(prompts)
        elif getattr(self.denoiser.config, "num_class_embeds", None):  # UNet2DModel with a null class
            self.num_classes = getattr(pipe, "num_classes", self.denoiser.config.num_class_embeds - 1)
        elif getattr(self.denoiser.config, "num_embeds_ada_norm", None):  # DiT: labels in ada-norm
            self.num_classes = self.denoiser.config.num_embeds_ada_norm
        else:
            raise TypeError(
                f"{type(pipe).__name__}'s denoiser takes no class labels or text: nothing to classify by. "
                "Supported: class-conditional UNet2DModel (DigitsPipeline), DiT, and SD-type text pipelines"
            )
        if class_names is not None and len(class_names) != self.num_classes:
            raise ValueError(f"{len(class_names)} class names for {self.num_classes} classes")

    @torch.no_grad()
    def _encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        encoded = self.pipe.encode_prompt(prompts, self.pipe.device, 1, False)
        return encoded[0]

    @property
    def latent_shape(self) -> tuple[int, ...]:
        size = self.denoiser.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        return (self.denoiser.config.in_channels, *size)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [0, 1] to x0 in the denoiser's space."""
        x = images * 2 - 1
        if self.vae is None:
            return x
        latents = self.vae.encode(x.to(self.vae.dtype)).latent_dist.mean
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    @property
    def image_shape(self) -> tuple[int, ...]:
        if self.vae is None:
            return self.latent_shape
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return (self.vae.config.in_channels, self.latent_shape[1] * factor, self.latent_shape[2] * factor)

    @torch.no_grad()
    def predict(self, x_t: torch.Tensor, t: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        if self.text_embeddings is not None:
            out = self.denoiser(x_t, t, encoder_hidden_states=self.text_embeddings[classes]).sample
        elif getattr(self.denoiser.config, "num_class_embeds", None):
            out = self.denoiser(x_t, t, class_labels=classes).sample
        else:
            out = self.denoiser(x_t, timestep=t, class_labels=classes).sample
        return out[:, : x_t.shape[1]]  # drop a learned-variance half


class DiffusionClassifier:
    """Classify images by which condition best predicts the noise added to them.

    Args:
        pipe: DigitsPipeline, a DiT pipeline, or an SD-type text-to-image pipeline.
        schedule: a preset name (``PRESETS``) or a :class:`ClassifierSchedule`.
        loss: ``"l2"`` (default), ``"l1"`` or ``"huber"``; mean over elements, no t weighting.
        batch_size: rows (candidate x timestep) per network call.
        seed: seeds the noise; the noise at timestep t is the same for every image and class.
        prompts / class_names / prompt_template: text pipelines: one prompt per class, or names
            filled into ``prompt_template``.
    """

    def __init__(
        self,
        pipe,
        schedule: str | ClassifierSchedule = "paper-cifar10",
        loss: str = "l2",
        batch_size: int = 500,
        seed: int = 0,
        prompts: Sequence[str] | None = None,
        class_names: Sequence[str] | None = None,
        prompt_template: str = "a photo of a {}",
    ):
        if isinstance(schedule, str):
            if schedule not in PRESETS:
                raise ValueError(f"unknown schedule {schedule!r}; presets: {', '.join(PRESETS)}")
            schedule = PRESETS[schedule]
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.pipe = pipe
        self.schedule = schedule
        self.loss = loss
        self.batch_size = batch_size
        self.seed = seed
        self.conditioner = _Conditioner(pipe, prompts, prompt_template, class_names)
        self.scheduler = pipe.scheduler
        self.kind = prediction_kind(self.scheduler)
        if self.kind in ("flow", "reverse_flow") and self.conditioner.text_embeddings is not None:
            # their denoisers take other timestep conventions (Flux t/1000, Lumina 1 - t/1000)
            # and other prompt encoders; only class-label flow models are wired here
            raise TypeError(
                f"{type(pipe).__name__}: text-conditional flow-matching pipelines are not supported by the "
                "Diffusion Classifier yet; class-label flow models (ClassConditionalTransformerPipeline) are"
            )
        self.num_train_timesteps = self.scheduler.config.num_train_timesteps
        self._noise: dict[int, torch.Tensor] = {}

    @property
    def num_classes(self) -> int:
        return self.conditioner.num_classes

    def noise_at(self, t: int) -> torch.Tensor:
        """The noise used at timestep ``t`` (for every image and every class)."""
        if t not in self._noise:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + t)
            self._noise[t] = torch.randn(self.conditioner.latent_shape, generator=generator)
        return self._noise[t]

    def _check_images(self, images: torch.Tensor) -> torch.Tensor:
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            raise ValueError("images must be a tensor (B, C, H, W) in [0, 1]")
        if len(images) == 0:
            raise ValueError("no images to classify")
        expected = self.conditioner.image_shape
        if tuple(images.shape[1:]) != tuple(expected):
            raise ValueError(
                f"images have shape {tuple(images.shape[1:])}, the model expects {tuple(expected)} (C, H, W); "
                "resize or convert them first"
            )
        return images

    def _errors(self, x0: torch.Tensor, pairs: list[tuple[int, int]]) -> torch.Tensor:
        """Errors of (class, t) pairs for one encoded image x0 (C, H, W), batched."""
        device = next(self.conditioner.denoiser.parameters()).device
        dtype = next(self.conditioner.denoiser.parameters()).dtype
        out = []
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start : start + self.batch_size]
            classes = torch.tensor([c for c, _ in chunk], device=device)
            t = torch.tensor([t for _, t in chunk])
            noise = torch.stack([self.noise_at(int(tt)) for tt in t]).to(device)
            alpha, sigma = alpha_sigma(self.scheduler, t)
            a, s = (v.reshape(-1, 1, 1, 1).to(device) for v in (alpha, sigma))
            x_t = (a * x0.double().to(device) + s * noise.double()).to(dtype)
            output = self.conditioner.predict(x_t, t.to(device), classes).double()
            # v, sample and flow models are scored on the noise their prediction implies
            predicted = implied_noise(output, x_t.double(), alpha.to(device), sigma.to(device), self.kind)
            out.append(prediction_error(predicted.float(), noise.float(), self.loss).cpu())
        return torch.cat(out) if out else torch.empty(0)

    @torch.no_grad()
    def classify(self, images: torch.Tensor, progress: bool = False) -> ClassificationResult:
        """Predicted labels, per-class mean errors, runner-up margins and NFE for each image."""
        images = self._check_images(images)
        x0s = torch.cat([self.conditioner.encode(images[i : i + 64]) for i in range(0, len(images), 64)])
        labels, errors, margins, nfe, used = [], [], [], [], []
        for x0 in tqdm(x0s, desc="classifying", unit="img", disable=not progress):
            label, mean_errors, margin, count, timesteps = self._classify_one(x0)
            labels.append(label)
            errors.append(mean_errors)
            margins.append(margin)
            nfe.append(count)
            used.append(timesteps)
        return ClassificationResult(
            torch.tensor(labels), torch.stack(errors), torch.tensor(margins), torch.tensor(nfe), used
        )

    def _classify_one(self, x0: torch.Tensor):
        schedule = self.schedule
        candidates = list(range(self.num_classes))
        # errors[c][t]: computed once, reused by later stages
        computed: dict[int, dict[int, float]] = {c: {} for c in candidates}
        final = torch.full((self.num_classes,), float("inf"))
        nfe = 0
        timesteps: list[int] = []
        for n, keep in zip(schedule.n_samples, schedule.keep, strict=True):
            grid = timestep_grid(self.num_train_timesteps, n, schedule.t_range)
            timesteps = sorted(set(timesteps) | set(grid))
            pairs = [(c, t) for c in candidates for t in timesteps if t not in computed[c]]
            for (c, t), error in zip(pairs, self._errors(x0, pairs).tolist(), strict=True):
                computed[c][t] = error
            nfe += len(pairs)
            matrix = torch.tensor(
                [[computed[c][t] for t in timesteps] for c in candidates], dtype=torch.float64
            )
            means = matrix.mean(1)
            final[candidates] = means.float()
            order = means.argsort().tolist()
            confident = (
                schedule.stop_z is not None
                and len(order) > 1
                and paired_margin_z(matrix, order[0], order[1]) >= schedule.stop_z
            )
            candidates = [candidates[i] for i in order[: max(1, min(keep, len(order)))]]
            if confident or len(candidates) == 1:
                candidates = candidates[:1]
                break
        best = candidates[0]
        others = final.clone()
        others[best] = float("inf")
        margin = float(others.min() - final[best]) if torch.isfinite(others.min()) else float("inf")
        return best, final, margin, nfe, timesteps
