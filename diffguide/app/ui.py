"""The Gradio Blocks layout of the demo: four tabs over :mod:`diffguide.app.core`.

Nothing here computes anything; each handler calls one function of ``core`` and turns an
:class:`~diffguide.app.core.AppError` (or any other failure) into a ``gr.Error`` message, so a
visitor reads what went wrong and the app keeps serving.
"""

from __future__ import annotations

import functools
import inspect
import logging

from ..classifier import DEFAULT_SCHEDULE
from ..guidance import METHODS, Method, Param
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


#: a number whose range spans at most this much gets a slider; wider ones a number box
SLIDER_SPAN = 25.0
NO_PRESET = "registry defaults"


def _info(param: Param) -> str:
    if param.kind == "path":
        return f"{param.range_text}; empty by default"
    default = core.control_value(param, param.default)
    return f"{param.range_text}; registry default " + (default if param.kind == "choice" else f"{default:g}")


def param_control(param: Param, value, elem_id: str):
    """The widget for one registry parameter: labelled with its doc, its range in the info line."""
    import gradio as gr

    common = {"value": value, "label": f"{param.name}: {param.doc}", "info": _info(param), "elem_id": elem_id}
    if param.kind in ("float", "int"):
        numeric = {"minimum": param.low, "maximum": param.high, "step": param.step}
        numeric["precision"] = 0 if param.kind == "int" else None
        if param.high - param.low <= SLIDER_SPAN:
            return gr.Slider(**numeric, **common)
        return gr.Number(**numeric, **common)
    if param.kind == "choice":
        widget = gr.Radio if len(param.choices) <= 3 else gr.Dropdown
        return widget(list(param.choices), **common)
    return gr.Textbox(placeholder="path to a .safetensors or .json file", **common)


def _method_note(entry: Method) -> str:
    presets = "; ".join(
        f"**{preset}**: " + ", ".join(f"{k} {v:g}" for k, v in values.items())
        for preset, values in entry.presets.items()
    )
    note = f"{entry.paper}."
    if presets:
        note += (
            f" Presets: {presets}. The controls start at the selected model's preset, or the registry "
            "defaults when its family has none; the values shown are what runs."
        )
    if entry.name == "linear-ag":
        note += (
            " Leave coefficients empty to use the ones shipped with the default model (w = 3, 20 steps) "
            "or a calibration on first use (digits models, about 200 CFG runs); a text model needs a file."
        )
    return note


class MethodControls:
    """Every method's parameter controls for one tab, each method in an accordion (from the
    registry). ``values`` lists the controls in ``core.PARAM_KEYS`` order."""

    def __init__(self, prefix: str, model: core.LoadedModel, shown, open_: bool):
        import gradio as gr

        self.boxes, self.presets, self.controls = {}, {}, {}
        for name, entry in METHODS.items():
            with gr.Accordion(
                f"{entry.title} ({name}) parameters",
                open=open_,
                visible=name in shown,
                elem_id=f"{prefix}-method-{name}",
            ) as box:
                gr.Markdown(_method_note(entry))
                if entry.presets:
                    self.presets[name] = gr.Dropdown(
                        [NO_PRESET, *entry.presets],
                        value=core.page_preset(name, model) or NO_PRESET,
                        label="fill in a preset",
                        info="starts at the selected model's; picking one sets the values below",
                        elem_id=f"{prefix}-preset-{name}",
                    )
                values = core.page_values(name, model)
                for param in entry.params:
                    self.controls[name, param.name] = param_control(
                        param, values[param.name], f"{prefix}-param-{name}-{param.name}"
                    )
            self.boxes[name] = box
        self.values = [self.controls[key] for key in core.PARAM_KEYS]

    def of(self, name: str) -> list:
        return [self.controls[name, param.name] for param in METHODS[name].params]

    def wire(self, registry: core.ModelRegistry, model_dropdown, selector) -> None:
        """Fill the controls when a preset is picked or the model changes; show the accordions of
        the selected methods."""
        hidden = {"api_visibility": "undocumented"}  # page plumbing, not part of the API
        for name, dropdown in self.presets.items():
            fill = _readable_errors(functools.partial(_preset_filled, name))
            dropdown.input(fill, dropdown, self.of(name), **hidden)
        outputs = [*self.presets.values(), *self.values]
        fill = _readable_errors(functools.partial(model_filled, registry))
        model_dropdown.change(fill, model_dropdown, outputs, **hidden)
        selector.change(
            functools.partial(_shown, list(self.boxes)), selector, list(self.boxes.values()), **hidden
        )


def _shown(names: list[str], chosen) -> list:
    import gradio as gr

    chosen = [chosen] if isinstance(chosen, str) else list(chosen or ())
    return [gr.update(visible=name in chosen) for name in names]


def _preset_filled(name: str, preset: str) -> list:
    values = core.preset_values(name, None if preset == NO_PRESET else preset)
    return [values[param.name] for param in METHODS[name].params]


