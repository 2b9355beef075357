"""Smooth Diffusion's variation regularizer against its analytic value for a linear denoiser."""

import pytest
import torch

from diffguide.attention import use_twice_differentiable_attention
from diffguide.smooth import (
    CAPACITIES,
    VariationRegularizer,
    spread_statistics,
    variation_norms,
    variation_table,
)


def _linear_setup(prediction_type="epsilon"):
    torch.manual_seed(0)
    weight = torch.randn(4, 4, dtype=torch.float64) * 0.3

    def denoise(x_t, t):
        return (x_t.flatten(1) @ weight.T).reshape(x_t.shape)

    x0 = torch.randn(3, 1, 2, 2, dtype=torch.float64)
    noise = torch.randn(3, 1, 2, 2, dtype=torch.float64)
    abar = torch.linspace(0.999, 0.01, 1000, dtype=torch.float64)
    t = torch.tensor([10, 500, 900])
    return weight, denoise, x0, noise, abar, t


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_regularizer_gradient_norm_equals_its_analytic_value_for_a_linear_denoiser(prediction_type):
    weight, denoise, x0, noise, abar, t = _linear_setup()
    norms = variation_norms(denoise, x0, noise, t, abar, prediction_type, torch.Generator().manual_seed(7))
    probe = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    expected = []
    for i in range(3):
        a, s = abar[t[i]].sqrt(), (1 - abar[t[i]]).sqrt()
        n = probe[i].flatten() / 2.0 * s  # / sqrt(C H W) = / 2, times sqrt(1 - abar)
        # x_t = a x0 + s eps; d x_t / d eps = s I
        if prediction_type == "epsilon":  # x0_hat = (x_t - s W x_t) / a
            jacobian = (torch.eye(4, dtype=torch.float64) - s * weight) * s / a
        else:  # x0_hat = a x_t - s W x_t
            jacobian = (a * torch.eye(4, dtype=torch.float64) - s * weight) * s
        expected.append((jacobian.T @ n).norm())
    torch.testing.assert_close(norms, torch.stack(expected))


def test_the_penalty_is_differentiable_through_the_model():
    weight, _, x0, noise, abar, t = _linear_setup()
    weight = weight.clone().requires_grad_(True)
    norms = variation_norms(lambda x, _t: (x.flatten(1) @ weight.T).reshape(x.shape), x0, noise, t, abar)
    norms.sum().backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0


def test_running_target_moves_by_the_decay_and_survives_a_checkpoint():
    regularizer = VariationRegularizer(weight=1.0, decay=0.01)
    assert regularizer.update_target(torch.tensor([2.0, 4.0])) == pytest.approx(0.03)
    assert regularizer.update_target(torch.tensor([3.0])) == pytest.approx(0.03 + 0.01 * (3.0 - 0.03))
    restored = VariationRegularizer()
    restored.load_state_dict(regularizer.state_dict())
    assert restored.target == regularizer.target


def test_penalty_is_measured_against_the_target_after_the_update_as_the_authors_code_does():
    _, denoise, x0, noise, abar, t = _linear_setup()
    regularizer = VariationRegularizer(weight=2.0)
    norms = variation_norms(denoise, x0, noise, t, abar, generator=torch.Generator().manual_seed(0))
    penalty = regularizer.loss(denoise, x0, noise, t, abar, generator=torch.Generator().manual_seed(0))
    moved = 0.01 * norms.mean()  # a was 0: a' = 0 + 0.01 (mean v - 0)
    torch.testing.assert_close(penalty, 2.0 * ((norms - moved) ** 2).mean())
    assert regularizer.target == pytest.approx(float(moved))


