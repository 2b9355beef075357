"""The Gradio Blocks layout of the demo: four tabs over :mod:`diffguide.app.core`.

Nothing here computes anything; each handler calls one function of ``core`` and turns an
:class:`~diffguide.app.core.AppError` (or any other failure) into a ``gr.Error`` message, so a
visitor reads what went wrong and the app keeps serving.
"""

from __future__ import annotations

import functools
import logging

from . import core

log = logging.getLogger(__name__)

INTRO = """# diffguide demo
Guidance rules from recent papers on the same seed, what they cost, and a diffusion model used
as a classifier. The embedded model draws 28 x 28 digits; CFG is the reference every rule
reduces to."""


def _readable_errors(fn):
    """Show failures as a message in the page, never as a traceback."""
    import gradio as gr

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except core.AppError as err:
            raise gr.Error(str(err), print_exception=False) from None
        except gr.Error:
            raise
        except Exception as err:  # the page gets one line; the server log keeps the traceback
            log.exception("request failed")
            raise gr.Error(f"{type(err).__name__}: {err}", print_exception=False) from None

    return wrapper


def _cost_table(samples: list[core.Sample]) -> str:
    rows = "\n".join(f"| {s.method} | {s.nfe:g} | {s.seconds:.2f} s |" for s in samples)
    return "| method | NFE per image | time |\n|---|---|---|\n" + rows


