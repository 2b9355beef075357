"""The judges: a small CNN classifier per embedded dataset (digits, Fashion-MNIST), trained on
its train split only.

It has two jobs. Its predictions say whether a generated sample shows the class that was
asked for; its penultimate features (``features``, 128-d) are the domain feature space in
which the project computes Frechet distances for the default model, the way Inception
features serve natural images.

Input: images (B, 1, 28, 28) in [0, 1], the format ``output_type="pt"`` gives.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .data import load_digits, load_fashion

#: dataset name -> (split loader, default epochs)
DATASETS = {"digits": (load_digits, 30), "fashion": (load_fashion, 15)}

FEATURE_DIM = 128


class DigitJudge(nn.Module):
    """Conv(32)-Conv(32)-pool-Conv(64)-Conv(64)-pool-FC(128)-FC(classes)."""

    def __init__(self, num_classes: int = 10, image_size: int = 28):
        super().__init__()
        self.num_classes, self.image_size = num_classes, image_size
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.MaxPool2d(2),
        )  # fmt: skip
        self.embed = nn.Sequential(
            nn.Flatten(), nn.Dropout(0.3), nn.Linear(64 * (image_size // 4) ** 2, FEATURE_DIM), nn.ReLU()
        )
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(FEATURE_DIM, num_classes))

    def _check(self, images: torch.Tensor) -> torch.Tensor:
        expected = (1, self.image_size, self.image_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"the judge takes images of shape (B, {', '.join(map(str, expected))}) in [0, 1]; "
                f"got {tuple(images.shape)}"
            )
        return (images - 0.5) / 0.5

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features (B, 128): the domain feature space for Frechet distance."""
        return self.embed(self.conv(self._check(images)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits (B, num_classes)."""
        return self.head(self.features(images))


def _augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random translations of up to 2 pixels, small rotations and scalings."""
    n = images.shape[0]
    angle = (torch.rand(n, generator=generator) - 0.5) * (2 * 0.2)  # +-11 degrees
    scale = 1 + (torch.rand(n, generator=generator) - 0.5) * 0.2
    shift = (torch.rand(n, 2, generator=generator) - 0.5) * (2 * 2 / 14)  # +-2 px in [-1, 1] units
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, align_corners=False, padding_mode="zeros")


def train_judge(
    output_dir: str | Path,
    epochs: int | None = None,
    seed: int = 0,
    progress: bool = True,
    dataset: str = "digits",
) -> dict:
    """Train the judge of ``dataset`` on its train split, report its test accuracy (overall and
    per class), save it as safetensors. ``epochs``: 30 for digits, 15 for Fashion-MNIST."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown judge dataset {dataset!r}; choose from {', '.join(DATASETS)}")
    load_split, default_epochs = DATASETS[dataset]
    epochs = default_epochs if epochs is None else epochs
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images, labels = load_split("train")
    model = DigitJudge()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    batches_per_epoch = (len(images) + 127) // 128
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 2e-3, total_steps=epochs * batches_per_epoch)
    started = time.perf_counter()
    for _ in tqdm(range(epochs), desc="train judge", disable=not progress):
        model.train()
        order = torch.randperm(len(images), generator=generator)
        for i in range(0, len(images), 128):
            index = order[i : i + 128]
            loss = F.cross_entropy(model(_augment(images[index], generator)), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    test_images, test_labels = load_split("test")
    with torch.no_grad():
        correct = torch.cat(
            [model(test_images[i : i + 1000]).argmax(1) for i in range(0, len(test_images), 1000)]
        )
        correct = correct == test_labels
    accuracy = correct.float().mean().item()
    per_class = [correct[test_labels == c].float().mean().item() for c in range(model.num_classes)]
    save_file(model.state_dict(), str(output_dir / "judge.safetensors"))
    record = {
        "dataset": dataset,
        "epochs": epochs,
        "seed": seed,
        "train_images": len(images),
        "test_accuracy": accuracy,
        "test_accuracy_per_class": [round(a, 4) for a in per_class],
        "train_seconds": round(time.perf_counter() - started, 1),
    }
    (output_dir / "judge.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def load_judge_from(path: str | Path) -> DigitJudge:
    """Load a judge saved by :func:`train_judge` (a folder or the .safetensors file), in eval mode."""
    path = Path(path)
    if path.is_dir():
        path = path / "judge.safetensors"
    if not path.exists():
        raise FileNotFoundError(
            f"no judge weights at {path}; train them with `diffguide train judge` (--dataset)"
        )
    try:
        state = load_file(str(path))
    except Exception as err:
        raise ValueError(f"{path} is not a readable safetensors judge checkpoint ({err})") from err
    model = DigitJudge()
    model.load_state_dict(state)
    return model.eval()