def test_min_alpha_bar_leaves_low_signal_timesteps_out_of_penalty_and_target():
    _, denoise, x0, noise, abar, t = _linear_setup()  # abar at t = 10, 500, 900: 0.989, 0.504, 0.109
    regularizer = VariationRegularizer(weight=1.0, min_alpha_bar=0.3)
    norms = variation_norms(denoise, x0, noise, t, abar, generator=torch.Generator().manual_seed(0))
    penalty = regularizer.loss(denoise, x0, noise, t, abar, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(penalty, ((norms[:2] - 0.01 * norms[:2].mean()) ** 2).mean())
    assert regularizer.target == pytest.approx(0.01 * float(norms[:2].mean()))
    assert float(VariationRegularizer(min_alpha_bar=0.999).loss(denoise, x0, noise, t, abar)) == 0.0
    restored = VariationRegularizer()
    restored.load_state_dict(regularizer.state_dict())
    assert restored.min_alpha_bar == 0.3
    with pytest.raises(ValueError, match="min_alpha_bar"):
        VariationRegularizer(min_alpha_bar=1.0)


def test_lambda_zero_adds_nothing_and_calls_no_network():
    calls = []
    regularizer = VariationRegularizer(weight=0.0)
    penalty = regularizer.loss(lambda x, t: calls.append(1) or x, torch.zeros(2, 1, 2, 2), torch.zeros(2, 1, 2, 2),
                               torch.zeros(2, dtype=torch.long), torch.ones(10))  # fmt: skip
    assert float(penalty) == 0.0 and not calls and regularizer.target == 0.0
    with pytest.raises(ValueError):
        VariationRegularizer(weight=-1.0)


def test_plain_attention_allows_double_backward_on_cpu():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=8,
    )  # fmt: skip
    abar = torch.linspace(0.999, 0.01, 1000)

    def norms_of(model):
        return variation_norms(lambda x, t: model(x, t).sample, torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8),
                               torch.tensor([100, 700]), abar)  # fmt: skip

    with pytest.raises(RuntimeError, match="not implemented"):  # torch's fused CPU attention
        norms_of(unet).sum().backward()
    unet.zero_grad()
    assert set(use_twice_differentiable_attention(unet)) == {"sdpa"}
    norms = norms_of(unet)
    norms.sum().backward()  # would raise with the fused CPU attention
    attention = [p for name, p in unet.named_parameters() if "attentions" in name and name.endswith("weight")]
    assert attention and all(p.grad is not None and p.grad.abs().sum() > 0 for p in attention)


def _sd_batches(pipe):
    embeddings = pipe.encode_prompt(["a cat", "a dog"], "cpu", 1, False)[0]

    def sample(generator):
        latents = torch.randn(2, 4, 8, 8, generator=generator)
        return latents, {"encoder_hidden_states": embeddings}

    return sample


def test_smooth_lora_on_sd_round_trips_through_load_lora_weights(tmp_path):
    from tiny_pipelines import tiny_sd

    from diffguide.models.smooth_lora import SmoothLoraConfig, train_smooth_lora

    trainer = tiny_sd()
    config = SmoothLoraConfig(steps=2, batch_size=2, learning_rate=1e-2, rank=4, checkpoint_every=1)
    record = train_smooth_lora(trainer.unet, trainer.scheduler, _sd_batches(trainer), tmp_path / "lora",
                               tmp_path / "run", config, progress=False)  # fmt: skip
    assert record["steps"] == 2 and record["running_target"] > 0

    def run(pipe):
        kwargs = {"num_inference_steps": 2, "output_type": "latent", "guidance_scale": 3.0}
        return pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images

    fresh = tiny_sd()
    base = run(fresh)
    fresh.load_lora_weights(tmp_path / "lora")
    assert (run(fresh) - base).abs().max() > 1e-4  # the LoRA changes the outputs
    fresh.unload_lora_weights()
    torch.testing.assert_close(run(fresh), base)


