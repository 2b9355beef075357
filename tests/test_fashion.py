"""The Fashion-MNIST flow-matching transformer: its data, its pipeline, guidance on it, its training.

Tests that read the dataset skip when Debian's ``dataset-fashion-mnist`` is not installed; CI
installs it and sets ``DIFFGUIDE_REQUIRE_FASHION=1``, which turns the skip into a failure. The
plumbing tests build a tiny DiT in the test (random weights), never the shipped one.
"""

from __future__ import annotations

import gzip
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file

import diffguide as dg
from diffguide.guidance.base import GuidanceRule
from diffguide.models.data import FASHION_ENV, fashion_folder, read_idx
from diffguide.models.pipeline import (
    ClassConditionalTransformerPipeline,
    fashion_scheduler,
    fashion_transformer,
)
from diffguide.models.training import FashionTrainingConfig, train_fashion

TINY = {"num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 8}
CALL = {"num_inference_steps": 4, "guidance_scale": 3.0, "output_type": "pt"}


def _require_data():
    try:
        fashion_folder()
    except FileNotFoundError as err:
        if os.environ.get("DIFFGUIDE_REQUIRE_FASHION") == "1":
            pytest.fail(f"DIFFGUIDE_REQUIRE_FASHION=1 but {err}")
        pytest.skip(str(err))


@pytest.fixture
def tiny_fashion() -> ClassConditionalTransformerPipeline:
    torch.manual_seed(0)
    pipe = ClassConditionalTransformerPipeline(
        transformer=fashion_transformer(**TINY), scheduler=fashion_scheduler()
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe, labels=(1, 7, 3), seed=0, **kwargs):
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(labels))]
    return pipe(list(labels), generator=generators, **{**CALL, **kwargs}).images


def test_idx_files_are_read_as_their_header_says(tmp_path):
    header = bytes([0, 0, 8, 3]) + (2).to_bytes(4, "big") + (2).to_bytes(4, "big") + (3).to_bytes(4, "big")
    path = tmp_path / "x-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(header + bytes(range(12))))
    assert read_idx(path).tolist() == [[[0, 1, 2], [3, 4, 5]], [[6, 7, 8], [9, 10, 11]]]
    path.write_bytes(gzip.compress(header + bytes(range(11))))
    with pytest.raises(ValueError, match="holds 11 values, its header says"):
        read_idx(path)


def test_missing_data_names_the_package_and_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv(FASHION_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=f"apt install dataset-fashion-mnist, or set {FASHION_ENV}"):
        dg.load_fashion("train")
    with pytest.raises(ValueError, match="unknown split 'all'"):
        dg.load_fashion("all")


def test_fashion_splits_are_the_published_ones():
    _require_data()
    train, train_labels = dg.load_fashion("train")
    test, test_labels = dg.load_fashion("test")
    assert train.shape == (60000, 1, 28, 28) and test.shape == (10000, 1, 28, 28)
    assert train.dtype == torch.float32 and 0 <= float(train.min()) and float(train.max()) == 1.0
    assert train_labels.bincount().tolist() == [6000] * 10 and test_labels.bincount().tolist() == [1000] * 10
    # the first train labels of the published files (zalandoresearch/fashion-mnist): ankle boot, T-shirt, ...
    assert train_labels[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]


def test_same_seed_same_images_and_batch_independent(tiny_fashion):
    first = _run(tiny_fashion)
    assert torch.equal(first, _run(tiny_fashion))
    assert not torch.equal(first, _run(tiny_fashion, seed=1))
    alone = _run(tiny_fashion, labels=(7,), seed=1)
    torch.testing.assert_close(alone[0], first[1], rtol=1e-5, atol=1e-5)