def build_app(registry: core.ModelRegistry | None = None):
    """The demo as a ``gr.Blocks`` (not launched)."""
    import gradio as gr
    import pandas as pd

    registry = registry or core.ModelRegistry()
    tracked = gr.Progress(track_tqdm=True)  # the pipelines' own tqdm bars drive the page's

    @_readable_errors
    def on_generate(model, condition, method, scale, steps, seed, eta, cap, momentum, threshold,
                    progress=tracked):  # fmt: skip
        params = {"eta": eta, "norm_threshold": cap, "momentum": momentum} if method == "apg" else {}
        if method == "ag":
            params = {"threshold": threshold}
        sample = core.generate(registry, model, condition, method, scale, steps, seed, params)
        return sample.image, _cost_table([sample])

    @_readable_errors
    def on_compare(model, condition, methods, scale, steps, seed, progress=tracked):
        samples = core.compare(registry, model, condition, methods, scale, steps, seed)
        return [(s.image, s.caption) for s in samples], _cost_table(samples)

    @_readable_errors
    def on_interpolate(label, scale, steps, seed, progress=tracked):
        base, smooth = core.interpolate(registry, label, scale, steps, seed)
        summary = f"ISTD (lower is smoother): base **{base.istd:.2f}**, Smooth-LoRA **{smooth.istd:.2f}**"
        return base.image, smooth.image, summary

    @_readable_errors
    def on_classify(sketch, upload, schedule, progress=tracked):
        result = core.classify(registry, upload if upload is not None else sketch, schedule=schedule)
        errors = pd.DataFrame({"class": list(result.errors), "error": list(result.errors.values())})
        summary = (
            f"Diffusion Classifier: **{result.prediction}** ({result.nfe} network evaluations); "
            f"judge: **{max(result.judge_probabilities, key=result.judge_probabilities.get)}**"
        )
        return core.digit_preview(result.digit), errors, result.judge_probabilities, summary

    method_choices = list(core.METHOD_NAMES)
    with gr.Blocks(title="diffguide demo") as demo:
        gr.Markdown(INTRO)
        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column():
                    g_model = gr.Dropdown(registry.names, value=core.DEFAULT_MODEL, label="model")
                    g_condition = gr.Textbox("3", label="class (0-9) or prompt")
                    g_method = gr.Radio(method_choices, value="apg", label="method")
                    g_scale = gr.Slider(*core.SCALE_RANGE, value=3.0, step=0.5, label="guidance scale")
                    g_steps = gr.Slider(*core.STEPS_RANGE, value=20, step=1, label="steps")
                    g_seed = gr.Number(0, precision=0, label="seed")
                    with gr.Accordion("method parameters", open=False):
                        g_eta = gr.Slider(
                            0.0, 1.0, value=0.0, step=0.05, label="APG eta (parallel component kept)"
                        )
                        g_cap = gr.Slider(
                            0.0, 20.0, value=2.0, step=0.5, label="APG norm threshold r (0 = no cap)"
                        )
                        g_momentum = gr.Slider(-0.9, 0.9, value=-0.5, step=0.05, label="APG momentum beta")
                        g_threshold = gr.Slider(
                            0.9, 1.0, value=0.991, step=0.001, label="AG cosine threshold"
                        )
                    g_button = gr.Button("Generate", variant="primary", elem_id="generate-button")
                with gr.Column():
                    g_image = gr.Image(label="sample", type="pil", elem_id="generate-image")
                    g_cost = gr.Markdown()
            g_button.click(
                on_generate,
                [
                    g_model,
                    g_condition,
                    g_method,
                    g_scale,
                    g_steps,
                    g_seed,
                    g_eta,
                    g_cap,
                    g_momentum,
                    g_threshold,
                ],
                [g_image, g_cost],
                api_name="generate",
            )
        with gr.Tab("Compare"):
            with gr.Row():
                with gr.Column():
                    c_model = gr.Dropdown(registry.names, value=core.DEFAULT_MODEL, label="model")
                    c_condition = gr.Textbox("7", label="class (0-9) or prompt")
                    c_methods = gr.CheckboxGroup(method_choices, value=method_choices, label="methods")
                    c_scale = gr.Slider(*core.SCALE_RANGE, value=3.0, step=0.5, label="guidance scale")
                    c_steps = gr.Slider(*core.STEPS_RANGE, value=20, step=1, label="steps")
                    c_seed = gr.Number(0, precision=0, label="seed")
                    c_button = gr.Button("Compare on one seed", variant="primary", elem_id="compare-button")
                with gr.Column():
                    c_gallery = gr.Gallery(
                        label="same seed, each method", columns=4, elem_id="compare-gallery"
                    )
                    c_cost = gr.Markdown()
            c_button.click(
                on_compare,
                [c_model, c_condition, c_methods, c_scale, c_steps, c_seed],
                [c_gallery, c_cost],
                api_name="compare",
            )
        with gr.Tab("Interpolate"):
            gr.Markdown("Slerp between two noises (11 images) with the base model and its Smooth-LoRA.")
            with gr.Row():
                i_label = gr.Dropdown([str(d) for d in range(10)], value="3", label="class")
                i_scale = gr.Slider(*core.SCALE_RANGE, value=3.0, step=0.5, label="guidance scale")
                i_steps = gr.Slider(*core.STEPS_RANGE, value=20, step=1, label="steps")
                i_seed = gr.Number(0, precision=0, label="seed")
            i_button = gr.Button("Interpolate", variant="primary", elem_id="interpolate-button")
            i_base = gr.Image(label="base model", type="pil")
            i_smooth = gr.Image(label="Smooth-LoRA", type="pil", elem_id="interpolate-smooth")
            i_summary = gr.Markdown()
            i_button.click(
                on_interpolate,
                [i_label, i_scale, i_steps, i_seed],
                [i_base, i_smooth, i_summary],
                api_name="interpolate",
            )
        with gr.Tab("Classify"):
            with gr.Row():
                with gr.Column():
                    k_sketch = gr.Sketchpad(
                        label="draw a digit",
                        type="numpy",
                        canvas_size=(280, 280),
                        fixed_canvas=True,
                        brush=gr.Brush(default_size=16, colors=["#000000"], color_mode="fixed"),
                        elem_id="classify-sketch",
                    )
                    k_upload = gr.Image(
                        label="or upload an image of one", type="numpy", sources=["upload"], height=160
                    )
                    k_schedule = gr.Dropdown(
                        ["fast", "paper-cifar10", "full"], value="fast", label="schedule"
                    )
                    k_button = gr.Button("Classify", variant="primary", elem_id="classify-button")
                with gr.Column():
                    k_preview = gr.Image(
                        label="what the classifier sees", type="pil", elem_id="classify-preview", height=200
                    )
                    k_summary = gr.Markdown()
                    k_errors = gr.BarPlot(
                        x="class",
                        y="error",
                        label="Diffusion Classifier: error per class (lower wins)",
                        height=220,
                    )
                    k_judge = gr.Label(num_top_classes=3, label="judge network probabilities")
            k_button.click(
                on_classify,
                [k_sketch, k_upload, k_schedule],
                [k_preview, k_errors, k_judge, k_summary],
                api_name="classify",
            )
    return demo


def launch(
    registry: core.ModelRegistry | None = None,
    host: str = "127.0.0.1",
    port: int | None = None,
    share: bool = False,
    block: bool = True,
    concurrency: int = 4,
):
    """Start the demo on ``host:port`` (loopback unless asked otherwise). Requests for one model
    queue on that model's lock (``core``); ``concurrency`` requests run at once overall."""
    demo = build_app(registry)
    demo.queue(default_concurrency_limit=concurrency)
    demo.launch(
        server_name=host, server_port=port, share=share, prevent_thread_lock=not block, quiet=not block
    )
    return demo