def test_smooth_lora_resumes_exactly_and_loads_into_digits_pipelines(tmp_path, tiny_pipe):
    from diffguide.models.smooth_lora import SmoothLoraConfig, train_smooth_lora
    from diffguide.models.training import DDPMScheduler, default_scheduler_config

    def unet_with_attention():
        torch.manual_seed(0)
        from diffusers import UNet2DModel

        return UNet2DModel(
            sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=4, attention_head_dim=8, num_class_embeds=11,
        )  # fmt: skip

    config = SmoothLoraConfig(steps=4, batch_size=4, learning_rate=1e-2, rank=2, checkpoint_every=2)
    scheduler = DDPMScheduler(**default_scheduler_config())

    def small(generator):
        return torch.randn(4, 1, 8, 8, generator=generator), {"class_labels": torch.tensor([1, 2, 3, 10])}

    train_smooth_lora(
        unet_with_attention(), scheduler, small, tmp_path / "a", tmp_path / "run_a", config, progress=False
    )
    assert train_smooth_lora(unet_with_attention(), scheduler, small, tmp_path / "b", tmp_path / "run_b", config,
                             progress=False, stop_after_steps=2) is None  # fmt: skip
    train_smooth_lora(
        unet_with_attention(), scheduler, small, tmp_path / "b", tmp_path / "run_b", config, progress=False
    )
    from safetensors.torch import load_file

    straight, resumed = (
        load_file(str(tmp_path / "a" / "pytorch_lora_weights.safetensors")),
        load_file(str(tmp_path / "b" / "pytorch_lora_weights.safetensors")),
    )
    assert straight.keys() == resumed.keys() and straight
    for key in straight:
        torch.testing.assert_close(straight[key], resumed[key], rtol=0, atol=0)

    import diffguide as dg

    pipe = dg.DigitsPipeline(unet=unet_with_attention(), scheduler=tiny_pipe.scheduler)
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"num_inference_steps": 2, "output_type": "pt"}
    base = pipe([1, 2], generator=torch.Generator().manual_seed(0), **kwargs).images
    pipe.load_lora_weights(tmp_path / "a")
    assert (
        pipe([1, 2], generator=torch.Generator().manual_seed(0), **kwargs).images - base
    ).abs().max() > 1e-5
    pipe.unload_lora_weights()
    assert torch.equal(pipe([1, 2], generator=torch.Generator().manual_seed(0), **kwargs).images, base)
    with pytest.raises(FileNotFoundError):
        pipe.load_lora_weights(tmp_path / "missing")


def test_digits_batches_are_train_digits_in_minus_one_one_with_labels_dropped_to_the_null_class():
    from diffguide.models.data import load_digits
    from diffguide.models.smooth_lora import SmoothLoraConfig, digits_batches

    train, train_labels = load_digits("train")
    test, _ = load_digits("test")
    config = SmoothLoraConfig(batch_size=1000)

    def nearest(batch, pool):  # distance to, and index of, the closest pool image in [0, 1]
        distances = torch.cdist(((batch + 1) / 2).flatten(1).double(), pool.flatten(1).double())
        return distances.min(dim=1)

    images, extra = digits_batches(config, label_dropout=0.0)(torch.Generator().manual_seed(0))
    assert images.shape == (1000, 1, 28, 28) and images.min() == -1 and images.max() == 1
    distance, index = nearest(images, train)
    assert distance.max() < 1e-5  # every image is a train digit mapped to [-1, 1] by 2 p - 1
    assert nearest(images, test)[0].min() > 1.0  # and none is a test digit
    assert torch.equal(extra["class_labels"], train_labels[index])  # its own label when not dropped

    images, extra = digits_batches(config, label_dropout=0.25)(torch.Generator().manual_seed(1))
    labels, own = extra["class_labels"], train_labels[nearest(images, train)[1]]
    dropped = labels == 10
    assert torch.equal(labels[~dropped], own[~dropped])
    assert abs(dropped.double().mean().item() - 0.25) < 0.06  # 4.4 standard errors of 1000 draws
    assert (digits_batches(config, label_dropout=1.0)(torch.Generator())[1]["class_labels"] == 10).all()


