"""Feature extraction for distribution metrics, image folders, and cached reference statistics.

Features come from the judge network's 128-d penultimate layer (the domain space for the
default digits model), from the standard Inception-v3 (``inception.py``), or from any ``torch.nn.Module`` the caller passes that maps images
(B, C, H, W) in [0, 1] to (B, D). Reference statistics are cached in ``.npz`` files that
record which extractor and which data produced them, so a file is never compared against
features of another kind.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import torch
from tqdm.auto import tqdm

from .frechet import gaussian_stats

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def load_image_folder(folder: str | Path, channels: int = 1, size: int | None = None) -> torch.Tensor:
    """All images in ``folder`` (sorted by name) as (N, channels, H, W) float32 in [0, 1].

    One rule for mixed folders: every image is converted to ``L`` (channels=1) or ``RGB``
    (channels=3) and, where its size differs from the target, resized with bicubic filtering
    to ``size`` x ``size``, or to the first image's size when ``size`` is None.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"image folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return load_image_files(files, channels, size, desc=f"reading {folder.name}")


def load_image_files(
    files: list[Path], channels: int = 1, size: int | None = None, desc: str = "reading"
) -> torch.Tensor:
    """``files`` as (N, channels, H, W) float32 in [0, 1], by :func:`load_image_folder`'s rule."""
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    target = (size, size) if size is not None else None
    arrays = []
    # a bar only where a load takes noticeable time, and only on a terminal (disable=None)
    for path in tqdm(files, desc=desc, unit="img", disable=True if len(files) < 2000 else None):
        try:
            image = PIL.Image.open(path).convert(mode)
        except (OSError, PIL.UnidentifiedImageError) as err:
            raise ValueError(f"cannot read image {path}: {err}") from None
        target = target or image.size
        if image.size != target:
            image = image.resize(target, PIL.Image.BICUBIC)
        arrays.append(np.asarray(image, dtype=np.float32).reshape(image.height, image.width, channels))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 255.0


@torch.no_grad()
def extract_features(images: torch.Tensor, extractor: torch.nn.Module, batch_size: int = 500) -> torch.Tensor:
    """Features (N, D) of images (N, C, H, W) in [0, 1]; the judge gives its penultimate layer."""
    forward = getattr(extractor, "features", extractor)
    parameter = next(extractor.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    chunks = [
        forward(images[i : i + batch_size].to(device)).flatten(1).cpu()
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(chunks).double()


def save_stats(
    path: str | Path, mu: np.ndarray, sigma: np.ndarray, key: str, features: np.ndarray | None = None
) -> Path:
    """Write reference statistics with the ``key`` naming extractor and data; ``features``
    (N, D) are kept too when given, for the k-NN metrics (precision/recall, density/coverage)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = {} if features is None else {"features": np.asarray(features, dtype=np.float32)}
    np.savez(path, mu=mu, sigma=sigma, key=np.array(key), **extra)
    return path


def load_stats_features(path: str | Path, key: str | None = None) -> np.ndarray:
    """The features saved with statistics (``diffguide eval stats --with-features``)."""
    load_stats(path, key)
    with np.load(Path(path), allow_pickle=False) as data:
        if "features" not in data:
            raise ValueError(
                f"{path} holds statistics without features; the k-NN metrics need them: "
                "rewrite it with `diffguide eval stats FOLDER --out FILE --with-features`"
            )
        return data["features"].astype(np.float64)


def load_stats(path: str | Path, key: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read statistics saved by :func:`save_stats`; refuse a file made with another ``key``."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            mu, sigma, saved_key = data["mu"], data["sigma"], str(data["key"])
    except (OSError, KeyError, ValueError) as err:
        raise ValueError(f"{path} is not a diffguide statistics file ({err})") from err
    if key is not None and saved_key != key:
        raise ValueError(f"{path} holds statistics for {saved_key!r}, not {key!r}; recompute them")
    return mu, sigma


def reference_stats(
    images: torch.Tensor, extractor: torch.nn.Module, cache: str | Path | None = None, key: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of the features of ``images``, read from ``cache`` when present."""
    if cache is not None and Path(cache).exists():
        return load_stats(cache, key)
    mu, sigma = gaussian_stats(extract_features(images, extractor))
    if cache is not None:
        save_stats(cache, mu, sigma, key or "unnamed")
    return mu, sigma
