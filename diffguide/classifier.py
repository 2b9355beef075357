"""Diffusion Classifier (Li, Prabhudesai, Duggal, Brown & Pathak, "Your Diffusion Model is
Secretly a Zero-Shot Classifier", ICCV 2023, arXiv 2303.16203).

For an image ``x0`` and each candidate condition ``c``:

    err(c) = mean_j  loss(eps_j, eps_theta(sqrt(abar_tj) x0 + sqrt(1 - abar_tj) eps_j, t_j, c))

with the same (t_j, eps_j) pairs for every candidate (the differences between classes are
then paired, which removes most of the variance), and the prediction is ``argmin_c err(c)``.
Models that predict something else are scored on the noise their output implies: for a
flow-matching model, ``x_t = (1 - s) x0 + s eps`` at timestep ``t = s T`` and the velocity ``v``
implies ``eps = x_t + (1 - s) v``, so its (l2) error is the velocity error weighted by
``(1 - s)^2``.
Adaptive elimination runs in stages: after stage ``i`` (``n_samples[i]`` timesteps in all)
only the ``keep[i]`` candidates with the lowest mean error go on; errors already computed are
reused. The paper's settings are presets (``PRESETS``), on its strided grid for the last
stage, ``t_k = T // n // 2 + k * (T // n)``, of which each earlier stage takes an evenly
spaced subset (as the authors' ``eval_prob_adaptive.py`` does).

Beyond the paper:

- ``order="stratified"``: the timesteps of every stage are the first ``n`` of one van der
  Corput sequence over ``[0, T)``, ``t_i = floor((vdc(i) + 1/128) T)``. Each stage then spans
  the whole range (for up to 64 timesteps, a prefix of ``2^m`` points has one point in each
  of ``2^m`` equal strata; beyond 64 the points fill the strata less evenly) and contains the
  earlier stages' timesteps, so no stage recomputes or leaves a gap.
- ``stop_z``: a stage ends the search once the paired error difference between the best
  candidate and the runner-up is ``stop_z`` standard errors from zero.
- ``t_range``: restrict the timesteps to a band (tuned on one model, such a band does not
  transfer to another: docs/BENCHMARKS.md, "Diffusion Classifier").

The default (``DEFAULT_SCHEDULE``, the same for the Python API, the CLI and the demo) uses the
whole range, stratified timesteps, staged elimination and the paired stop; it was chosen on
train images of two models (evals/classifier.py --study).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .prediction import alpha_sigma, implied_noise, prediction_kind, uses_flow_sigmas

LOSSES = ("l2", "l1", "huber")
ORDERS = ("strided", "stratified")
SCORES = ("mean", "log")


def van_der_corput(i: int) -> float:
    """The i-th point of the base-2 van der Corput sequence: i's binary digits mirrored after
    the point (0, 1/2, 1/4, 3/4, 1/8, ...)."""
    value, weight = 0.0, 0.5
    while i:
        value += weight * (i & 1)
        i >>= 1
        weight /= 2
    return value


def timestep_grid(num_train_timesteps: int, n: int, t_range: tuple[int, int] | None = None) -> list[int]:
    """The paper's strided grid of ``n`` timesteps, over ``[0, T)`` or ``t_range``."""
    low, high = t_range if t_range is not None else (0, num_train_timesteps)
    span = high - low
    if n > span:
        raise ValueError(f"cannot place {n} distinct timesteps in [{low}, {high})")
    stride = span // n
    return [low + stride // 2 + k * stride for k in range(n)]


STRATIFIED_OFFSET = 1 / 128  # half a stratum of 64: no timestep at the range's edge


def stratified_timesteps(
    num_train_timesteps: int, n: int, t_range: tuple[int, int] | None = None
) -> list[int]:
    """The first ``n`` distinct timesteps ``floor((vdc(i) + 1/128) T)`` of the van der Corput
    sequence over ``[0, T)`` (or ``t_range``). Any two calls share their common prefix, and a
    prefix of ``2^m`` (m <= 6) has one timestep in each of ``2^m`` equal strata."""
    low, high = t_range if t_range is not None else (0, num_train_timesteps)
    span = high - low
    if n > span:
        raise ValueError(f"cannot place {n} distinct timesteps in [{low}, {high})")
    timesteps: list[int] = []
    seen: set[int] = set()
    i = 0
    while len(timesteps) < n:
        t = low + min(span - 1, int((van_der_corput(i) + STRATIFIED_OFFSET) * span))
        if t not in seen:
            seen.add(t)
            timesteps.append(t)
        i += 1
    return timesteps


@dataclass(frozen=True)
class ClassifierSchedule:
    """Stages of adaptive elimination.

    Args:
        n_samples: total timesteps evaluated per surviving candidate after each stage
            (increasing).
        keep: candidates kept after each stage (the last is usually 1).
        t_range: ``(low, high)``: the timesteps lie in ``[low, high)`` instead of ``[0, T)``.
        stop_z: stop after any stage where the runner-up's paired error exceeds the best one's
            by ``stop_z`` standard errors (``None``: never stop early).
        order: ``"strided"`` (the paper's grid of ``n`` per stage) or ``"stratified"``
            (nested prefixes of one van der Corput sequence: :func:`stratified_timesteps`).
        score: ``"mean"`` (the paper's: rank by mean error) or ``"log"`` (rank by mean log
            error, the geometric mean: :func:`score_errors`).
    """

    n_samples: tuple[int, ...]
    keep: tuple[int, ...]
    t_range: tuple[int, int] | None = None
    stop_z: float | None = None
    order: str = "strided"
    score: str = "mean"

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
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {self.order!r}")
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {self.score!r}")
        if self.stop_z is not None and self.stop_z <= 0:
            raise ValueError(f"stop_z must be > 0 (or None: never stop early), got {self.stop_z}")

    def stage_timesteps(self, num_train_timesteps: int) -> list[list[int]]:
        """The timesteps every surviving candidate has been evaluated at after each stage."""
        if self.order == "stratified":
            full = stratified_timesteps(num_train_timesteps, self.n_samples[-1], self.t_range)
            return [full[:n] for n in self.n_samples]
        # as the authors' code does: one strided grid for the last stage, each stage an evenly
        # spaced subset of it (so the stages nest only where the strides divide)
        full = timestep_grid(num_train_timesteps, self.n_samples[-1], self.t_range)
        stages, seen = [], set()
        for n in self.n_samples:
            stride = len(full) // n
            seen |= set(full[stride // 2 :: stride][:n])
            stages.append(sorted(seen))
        return stages

    def max_nfe(self, num_classes: int, num_train_timesteps: int = 1000) -> int:
        """Network evaluations per image when no stage stops early."""
        total, seen, survivors = 0, set(), num_classes
        for timesteps, keep in zip(self.stage_timesteps(num_train_timesteps), self.keep, strict=True):
            total += survivors * len(set(timesteps) - seen)
            seen |= set(timesteps)
            survivors = min(survivors, keep)
            if survivors == 1:  # the search ends once one candidate is left
                break
        return total

    def describe(self) -> str:
        """One line: stages, survivors, timesteps and stop."""
        text = f"{self.n_samples} keep {self.keep}, {self.order}"
        text += f" t in {self.t_range}" if self.t_range else " over [0, T)"
        text += f", stop at z >= {self.stop_z:g}" if self.stop_z else ""
        return text + (", log errors" if self.score == "log" else "")


PRESETS: dict[str, ClassifierSchedule] = {
    # ours, the default: the whole range on nested stratified timesteps, every class at 8, the
    # best 5 at 16, the best 3 at 32, the best 2 at 64, stopping once the runner-up is 3 paired
    # standard errors behind (chosen on train images of the digits UNet and the fashion flow
    # transformer: evals/classifier.py --study)
    "adaptive": ClassifierSchedule((8, 16, 32, 64), (5, 3, 2, 1), stop_z=3.0, order="stratified"),
    # the same search ranking by mean log error: better on the digits test split, much worse on
    # fashion's (docs/classifier.md)
    "adaptive-log": ClassifierSchedule(
        (8, 16, 32, 64), (5, 3, 2, 1), stop_z=3.0, order="stratified", score="log"
    ),
    # the paper's CIFAR-10 setting (with l1 there) and its ImageNet setting
    "paper-cifar10": ClassifierSchedule((50, 500), (5, 1)),
    "paper-imagenet": ClassifierSchedule((50, 100, 500, 1000), (500, 50, 10, 1)),
    # every candidate at every one of 500 grid timesteps: the cost every schedule is measured against
    "full": ClassifierSchedule((500,), (1,)),
    # the previous CLI default: a band of timesteps measured on the default model's train split
    # (t in [600, 950)); kept for comparison, it does not transfer to other models
    "fast": ClassifierSchedule((5, 10, 20), (3, 2, 1), t_range=(600, 950), stop_z=3.0),
}
DEFAULT_SCHEDULE = "adaptive"


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


def score_errors(errors: torch.Tensor, score: str) -> torch.Tensor:
    """Errors as the search compares them: as they are (``"mean"``, the paper's), or their
    logarithm (``"log"``: each timestep then counts by its error ratio between candidates,
    whatever the error's size at that noise level)."""
    return errors.clamp_min(1e-30).log() if score == "log" else errors


def paired_margin_z(errors: torch.Tensor, best: int, runner_up: int) -> float:
    """z-score of the mean paired difference ``err[runner_up] - err[best]`` over timesteps."""
    diff = errors[runner_up] - errors[best]
    if diff.numel() < 2:
        return 0.0
    standard_error = diff.std(unbiased=True) / math.sqrt(diff.numel())
    return float(diff.mean() / standard_error.clamp_min(1e-12))


@dataclass
class ClassificationResult:
    """Per image: predicted label; the mean error of every candidate (an eliminated one's over
    the timesteps it was evaluated at, so errors of candidates eliminated at different stages
    are means over different timesteps); the margin to the runner-up, paired: the smallest,
    over the other candidates, of their mean error minus the winner's on the same timesteps
    (>= 0); NFE; and the timesteps the winner was evaluated at."""

    labels: torch.Tensor
    errors: torch.Tensor
    margins: torch.Tensor
    nfe: torch.Tensor
    timesteps_used: list[list[int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def concat(cls, results: Sequence[ClassificationResult]) -> ClassificationResult:
        """The results of consecutive shards of one image set, as one result."""
        if not results:
            raise ValueError("no results to concatenate")
        return cls(
            torch.cat([r.labels for r in results]),
            torch.cat([r.errors for r in results]),
            torch.cat([r.margins for r in results]),
            torch.cat([r.nfe for r in results]),
            [t for r in results for t in r.timesteps_used],
        )


class _Conditioner:
    """How to encode images and query the denoiser for one kind of pipeline."""

    def __init__(self, pipe, prompts: Sequence[str] | None, prompt_template: str, class_names):
        self.pipe = pipe
        self.denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
        if self.denoiser is None:
            raise TypeError(f"{type(pipe).__name__} has no unet or transformer to classify with")
        self.vae = getattr(pipe, "vae", None)
        config = self.denoiser.config
        self.text_embeddings = self.pooled_embeddings = None
        self.text_kind = None
        if hasattr(pipe, "encode_prompt"):
            self.text_kind = self._text_kind(pipe)
            if prompts is None:
                if class_names is None:
                    raise ValueError(
                        "a text-conditional pipeline needs prompts= or class_names= (one per class)"
                    )
                prompts = [prompt_template.format(name) for name in class_names]
            self._encode_prompts(list(prompts))
            self.num_classes = len(prompts)
        elif getattr(config, "num_class_embeds", None):  # UNet2DModel with a null class
            self.num_classes = getattr(pipe, "num_classes", config.num_class_embeds - 1)
        elif getattr(config, "num_embeds_ada_norm", None):  # DiT: labels in ada-norm
            self.num_classes = config.num_embeds_ada_norm
        else:
            raise TypeError(
                f"{type(pipe).__name__}'s denoiser takes no class labels or text: nothing to classify by. "
                "Supported: class-conditional UNet2DModel (DigitsPipeline), DiT, and SD / SDXL / SD3 text pipelines"
            )
        if class_names is not None and len(class_names) != self.num_classes:
            raise ValueError(f"{len(class_names)} class names for {self.num_classes} classes")

    def _text_kind(self, pipe) -> str:
        name = type(self.denoiser).__name__
        if name == "SD3Transformer2DModel":
            return "sd3"  # it takes the scheduler timestep s * T, as the grid's t
        if getattr(self.denoiser.config, "addition_embed_type", None) == "text_time":
            if getattr(getattr(pipe, "config", None), "requires_aesthetics_score", False):
                raise TypeError(
                    f"{type(pipe).__name__}: the SDXL refiner's aesthetic-score conditioning is not wired; "
                    "classify with the SDXL base pipeline"
                )
            return "sdxl"
        if name.startswith("UNet2DCondition"):
            return "sd"
        # Flux and Qwen-Image pack latents into tokens and take t / 1000, Lumina 1 - t / 1000,
        # each with its own position ids: none is wired here
        raise TypeError(
            f"{type(pipe).__name__} ({name}) is not supported by the Diffusion Classifier yet: "
            "its denoiser's inputs (packed latents, timestep convention) are not wired; supported text "
            "pipelines are SD, SDXL and SD3"
        )

    @torch.no_grad()
    def _encode_prompts(self, prompts: list[str]) -> None:
        device = self.pipe.device
        if self.text_kind == "sd":
            self.text_embeddings = self.pipe.encode_prompt(prompts, device, 1, False)[0]
            return
        if self.text_kind == "sdxl":
            encoded = self.pipe.encode_prompt(
                prompt=prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
        else:
            encoded = self.pipe.encode_prompt(
                prompt=prompts, prompt_2=None, prompt_3=None, device=device,
                num_images_per_prompt=1, do_classifier_free_guidance=False,
            )  # fmt: skip
        self.text_embeddings, self.pooled_embeddings = encoded[0], encoded[2]

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
        # VAEs that overflow in half precision (SDXL's: force_upcast) encode in float32, as diffusers does
        upcast = self.vae.dtype != torch.float32 and getattr(self.vae.config, "force_upcast", False)
        vae = self.vae.to(torch.float32) if upcast else self.vae
        latents = vae.encode(x.to(device=vae.device, dtype=vae.dtype)).latent_dist.mean
        if upcast:
            self.vae.to(self.denoiser.dtype)
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return ((latents - shift) * self.vae.config.scaling_factor).float().cpu()

    @property
    def image_shape(self) -> tuple[int, ...]:
        if self.vae is None:
            return self.latent_shape
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return (self.vae.config.in_channels, self.latent_shape[1] * factor, self.latent_shape[2] * factor)

    @torch.no_grad()
    def predict(self, x_t: torch.Tensor, t: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        if self.text_kind == "sd":
            out = self.denoiser(x_t, t, encoder_hidden_states=self.text_embeddings[classes]).sample
        elif self.text_kind == "sdxl":
            height, width = (
                side * 2 ** (len(self.vae.config.block_out_channels) - 1) for side in x_t.shape[-2:]
            )
            # original size, crop offset, target size: the image as it is, uncropped
            time_ids = torch.tensor([height, width, 0, 0, height, width], device=x_t.device)
            added = {"text_embeds": self.pooled_embeddings[classes],
                     "time_ids": time_ids.to(x_t.dtype).expand(len(x_t), 6)}  # fmt: skip
            out = self.denoiser(
                x_t, t, encoder_hidden_states=self.text_embeddings[classes], added_cond_kwargs=added
            ).sample
        elif self.text_kind == "sd3":
            out = self.denoiser(
                hidden_states=x_t, timestep=t.to(x_t.dtype), encoder_hidden_states=self.text_embeddings[classes],
                pooled_projections=self.pooled_embeddings[classes],
            ).sample  # fmt: skip
        elif getattr(self.denoiser.config, "num_class_embeds", None):
            out = self.denoiser(x_t, t, class_labels=classes).sample
        else:
            out = self.denoiser(x_t, timestep=t, class_labels=classes).sample
        return out[:, : x_t.shape[1]]  # drop a learned-variance half


@dataclass
class _Search:
    """One image's adaptive search: surviving candidates, errors computed so far, NFE."""

    candidates: list[int]
    computed: dict[tuple[int, int], float] = field(default_factory=dict)
    final: torch.Tensor | None = None
    nfe: int = 0
    timesteps: list[int] = field(default_factory=list)
    done: bool = False


class DiffusionClassifier:
    """Classify images by which condition best predicts the noise added to them.

    Args:
        pipe: DigitsPipeline, ClassConditionalTransformerPipeline, a DiT pipeline, or an SD,
            SDXL or SD3 text-to-image pipeline.
        schedule: a preset name (``PRESETS``; default ``DEFAULT_SCHEDULE``) or a
            :class:`ClassifierSchedule`.
        loss: ``"l2"`` (default), ``"l1"`` or ``"huber"``; mean over elements, no t weighting.
        batch_size: rows (image x candidate x timestep) per network call; bounds the memory
            (500 suits small models; lower it for SD-size ones, e.g. 8-32 at 512-1024 px).
        images_per_batch: images whose searches advance together, so that their rows fill
            the network calls.
        seed: seeds the noise; the noise at timestep t is the same for every image and class.
        prompts / class_names / prompt_template: text pipelines: one prompt per class, or names
            filled into ``prompt_template``.
    """

    def __init__(
        self,
        pipe,
        schedule: str | ClassifierSchedule = DEFAULT_SCHEDULE,
        loss: str = "l2",
        batch_size: int = 500,
        seed: int = 0,
        prompts: Sequence[str] | None = None,
        class_names: Sequence[str] | None = None,
        prompt_template: str = "a photo of a {}",
        images_per_batch: int = 32,
    ):
        if isinstance(schedule, str):
            if schedule not in PRESETS:
                raise ValueError(f"unknown schedule {schedule!r}; presets: {', '.join(PRESETS)}")
            schedule = PRESETS[schedule]
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        if batch_size < 1 or images_per_batch < 1:
            raise ValueError(
                f"batch_size and images_per_batch must be >= 1, got {batch_size} and {images_per_batch}"
            )
        self.pipe = pipe
        self.schedule = schedule
        self.loss = loss
        self.batch_size = batch_size
        self.images_per_batch = images_per_batch
        self.seed = seed
        self.conditioner = _Conditioner(pipe, prompts, prompt_template, class_names)
        self.scheduler = pipe.scheduler
        self.kind = prediction_kind(self.scheduler)
        if self.kind in ("flow", "reverse_flow") and self.conditioner.text_kind not in (None, "sd3"):
            raise TypeError(
                f"{type(pipe).__name__}: a flow-matching scheduler on a {self.conditioner.text_kind.upper()} "
                "denoiser is not supported; use its own scheduler"
            )
        self.num_train_timesteps = self.scheduler.config.num_train_timesteps
        self._stages = schedule.stage_timesteps(self.num_train_timesteps)
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

    def row_errors(self, x0s: torch.Tensor, rows: Sequence[tuple[int, int, int]]) -> torch.Tensor:
        """The error of each ``(image index, class, timestep)`` row for encoded images ``x0s``,
        ``batch_size`` rows per network call."""
        parameter = next(self.conditioner.denoiser.parameters())
        device, dtype = parameter.device, parameter.dtype
        out = []
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            images = torch.tensor([i for i, _, _ in chunk])
            classes = torch.tensor([c for _, c, _ in chunk], device=device)
            t = torch.tensor([t for _, _, t in chunk])
            noise = torch.stack([self.noise_at(int(tt)) for tt in t]).to(device, torch.float64)
            alpha, sigma = (v.to(device) for v in self._noise_levels(t))
            x0 = x0s[images].to(device, torch.float64)
            x_t = (alpha.reshape(-1, 1, 1, 1) * x0 + sigma.reshape(-1, 1, 1, 1) * noise).to(dtype)
            output = self.conditioner.predict(x_t, t.to(device), classes).double()
            # v, sample and flow models are scored on the noise their prediction implies
            predicted = implied_noise(output, x_t.double(), alpha, sigma, self.kind)
            out.append(prediction_error(predicted.float(), noise.float(), self.loss).cpu())
        return torch.cat(out) if out else torch.empty(0)

    def _noise_levels(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """float64 (alpha, sigma) at integer training timesteps, from the schedule alone (not
        from a sampling run's current step, which k-diffusion-style schedulers would read)."""
        if uses_flow_sigmas(self.scheduler):
            return alpha_sigma(self.scheduler, t)
        abar = torch.as_tensor(self.scheduler.alphas_cumprod, dtype=torch.float64).cpu()[t.long()]
        return abar.sqrt(), (1 - abar).sqrt()

    @torch.no_grad()
    def classify(self, images: torch.Tensor, progress: bool = False) -> ClassificationResult:
        """Predicted labels, per-class mean errors, runner-up margins and NFE for each image."""
        images = self._check_images(images)
        results = []
        with tqdm(total=len(images), desc="classifying", unit="img", disable=not progress) as bar:
            for start in range(0, len(images), self.images_per_batch):
                x0s = self.conditioner.encode(images[start : start + self.images_per_batch])
                results.append(self._classify_batch(x0s))
                bar.update(len(x0s))
        return ClassificationResult.concat(results)

    def _classify_batch(self, x0s: torch.Tensor) -> ClassificationResult:
        searches = [_Search(list(range(self.num_classes))) for _ in range(len(x0s))]
        for timesteps, keep in zip(self._stages, self.schedule.keep, strict=True):
            active = [i for i, search in enumerate(searches) if not search.done]
            rows = [
                (i, c, t)
                for i in active
                for c in searches[i].candidates
                for t in timesteps
                if (c, t) not in searches[i].computed
            ]
            for (i, c, t), error in zip(rows, self.row_errors(x0s, rows).tolist(), strict=True):
                searches[i].computed[c, t] = error
                searches[i].nfe += 1
            for i in active:
                self._advance(searches[i], timesteps, keep)
        for search in searches:  # a schedule whose last stage keeps several: the best of them
            search.candidates = search.candidates[:1]
        labels = [s.candidates[0] for s in searches]
        return ClassificationResult(
            torch.tensor(labels), torch.stack([s.final for s in searches]),
            torch.tensor([self._paired_margin(s) for s in searches]), torch.tensor([s.nfe for s in searches]),
            [s.timesteps for s in searches],
        )  # fmt: skip

    def _paired_margin(self, search: _Search) -> float:
        """The smallest mean of ``score(c, t) - score(winner, t)`` over the timesteps each other
        candidate ``c`` was evaluated at (the winner was evaluated at all of them)."""
        winner = search.candidates[0]
        differences: dict[int, list[float]] = {}
        for (c, t), error in search.computed.items():
            if c != winner:
                pair = score_errors(
                    torch.tensor([error, search.computed[winner, t]], dtype=torch.float64),
                    self.schedule.score,
                )
                differences.setdefault(c, []).append(float(pair[0] - pair[1]))
        return min((sum(d) / len(d) for d in differences.values()), default=float("inf"))

    def _advance(self, search: _Search, timesteps: list[int], keep: int) -> None:
        """Rank the survivors on this stage's timesteps, keep the best ``keep``, stop if sure."""
        matrix = score_errors(
            torch.tensor(
                [[search.computed[c, t] for t in timesteps] for c in search.candidates], dtype=torch.float64
            ),
            self.schedule.score,
        )
        means = matrix.mean(1)
        if search.final is None:
            search.final = torch.full((self.num_classes,), float("inf"))
        # reported on the error's own scale: the mean, or for "log" the geometric mean
        search.final[search.candidates] = (means.exp() if self.schedule.score == "log" else means).float()
        order = means.argsort().tolist()
        confident = (
            self.schedule.stop_z is not None
            and len(order) > 1
            and paired_margin_z(matrix, order[0], order[1]) >= self.schedule.stop_z
        )
        search.candidates = [search.candidates[j] for j in order[: max(1, min(keep, len(order)))]]
        search.timesteps = list(timesteps)
        if confident or len(search.candidates) == 1:
            search.candidates = search.candidates[:1]
            search.done = True


def shard_bounds(count: int, num_shards: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, end)`` shares of ``count`` items over ``num_shards`` shards, the
    first ``count % num_shards`` one item larger."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    size, extra = divmod(count, num_shards)
    bounds, start = [], 0
    for shard in range(num_shards):
        end = start + size + (shard < extra)
        bounds.append((start, end))
        start = end
    return bounds


def process_state():
    """accelerate's ``PartialState`` of this process: one process, or one of those that
    ``accelerate launch`` / ``torchrun`` started (on CPU, gloo)."""
    from accelerate import PartialState

    # without cpu=True, accelerate treats processes launched on a CPU-only machine as one
    return PartialState(cpu=not torch.cuda.is_available())


def classify_sharded(
    classifier: DiffusionClassifier, images: torch.Tensor, progress: bool = False
) -> ClassificationResult:
    """Classify ``images`` across the processes of ``accelerate launch``: each process takes a
    contiguous share, and every process gets the whole result back in order. In one process,
    the same as ``classifier.classify(images)``. Each image's search depends only on that image
    and the seed, so the merged result equals the one-process result."""
    from accelerate.utils import gather_object

    state = process_state()
    if state.num_processes == 1:
        return classifier.classify(images, progress=progress)
    start, end = shard_bounds(len(images), state.num_processes)[state.process_index]
    mine = (
        classifier.classify(images[start:end], progress=progress and state.is_main_process)
        if end > start
        else None
    )
    shares = gather_object([mine])
    return ClassificationResult.concat([share for share in shares if share is not None])
