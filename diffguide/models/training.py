"""Training of the embedded models: the digits UNet with DDPM's epsilon objective, the
Fashion-MNIST transformer with rectified flow (:class:`FlowObjective`), label dropout for both.

``corruption="spd"`` trains the same network with Shortest Path Diffusion's per-frequency
corruption (``diffguide.schedulers.spd``) instead of DDPM's, with everything else equal, so
the two can be compared at the same budget.

``diffguide train default`` runs :func:`train_default`. Each step draws a batch from the
train split (never the test split), a uniform timestep and Gaussian noise per image, replaces
the label by the null class with probability ``label_dropout`` (so the same network gives
the unconditional prediction CFG needs), and minimises ``||eps - eps_theta(x_t, t, y)||^2``.
An exponential moving average of the weights is what gets saved.

Every random draw comes from one seeded ``torch.Generator`` whose state is checkpointed with
the model, the EMA and the optimizer, so a resumed run continues exactly as an uninterrupted
one would.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from ..callbacks.base import Callback, CallbackRunner
from .data import load_digits
from .pipeline import DigitsPipeline, default_sampling_scheduler, default_scheduler_config, default_unet


@dataclass
class TrainingConfig:
    """What the training of both embedded models shares (the digits model's values)."""

    steps: int = 1800
    batch_size: int = 128
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    label_dropout: float = 0.1
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 100


@dataclass
class DefaultTrainingConfig(TrainingConfig):
    """Hyper-parameters of ``diffguide train default`` (the shipped model uses these defaults)."""

    source: str = "mnist"
    #: the DDPM noise schedule: diffusers' ``beta_schedule`` ("squaredcos_cap_v2", the shipped
    #: model; "linear": another model to check that a method carries over)
    beta_schedule: str = "squaredcos_cap_v2"
    #: "ddpm" (the shipped model) or "spd" (Shortest Path Diffusion: per-frequency corruption)
    corruption: str = "ddpm"
    #: SPD's data spectrum: "fit" (c1/(c2+|f|)^m fitted to the train split), "authors" (their
    #: CIFAR-10 constants) or "empirical" (the train split's radial power spectrum)
    spd_spectrum: str = "fit"


@dataclass
class FashionTrainingConfig(TrainingConfig):
    """Hyper-parameters of ``diffguide train fashion`` (the shipped Fashion-MNIST model uses these)."""

    steps: int = 4000
    learning_rate: float = 3e-4
    warmup_steps: int = 200
    #: the first N train images only (tests); None: all 60,000
    train_images: int | None = None
    #: keyword arguments of :func:`~diffguide.models.pipeline.fashion_transformer` (tests: a tiny one)
    model: dict = field(default_factory=dict)


CORRUPTIONS = ("ddpm", "spd")
SPD_SPECTRA = ("fit", "authors", "empirical")


def spd_scheduler_for(data: torch.Tensor, spectrum: str, num_train_timesteps: int = 1000):
    """The ShortestPathScheduler for ``data`` (N, C, H, W) in [-1, 1] with the chosen spectrum."""
    from ..schedulers.spd import ShortestPathScheduler, fit_spectrum_parameters, radial_power_spectrum

    size = list(data.shape[-2:])
    if spectrum == "fit":
        return ShortestPathScheduler(num_train_timesteps, size, **fit_spectrum_parameters(data))
    if spectrum == "authors":
        return ShortestPathScheduler(num_train_timesteps, size)
    if spectrum == "empirical":
        return ShortestPathScheduler(num_train_timesteps, size, spectrum=radial_power_spectrum(data).tolist())
    raise ValueError(f"spd_spectrum must be one of {SPD_SPECTRA}, got {spectrum!r}")


def _lr_factor(step: int, config: DefaultTrainingConfig) -> float:
    """Linear warm-up, then cosine decay to zero at the last step."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _checkpoint_path(run_dir: Path) -> Path:
    return run_dir / "checkpoint.pt"


def read_checkpoint(path: Path, config) -> dict | None:
    """The state saved at ``path`` (``None`` if there is none); refused when it was written with
    another config (a dataclass), since resuming it would silently mix two runs."""
    if not path.exists():
        return None
    state = torch.load(path, weights_only=True)
    if state["config"] != asdict(config):
        raise ValueError(
            f"{path} was written with another config ({state['config']}); use a new --run-dir or the same settings"
        )
    return state


def write_checkpoint(path: Path, state: dict) -> None:
    """Save ``state`` to ``path`` through a temporary file, so an interruption never leaves half a file."""
    torch.save(state, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)


class _EpsilonObjective:
    """DDPM's (or SPD's) epsilon objective: ``x_t`` from the noise scheduler, target ``eps``."""

    def __init__(self, noise_scheduler, first_t: int):
        self.noise_scheduler, self.first_t = noise_scheduler, first_t

    def corrupt(self, x0: torch.Tensor, generator: torch.Generator):
        """``(x_t, model timestep, target, noise, timesteps)`` for a batch."""
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(
            self.first_t, self.noise_scheduler.config.num_train_timesteps + self.first_t, (len(x0),),
            generator=generator,
        )  # fmt: skip
        return self.noise_scheduler.add_noise(x0, noise, t), t, noise, noise, t


class FlowObjective:
    """Rectified flow (Liu et al., 2022; Esser et al., SD3, 2024): ``x_s = (1 - s) x0 + s noise``
    with ``s = sigmoid(n)``, ``n ~ N(0, 1)`` (SD3's logit-normal), target the velocity
    ``noise - x0``, the model called at timestep ``1000 s`` (FlowMatchEuler's convention)."""

    noise_scheduler = None

    def corrupt(self, x0: torch.Tensor, generator: torch.Generator):
        noise = torch.randn(x0.shape, generator=generator)
        s = torch.sigmoid(torch.randn(len(x0), generator=generator))
        s_ = s.reshape(-1, *([1] * (x0.ndim - 1)))
        return (1 - s_) * x0 + s_ * noise, s * 1000, noise - x0, noise, s * 1000


def train_default(
    output_dir: str | Path,
    run_dir: str | Path,
    config: DefaultTrainingConfig | None = None,
    progress: bool = True,
    stop_after_steps: int | None = None,
    callbacks: Sequence[Callback] = (),
) -> dict | None:
    """Train the default digits model and save it with ``save_pretrained`` in ``output_dir``.

    ``callbacks`` (:mod:`diffguide.callbacks`) run through a ``CallbackRunner``: their loss
    terms are added to the MSE and their state is part of the checkpoint. The context carries
    ``noise``, ``timesteps``, ``noise_scheduler`` and ``extras["x0"]`` /
    ``extras["model_kwargs"]``.

    ``run_dir`` holds the resumable checkpoint; re-running with the same ``run_dir`` continues
    from the last checkpoint. ``stop_after_steps`` ends the run early after a checkpoint
    (returning ``None``), as an interruption would. Returns the training record also written
    to ``output_dir/training.json``.
    """
    config = config or DefaultTrainingConfig()
    if config.corruption not in CORRUPTIONS:
        raise ValueError(f"corruption must be one of {CORRUPTIONS}, got {config.corruption!r}")
    if config.corruption == "spd" and config.beta_schedule != DefaultTrainingConfig.beta_schedule:
        raise ValueError("beta_schedule sets DDPM's noise schedule; SPD has its own: leave it at the default")
    torch.manual_seed(config.seed)
    images, labels = load_digits("train", source=config.source)
    data = images * 2 - 1
    num_classes = int(labels.max()) + 1
    unet = default_unet(sample_size=data.shape[-1], num_classes=num_classes)
    if config.corruption == "spd":
        noise_scheduler = spd_scheduler_for(data, config.spd_spectrum)
        first_t = 1  # SPD's t = 0 is the clean image; DDPM's t = 0 already has a little noise
    else:
        noise_scheduler = DDPMScheduler(**default_scheduler_config(config.beta_schedule))
        first_t = 0
    sampler = (
        noise_scheduler if config.corruption == "spd" else default_sampling_scheduler(config.beta_schedule)
    )

    def pipeline(model):
        return DigitsPipeline(unet=model, scheduler=sampler)

    def predict(model, noisy, t, y):
        return model(noisy, t, class_labels=y).sample

    return _train(
        unet, predict, pipeline, _EpsilonObjective(noise_scheduler, first_t), data, labels, num_classes,
        config, Path(output_dir), Path(run_dir), progress, stop_after_steps, callbacks, "train default",
    )  # fmt: skip


def train_fashion(
    output_dir: str | Path,
    run_dir: str | Path,
    config: FashionTrainingConfig | None = None,
    progress: bool = True,
    stop_after_steps: int | None = None,
    callbacks: Sequence[Callback] = (),
) -> dict | None:
    """Train the Fashion-MNIST flow-matching transformer (:func:`fashion_transformer`) on the
    train split and save a :class:`ClassConditionalTransformerPipeline` in ``output_dir``; the
    loop, checkpoints, resumption and callbacks are :func:`train_default`'s."""
    from .data import load_fashion
    from .pipeline import (
        ClassConditionalTransformerPipeline,
        disable_label_dropout,
        fashion_scheduler,
        fashion_transformer,
    )

    config = config or FashionTrainingConfig()
    torch.manual_seed(config.seed)
    images, labels = load_fashion("train")
    if config.train_images is not None:
        images, labels = images[: config.train_images], labels[: config.train_images]
    data = images * 2 - 1
    transformer = disable_label_dropout(fashion_transformer(**config.model))

    def pipeline(model):
        return ClassConditionalTransformerPipeline(transformer=model, scheduler=fashion_scheduler())

    def predict(model, noisy, t, y):
        return model(noisy, timestep=t, class_labels=y).sample

    return _train(
        transformer, predict, pipeline, FlowObjective(), data, labels, 10, config,
        Path(output_dir), Path(run_dir), progress, stop_after_steps, callbacks, "train fashion",
    )  # fmt: skip


def _train(
    model, predict, pipeline, objective, data, labels, num_classes, config, output_dir: Path, run_dir: Path,
    progress: bool, stop_after_steps: int | None, callbacks: Sequence[Callback], desc: str,
) -> dict | None:  # fmt: skip
    """The training loop both embedded models share (see :func:`train_default`)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.0)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, config))
    ema = EMAModel(model.parameters(), decay=config.ema_decay)
    generator = torch.Generator().manual_seed(config.seed)

    step, elapsed, order, cursor = 0, 0.0, torch.randperm(len(data), generator=generator), 0
    losses: list[float] = []
    runner = CallbackRunner(callbacks, model, optimizer, total_steps=config.steps)
    checkpoint = _checkpoint_path(run_dir)
    state = read_checkpoint(checkpoint, config)
    if state is not None:
        # callbacks first: their state may re-apply surgery (L0's pruning masks) that the
        # saved model's keys assume
        runner.load_state_dict(state.get("callbacks", runner.state_dict()))
        model.load_state_dict(state["unet"])
        optimizer.load_state_dict(state["optimizer"])
        lr_schedule.load_state_dict(state["lr_schedule"])
        ema.load_state_dict(state["ema"])
        generator.set_state(state["generator"])
        step, elapsed, order, cursor = state["step"], state["elapsed"], state["order"], state["cursor"]
        losses = state["losses"]
    runner.ctx.step = step

    def save_checkpoint() -> None:
        state = {
            "config": asdict(config),
            "unet": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "lr_schedule": lr_schedule.state_dict(),
            "ema": ema.state_dict(),
            "generator": generator.get_state(),
            "step": step,
            "elapsed": elapsed,
            "order": order,
            "cursor": cursor,
            "losses": losses,
            "callbacks": runner.state_dict(),
        }
        write_checkpoint(checkpoint, state)

    model.train()
    runner.train_begin()
    bar = tqdm(total=config.steps, initial=step, desc=desc, disable=not progress)
    while step < config.steps:
        started = time.perf_counter()
        if cursor + config.batch_size > len(order):
            order, cursor = torch.randperm(len(data), generator=generator), 0
        index = order[cursor : cursor + config.batch_size]
        cursor += config.batch_size
        x0, y = data[index], labels[index].clone()
        drop = torch.rand(len(y), generator=generator) < config.label_dropout
        y[drop] = num_classes
        noisy, model_t, target, noise, t = objective.corrupt(x0, generator)

        ctx = runner.step_begin((x0, y), noise=noise, timesteps=t, noise_scheduler=objective.noise_scheduler)
        ctx.extras = {"x0": x0, "model_kwargs": {"class_labels": y}}
        ctx.outputs = predict(model, noisy, model_t, y)
        mse = F.mse_loss(ctx.outputs, target)
        loss = runner.total_loss(mse)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        runner.optimizer_step()
        lr_schedule.step()
        ema.step(model.parameters())

        step += 1
        losses.append(mse.item())
        elapsed += time.perf_counter() - started
        bar.update()
        bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
        if step % config.checkpoint_every == 0 or step == config.steps:
            save_checkpoint()
        if stop_after_steps is not None and step >= stop_after_steps:
            save_checkpoint()
            bar.close()
            return None
    bar.close()
    runner.train_end()

    ema.copy_to(model.parameters())
    model.eval()
    pipe = pipeline(model)
    pipe.save_pretrained(output_dir, safe_serialization=True)
    record = {
        "config": asdict(config),
        "train_images": len(data),
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": step,
        "train_seconds": round(elapsed, 1),
        "torch_threads": torch.get_num_threads(),
        "final_loss_mean_last_100": sum(losses[-100:]) / len(losses[-100:]),
    }
    (output_dir / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return record
