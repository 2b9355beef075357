"""The training command is seeded and resumes exactly where it stopped."""

import json

import torch
from safetensors.torch import load_file

from diffguide.models.training import DefaultTrainingConfig, train_default


def _weights(folder):
    return load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))


def test_resumed_training_matches_uninterrupted(tmp_path, monkeypatch):
    from conftest import tiny_digits_unet

    import diffguide.models.training as training

    monkeypatch.setattr(
        training, "default_unet", lambda sample_size, num_classes: tiny_digits_unet(sample_size)
    )
    config = DefaultTrainingConfig(
        steps=6, batch_size=16, warmup_steps=2, source="sklearn", checkpoint_every=2
    )
    record = train_default(tmp_path / "straight", tmp_path / "run_a", config, progress=False)
    assert record["steps"] == 6
    assert (
        train_default(tmp_path / "resumed", tmp_path / "run_b", config, progress=False, stop_after_steps=3)
        is None
    )
    assert not (tmp_path / "resumed").exists()
    train_default(tmp_path / "resumed", tmp_path / "run_b", config, progress=False)
    straight, resumed = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert straight.keys() == resumed.keys()
    for name in straight:
        torch.testing.assert_close(straight[name], resumed[name], rtol=0, atol=0)
    saved = json.loads((tmp_path / "straight" / "training.json").read_text())
    assert saved["config"]["seed"] == 0 and saved["train_images"] == 1438


def test_resume_with_other_settings_is_refused(tmp_path, monkeypatch):
    import pytest
    from conftest import tiny_digits_unet

    import diffguide.models.training as training

    monkeypatch.setattr(
        training, "default_unet", lambda sample_size, num_classes: tiny_digits_unet(sample_size)
    )
    config = DefaultTrainingConfig(steps=2, batch_size=8, source="sklearn", checkpoint_every=1)
    train_default(tmp_path / "out", tmp_path / "run", config, progress=False, stop_after_steps=1)
    with pytest.raises(ValueError, match="another config"):
        train_default(
            tmp_path / "out",
            tmp_path / "run",
            DefaultTrainingConfig(steps=3, batch_size=8, source="sklearn", checkpoint_every=1),
            progress=False,
        )