def test_spread_splits_into_within_and_between_timestep_parts():
    table = torch.tensor([[1.0, 3.0, 2.0], [4.0, 6.0, 8.0]], dtype=torch.float64)
    stats = spread_statistics(table)
    flat = table.flatten()
    assert stats["mean"] == pytest.approx(float(flat.mean()))
    assert stats["std"] == pytest.approx(float(flat.std(unbiased=False)))
    within = ((2 / 3) + (8 / 3)) / 2  # the two rows' population variances
    assert stats["within_std"] == pytest.approx(within**0.5)
    assert stats["between_std"] == pytest.approx(2.0)  # row means 2 and 6
    assert stats["std"] ** 2 == pytest.approx(stats["within_std"] ** 2 + stats["between_std"] ** 2)
    assert stats["cv"] == pytest.approx(stats["std"] / stats["mean"])
    with pytest.raises(ValueError, match="samples >= 2"):
        spread_statistics(torch.ones(3, 1))


def test_variation_table_is_variation_norms_on_seeded_draws_and_repeats_exactly():
    _, denoise, x0, _, abar, _ = _linear_setup()
    timesteps = torch.tensor([10, 500])
    table = variation_table(denoise, x0, timesteps, abar, seed=3)
    assert table.shape == (2, 3) and not table.requires_grad
    for row, timestep in enumerate(timesteps.tolist()):
        generator = torch.Generator().manual_seed(3 * 1_000_003 + row)
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
        expected = variation_norms(denoise, x0, noise, torch.full((3,), timestep), abar, generator=generator)
        torch.testing.assert_close(table[row], expected.detach())
    torch.testing.assert_close(variation_table(denoise, x0, timesteps, abar, seed=3), table)


def _unet_with_attention(num_class_embeds=11):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=8, num_class_embeds=num_class_embeds,
    )  # fmt: skip


@pytest.mark.parametrize("capacity", ["attention+conv", "full"])
def test_wider_capacities_train_what_they_name_and_load_back(tmp_path, capacity):
    from diffusers import UNet2DModel
    from safetensors.torch import load_file

    from diffguide.models.smooth_lora import SmoothLoraConfig, train_smooth_lora
    from diffguide.models.training import DDPMScheduler, default_scheduler_config

    config = SmoothLoraConfig(steps=2, batch_size=2, learning_rate=1e-2, rank=2, capacity=capacity)

    def small(generator):
        return torch.randn(2, 1, 8, 8, generator=generator), {"class_labels": torch.tensor([1, 10])}

    unet = _unet_with_attention()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    record = train_smooth_lora(unet, DDPMScheduler(**default_scheduler_config()), small, tmp_path / "out",
                               tmp_path / "run", config, progress=False)  # fmt: skip
    if capacity == "full":
        assert record["trained_parameters"] == sum(p.numel() for p in _unet_with_attention().parameters())
        trained = UNet2DModel.from_pretrained(tmp_path / "out" / "unet")
        changed = [k for k, v in trained.state_dict().items() if not torch.equal(v, before[k])]
        assert any("resnets" in k for k in changed) and any("attentions" in k for k in changed)
    else:
        keys = load_file(str(tmp_path / "out" / "pytorch_lora_weights.safetensors")).keys()
        modules = {key.split(".lora_")[0].rsplit(".", 1)[-1] for key in keys}
        assert modules == {"to_q", "to_k", "to_v", "0", "conv1", "conv2"}  # "0": to_out.0
        from diffguide.smooth import load_lora_into

        loaded = load_lora_into(_unet_with_attention(), tmp_path / "out")
        wrapped = {name.rsplit(".", 1)[-1] for name, m in loaded.named_modules() if hasattr(m, "lora_A")}
        assert {"conv1", "conv2", "to_q"} <= wrapped
    with pytest.raises(ValueError, match="capacity"):
        SmoothLoraConfig(capacity="everything")
    assert set(CAPACITIES) == {"attention", "attention+conv", "full"}