def model_filled(registry: core.ModelRegistry, model_name: str) -> list:
    """The presets and control values a tab shows for ``model_name`` (``MethodControls.wire``'s
    outputs: the methods' preset dropdowns, then every control in ``core.PARAM_KEYS`` order)."""
    model = registry.get(model_name)
    presets = [core.page_preset(name, model) or NO_PRESET for name, entry in METHODS.items() if entry.presets]
    values = {name: core.page_values(name, model) for name in METHODS}
    return [*presets, *(values[name][param] for name, param in core.PARAM_KEYS)]


def _gradio_handler(fn, names: list[str], progress):
    """``fn(*values)`` as Gradio sees a handler of one positional parameter per input (``names``)
    followed by the progress tracker, which it then drops."""

    def handler(*args):
        return fn(*args[: len(names)])  # Gradio passes a progress tracker of its own last

    parameters = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names]
    parameters.append(
        inspect.Parameter("progress", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=progress)
    )
    handler.__signature__ = inspect.Signature(parameters)
    handler.__name__ = fn.__name__
    return handler


def _cost_table(samples: list[core.Sample]) -> str:
    rows = "\n".join(f"| {s.method} | {s.nfe:g} | {s.seconds:.2f} s |" for s in samples)
    return "| method | NFE per image | time |\n|---|---|---|\n" + rows


def build_app(registry: core.ModelRegistry | None = None):
    """The demo as a ``gr.Blocks`` (not launched)."""
    import gradio as gr
    import pandas as pd

    registry = registry or core.ModelRegistry()
    tracked = gr.Progress(track_tqdm=True)  # the pipelines' own tqdm bars drive the page's

    def on_generate(model, condition, method, scale, steps, seed, *values):
        params = core.split_params(values)[method] if method in METHODS else {}
        sample = core.generate(registry, model, condition, method, scale, steps, seed, params)
        return sample.image, _cost_table([sample])

    def on_compare(model, condition, methods, scale, steps, seed, *values):
        params = core.split_params(values)
        samples = core.compare(registry, model, condition, methods, scale, steps, seed, params)
        return [(s.image, s.caption) for s in samples], _cost_table(samples)

    settings = ["model", "condition", "method", "scale", "steps", "seed"]
    param_names = [f"{name}_{param}".replace("-", "_") for name, param in core.PARAM_KEYS]
    on_generate = _readable_errors(_gradio_handler(on_generate, settings + param_names, tracked))
    settings[2] = "methods"
    on_compare = _readable_errors(_gradio_handler(on_compare, settings + param_names, tracked))

    @_readable_errors
    def on_interpolate(label, scale, steps, seed, progress=tracked):
        base, smooth = core.interpolate(registry, label, scale, steps, seed)
        summary = f"ISTD (lower is smoother): base **{base.istd:.2f}**, Smooth-LoRA **{smooth.istd:.2f}**"
        return base.image, smooth.image, summary

    @_readable_errors
    def on_classify(sketch, upload, schedule, model_name=core.DEFAULT_MODEL, progress=tracked):
        image = upload if upload is not None else sketch
        result = core.classify(registry, image, model_name=model_name, schedule=schedule)
        errors = pd.DataFrame({"class": list(result.errors), "error": list(result.errors.values())})
        summary = (
            f"Diffusion Classifier: **{result.prediction}** ({result.nfe} network evaluations); "
            f"judge: **{max(result.judge_probabilities, key=result.judge_probabilities.get)}**"
        )
        return core.digit_preview(result.digit), errors, result.judge_probabilities, summary

    method_choices = list(core.METHOD_NAMES)
    default_model = registry.get(core.DEFAULT_MODEL)  # its family sets the controls' starting preset
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
                    g_params = MethodControls("generate", default_model, shown=["apg"], open_=True)
                    g_button = gr.Button("Generate", variant="primary", elem_id="generate-button")
                with gr.Column():
                    g_image = gr.Image(label="sample", type="pil", elem_id="generate-image")
                    g_cost = gr.Markdown()
            g_params.wire(registry, g_model, g_method)
            g_button.click(
                on_generate,
                [g_model, g_condition, g_method, g_scale, g_steps, g_seed, *g_params.values],
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
                    c_params = MethodControls("compare", default_model, shown=method_choices, open_=False)
                    c_button = gr.Button("Compare on one seed", variant="primary", elem_id="compare-button")
                with gr.Column():
                    c_gallery = gr.Gallery(
                        label="same seed, each method", columns=len(method_choices), elem_id="compare-gallery"
                    )
                    c_cost = gr.Markdown()
            c_params.wire(registry, c_model, c_methods)
            c_button.click(
                on_compare,
                [c_model, c_condition, c_methods, c_scale, c_steps, c_seed, *c_params.values],
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
                        [DEFAULT_SCHEDULE, "paper-cifar10", "full"], value=DEFAULT_SCHEDULE, label="schedule"
                    )
                    k_model = gr.Dropdown(
                        registry.names, value=core.DEFAULT_MODEL, label="model (class labels)"
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
                [k_sketch, k_upload, k_schedule, k_model],
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