def test_guidance_identities_on_the_flow_transformer(tiny_fashion):
    plain = _run(tiny_fashion)
    with dg.guided(tiny_fashion, dg.CFG()):
        assert torch.equal(_run(tiny_fashion), plain)  # CFG through the hook is the pipeline's own
    off = {
        "APG off": dg.APG(eta=1.0, norm_threshold=math.inf, momentum=0.0),
        "AG off": dg.AdaptiveGuidance(threshold=1.5),
    }
    for name, rule in off.items():
        with dg.guided(tiny_fashion, rule):
            torch.testing.assert_close(_run(tiny_fashion), plain, rtol=1e-5, atol=1e-5, msg=name)
            assert dg.stats(tiny_fashion)["nfe_per_sample"] == [8, 8, 8]
    with dg.guided(tiny_fashion, dg.AdaptiveGuidance(threshold=-1.0)):
        _run(tiny_fashion)
        assert dg.stats(tiny_fashion)["nfe_per_sample"] == [5, 5, 5]  # switched after step 0
    assert torch.equal(_run(tiny_fashion), plain)  # removed: exactly the pipeline again


def test_combinations_reduce_to_their_parts_through_the_hook(tiny_fashion):
    """AG inside an interval over every noise level is AG; LinearAG with a switch that never fires
    is LinearAG (images and NFE), on the flow transformer through the batched hook."""
    ag = dg.AdaptiveGuidance(threshold=0.5)  # low enough to switch on a random-weight model
    with dg.guided(tiny_fashion, ag):
        alone, alone_nfe = _run(tiny_fashion), dg.stats(tiny_fashion)["nfe_per_sample"]
    assert alone_nfe != [8, 8, 8]  # the switch fires, so the identity covers it
    with dg.guided(tiny_fashion, dg.WithinInterval(dg.AdaptiveGuidance(threshold=0.5), 0.0, math.inf)):
        assert torch.equal(_run(tiny_fashion), alone)
        assert dg.stats(tiny_fashion)["nfe_per_sample"] == alone_nfe
    linear = dg.calibrate_linear_ag(tiny_fashion, {"class_labels": [0, 1, 2, 3], **CALL}, space="denoised")
    with dg.guided(tiny_fashion, linear):
        plain_linear = _run(tiny_fashion)
    with dg.guided(tiny_fashion, linear.with_switch(1.5)):
        assert torch.equal(_run(tiny_fashion), plain_linear)
        assert dg.stats(tiny_fashion)["nfe"] == linear.nfe
    with dg.guided(tiny_fashion, linear.with_switch(-1.0)):  # switches at the first real step
        _run(tiny_fashion)
        assert dg.stats(tiny_fashion)["nfe_per_sample"] == [5, 5, 5]


class _Recorder(GuidanceRule):
    """CFG in x0 space that keeps what it was given."""

    space = "denoised"

    def __init__(self):
        self.seen = []

    def combine(self, cond, uncond, uncond_mask, step):
        self.seen.append((cond.clone(), float(step.alpha[0]), float(step.sigma[0])))
        return uncond + step.guidance_scale * (cond - uncond)


def test_x0_of_the_flow_output_matches_an_independent_computation(tiny_fashion):
    """x_s = (1 - s) x0 + s noise and v = noise - x0, so x0 = x_s - s v, with s the scheduler's
    sigma at the step: recompute it from the transformer called by hand at each step."""
    recorder = _Recorder()
    latents = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    with dg.guided(tiny_fashion, recorder):
        tiny_fashion([4, 8], latents=latents.clone(), **CALL)
    scheduler = fashion_scheduler()
    scheduler.set_timesteps(CALL["num_inference_steps"])
    x = latents.double()
    for i, t in enumerate(scheduler.timesteps):
        s = float(scheduler.sigmas[i])
        with torch.no_grad():
            both = tiny_fashion.transformer(
                torch.cat([x, x]).float(), timestep=t.expand(4), class_labels=torch.tensor([10, 10, 4, 8])
            ).sample.double()
        uncond, cond = both.chunk(2)
        seen_cond, alpha, sigma = recorder.seen[i]
        assert (alpha, sigma) == pytest.approx((1 - s, s), abs=1e-12)
        torch.testing.assert_close(seen_cond, x - s * cond, rtol=1e-5, atol=1e-5)
        velocity = uncond + CALL["guidance_scale"] * (cond - uncond)
        x = x + (float(scheduler.sigmas[i + 1]) - s) * velocity


