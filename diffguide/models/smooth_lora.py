"""Smooth-LoRA training: a LoRA fine-tune with Smooth Diffusion's variation regularizer.

``diffguide train smooth-lora`` runs :func:`train_smooth_lora` on the embedded digits model;
the function itself takes any UNet (``UNet2DModel`` or ``UNet2DConditionModel``), its
training scheduler and a batch sampler, so SD-type models train the same way. The paper's
recipe: rank 8 on all attention projections, AdamW at a constant 1e-4, gradient clipping at
1.0, lambda = 1. ``capacity`` widens it to the convolutions (``"attention+conv"``) or to the
whole network (``"full"``, saved as a UNet folder). The loop runs through accelerate,
checkpoints the trained weights, optimizer, the regularizer's running target and the random
state, and resumes exactly.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..callbacks.base import CallbackRunner
from ..callbacks.smooth_diffusion import SmoothVariation
from ..smooth import CAPACITIES, SD15_MIN_ALPHA_BAR, add_lora, lora_state_dict, save_lora
from .training import read_checkpoint, write_checkpoint

BatchSampler = Callable[[torch.Generator], tuple[torch.Tensor, dict]]


@dataclass
class SmoothLoraConfig:
    """Hyper-parameters of a Smooth-LoRA run (``weight=0`` is the control run).

    ``min_alpha_bar``: the penalty skips timesteps with less signal than SD 1.5's last one
    (no-op on SD's own schedule; see :mod:`diffguide.smooth`). ``capacity``: a key of
    :data:`diffguide.smooth.CAPACITIES` (``rank`` applies to the LoRA ones). ``source``: the
    digits :func:`digits_batches` reads (``"mnist"`` 28x28 or ``"sklearn"`` 8x8). ``target_bands``:
    1 is the paper's single running target; more keep one per band of timesteps (ours)."""

    steps: int = 1000
    batch_size: int = 64
    learning_rate: float = 1e-4
    rank: int = 8
    weight: float = 1.0
    min_alpha_bar: float = SD15_MIN_ALPHA_BAR
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 100
    capacity: str = "attention"
    source: str = "mnist"
    target_bands: int = 1

    def __post_init__(self) -> None:
        if self.capacity not in CAPACITIES:
            raise ValueError(f"capacity must be one of {sorted(CAPACITIES)}, got {self.capacity!r}")


#: the digits a model of each image size was trained on (``load_digits``' sources)
DIGITS_SOURCES = {28: "mnist", 8: "sklearn"}


def digits_source(unet: torch.nn.Module) -> str:
    """``"mnist"`` for a 28x28 digits UNet, ``"sklearn"`` for an 8x8 one; ValueError otherwise."""
    size = unet.config.sample_size
    if size not in DIGITS_SOURCES:
        raise ValueError(f"a {size}x{size} model: Smooth-LoRA trains 28x28 or 8x8 digits models")
    return DIGITS_SOURCES[size]


def digits_batches(
    config: SmoothLoraConfig, num_classes: int = 10, label_dropout: float = 0.1
) -> BatchSampler:
    """Batches of the digits train split in [-1, 1] with labels (dropped to the null class at the
    rate the default model was trained with)."""
    from .data import load_digits

    images, labels = load_digits("train", source=config.source)
    data = images * 2 - 1

    def sample(generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        index = torch.randint(0, len(data), (config.batch_size,), generator=generator)
        y = labels[index].clone()
        y[torch.rand(len(y), generator=generator) < label_dropout] = num_classes
        return data[index], {"class_labels": y}

    return sample


def train_smooth_lora(
    unet: torch.nn.Module,
    noise_scheduler,
    sample_batch: BatchSampler,
    output_dir: str | Path,
    run_dir: str | Path,
    config: SmoothLoraConfig | None = None,
    progress: bool = True,
    stop_after_steps: int | None = None,
) -> dict | None:
    """Train a LoRA on ``unet`` (or, with ``capacity="full"``, all of it) with the denoising loss
    plus ``config.weight`` times the variation penalty; save it to ``output_dir`` (diffusers' LoRA
    format, or the UNet's ``save_pretrained`` folder ``output_dir/unet``). Returns the training
    record, or ``None`` when stopped early by ``stop_after_steps`` (resume with the same
    ``run_dir``)."""
    from accelerate import Accelerator
    from peft import set_peft_model_state_dict

    config = config or SmoothLoraConfig()
    output_dir, run_dir = Path(output_dir), Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    prediction_type = noise_scheduler.config.prediction_type
    full = CAPACITIES[config.capacity] is None
    if full:
        unet.requires_grad_(True)
    else:
        add_lora(unet, config.rank, CAPACITIES[config.capacity])
    parameters = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate)
    smooth = SmoothVariation(
        weight=config.weight, min_alpha_bar=config.min_alpha_bar, target_bands=config.target_bands
    )
    generator = torch.Generator().manual_seed(config.seed)
    step, elapsed, losses = 0, 0.0, []
    checkpoint = run_dir / "checkpoint.pt"
    state = read_checkpoint(checkpoint, config)
    if state is not None:
        if full:
            unet.load_state_dict(state["weights"])
        else:
            set_peft_model_state_dict(unet, {k.removeprefix("unet."): v for k, v in state["lora"].items()})
        optimizer.load_state_dict(state["optimizer"])
        smooth.load_state_dict(state["regularizer"])
        generator.set_state(state["generator"])
        step, elapsed, losses = state["step"], state["elapsed"], state["losses"]
    if stop_after_steps is not None and step > stop_after_steps:
        raise ValueError(f"{checkpoint} is already at step {step}, past stop_after_steps={stop_after_steps}")
    if stop_after_steps is not None and step == stop_after_steps:
        return None  # nothing to train: the checkpoint holds exactly this budget

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    unet, optimizer = accelerator.prepare(unet, optimizer)
    runner = CallbackRunner([smooth], unet, optimizer, total_steps=config.steps, accelerator=accelerator)
    runner.ctx.step = step

    def trained_weights() -> dict:
        model = accelerator.unwrap_model(unet)
        if full:
            return {"weights": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
        return {"lora": lora_state_dict(model)}

    def save_checkpoint() -> None:
        state = {
            "config": asdict(config),
            **trained_weights(),
            "optimizer": optimizer.state_dict(),
            "regularizer": smooth.state_dict(),
            "generator": generator.get_state(),
            "step": step,
            "elapsed": elapsed,
            "losses": losses,
        }
        write_checkpoint(checkpoint, state)

    unet.train()
    bar = tqdm(total=config.steps, initial=step, desc="smooth-lora", disable=not progress)
    while step < config.steps:
        started = time.perf_counter()
        x0, cond = sample_batch(generator)
        x0 = x0.to(accelerator.device)
        cond = {k: v.detach().to(accelerator.device) for k, v in cond.items()}  # conditioning is not trained
        noise = torch.randn(x0.shape, generator=generator).to(accelerator.device)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(x0),), generator=generator)
        t = t.to(accelerator.device)
        noisy = noise_scheduler.add_noise(x0, noise, t)
        target = noise if prediction_type == "epsilon" else noise_scheduler.get_velocity(x0, noise, t)
        runner.step_begin(
            (x0, cond), noise=noise, timesteps=t, noise_scheduler=noise_scheduler,
        ).extras = {"x0": x0, "model_kwargs": cond, "generator": generator}  # fmt: skip
        denoising = F.mse_loss(unet(noisy, t, **cond).sample, target)
        loss = runner.total_loss(denoising)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(parameters, config.grad_clip)
        runner.optimizer_step()
        step += 1
        losses.append([denoising.item(), runner.ctx.logs.get("variation", 0.0)])
        elapsed += time.perf_counter() - started
        bar.update()
        bar.set_postfix(
            mse=f"{denoising.item():.4f}",
            penalty=f"{losses[-1][1]:.4f}",
            target=f"{smooth.regularizer.target:.3f}",
        )
        if step % config.checkpoint_every == 0 or step == config.steps:
            save_checkpoint()
        if stop_after_steps is not None and step >= stop_after_steps:
            save_checkpoint()
            bar.close()
            return None
    bar.close()
    record = training_record(asdict(config), step, elapsed, losses, smooth.regularizer.target, parameters)
    save_trained(accelerator.unwrap_model(unet), config.capacity, output_dir, record)
    return record


def training_record(
    config: dict, step: int, elapsed: float, losses: list, running_target: float, parameters: list
) -> dict:
    """What ``training.json`` holds: the config, the step reached, seconds, the last 100 steps'
    mean MSE and penalty, the running target and the number of trained parameters."""
    tail = losses[-100:]
    return {
        "config": config,
        "steps": step,
        "train_seconds": round(elapsed, 1),
        "final_mse_mean_last_100": sum(m for m, _ in tail) / len(tail),
        "final_penalty_mean_last_100": sum(p for _, p in tail) / len(tail),
        "running_target": running_target,
        "trained_parameters": sum(p.numel() for p in parameters),
    }


def save_trained(unet: torch.nn.Module, capacity: str, folder: str | Path, record: dict) -> None:
    """Write what a run trained to ``folder``: the LoRA (diffusers' format) or, for a full
    fine-tune, the UNet's ``save_pretrained`` folder ``folder/unet``; and ``training.json``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if CAPACITIES[capacity] is None:
        unet.save_pretrained(folder / "unet")
    else:
        save_lora(unet, folder)
    (folder / "training.json").write_text(json.dumps(record, indent=2) + "\n")
