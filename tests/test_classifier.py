"""Diffusion Classifier: planted denoisers, shared noise, elimination, NFE, text and DiT paths."""

import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, DiTPipeline, DiTTransformer2DModel, UNet2DModel
from tiny_pipelines import _vae, tiny_sd

import diffguide as dg
from diffguide.classifier import ClassifierSchedule, DiffusionClassifier, timestep_grid


class PlantedUNet(torch.nn.Module):
    """Predicts the exact noise for ``true_class`` and the noise plus ``offsets[c]`` otherwise."""

    def __init__(self, x0: torch.Tensor, true_class: int, offsets: list[float], scheduler):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))  # gives the module a device and dtype
        self.config = SimpleNamespace(
            num_class_embeds=len(offsets) + 1, sample_size=x0.shape[-1], in_channels=x0.shape[0]
        )
        self.x0, self.true_class, self.offsets = x0 * 2 - 1, true_class, offsets
        self.abar = scheduler.alphas_cumprod
        self.rows: list[tuple[int, int, torch.Tensor]] = []

    def forward(self, x_t, t, class_labels):
        abar = self.abar[t].reshape(-1, 1, 1, 1)
        noise = (x_t - abar.sqrt() * self.x0) / (1 - abar).sqrt()
        offsets = torch.tensor(
            [0.0 if c == self.true_class else self.offsets[c] for c in class_labels.tolist()]
        )
        self.rows += [(int(c), int(tt), x.clone()) for c, tt, x in zip(class_labels, t, x_t, strict=True)]
        return SimpleNamespace(sample=noise + offsets.reshape(-1, 1, 1, 1))


