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


def test_callbacks_run_inside_train_default_and_resume_with_their_state(tmp_path, monkeypatch):
    from conftest import tiny_digits_unet

    import diffguide.models.training as training
    from diffguide.callbacks import Callback

    class CountingPenalty(Callback):
        """An L2 term on the model's first weight, and a count of optimizer steps seen."""

        def __init__(self):
            self.steps = 0

        def loss_terms(self, ctx):
            assert ctx.noise is not None and ctx.timesteps is not None and "x0" in ctx.extras
            return {"l2": 1e-3 * next(ctx.model.parameters()).pow(2).sum()}

        def after_optimizer_step(self, ctx):
            self.steps += 1

        def state_dict(self):
            return {"steps": self.steps}

        def load_state_dict(self, state):
            self.steps = state["steps"]

    monkeypatch.setattr(
        training, "default_unet", lambda sample_size, num_classes: tiny_digits_unet(sample_size)
    )
    config = DefaultTrainingConfig(
        steps=4, batch_size=16, warmup_steps=1, source="sklearn", checkpoint_every=2
    )
    plain = train_default(tmp_path / "plain", tmp_path / "run_plain", config, progress=False)
    straight = CountingPenalty()
    train_default(tmp_path / "straight", tmp_path / "run_a", config, progress=False, callbacks=[straight])
    assert straight.steps == 4
    assert _weights(tmp_path / "straight").keys() == _weights(tmp_path / "plain").keys()
    assert plain["steps"] == 4
    first = CountingPenalty()
    train_default(
        tmp_path / "resumed",
        tmp_path / "run_b",
        config,
        progress=False,
        stop_after_steps=2,
        callbacks=[first],
    )
    second = CountingPenalty()
    train_default(tmp_path / "resumed", tmp_path / "run_b", config, progress=False, callbacks=[second])
    assert second.steps == 4  # 2 restored from the checkpoint + 2 more
    straight_w, resumed_w = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    for name in straight_w:
        torch.testing.assert_close(straight_w[name], resumed_w[name], rtol=0, atol=0)
    different = any(
        not torch.equal(straight_w[name], weight) for name, weight in _weights(tmp_path / "plain").items()
    )
    assert different  # the penalty changed the training
