"""Shared fixtures: tiny offline pipelines with random weights, and the embedded default model."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DModel

import diffguide as dg
from diffguide.models.pipeline import default_sampling_scheduler


def tiny_digits_unet(sample_size: int = 8, num_classes: int = 10) -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        num_class_embeds=num_classes + 1,
    )


@pytest.fixture
def tiny_pipe() -> dg.DigitsPipeline:
    """A DigitsPipeline over an 8x8 random-weight UNet (plumbing only, no quality)."""
    scheduler = default_sampling_scheduler()
    pipe = dg.DigitsPipeline(unet=tiny_digits_unet(), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def default_pipe() -> dg.DigitsPipeline:
    return dg.load_default_pipeline()


@pytest.fixture(scope="session")
def judge():
    return dg.load_judge()
