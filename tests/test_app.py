"""The demo: its functions called directly, then the served app driven by gradio_client."""

from __future__ import annotations

import os
import threading

import numpy as np
import PIL.Image
import pytest
import torch

from diffguide.app import core

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


@pytest.fixture(scope="module")
def registry():
    return core.ModelRegistry()


def _pixels(image: PIL.Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_generate_counts_two_evaluations_per_step_for_cfg(registry):
    sample = core.generate(registry, "default", "3", "cfg", 3.0, 4, 0)
    assert sample.nfe == 8 and sample.image.size == (224, 224)
    assert "cfg · 8 NFE" in sample.caption


def test_generate_passes_method_parameters(registry):
    # AG with a threshold above any cosine never switches: CFG's image and NFE
    cfg = core.generate(registry, "default", 5, "cfg", 3.0, 4, 1)
    ag = core.generate(registry, "default", 5, "ag", 3.0, 4, 1, {"threshold": 1.5})
    assert ag.nfe == 8 and np.array_equal(_pixels(ag.image), _pixels(cfg.image))
    # APG at eta = 1 with no cap and no momentum is CFG too (to 8-bit rounding)
    apg = core.generate(
        registry, "default", 5, "apg", 3.0, 4, 1, {"eta": 1.0, "norm_threshold": 0.0, "momentum": 0.0}
    )
    assert np.abs(_pixels(apg.image) - _pixels(cfg.image)).max() <= 1


def test_compare_runs_every_method_on_the_same_seed(registry):
    samples = core.compare(registry, "default", "7", ["cfg", "ag"], 3.0, 4, 2)
    assert [s.method for s in samples] == ["cfg", "ag"]
    alone = core.generate(registry, "default", "7", "cfg", 3.0, 4, 2)
    assert np.array_equal(_pixels(samples[0].image), _pixels(alone.image))
    assert samples[1].nfe < samples[0].nfe


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda r: core.generate(r, "default", "3", "cfg", 3.0, 0, 0), "steps must be between 1 and 200"),
        (lambda r: core.generate(r, "default", "3", "cfg", 3.0, 999, 0), "steps must be between 1 and 200"),
        (lambda r: core.generate(r, "default", "3", "cfg", 0.5, 4, 0), "guidance scale must be between"),
        (lambda r: core.generate(r, "default", "3", "cfg", 3.0, float("inf"), 0), "must be finite numbers"),
        (lambda r: core.generate(r, "default", "twelve", "cfg", 3.0, 4, 0), "class from 0 to 9"),
        (lambda r: core.generate(r, "default", "3", "magic", 3.0, 4, 0), "unknown method 'magic'"),
        (lambda r: core.generate(r, "/etc", "3", "cfg", 3.0, 4, 0), "unknown model '/etc'"),
        (lambda r: core.compare(r, "default", "3", [], 3.0, 4, 0), "at least one method"),
        (lambda r: core.classify(r, None), "sketch is empty"),
        (lambda r: core.classify(r, np.full((50, 50, 4), 0, np.uint8)), "sketch is empty"),
    ],
)
def test_bad_input_gets_a_message_naming_the_problem(registry, call, message):
    with pytest.raises(core.AppError, match=message):
        call(registry)


