"""The demo: its functions called directly, then the served app driven by gradio_client."""

from __future__ import annotations

import os
import re
import threading

import numpy as np
import PIL.Image
import pytest
import torch

from diffguide.app import core
from diffguide.classifier import DEFAULT_SCHEDULE

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
    from diffguide.models import FASHION_MODEL_DIR

    shipped = ["fashion"] if (FASHION_MODEL_DIR / "model_index.json").is_file() else []
    assert registry.names == ["default", *shipped, "broken"]
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
    real = compare.calibrate_on_labels
    monkeypatch.setattr(compare, "calibrate_on_labels",
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


# --- method parameters: from the registry -------------------------------------------------------


def _changed(param, value, coefficients):
    """A setting of ``param`` other than ``value`` (the page's untouched one), in range."""
    if param.kind == "path":
        return str(coefficients)
    if param.kind == "choice":
        return next(c for c in param.choices if c != value)
    if param.infinite is not None and value != param.infinite:
        return param.infinite  # also proves the widget's stand-in for inf reaches the rule
    return param.low if value != param.low else param.high


@pytest.fixture(scope="module")
def coefficients(tmp_path_factory):
    """A LinearAG file for 20 steps at w = 3: zeros, every step real CFG (so nfe 40, not the shipped 25)."""
    from diffguide.guidance import LinearAG

    path = tmp_path_factory.mktemp("linear-ag") / "zeros.safetensors"
    return LinearAG(torch.zeros(20, 4), schedule=["cfg"] * 20, guidance_scale=3.0).save(path)


@pytest.fixture(scope="module")
def text_model():
    """A tiny random-weight SDXL pipeline (family "sdxl": APG's paper preset) as the app holds models."""
    from tiny_pipelines import tiny_sdxl

    return core.LoadedModel("tiny-sdxl", tiny_sdxl())


def test_method_names_are_the_registry():
    from diffguide.guidance import METHODS

    assert core.METHOD_NAMES == tuple(METHODS) and "interval" in core.METHOD_NAMES
    assert core.PARAM_KEYS == tuple((m.name, p.name) for m in METHODS.values() for p in m.params)


@pytest.mark.parametrize("name", core.METHOD_NAMES)
def test_untouched_controls_build_the_registry_rule(registry, name):
    from diffguide import make_rule
    from diffguide.compare import SHIPPED_LINEAR_AG, build_rule, resolve_preset
    from diffguide.models import DEFAULT_MODEL_DIR

    model = registry.get("default")
    rule = core.make_method(name, model, 3.0, 20, core.page_values(name, model))
    # linear-ag left empty on the default model at w = 3, 20 steps: the shipped coefficients
    shipped = {"coefficients": DEFAULT_MODEL_DIR / SHIPPED_LINEAR_AG[3.0, 20]} if name == "linear-ag" else {}
    expected = make_rule(name, preset=resolve_preset(name, model.pipe), **shipped)
    assert repr(rule) == repr(expected) == repr(build_rule(name, model.pipe, 3.0, 20))
    assert core.page_preset(name, model) == ("digits" if name in ("apg", "ag") else None)


@pytest.mark.parametrize("name", core.METHOD_NAMES)
def test_untouched_controls_on_a_text_model_build_its_rule(text_model, coefficients, name):
    from diffguide import make_rule
    from diffguide.compare import build_rule, resolve_preset

    values = core.page_values(name, text_model)
    if name == "linear-ag":  # no coefficients for a text model: refused, saying what to do
        with pytest.raises(core.AppError, match="needs coefficients calibrated on it.*coefficients box"):
            core.make_method(name, text_model, 3.0, 20, values)
        values = {"coefficients": str(coefficients)}
    rule = core.make_method(name, text_model, 3.0, 20, values)
    expected = make_rule(
        name, preset=resolve_preset(name, text_model.pipe), **values if name == "linear-ag" else {}
    )
    assert repr(rule) == repr(expected) == repr(build_rule(name, text_model.pipe, 3.0, 20, **values))
    if name == "apg":  # the SDXL preset (the paper's cap), not the digits model's
        assert values["norm_threshold"] == 15.0 and rule.norm_threshold == 15.0


@pytest.mark.parametrize("key", core.PARAM_KEYS, ids=["-".join(key) for key in core.PARAM_KEYS])
def test_a_changed_control_reaches_the_rule(registry, coefficients, key):
    from diffguide import make_rule
    from diffguide.compare import resolve_preset
    from diffguide.guidance import METHODS

    name, param_name = key
    model = registry.get("default")
    param = METHODS[name].param(param_name)
    values = core.page_values(name, model)
    setting = _changed(param, values[param_name], coefficients)
    rule = core.make_method(name, model, 3.0, 20, {**values, param_name: setting})
    expected = make_rule(name, preset=resolve_preset(name, model.pipe), **{param_name: setting})
    assert repr(rule) == repr(expected)
    assert repr(rule) != repr(core.make_method(name, model, 3.0, 20, values))


def test_a_bad_parameter_gets_the_registry_message(registry, tmp_path):
    from diffguide.guidance import METHODS

    def registry_message(name, param, value):
        with pytest.raises(ValueError) as err:
            METHODS[name].param(param).check(value)
        return re.escape(f"{name}: {err.value}")

    model = registry.get("default")
    with pytest.raises(core.AppError, match=registry_message("apg", "norm_threshold", -1.0)):
        core.make_method("apg", model, 3.0, 4, {"norm_threshold": -1.0})
    with pytest.raises(core.AppError, match=registry_message("ag", "space", "pixels")):
        core.make_method("ag", model, 3.0, 4, {"space": "pixels"})
    with pytest.raises(core.AppError, match="cfg has no parameter 'eta'"):
        core.make_method("cfg", model, 3.0, 4, {"eta": 1.0})
    with pytest.raises(core.AppError, match="linear-ag.*: LinearAG coefficients file .* does not exist"):
        core.make_method("linear-ag", model, 3.0, 4, {"coefficients": str(tmp_path / "missing.safetensors")})


def test_compare_takes_each_methods_parameters(registry):
    # AG at threshold -1 switches at once: CFG at step 0, the conditional pass alone after it
    samples = core.compare(registry, "default", "7", ["cfg", "ag"], 3.0, 4, 2, {"ag": {"threshold": -1.0}})
    assert [s.nfe for s in samples] == [8, 5]
    interval = core.compare(registry, "default", "7", ["interval"], 3.0, 4, 2)[0]
    assert 4 <= interval.nfe <= 8 and interval.image.size == (224, 224)


def _by_id(demo) -> dict:
    return {block.elem_id: block for block in demo.blocks.values() if getattr(block, "elem_id", None)}


@pytest.fixture(scope="module")
def built(registry):
    pytest.importorskip("gradio")
    from diffguide.app import ui

    return ui.build_app(registry)


@pytest.mark.parametrize("tab", ["generate", "compare"])
def test_the_page_has_a_control_for_every_registry_parameter(registry, built, tab):
    import gradio as gr

    from diffguide.compare import resolve_preset
    from diffguide.guidance import METHODS

    blocks, pipe = _by_id(built), registry.get("default").pipe
    made = {key for key in blocks if key.startswith(f"{tab}-param-")}
    assert made == {f"{tab}-param-{name}-{param}" for name, param in core.PARAM_KEYS}
    for name, entry in METHODS.items():
        preset = resolve_preset(name, pipe)
        assert isinstance(blocks[f"{tab}-method-{name}"], gr.Accordion)
        if entry.presets:  # the preset dropdown starts at the default model's (digits) or at none
            assert blocks[f"{tab}-preset-{name}"].value == (preset or "registry defaults")
        settings = entry.settings(preset)
        for param in entry.params:
            control = blocks[f"{tab}-param-{name}-{param.name}"]
            shown = param.widget_value(settings[param.name])
            assert control.value == (shown if shown is not None else "")
            assert param.doc in control.label and param.range_text in control.info
            if param.kind in ("float", "int"):
                assert isinstance(control, gr.Slider | gr.Number)
                assert (control.minimum, control.maximum) == (param.low, param.high)
            elif param.kind == "choice":
                assert [value for _, value in control.choices] == list(param.choices)
            else:
                assert isinstance(control, gr.Textbox)
    # the APG cap: the digits preset's 2 (the registry default, 15, is in its info line)
    cap = blocks[f"{tab}-param-apg-norm_threshold"]
    assert cap.value == 2.0 and "registry default 15" in cap.info


def test_changing_the_model_fills_in_its_presets(registry, text_model):
    from diffguide.app import ui
    from diffguide.guidance import METHODS

    filled = ui.model_filled(registry, "default")
    with_presets = [name for name, entry in METHODS.items() if entry.presets]
    assert filled[: len(with_presets)] == ["digits", "digits", "registry defaults"]  # apg, ag, interval
    page = {name: core.page_values(name, registry.get("default")) for name in METHODS}
    assert filled[len(with_presets) :] == [page[name][param] for name, param in core.PARAM_KEYS]
    sdxl = ui._preset_filled("apg", "sdxl")  # picking a preset fills in its values
    assert sdxl == list(core.preset_values("apg", "sdxl").values()) and sdxl[1] == 15.0
    assert ui._preset_filled("apg", "registry defaults") == list(core.preset_values("apg").values())


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


def _page(registry, **changes) -> list:
    """The page's parameter controls as sent when untouched (``PARAM_KEYS`` order), with
    ``changes`` keyed ``method__param`` (``-`` in names as ``_``)."""
    model = registry.get("default")
    values = [core.page_values(name, model)[param] for name, param in core.PARAM_KEYS]
    for key, value in changes.items():
        values[[f"{n}__{p}".replace("-", "_") for n, p in core.PARAM_KEYS].index(key)] = value
    return values


def test_app_binds_to_loopback_only(served):
    assert served.server_name == "127.0.0.1"
    assert served.local_url.startswith("http://127.0.0.1:")


def test_app_generate_tab(client, registry):
    image, cost = client.predict("default", "3", "cfg", 3.0, 4, 0, *_page(registry), api_name="/generate")
    assert PIL.Image.open(image).size == (224, 224) and "| cfg | 8 |" in cost
    # AG above any cosine never switches: CFG's NFE
    _, cost = client.predict(
        "default", "3", "ag", 3.0, 4, 0, *_page(registry, ag__threshold=1.5), api_name="/generate"
    )
    assert "| ag | 8 |" in cost


def test_app_compare_tab_passes_each_methods_parameters(client, registry):
    # AG at threshold -1 switches at step 0: one CFG step, then the conditional pass alone
    _, cost = client.predict(
        "default", "7", ["cfg", "ag"], 3.0, 4, 0, *_page(registry, ag__threshold=-1.0), api_name="/compare"
    )
    assert "| cfg | 8 |" in cost and "| ag | 5 |" in cost
    _, cost = client.predict("default", "7", ["ag"], 3.0, 4, 0, *_page(registry), api_name="/compare")
    assert "| ag | 5 |" not in cost  # the digits threshold, 0.991, switches later


def test_app_compare_tab_and_concurrent_requests_match_single_runs(client, registry):
    def ask(method):
        return client.submit("default", "6", [method], 3.0, 5, 3, *_page(registry), api_name="/compare")

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
    preview, errors, judge, summary = client.predict(
        sketch, None, DEFAULT_SCHEDULE, "default", api_name="/classify"
    )
    assert judge["label"] == str(int(labels[1]))
    assert f"Diffusion Classifier: **{int(labels[1])}**" in summary


def test_app_shows_bad_input_as_a_message_and_keeps_serving(client, registry):
    from gradio_client.exceptions import AppError as ClientAppError

    page = _page(registry)
    # the page's slider range is the rule's: Gradio checks it first, with its own message
    with pytest.raises(ClientAppError, match="less than minimum value 1|steps must be between 1 and 200"):
        client.predict("default", "3", "cfg", 3.0, 0, 0, *page, api_name="/generate")
    with pytest.raises(ClientAppError, match="class from 0 to 9"):
        client.predict("default", "x", "cfg", 3.0, 4, 0, *page, api_name="/generate")
    # a parameter's range is the registry's, checked by the widget and again in core
    with pytest.raises(ClientAppError, match="less than minimum value -1|threshold must be from -1 to 1.5"):
        client.predict(
            "default", "3", "ag", 3.0, 4, 0, *_page(registry, ag__threshold=-2.0), api_name="/generate"
        )
    with pytest.raises(ClientAppError, match="coefficients file .*missing.json does not exist"):
        wrong = _page(registry, linear_ag__coefficients="missing.json")
        client.predict("default", "3", "linear-ag", 3.0, 4, 0, *wrong, api_name="/generate")
    with pytest.raises(ClientAppError, match="sketch is empty"):
        client.predict(
            {"background": None, "layers": [], "composite": None},
            None,
            DEFAULT_SCHEDULE,
            "default",
            api_name="/classify",
        )
    image, _ = client.predict("default", "1", "ag", 3.0, 3, 0, *page, api_name="/generate")
    assert PIL.Image.open(image).size == (224, 224)


def test_a_flow_transformer_folder_generates_and_classifies_with_its_own_judge(tmp_path):
    """A ClassConditionalTransformerPipeline (the fashion model's class, tiny and random here)
    takes class numbers like the digits model, samples as the pipeline itself does, and its
    Classify tab scores against the fashion judge."""
    from tiny_pipelines import tiny_fashion

    tiny = tiny_fashion()
    tiny.save_pretrained(tmp_path / "coats")
    mine = core.ModelRegistry([tmp_path / "coats"])
    sample = core.generate(mine, "coats", "4", "cfg", 3.0, 3, 5)
    direct = tiny(
        class_labels=[4],
        guidance_scale=3.0,
        num_inference_steps=3,
        generator=torch.Generator().manual_seed(5),
    ).images[0]
    assert np.array_equal(_pixels(sample.image), _pixels(direct.resize((224, 224), PIL.Image.NEAREST)))
    assert sample.nfe == 6
    with pytest.raises(core.AppError, match="the coats model takes a class from 0 to 9"):
        core.generate(mine, "coats", "10", "cfg", 3.0, 3, 5)
    assert mine.get("coats").judge_name == "fashion"
    result = core.classify(mine, {"composite": _drawn(torch.rand(1, 28, 28))}, model_name="coats")
    assert set(result.judge_probabilities) == {str(c) for c in range(10)}
    assert len(result.errors) >= 1 and result.nfe > 0