def test_the_pipeline_saves_and_loads_through_load_pipeline(tiny_fashion, tmp_path):
    tiny_fashion.save_pretrained(tmp_path / "fashion")
    loaded = dg.load_pipeline(tmp_path / "fashion")
    assert type(loaded) is ClassConditionalTransformerPipeline and loaded.guidance_family == "fashion"
    assert torch.equal(_run(loaded), _run(tiny_fashion))
    with pytest.raises(ValueError, match="class label 10 is out of range"):
        loaded([10], **CALL)


def test_fashion_training_resumes_exactly(tmp_path):
    _require_data()
    config = FashionTrainingConfig(
        steps=4, batch_size=8, warmup_steps=2, checkpoint_every=2, train_images=64, model=TINY
    )
    record = train_fashion(tmp_path / "straight", tmp_path / "run_a", config, progress=False)
    assert record["steps"] == 4 and record["train_images"] == 64
    assert (
        train_fashion(tmp_path / "resumed", tmp_path / "run_b", config, progress=False, stop_after_steps=3)
        is None
    )
    train_fashion(tmp_path / "resumed", tmp_path / "run_b", config, progress=False)
    weights = "transformer/diffusion_pytorch_model.safetensors"
    straight, resumed = (
        load_file(str(tmp_path / "straight" / weights)),
        load_file(str(tmp_path / "resumed" / weights)),
    )
    for name in straight:
        torch.testing.assert_close(straight[name], resumed[name], rtol=0, atol=0)
    saved = json.loads((tmp_path / "straight" / "training.json").read_text())
    assert saved["config"]["model"] == TINY


def test_the_shipped_judge_reaches_the_published_cnn_baselines():
    """Fashion-MNIST's published CNN baselines reach 91-93% on the test split."""
    _require_data()
    judge = dg.load_judge("fashion")
    images, labels = dg.load_fashion("test")
    with torch.no_grad():
        predictions = torch.cat([judge(images[i : i + 2000]).argmax(1) for i in range(0, len(images), 2000)])
    accuracy = (predictions == labels).float().mean().item()
    assert accuracy >= 0.91
    recorded = json.loads((dg.models.FASHION_JUDGE_DIR / "judge.json").read_text())
    assert accuracy == pytest.approx(recorded["test_accuracy"], abs=1e-6)


def _shipped() -> ClassConditionalTransformerPipeline:
    pipe = dg.load_pipeline("fashion")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_shipped_model_is_the_recorded_run_and_loads_by_name():
    pipe = _shipped()
    assert type(pipe) is ClassConditionalTransformerPipeline and pipe.num_classes == 10
    record = json.loads((dg.models.FASHION_MODEL_DIR / "training.json").read_text())
    assert record["steps"] == FashionTrainingConfig().steps and record["config"]["seed"] == 0
    assert record["parameters"] == sum(p.numel() for p in pipe.transformer.parameters())
    weights = dg.models.FASHION_MODEL_DIR / "transformer" / "diffusion_pytorch_model.safetensors"
    assert weights.stat().st_size <= 30 * 2**20  # the package budget


def test_guidance_identities_on_the_shipped_flow_transformer():
    """The same identities as on the tiny build, on the trained weights: the hook's CFG is the
    pipeline's own bit for bit, APG and AG at their off settings equal CFG, removal is exact."""
    pipe = _shipped()
    plain = _run(pipe, labels=(0, 9))
    assert torch.equal(plain, _run(pipe, labels=(0, 9)))  # same seed, same images
    with dg.guided(pipe, dg.CFG()):
        assert torch.equal(_run(pipe, labels=(0, 9)), plain)
    for rule in (dg.APG(eta=1.0, norm_threshold=math.inf, momentum=0.0), dg.AdaptiveGuidance(threshold=1.5)):
        with dg.guided(pipe, rule):
            torch.testing.assert_close(_run(pipe, labels=(0, 9)), plain, rtol=1e-5, atol=1e-5)
    assert torch.equal(_run(pipe, labels=(0, 9)), plain)
