"""Inception features come only from a local file, with clear errors otherwise."""

import PIL.Image
import pytest
import torch

from diffguide.cli import main
from diffguide.metrics.inception import FEATURE_DIM, TORCHSCRIPT_FILE, load_inception, to_uint8_rgb


class _StandInInception(torch.nn.Module):
    """Same call contract as NVIDIA's TorchScript Inception: uint8 (B, 3, H, W) -> (B, 2048)."""

    def forward(self, images: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        assert images.dtype == torch.uint8 and images.shape[1] == 3
        pooled = images.float().mean(dim=(2, 3))  # (B, 3)
        return pooled.repeat(1, 2048 // 3 + 1)[:, :2048]


@pytest.fixture
def torchscript_file(tmp_path):
    path = tmp_path / TORCHSCRIPT_FILE
    torch.jit.save(torch.jit.script(_StandInInception()), str(path))
    return path


def test_to_uint8_rgb_quantizes_and_repeats_grey():
    grey = torch.tensor([0.0, 0.5, 1.0, 1.2]).reshape(1, 1, 2, 2)
    rgb = to_uint8_rgb(grey)
    assert rgb.dtype == torch.uint8 and rgb.shape == (1, 3, 2, 2)
    assert rgb[0, :, 0, 1].tolist() == [128, 128, 128] and rgb[0, 0, 1, 1] == 255


def test_torchscript_inception_gives_2048_features_of_uint8_pixels(torchscript_file):
    extractor = load_inception(torchscript_file)
    images = torch.rand(5, 1, 28, 28)
    features = extractor(images)
    assert features.shape == (5, FEATURE_DIM)
    expected = (images * 255).round().mean(dim=(1, 2, 3))
    torch.testing.assert_close(features[:, 0], expected)


def test_missing_inception_weights_name_the_expected_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=TORCHSCRIPT_FILE):
        load_inception(None)
    with pytest.raises(FileNotFoundError, match="does not exist.*inception-2015-12-05"):
        load_inception(tmp_path / "nothing.pt")


def test_a_non_torchscript_file_is_refused_with_a_reason(tmp_path):
    garbage = tmp_path / "weights.pth"
    garbage.write_bytes(b"not weights")
    with pytest.raises((ImportError, ValueError), match="weights.pth"):
        load_inception(garbage)


def test_cli_inception_features_and_errors(torchscript_file, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        PIL.Image.new("RGB", (16 + i, 16), color=(60 * i, 10, 200)).save(folder / f"{i}.png")
    args = ["eval", "fid", str(folder), str(folder), "--features", "inception"]
    assert main([*args, "--inception-weights", str(torchscript_file)]) == 0
    assert "FD (inception features): 0.0000" in capsys.readouterr().out
    assert main(args) == 2
    assert TORCHSCRIPT_FILE in capsys.readouterr().err