def test_cli_trains_on_the_base_models_own_schedule_and_writes_a_pipeline_for_full(tmp_path, monkeypatch):
    import diffguide as dg
    from diffguide.cli import main
    from diffguide.models import smooth_lora
    from diffguide.models.pipeline import default_sampling_scheduler

    base = tmp_path / "base"
    dg.DigitsPipeline(
        unet=_unet_with_attention(), scheduler=default_sampling_scheduler("scaled_linear")
    ).save_pretrained(base)
    seen = {}
    original = smooth_lora.train_smooth_lora

    def spy(unet, scheduler, sample_batch, *args, **kwargs):
        seen["betas"] = scheduler.config.beta_schedule
        seen["batch"] = sample_batch(torch.Generator().manual_seed(0))[0].shape
        return original(unet, scheduler, sample_batch, *args, progress=False, **kwargs)

    monkeypatch.setattr(smooth_lora, "train_smooth_lora", spy)
    out = tmp_path / "full"
    code = main(["train", "smooth-lora", "--base", str(base), "--capacity", "full", "--steps", "1", "--batch-size",
                 "2", "--out", str(out), "--run-dir", str(tmp_path / "run")])  # fmt: skip
    assert code == 0 and seen["betas"] == "scaled_linear" and seen["batch"] == (2, 1, 8, 8)  # sklearn's 8x8
    loaded = dg.DigitsPipeline.from_pretrained(out)
    assert loaded.scheduler.config.beta_schedule == "scaled_linear"
    spd = tmp_path / "spd"
    dg.DigitsPipeline(
        unet=_unet_with_attention(), scheduler=dg.ShortestPathScheduler(sample_size=8)
    ).save_pretrained(spd)
    refused = main(
        ["train", "smooth-lora", "--base", str(spd), "--steps", "1", "--out", str(tmp_path / "no")]
    )
    assert refused == 2  # with the reason, not trained on diffusers' default betas
    assert not (tmp_path / "no").exists()


def test_a_checkpoint_at_or_past_the_budget_is_not_trained_further(tmp_path):
    from diffguide.models.smooth_lora import SmoothLoraConfig, train_smooth_lora
    from diffguide.models.training import DDPMScheduler, default_scheduler_config

    config = SmoothLoraConfig(steps=4, batch_size=2, learning_rate=1e-2, rank=2, checkpoint_every=1)
    scheduler = DDPMScheduler(**default_scheduler_config())

    def small(generator):
        return torch.randn(2, 1, 8, 8, generator=generator), {"class_labels": torch.tensor([1, 10])}

    def run(stop):
        return train_smooth_lora(_unet_with_attention(), scheduler, small, tmp_path / "out", tmp_path / "run", config,
                                 progress=False, stop_after_steps=stop)  # fmt: skip

    assert run(2) is None
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert run(2) is None  # already there: nothing trained, nothing written
    again = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert again["step"] == saved["step"] == 2
    with pytest.raises(ValueError, match="past stop_after_steps"):
        run(1)


def test_banded_targets_penalise_each_sample_against_its_own_bands_moved_target():
    from diffguide.smooth import BandedVariationRegularizer

    _, denoise, x0, noise, abar, t = _linear_setup()  # t = 10, 500, 900: bands 0, 1, 1 of 2
    banded = BandedVariationRegularizer(bands=2, num_train_timesteps=1000, weight=2.0)
    norms = variation_norms(denoise, x0, noise, t, abar, generator=torch.Generator().manual_seed(0))
    penalty = banded.loss(denoise, x0, noise, t, abar, generator=torch.Generator().manual_seed(0))
    low, high = 0.01 * norms[0], 0.01 * norms[1:].mean()  # both targets start at 0
    expected = 2.0 * torch.stack([norms[0] - low, norms[1] - high, norms[2] - high]).pow(2).mean()
    torch.testing.assert_close(penalty, expected)
    assert banded.targets == pytest.approx([float(low), float(high)])
    single = BandedVariationRegularizer(bands=1, weight=2.0)  # one band is the paper's regularizer
    paper = VariationRegularizer(weight=2.0)
    for regularizer in (single, paper):
        regularizer.value = regularizer.loss(
            denoise, x0, noise, t, abar, generator=torch.Generator().manual_seed(0)
        )
    torch.testing.assert_close(single.value, paper.value)
    restored = BandedVariationRegularizer(bands=2)
    restored.load_state_dict(banded.state_dict())
    assert restored.targets == banded.targets
    with pytest.raises(ValueError, match="bands"):
        BandedVariationRegularizer(bands=0)