def test_a_model_folder_that_fails_to_load_is_reported(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text('{"_class_name": "DigitsPipeline"}')
    registry = core.ModelRegistry([broken])
    assert registry.names == ["default", "broken"]
    with pytest.raises(core.AppError, match="the model folder .*broken failed to load"):
        core.generate(registry, "broken", "3", "cfg", 3.0, 4, 0)


def test_a_saved_digits_folder_is_offered_by_name(tmp_path, registry):
    registry.get("default").pipe.save_pretrained(tmp_path / "mine")
    mine = core.ModelRegistry([tmp_path / "mine"])
    ours = core.generate(mine, "mine", "4", "cfg", 3.0, 3, 5)
    reference = core.generate(registry, "default", "4", "cfg", 3.0, 3, 5)
    assert np.array_equal(_pixels(ours.image), _pixels(reference.image))


def _drawn(digit: torch.Tensor, size: int = 280, transparent: bool = True) -> np.ndarray:
    """A test digit as a visitor would draw it: black ink, on transparent or white paper."""
    ink = PIL.Image.fromarray((digit[0].numpy() * 255).astype(np.uint8)).resize(
        (size, size), PIL.Image.BILINEAR
    )
    ink = np.asarray(ink, dtype=np.float64) / 255
    rgba = np.zeros((size, size, 4), np.uint8)
    if transparent:  # black ink whose opacity is the stroke
        rgba[..., 3] = (255 * ink).astype(np.uint8)
    else:
        rgba[..., :3] = (255 * (1 - ink)).astype(np.uint8)[..., None]
        rgba[..., 3] = 255
    return rgba


def test_sketch_to_digit_centres_white_ink_on_black_like_mnist():
    canvas = np.zeros((100, 60, 4), np.uint8)
    canvas[10:50, 40:44] = (0, 0, 0, 255)  # a black vertical stroke on transparent paper
    digit = core.sketch_to_digit({"composite": canvas})
    assert digit.shape == (1, 1, 28, 28) and digit.max() == pytest.approx(1.0, abs=0.02)
    rows, cols = torch.nonzero(digit[0, 0] > 0.5, as_tuple=True)
    assert rows.max() - rows.min() + 1 == pytest.approx(20, abs=1)  # the long side scaled to 20
    assert abs((rows.min() + rows.max()) / 2 - 13.5) <= 1 and abs((cols.min() + cols.max()) / 2 - 13.5) <= 1
    # the same stroke uploaded as dark ink on white paper gives the same digit
    upload = np.full((100, 60, 3), 255, np.uint8)
    upload[10:50, 40:44] = 0
    torch.testing.assert_close(core.sketch_to_digit(upload), digit)


def test_sketch_to_digit_reads_float_images_and_refuses_what_is_not_an_image():
    canvas = np.zeros((40, 40), np.float32)
    canvas[5:35, 18:22] = 1.0  # white ink on black, floats in [0, 1]
    digit = core.sketch_to_digit(canvas)
    assert digit.max() == pytest.approx(1.0, abs=0.02) and digit.sum() > 10
    with pytest.raises(core.AppError, match="expected an image"):
        core.sketch_to_digit(np.zeros((4, 40, 40)))  # channels first
    with pytest.raises(core.AppError, match="sketch is empty"):
        core.sketch_to_digit(np.full((20, 20), np.nan))


def test_linear_ag_is_calibrated_once_per_model_scale_and_steps(tmp_path, registry, monkeypatch):
    import diffguide.compare as compare

    calls = []
    real = compare.calibrate_linear_ag
    monkeypatch.setattr(compare, "calibrate_linear_ag",
                        lambda pipe, w, steps, trajectories=4: calls.append((w, steps)) or real(pipe, w, steps, 4))  # fmt: skip
    registry.get("default").pipe.save_pretrained(tmp_path / "mine")
    mine = core.ModelRegistry([tmp_path / "mine"])
    first = core.generate(mine, "mine", "2", "linear-ag", 3.0, 3, 0)
    second = core.generate(mine, "mine", "2", "linear-ag", 3.0, 3, 0)
    assert calls == [(3.0, 3)]  # another digits model does not get the default model's coefficients
    assert np.array_equal(_pixels(first.image), _pixels(second.image))
    core.generate(registry, "default", "2", "linear-ag", 3.0, 20, 0)
    assert calls == [(3.0, 3)]  # the default model at w=3, 20 steps uses the shipped file


def test_classify_reads_a_drawn_test_digit(registry):
    from diffguide import load_digits

    images, labels = load_digits("test")
    result = core.classify(registry, {"composite": _drawn(images[0])})
    assert result.prediction == int(labels[0])
    assert max(result.judge_probabilities, key=result.judge_probabilities.get) == str(int(labels[0]))
    assert set(result.errors) <= {str(c) for c in range(10)} and result.nfe > 0


@pytest.fixture(scope="module")
def smooth_lora(tmp_path_factory):
    """A 2-step LoRA on the default model (the shipped one may not exist yet)."""
    from diffusers import DDPMScheduler

    from diffguide import load_default_pipeline
    from diffguide.models.pipeline import default_scheduler_config
    from diffguide.models.smooth_lora import SmoothLoraConfig, digits_batches, train_smooth_lora

    folder = tmp_path_factory.mktemp("lora")
    config = SmoothLoraConfig(steps=2, batch_size=2, learning_rate=1e-2)
    train_smooth_lora(
        load_default_pipeline().unet, DDPMScheduler(**default_scheduler_config()), digits_batches(config),
        folder / "out", folder / "run", config, progress=False,
    )  # fmt: skip
    return folder / "out"


def test_interpolate_gives_base_and_lora_strips_with_their_istd(registry, smooth_lora):
    from diffguide.metrics import interpolation_istd

    base, smooth = core.interpolate(registry, "3", 3.0, 3, 0, lora=smooth_lora)
    reference, _, _ = interpolation_istd(
        registry.get("default").pipe, [3], seed=0, guidance_scale=3.0, num_inference_steps=3
    )
    assert base.istd == pytest.approx(reference) and smooth.istd != pytest.approx(reference)
    assert base.image.size == smooth.image.size and base.image.width > 11 * 28


def test_concurrent_requests_for_one_model_do_not_mix_guidance_state(registry):
    alone = {m: core.compare(registry, "default", "2", [m], 3.0, 6, 9)[0] for m in ("ag", "apg")}
    results = {}

    def run(method):
        results[method] = core.compare(registry, "default", "2", [method], 3.0, 6, 9)[0]

    threads = [threading.Thread(target=run, args=(m,)) for m in ("ag", "apg")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for method, sample in alone.items():
        assert np.array_equal(_pixels(results[method].image), _pixels(sample.image))
        assert results[method].nfe == sample.nfe


# --- the served app ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(smooth_lora, monkeypatch_module):
    pytest.importorskip("gradio")
    from diffguide.app import ui

    monkeypatch_module.setattr(core, "shipped_smooth_lora", lambda: smooth_lora)
    demo = ui.launch(core.ModelRegistry(), port=None, block=False)
    yield demo
    demo.close()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module")
def client(served):
    from gradio_client import Client

    return Client(served.local_url, verbose=False, analytics_enabled=False)


def test_app_binds_to_loopback_only(served):
    assert served.server_name == "127.0.0.1"
    assert served.local_url.startswith("http://127.0.0.1:")


def test_app_generate_tab(client):
    image, cost = client.predict(
        "default", "3", "cfg", 3.0, 4, 0, 0.0, 2.0, -0.5, 0.991, api_name="/generate"
    )
    assert PIL.Image.open(image).size == (224, 224) and "| cfg | 8 |" in cost


def test_app_compare_tab_and_concurrent_requests_match_single_runs(client):
    def ask(method):
        return client.submit("default", "6", [method], 3.0, 5, 3, api_name="/compare")

    alone = {m: ask(m).result() for m in ("apg", "ag")}
    jobs = {m: ask(m) for m in ("apg", "ag")}  # both in flight at once
    for method, job in jobs.items():
        gallery, cost = job.result()
        reference = alone[method][0]
        assert len(gallery) == 1 and f"| {method} |" in cost
        assert np.array_equal(
            _pixels(PIL.Image.open(gallery[0]["image"])), _pixels(PIL.Image.open(reference[0]["image"]))
        )


def test_app_interpolate_tab(client):
    base, smooth, summary = client.predict("3", 3.0, 3, 0, api_name="/interpolate")
    assert PIL.Image.open(base).size == PIL.Image.open(smooth).size and "ISTD" in summary


def test_app_classify_tab(client, tmp_path):
    from gradio_client import handle_file

    from diffguide import load_digits

    images, labels = load_digits("test")
    path = tmp_path / "drawn.png"
    PIL.Image.fromarray(_drawn(images[1])).save(path)
    sketch = {"background": None, "layers": [], "composite": handle_file(str(path))}
    preview, errors, judge, summary = client.predict(sketch, None, "fast", api_name="/classify")
    assert judge["label"] == str(int(labels[1]))
    assert f"Diffusion Classifier: **{int(labels[1])}**" in summary


def test_app_shows_bad_input_as_a_message_and_keeps_serving(client):
    from gradio_client.exceptions import AppError as ClientAppError

    # the page's slider range is the rule's: Gradio checks it first, with its own message
    with pytest.raises(ClientAppError, match="less than minimum value 1|steps must be between 1 and 200"):
        client.predict("default", "3", "cfg", 3.0, 0, 0, 0.0, 2.0, -0.5, 0.991, api_name="/generate")
    with pytest.raises(ClientAppError, match="class from 0 to 9"):
        client.predict("default", "x", "cfg", 3.0, 4, 0, 0.0, 2.0, -0.5, 0.991, api_name="/generate")
    with pytest.raises(ClientAppError, match="sketch is empty"):
        client.predict(
            {"background": None, "layers": [], "composite": None}, None, "fast", api_name="/classify"
        )
    image, _ = client.predict("default", "1", "ag", 3.0, 3, 0, 0.0, 2.0, -0.5, 0.991, api_name="/generate")
    assert PIL.Image.open(image).size == (224, 224)