def _planted(true_class=2, offsets=(0.3, 0.6, 0.2, 0.9, 0.5)):
    scheduler = DDIMScheduler()
    image = torch.rand(1, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    unet = PlantedUNet(image[0], true_class, list(offsets), scheduler)
    return SimpleNamespace(unet=unet, scheduler=scheduler, num_classes=len(offsets)), image


def test_planted_denoiser_is_classified_correctly_with_exact_nfe():
    pipe, image = _planted()
    result = DiffusionClassifier(pipe, schedule=ClassifierSchedule((6,), (1,)), batch_size=7).classify(image)
    assert result.labels.tolist() == [2]
    assert result.nfe.tolist() == [5 * 6] == [len(pipe.unet.rows)]
    assert result.margins[0] > 0 and result.errors[0].argmin() == 2


def _huber(offset: float) -> float:  # torch's default delta = 1
    return 0.5 * offset**2 if abs(offset) <= 1 else abs(offset) - 0.5


@pytest.mark.parametrize(("loss", "per_element"), [("l2", lambda o: o**2), ("l1", abs), ("huber", _huber)])
def test_planted_errors_and_margin_equal_the_loss_of_each_offset_in_closed_form(loss, per_element):
    # the planted denoiser is off by the constant offsets[c] at every element for c != 2 and
    # exact for c = 2, so err(c) = loss(offsets[c]) at every timestep and err(2) = 0; the margin
    # is the smallest wrong-class error. 1.6 and 2.5 lie on huber's linear branch.
    offsets = (0.3, 1.6, 0.7, 2.5, 0.5)
    pipe, image = _planted(true_class=2, offsets=offsets)
    schedule = ClassifierSchedule((6,), (1,))
    result = dg.DiffusionClassifier(pipe, schedule=schedule, loss=loss).classify(image)
    expected = torch.tensor([0.0 if c == 2 else per_element(o) for c, o in enumerate(offsets)])
    torch.testing.assert_close(result.errors[0], expected, atol=1e-5, rtol=1e-5)
    assert result.margins[0].item() == pytest.approx(per_element(0.3), abs=1e-5)
    assert result.labels.tolist() == [2]


def test_noise_and_timesteps_are_shared_across_classes():
    pipe, image = _planted()
    DiffusionClassifier(pipe, schedule=ClassifierSchedule((4,), (1,))).classify(image)
    by_t: dict[int, list] = {}
    for cls, t, x_t in pipe.unet.rows:
        by_t.setdefault(t, []).append((cls, x_t))
    assert sorted(by_t) == timestep_grid(1000, 4)
    for rows in by_t.values():
        assert sorted(cls for cls, _ in rows) == list(range(5))
        assert all(torch.equal(rows[0][1], x_t) for _, x_t in rows)


def test_elimination_keeps_the_true_class_and_reuses_errors():
    pipe, image = _planted(true_class=4, offsets=(0.2, 0.25, 0.9, 0.8, 0.0))
    result = DiffusionClassifier(pipe, schedule=ClassifierSchedule((2, 4), (2, 1))).classify(image)
    assert result.labels.tolist() == [4]
    # the authors' eval_prob_adaptive.py: one grid for the last stage, each stage a strided
    # subset of it: here stage 1 = [375, 875] of [125, 375, 625, 875]
    last = list(range(1000 // 4 // 2, 1000, 1000 // 4))[:4]
    first = last[len(last) // 2 // 2 :: len(last) // 2][:2]
    assert first == [375, 875]
    assert sorted({t for _, t, _ in pipe.unet.rows}) == last
    # stage 1: 5 classes x 2 timesteps; stage 2: 2 survivors x the 2 timesteps not yet seen
    assert result.nfe.tolist() == [5 * 2 + 2 * 2] == [len(pipe.unet.rows)]


def test_max_nfe_is_what_a_search_without_a_stop_spends():
    from diffguide.classifier import PRESETS

    assert PRESETS["paper-cifar10"].max_nfe(10) == 10 * 50 + 5 * 450  # the 50 lie on the 500-grid
    assert PRESETS["full"].max_nfe(10) == 5000
    for schedule in [
        ClassifierSchedule((2, 4), (2, 1)),
        ClassifierSchedule((2, 4, 8), (1, 1, 1)),  # one survivor after stage 1: the search ends there
        ClassifierSchedule((3, 6, 12), (3, 2, 1), order="stratified"),
        ClassifierSchedule((2, 5), (4, 1)),  # strides that do not divide: the stages overlap in part
    ]:
        pipe, image = _planted(true_class=4, offsets=(0.2, 0.25, 0.9, 0.8, 0.0))
        result = DiffusionClassifier(pipe, schedule=schedule).classify(image)
        assert result.nfe.tolist() == [schedule.max_nfe(5)] == [len(pipe.unet.rows)], schedule


def test_margins_are_paired_and_never_negative_under_elimination(tiny_pipe):
    # errors vary far more with t than between classes: a class dropped early has a mean over
    # other timesteps than the winner's, so only the paired margin is comparable
    images = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    schedule = ClassifierSchedule((2, 4, 8), (5, 2, 1), order="stratified")
    classifier = DiffusionClassifier(tiny_pipe, schedule=schedule)
    result = classifier.classify(images)
    # each eliminated class lost to the winner on the timesteps it was dropped at
    assert (result.margins >= 0).all()
    # planted: class c's error exceeds the true class's by offsets[c]^2 at every timestep, so the
    # paired margin is the smallest offset squared whichever stage each class was dropped at
    pipe, image = _planted(true_class=4, offsets=(0.3, 0.25, 0.9, 0.8, 0.0))
    result = DiffusionClassifier(pipe, schedule=ClassifierSchedule((2, 4, 8), (3, 2, 1))).classify(image)
    assert result.margins[0].item() == pytest.approx(0.25**2, rel=1e-4)


def test_confident_margin_stops_early():
    pipe, image = _planted(offsets=(2.0, 2.0, 0.0, 2.0, 2.0))
    schedule = ClassifierSchedule((4, 8, 16), (5, 5, 1), stop_z=3.0)
    result = DiffusionClassifier(pipe, schedule=schedule).classify(image)
    assert result.labels.tolist() == [2] and result.nfe.tolist() == [5 * 4]


def test_classification_is_deterministic_given_a_seed(tiny_pipe):
    images = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    first = DiffusionClassifier(tiny_pipe, schedule=ClassifierSchedule((3,), (1,)), seed=5).classify(images)
    again = DiffusionClassifier(tiny_pipe, schedule=ClassifierSchedule((3,), (1,)), seed=5).classify(images)
    assert torch.equal(first.errors, again.errors)


def test_text_conditional_path_runs_on_a_tiny_sd_pipeline():
    pipe = tiny_sd()
    classifier = DiffusionClassifier(
        pipe, schedule=ClassifierSchedule((2,), (1,)), class_names=["cat", "dog", "car"]
    )
    result = classifier.classify(torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
    assert result.labels.shape == (2,) and set(result.labels.tolist()) <= {0, 1, 2}
    assert result.nfe.tolist() == [3 * 2, 3 * 2] and result.errors.shape == (2, 3)


def test_dit_class_label_path_runs():
    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1,
        sample_size=8, patch_size=2, num_embeds_ada_norm=4, norm_num_groups=4,
    )  # fmt: skip
    pipe = DiTPipeline(transformer=transformer, vae=_vae(), scheduler=DDIMScheduler())
    result = DiffusionClassifier(pipe, schedule=ClassifierSchedule((2,), (1,))).classify(
        torch.rand(1, 3, 16, 16)
    )
    assert result.nfe.tolist() == [4 * 2] and 0 <= int(result.labels[0]) < 4


def test_bad_input_gets_clear_errors(tiny_pipe):
    classifier = DiffusionClassifier(tiny_pipe, schedule=ClassifierSchedule((2,), (1,)))
    with pytest.raises(ValueError, match=r"shape \(1, 28, 28\), the model expects \(1, 8, 8\)"):
        classifier.classify(torch.rand(1, 1, 28, 28))
    with pytest.raises(ValueError, match="no images"):
        classifier.classify(torch.rand(0, 1, 8, 8))
    unconditional = DDPMPipeline(unet=UNet2DModel(sample_size=8, block_out_channels=(8, 16), norm_num_groups=4,
                                                  down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2),
                                 scheduler=DDIMScheduler())  # fmt: skip
    with pytest.raises(TypeError, match="takes no class labels or text"):
        DiffusionClassifier(unconditional)
    with pytest.raises(ValueError, match="unknown schedule"):
        DiffusionClassifier(tiny_pipe, schedule="fastest")
    with pytest.raises(ValueError, match="n_samples must increase"):
        ClassifierSchedule((5, 5), (2, 1))
    with pytest.raises(ValueError, match="needs prompts= or class_names="):
        DiffusionClassifier(tiny_sd())


class PlantedFlowTransformer(torch.nn.Module):
    """A flow-matching DiT stand-in: the exact velocity ``noise - x0`` of one image for
    ``true_class``, that velocity plus ``offsets[c]`` otherwise."""

    def __init__(self, x0: torch.Tensor, true_class: int, offsets: list[float]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.config = SimpleNamespace(
            num_embeds_ada_norm=len(offsets), sample_size=x0.shape[-1], in_channels=x0.shape[0]
        )
        self.x0, self.true_class, self.offsets = x0 * 2 - 1, true_class, offsets
        self.timesteps: list[float] = []

    def forward(self, x_t, timestep, class_labels):
        s = (timestep.double() / 1000).reshape(-1, 1, 1, 1)
        noise = (x_t.double() - (1 - s) * self.x0) / s
        offsets = torch.tensor(
            [0.0 if c == self.true_class else self.offsets[c] for c in class_labels.tolist()]
        )
        self.timesteps += timestep.tolist()
        return SimpleNamespace(sample=(noise - self.x0 + offsets.reshape(-1, 1, 1, 1)).float())


def test_flow_models_are_scored_on_the_velocity_error_weighted_by_one_minus_s_squared():
    # eps = x_t + (1 - s) v, so a velocity off by o is a noise off by (1 - s) o: err(c) is
    # the mean over the grid of (1 - s_t)^2 o_c^2 (l2), and err(true class) = 0
    from diffusers import FlowMatchEulerDiscreteScheduler

    image = torch.rand(1, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    offsets = [0.3, 0.6, 0.2, 0.9]
    model = PlantedFlowTransformer(image[0], 1, offsets)
    pipe = SimpleNamespace(transformer=model, scheduler=FlowMatchEulerDiscreteScheduler(), num_classes=4)
    result = DiffusionClassifier(pipe, schedule=ClassifierSchedule((8,), (1,))).classify(image)
    grid = torch.tensor(timestep_grid(1000, 8), dtype=torch.float64)
    weight = ((1 - grid / 1000) ** 2).mean().item()
    expected = [0.0 if c == 1 else weight * o**2 for c, o in enumerate(offsets)]
    assert result.labels.tolist() == [1]
    torch.testing.assert_close(
        result.errors[0].double(), torch.tensor(expected, dtype=torch.float64), atol=1e-5, rtol=1e-4
    )
    assert sorted(set(model.timesteps)) == grid.tolist()


def test_the_flow_transformer_pipeline_is_classified_through_its_velocity():
    """On a tiny ClassConditionalTransformerPipeline: each error equals the one computed by
    hand from the transformer's velocity at x_s = (1 - s) x0 + s eps."""
    from tiny_pipelines import tiny_fashion

    pipe = tiny_fashion()
    image = torch.rand(1, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    classifier = DiffusionClassifier(pipe, schedule=ClassifierSchedule((3,), (1,)))
    result = classifier.classify(image)
    x0 = image[0].double() * 2 - 1
    for c in range(10):
        errors = []
        for t in timestep_grid(1000, 3):
            s, noise = t / 1000, classifier.noise_at(t).double()
            x_s = (1 - s) * x0 + s * noise
            with torch.no_grad():
                v = (
                    pipe.transformer(
                        x_s[None].float(), timestep=torch.tensor([t]), class_labels=torch.tensor([c])
                    )
                    .sample[0]
                    .double()
                )
            errors.append((((1 - s) * (v - (noise - x0))) ** 2).mean().item())
        assert result.errors[0, c].item() == pytest.approx(sum(errors) / len(errors), rel=1e-4)
    assert result.nfe.tolist() == [30]


def test_text_pipelines_with_unwired_denoisers_are_refused_with_the_reason():
    from diffusers import FlowMatchEulerDiscreteScheduler

    class FluxTransformer2DModel(torch.nn.Linear):  # stands in by name: packed latents, t / 1000
        pass

    transformer = FluxTransformer2DModel(1, 1)
    transformer.config = SimpleNamespace(sample_size=8, in_channels=4)
    pipe = SimpleNamespace(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), device="cpu",
        encode_prompt=lambda prompts, *args: (torch.zeros(len(prompts), 3, 4),),
    )  # fmt: skip
    with pytest.raises(TypeError, match=r"FluxTransformer2DModel\) is not supported .* SD, SDXL and SD3"):
        DiffusionClassifier(pipe, prompts=["a cat", "a dog"])


def test_the_api_cli_and_demo_default_to_the_same_schedule():
    import inspect

    from diffguide.app import core
    from diffguide.classifier import DEFAULT_SCHEDULE, PRESETS
    from diffguide.cli import build_parser

    classify = build_parser()._subparsers._group_actions[0].choices["classify"]
    assert classify.get_default("schedule") == DEFAULT_SCHEDULE
    assert inspect.signature(DiffusionClassifier).parameters["schedule"].default == DEFAULT_SCHEDULE
    assert inspect.signature(core.classify).parameters["schedule"].default is None  # -> DEFAULT_SCHEDULE
    default = PRESETS[DEFAULT_SCHEDULE]
    # it must not lean on a band of timesteps measured on one model
    assert default.t_range is None and default.order == "stratified"


def test_stratified_timesteps_nest_and_put_one_in_each_stratum():
    from diffguide.classifier import stratified_timesteps

    timesteps = stratified_timesteps(1000, 64)
    assert len(set(timesteps)) == 64 and all(0 <= t < 1000 for t in timesteps)
    for m in range(7):  # each prefix of 2^m has one timestep in each of 2^m equal strata
        prefix = timesteps[: 2**m]
        assert sorted(t * 2**m // 1000 for t in prefix) == list(range(2**m))
    # a schedule's stages are prefixes of one sequence, so no stage recomputes
    stages = ClassifierSchedule((8, 16, 32), (5, 2, 1), order="stratified").stage_timesteps(1000)
    assert stages[0] == stages[1][:8] and stages[1] == stages[2][:16]
    assert stratified_timesteps(1000, 4, t_range=(200, 600)) == [203, 403, 303, 503]


class PlantedSchedulePipe:
    """A planted denoiser for a set of images: the exact noise for the image's own class; for
    another class c, the noise plus ``offsets[c]`` at the timesteps in ``where[c]`` (all if
    ``where`` is None). It knows the classifier's noise (``use_noise_of``) and recovers which
    image a row came from as the one that x_t minus that noise leaves."""

    def __init__(self, images, labels, offsets, where=None):
        self.scheduler = DDIMScheduler()
        self.num_classes = len(offsets)
        pipe, abar, x0s = self, self.scheduler.alphas_cumprod, images * 2 - 1

        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.weight = torch.nn.Parameter(torch.zeros(()))
                self.config = SimpleNamespace(
                    num_class_embeds=len(offsets) + 1,
                    sample_size=images.shape[-1],
                    in_channels=images.shape[1],
                )

            def forward(self, x_t, t, class_labels):
                noise = torch.stack([pipe.noise_at(int(tt)) for tt in t])
                a = abar[t].reshape(-1, 1, 1, 1)
                x0 = (x_t - (1 - a).sqrt() * noise) / a.sqrt()
                image = torch.cdist(x0.flatten(1), x0s.flatten(1)).argmin(1)
                shift = torch.zeros(len(x_t))
                for r, (c, tt, i) in enumerate(
                    zip(class_labels.tolist(), t.tolist(), image.tolist(), strict=True)
                ):
                    if c != int(labels[i]) and (where is None or tt in where[c]):
                        shift[r] = offsets[c]
                return SimpleNamespace(sample=noise + shift.reshape(-1, 1, 1, 1))

        self.unet = Net()

    def classifier(self, **kwargs) -> DiffusionClassifier:
        classifier = DiffusionClassifier(self, **kwargs)
        self.noise_at = classifier.noise_at
        return classifier


def test_the_default_schedule_classifies_a_planted_exact_denoiser_with_the_predicted_cost():
    from diffguide.classifier import DEFAULT_SCHEDULE, PRESETS

    schedule = PRESETS[DEFAULT_SCHEDULE]
    images = torch.rand(12, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    labels = torch.arange(12) % 10
    # clear case: every wrong class is off at every timestep -> certain after the first stage
    pipe = PlantedSchedulePipe(images, labels, offsets=[0.5 + 0.05 * c for c in range(10)])
    result = pipe.classifier(images_per_batch=5).classify(images)
    assert result.labels.tolist() == labels.tolist()
    assert result.nfe.tolist() == [10 * schedule.n_samples[0]] * 12
    # hard case: each wrong class differs from the true one at a single timestep, so no stage
    # is sure (z ~ 1) and every stage runs; the true class still wins, at the full cost
    first = schedule.stage_timesteps(1000)[0]
    where = [{first[c % len(first)]} for c in range(10)]
    pipe = PlantedSchedulePipe(images, labels, offsets=[0.5] * 10, where=where)
    result = pipe.classifier(images_per_batch=5).classify(images)
    assert result.labels.tolist() == labels.tolist()
    assert result.nfe.tolist() == [schedule.max_nfe(10)] * 12 == [10 * 8 + 5 * 8 + 3 * 16 + 2 * 32] * 12


def test_sharded_classification_equals_one_process(tiny_pipe):
    from diffguide.classifier import ClassificationResult, shard_bounds

    images = torch.rand(7, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    schedule = ClassifierSchedule((2, 4, 8), (4, 2, 1), stop_z=2.0, order="stratified")
    whole = DiffusionClassifier(tiny_pipe, schedule=schedule).classify(images)
    assert shard_bounds(7, 3) == [(0, 3), (3, 5), (5, 7)]
    for shards in (2, 3, 7):
        parts = [
            DiffusionClassifier(tiny_pipe, schedule=schedule, images_per_batch=2).classify(images[a:b])
            for a, b in shard_bounds(len(images), shards)
        ]
        merged = ClassificationResult.concat(parts)
        assert merged.labels.tolist() == whole.labels.tolist() and merged.nfe.tolist() == whole.nfe.tolist()
        torch.testing.assert_close(merged.errors, whole.errors, rtol=1e-5, atol=1e-6)
        assert merged.timesteps_used == whole.timesteps_used


def test_sd3_and_sdxl_text_paths_score_each_prompt():
    from tiny_pipelines import tiny_sd3, tiny_sdxl

    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    pipe = tiny_sd3()
    classifier = DiffusionClassifier(
        pipe, schedule=ClassifierSchedule((2,), (1,)), prompts=["a cat", "a dog"]
    )
    result = classifier.classify(image)
    assert result.nfe.tolist() == [2 * 2] and result.errors.shape == (1, 2)
    # by hand for the dog prompt: x_s = (1 - s) x0 + s eps, eps implied by the velocity as eps = x_s + (1 - s) v
    x0 = classifier.conditioner.encode(image)[0].double()
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompt=["a dog"], prompt_2=None, prompt_3=None, do_classifier_free_guidance=False
    )
    errors = []
    for t in timestep_grid(1000, 2):
        s, noise = t / 1000, classifier.noise_at(t).double()
        x_s = ((1 - s) * x0 + s * noise).float()[None]
        with torch.no_grad():
            v = pipe.transformer(
                hidden_states=x_s, timestep=torch.tensor([float(t)]), encoder_hidden_states=embeds,
                pooled_projections=pooled,
            ).sample[0].double()  # fmt: skip
        errors.append(((x_s[0].double() + (1 - s) * v - noise) ** 2).mean().item())
    assert result.errors[0, 1].item() == pytest.approx(sum(errors) / 2, rel=1e-4)
    pipe = tiny_sdxl()
    classifier = DiffusionClassifier(
        pipe, schedule=ClassifierSchedule((2,), (1,)), class_names=["cat", "dog", "car"]
    )
    result = classifier.classify(image)
    assert result.nfe.tolist() == [3 * 2]
    # by hand for "a photo of a car", with the pipeline's own time ids of an uncropped 16x16 image
    embeds, _, pooled, _ = pipe.encode_prompt(prompt=["a photo of a car"], do_classifier_free_guidance=False)
    time_ids = pipe._get_add_time_ids(
        (16, 16),
        (0, 0),
        (16, 16),
        dtype=embeds.dtype,
        text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim,
    )
    x0 = classifier.conditioner.encode(image)[0].double()
    errors = []
    for t in timestep_grid(1000, 2):
        abar = pipe.scheduler.alphas_cumprod[t].double()
        noise = classifier.noise_at(t).double()
        x_t = (abar.sqrt() * x0 + (1 - abar).sqrt() * noise).float()[None]
        with torch.no_grad():
            eps = pipe.unet(
                x_t, torch.tensor([t]), encoder_hidden_states=embeds,
                added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
            ).sample[0].double()  # fmt: skip
        errors.append(((eps - noise) ** 2).mean().item())
    assert result.errors[0, 2].item() == pytest.approx(sum(errors) / 2, rel=1e-4)


class TableClassifier(DiffusionClassifier):
    """The classifier's search with its network calls answered from ``table[class][timestep]``."""

    def __init__(self, pipe, schedule, table):
        super().__init__(pipe, schedule=schedule)
        self.table = table

    def row_errors(self, x0s, rows):
        return torch.tensor([self.table[c][t] for _, c, t in rows])


def test_the_log_score_ranks_by_the_geometric_mean_error():
    # class 0 wins on the arithmetic mean (5.05 < 5.275), class 1 on the geometric mean
    # (sqrt(10.5 * 0.05) = 0.725 < sqrt(10 * 0.1) = 1): at the low-error timestep it is half class 0's
    pipe, image = _planted(offsets=(0.1, 0.2))
    grid = timestep_grid(1000, 2)
    table = {0: {grid[0]: 10.0, grid[1]: 0.1}, 1: {grid[0]: 10.5, grid[1]: 0.05}}
    mean = TableClassifier(pipe, ClassifierSchedule((2,), (1,)), table).classify(image)
    log = TableClassifier(pipe, ClassifierSchedule((2,), (1,), score="log"), table).classify(image)
    assert mean.labels.tolist() == [0] and log.labels.tolist() == [1]
    torch.testing.assert_close(mean.errors[0], torch.tensor([5.05, 5.275]))
    torch.testing.assert_close(log.errors[0], torch.tensor([1.0, (10.5 * 0.05) ** 0.5]))
    # the margin is paired in the score's units: mean log ratio of class 0 to class 1
    expected = (math.log(10.0 / 10.5) + math.log(0.1 / 0.05)) / 2
    assert log.margins[0].item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="score must be one of"):
        ClassifierSchedule((2,), (1,), score="median")
