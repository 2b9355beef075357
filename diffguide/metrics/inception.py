"""Standard Inception-v3 (2015-12-05) features for FID, loaded from a local weight file only.

FID as published (Heusel et al., NeurIPS 2017) uses the 2048-d pool features of the
TensorFlow Inception-v3 graph of 2015-12-05. Two ports of it are in wide use, and both are
accepted here, from a path the user gives; nothing is ever downloaded:

- ``inception-2015-12-05.pt``: NVIDIA's TorchScript export (StyleGAN2-ADA, clean-fid). Plain
  ``torch.jit.load``; needs no other package. Called as ``model(uint8_images,
  return_features=True)``; it resizes to 299x299 itself.
- ``weights-inception-2015-12-05-6726825d.pth``: torch-fidelity's state dict (torchmetrics'
  FID builds on it). Loaded through ``torch_fidelity.FeatureExtractorInceptionV3`` with
  ``feature_extractor_weights_path``; torch-fidelity imports torchvision, which must therefore
  import beside the installed torch.

Both take uint8 images, as the original graph did, so our [0, 1] tensors are quantized to
0..255 first and grey images are repeated to three channels.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import torch

TORCHSCRIPT_FILE = "inception-2015-12-05.pt"
TORCH_FIDELITY_FILE = "weights-inception-2015-12-05-6726825d.pth"
FEATURE_DIM = 2048


def to_uint8_rgb(images: torch.Tensor) -> torch.Tensor:
    """(B, 1 or 3, H, W) floats in [0, 1] to (B, 3, H, W) uint8, as the 2015 graph expects."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images (B, 1 or 3, H, W), got shape {tuple(images.shape)}")
    quantized = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    return quantized.expand(-1, 3, -1, -1) if quantized.shape[1] == 1 else quantized


class InceptionFeatures(torch.nn.Module):
    """Maps images in [0, 1] to the 2048-d pool features of either Inception port."""

    def __init__(self, network: torch.nn.Module, kind: str):
        super().__init__()
        self.network = network
        self.kind = kind

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = to_uint8_rgb(images)
        if self.kind == "torchscript":
            return self.network(pixels, return_features=True)
        (features,) = self.network(pixels)
        return features


def load_inception(weights_path: str | Path | None) -> InceptionFeatures:
    """Inception features from ``weights_path`` (either port above); a clear error otherwise."""
    expected = f"{TORCHSCRIPT_FILE} (TorchScript, no extra package) or {TORCH_FIDELITY_FILE} (torch-fidelity)"
    if weights_path is None:
        raise FileNotFoundError(f"Inception features need a local weight file: pass {expected}")
    path = Path(weights_path)
    if not path.is_file():
        raise FileNotFoundError(f"Inception weight file {path} does not exist; expected {expected}")
    if _is_torchscript(path):
        try:
            network = torch.jit.load(str(path), map_location="cpu").eval()
        except RuntimeError as err:
            raise ValueError(f"{path} is a TorchScript archive that does not load: {err}") from None
        return InceptionFeatures(network, "torchscript")
    try:
        from torch_fidelity import FeatureExtractorInceptionV3
    except Exception as err:  # torchvision built for another torch fails with RuntimeError
        raise ImportError(
            f"{path} is not TorchScript, so it is read as torch-fidelity's {TORCH_FIDELITY_FILE}, and "
            f"torch-fidelity (with a torchvision matching your torch) does not import: {err}. Install "
            f"both, or pass NVIDIA's TorchScript {TORCHSCRIPT_FILE}, which needs neither."
        ) from None
    try:
        network = FeatureExtractorInceptionV3(
            "inception-v3-compat", [str(FEATURE_DIM)], feature_extractor_weights_path=str(path)
        )
    except Exception as err:
        raise ValueError(f"cannot load {path} as {TORCH_FIDELITY_FILE}: {err}") from None
    return InceptionFeatures(network.eval(), "torch-fidelity")


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        # torch.save archives are zips too; only TorchScript ones carry compiled code.
        return any("/code/" in name for name in archive.namelist())
