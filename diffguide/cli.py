"""The ``diffguide`` command line: thin wrappers over the library.

Every subcommand has ``--help``; bad input exits non-zero with a one-line reason.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


class UsageError(ValueError):
    """Bad input from the command line; reported in one line with exit status 2."""


def parse_labels(text: str, num_classes: int = 10) -> list[int]:
    """``"0-9"``, ``"3"``, ``"1,3,5"`` or ``"0-4,7"`` -> a list of class labels."""
    labels: list[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part[1:]:
                low, high = (int(x) for x in part.split("-", 1))
                if low > high:
                    raise UsageError(f"label range {part!r} runs backwards")
                labels.extend(range(low, high + 1))
            else:
                labels.append(int(part))
        except ValueError as err:
            if isinstance(err, UsageError):
                raise
            raise UsageError(f"cannot read labels {text!r}: use forms like 0-9, 3 or 1,3,5") from None
    bad = [label for label in labels if not 0 <= label < num_classes]
    if bad:
        raise UsageError(f"label {bad[0]} is out of range: the model knows classes 0-{num_classes - 1}")
    return labels


def _check_output_path(path: Path) -> None:
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise UsageError(
            f"unknown output type {path.suffix or '(none)'!r} for {path}; use one of {IMAGE_SUFFIXES}"
        )
    if path.is_dir():
        raise UsageError(f"output path {path} is a directory; name an image file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot create the folder of {path}: {err.strerror}") from None
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UsageError(f"cannot write to {path}: permission denied")


DTYPES = ("float32", "float16", "bfloat16")


def _load_cli_pipeline(args: argparse.Namespace):
    """``--pipeline`` (the embedded digits model by default) on ``--device`` in ``--dtype``."""
    import torch

    from .models import load_pipeline

    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UsageError(f"--device {args.device!r} is not a device; use cpu, cuda, cuda:1 or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: this torch sees no CUDA device; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(
            f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {args.device}: MPS is not available here; use --device cpu")
    try:
        pipe = load_pipeline(args.pipeline, torch_dtype=getattr(torch, args.dtype))
    except (FileNotFoundError, OSError, ValueError) as err:
        raise UsageError(f"--pipeline {args.pipeline}: {str(err).splitlines()[0]}") from None
    from .hooks import check_pipeline

    try:
        check_pipeline(pipe)
    except TypeError as err:
        raise UsageError(f"--pipeline {args.pipeline}: {err}") from None
    if getattr(args, "sampler", None) is not None:
        from .models.pipeline import use_sampler
        from .prediction import uses_flow_sigmas

        if uses_flow_sigmas(pipe.scheduler) or "beta_schedule" not in pipe.scheduler.config:
            raise UsageError(
                f"--sampler {args.sampler}: {type(pipe.scheduler).__name__} drives a flow-matching model, which "
                "the --sampler choices (DDPM-family schedulers) cannot; leave --sampler out"
            )

        try:
            use_sampler(pipe, args.sampler)
        except (ValueError, AttributeError) as err:
            raise UsageError(f"--sampler {args.sampler}: {err}") from None
    return pipe.to(device)


def _conditions(args: argparse.Namespace, pipe) -> tuple[list[int] | None, list[str] | None, list[str]]:
    """(class labels, prompts, one grid-row label per condition): ``--labels`` for
    class-conditional pipelines, ``--prompt`` (repeatable) for text-to-image ones."""
    from .compare import is_class_conditional

    if is_class_conditional(pipe):
        if args.prompt or args.negative_prompt is not None:
            raise UsageError(
                f"{type(pipe).__name__} is class-conditional: give --labels, not --prompt or --negative-prompt"
            )
        if getattr(pipe, "num_classes", None) is None:
            raise UsageError(
                f"the CLI samples DigitsPipeline-style class-conditional models; {type(pipe).__name__}: "
                "use dg.apply(pipe, rule) in Python"
            )
        labels = parse_labels(args.labels or "0-9", pipe.num_classes)
        return [label for label in labels for _ in range(args.n)], None, [str(label) for label in labels]
    if args.labels is not None:
        raise UsageError(f"{type(pipe).__name__} takes prompts: give --prompt TEXT, not --labels")
    if not args.prompt:
        raise UsageError(f"{type(pipe).__name__} takes prompts: give --prompt TEXT")
    prompts = [prompt for prompt in args.prompt for _ in range(args.n)]
    return None, prompts, [prompt if len(prompt) <= 24 else prompt[:23] + "…" for prompt in args.prompt]


def parse_params(texts: list[str], methods: list[str]) -> dict[str, dict]:
    """``--param`` values checked against the registry, per method: ``key=value`` applies to every
    chosen method with that parameter, ``method.key=value`` to one."""
    from .guidance import method

    params: dict[str, dict] = {name: {} for name in methods}
    for text in texts:
        key, sep, value = text.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--param {text!r}: write key=value or method.key=value, e.g. norm_threshold=5")
        scope, _, name = key.strip().rpartition(".")
        targets = [scope] if scope else methods
        if scope and scope not in methods:
            raise UsageError(
                f"--param {text!r}: {scope!r} is not one of the chosen methods ({', '.join(methods)})"
            )
        owners = [m for m in targets if name in {p.name for p in method(m).params}]
        if not owners:
            known = "; ".join(f"{m}: {', '.join(p.name for p in method(m).params)}" for m in targets)
            raise UsageError(f"--param {text!r}: no chosen method has a parameter {name!r} ({known})")
        for owner in owners:
            param = method(owner).param(name)
            try:
                params[owner][name] = param.check(param.parse(value))
            except ValueError as err:
                raise UsageError(f"--param {text!r}: {err}") from None
    return params


def _run_methods(args: argparse.Namespace, methods: list[str]) -> int:
    """The body of ``sample`` and ``compare``: build each rule from the registry, sample on the
    same seeds, write the grid (a row per method and condition) and print the table."""
    from .guidance import METHODS

    unknown = [m for m in methods if m not in METHODS]
    if not methods or unknown:
        raise UsageError(
            f"unknown method {unknown[0] if unknown else '(none)'!r}; choose from {', '.join(METHODS)}"
        )
    for flag, value in (("--steps", args.steps), ("--n", args.n)):
        if value < 1:
            raise UsageError(f"{flag} must be >= 1, got {value}")
    params = parse_params(args.param, methods)
    out = Path(args.out)
    _check_output_path(out)
    pipe = _load_cli_pipeline(args)
    class_labels, prompts, row_labels = _conditions(args, pipe)
    if methods != ["cfg"] and not args.scale > 1:
        raise UsageError(f"--scale {args.scale}: guidance rules need a CFG scale > 1")

    import torch

    from .compare import build_rule, compare, resolve_preset, scale_argument
    from .images import labelled_grid

    if args.preset not in ("auto", "none") and not any(args.preset in METHODS[m].presets for m in methods):
        known = sorted({p for m in METHODS.values() for p in m.presets})
        raise UsageError(
            f"--preset {args.preset}: none of {', '.join(methods)} has it (presets: {', '.join(known)}, auto, none)"
        )
    rules, presets = {}, {}
    for name in methods:
        try:
            presets[name] = resolve_preset(name, pipe, args.preset)
            rules[name] = build_rule(name, pipe, args.scale, args.steps, presets[name], **params[name])
        except ValueError as err:
            raise UsageError(f"{name}: {err}") from None
    judge = None
    from .models import JUDGE_DIRS, load_judge

    if class_labels is not None and args.pipeline in JUDGE_DIRS:  # an embedded model: its own judge
        judge = load_judge(args.pipeline)
    results = compare(
        pipe, rules, class_labels=class_labels, prompts=prompts, negative_prompt=args.negative_prompt,
        seed=args.seed, judge=judge, guidance_scale=args.scale, num_inference_steps=args.steps,
    )  # fmt: skip
    rows = [f"{r.name} {label}" if len(results) > 1 else label for r in results for label in row_labels]
    labelled_grid(
        torch.cat([r.images for r in results]), rows, margin=max(24, 8 + 6 * max(map(len, rows)))
    ).save(out)
    samples = len(class_labels or prompts)
    print(
        f"wrote {out.resolve()}: {len(results)} method(s) x {samples} samples, seeds {args.seed}-{args.seed + samples - 1}, "
        f"{scale_argument(pipe)}={args.scale:g}"
    )
    baseline = next((r for r in results if r.name == "cfg"), results[0])
    from .compare import benchmark_point
    from .metrics import per_sample_distance

    model = {"default": "digits"}.get(args.pipeline, args.pipeline) if args.pipeline in JUDGE_DIRS else None
    print(
        f"{'method':<10} {'NFE/image':>9} {'time (s)':>9} {'time/' + baseline.name:>9} {'judge acc.':>10} "
        f"{'L2 to ' + baseline.name:>9} {'P / R (benchmark)':>18}  rule"
    )
    footnote = None
    for r in results:
        accuracy = f"{r.judge_accuracy:.0%}" if r.judge_accuracy is not None else "-"
        preset = f" (preset {presets[r.name]})" if presets[r.name] else ""
        distance = per_sample_distance(r.images, baseline.images).mean().item()
        point = benchmark_point(model, r.rule, args.steps, args.scale) if model else None
        measured = f"{point['precision']:.2f} / {point['recall']:.2f}" if point else "-"
        footnote = footnote or point
        print(
            f"{r.name:<10} {r.nfe_per_image:>9.1f} {r.seconds:>9.2f} "
            f"{r.seconds / baseline.seconds:>9.2f} {accuracy:>10} {distance:>9.2f} {measured:>18}  {r.rule!r}{preset}"
        )
    print(
        f"L2 to {baseline.name}: mean per-sample pixel distance (0-1) to the {baseline.name} row on the same seeds."
        + (
            f" P / R: improved precision and recall (k=3) of this rule and setting in the benchmark, "
            f"{footnote['samples']} samples (docs/BENCHMARKS.md, frontier_{model}); too few samples here to measure."
            if footnote
            else ""
        )
    )
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    return _run_methods(args, [args.method])


def _cmd_compare(args: argparse.Namespace) -> int:
    return _run_methods(args, [m.strip() for m in args.methods.split(",") if m.strip()])


def _cmd_classify(args: argparse.Namespace) -> int:
    from .classifier import PRESETS

    if args.schedule not in PRESETS:
        raise UsageError(f"unknown --schedule {args.schedule!r}; choose from {', '.join(PRESETS)}")
    from .metrics.features import IMAGE_SUFFIXES as SUFFIXES

    files: list[Path] = []
    for item in args.images:
        path = Path(item)
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix.lower() in SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            raise UsageError(f"{path} does not exist")
    if not files:
        raise UsageError(f"no images ({', '.join(SUFFIXES)}) in {' '.join(args.images)}")

    import json

    from .classifier import DiffusionClassifier, classify_sharded, process_state
    from .metrics.features import load_image_files
    from .models import load_pipeline

    try:
        pipe = load_pipeline(
            "digits" if args.model == "default" else args.model, device=process_state().device
        )
        classifier = DiffusionClassifier(pipe, schedule=args.schedule, seed=args.seed)
    except (FileNotFoundError, OSError, ValueError, TypeError) as err:
        raise UsageError(f"--model {args.model}: {str(err).splitlines()[0]}") from None
    channels, height, width = classifier.conditioner.image_shape
    try:
        images = load_image_files(files, channels=channels, size=height)
    except ValueError as err:
        raise UsageError(str(err)) from None
    # under `accelerate launch`, each process classifies a share and the first one prints
    result = classify_sharded(classifier, images, progress=len(files) > 1)
    if not _is_main_process():
        return 0
    rows = [
        {"image": str(path), "label": int(label), "margin": float(margin), "nfe": int(nfe)}
        for path, label, margin, nfe in zip(files, result.labels, result.margins, result.nfe, strict=True)
    ]
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        for row in rows:
            print(
                f"{row['image']}: {row['label']} (margin {row['margin']:.4f} to the runner-up, {row['nfe']} NFE)"
            )
    return 0


def _is_main_process() -> bool:
    from .classifier import process_state

    return process_state().is_main_process


def _features_extractor(name: str, inception_weights: str | None = None):
    """(extractor, channels, size) for --features judge|inception|PATH."""
    if name == "judge":
        from .models import load_judge

        return load_judge(), 1, 28
    if name == "inception":
        from .metrics.inception import load_inception

        try:
            return load_inception(inception_weights), 3, None
        except (FileNotFoundError, ImportError, ValueError) as err:
            raise UsageError(f"--features inception: {err}") from None
    path = Path(name)
    if not path.is_file():
        raise UsageError(
            f"--features must be 'judge', 'inception' or a TorchScript file; {name} does not exist"
        )
    import torch

    try:
        return torch.jit.load(str(path), map_location="cpu").eval(), 3, None
    except RuntimeError as err:
        raise UsageError(f"cannot load {path} as a TorchScript feature extractor: {err}") from None


def _stats_or_features(
    source: str, extractor, channels: int, size: int | None, key: str, need_features: bool = False
):
    """(mu, sigma, features or None) for an image folder or a saved .npz statistics file; a
    statistics file gives its saved features where ``need_features``."""
    from .metrics import gaussian_stats
    from .metrics.features import extract_features, load_image_folder, load_stats, load_stats_features

    path = Path(source)
    if path.suffix == ".npz":
        if not path.is_file():
            raise UsageError(f"statistics file {path} does not exist")
        return (*load_stats(path, key), load_stats_features(path, key) if need_features else None)
    features = extract_features(load_image_folder(path, channels=channels, size=size), extractor)
    return (*gaussian_stats(features), features)


def _cmd_eval(args: argparse.Namespace) -> int:
    if args.eval_command == "istd":
        return _cmd_eval_istd(args)
    extractor, channels, size = _features_extractor(args.features, args.inception_weights)
    key = f"features={args.features}"
    if args.features == "inception":  # the two ports differ slightly: never mix their statistics
        key += f"({Path(args.inception_weights).name})"
    if args.eval_command == "stats":
        from .metrics.features import save_stats

        if args.with_features and Path(args.folder).suffix == ".npz":
            raise UsageError("--with-features needs an image folder, not a statistics file")
        mu, sigma, features = _stats_or_features(args.folder, extractor, channels, size, key)
        written = save_stats(
            args.out, mu, sigma, key, features=features.numpy() if args.with_features else None
        )
        print(
            f"wrote {written.resolve()} ({len(mu)}-d {key}{', with features' if args.with_features else ''})"
        )
        return 0

    from .metrics import (
        density_coverage,
        frechet_distance,
        frechet_distance_infinity,
        kernel_distance,
        precision_recall,
    )

    knn = args.pr or args.density
    mu_a, sigma_a, features_a = _stats_or_features(args.a, extractor, channels, size, key, knn)
    mu_b, sigma_b, features_b = _stats_or_features(args.b, extractor, channels, size, key, knn)
    print(f"FD ({args.features} features): {frechet_distance(mu_a, sigma_a, mu_b, sigma_b):.4f}")
    if knn and len(features_a) != len(features_b):
        print(
            f"note: {len(features_a)} generated vs {len(features_b)} reference samples; k-NN radii shrink as a "
            "set grows, so compare these metrics at equal sizes"
        )
    if args.pr:
        precision, recall = precision_recall(features_b, features_a, k=3)
        print(f"precision (k=3): {precision:.4f}  recall (k=3): {recall:.4f}")
    if args.density:
        density, coverage = density_coverage(features_b, features_a, k=5)
        print(f"density (k=5): {density:.4f}  coverage (k=5): {coverage:.4f}")
    if args.kid:
        if features_a is None or features_b is None:
            raise UsageError("--kid needs image folders on both sides, not statistics files")
        mean, std = kernel_distance(features_a, features_b)
        print(f"KID: {mean:.6f} +- {std:.6f}")
    if args.fd_inf:
        if features_a is None:
            raise UsageError("--fd-inf needs an image folder as A (the generated images)")
        fd_inf, points = frechet_distance_infinity(features_a, mu_b, sigma_b)
        print(f"FD-infinity: {fd_inf:.4f} (from N = {', '.join(str(n) for n, _ in points)})")
    return 0


def _cmd_eval_istd(args: argparse.Namespace) -> int:
    if args.model != "default":
        raise UsageError(f"--model {args.model!r}: only the embedded 'default' model is supported so far")
    if args.pairs < 1 or args.steps < 1:
        raise UsageError("--pairs and --steps must be >= 1")
    from .metrics import interpolation_istd
    from .models import load_default_pipeline

    pipe = load_default_pipeline()
    labels = [i % pipe.num_classes for i in range(args.pairs)]
    mean, values, _ = interpolation_istd(
        pipe, labels, seed=args.seed, guidance_scale=args.scale, num_inference_steps=args.steps
    )
    print(f"ISTD: {mean:.2f} over {len(values)} noise pairs (CFG {args.scale}, {args.steps} DDIM steps)")
    return 0


def _load_model(model: str, lora: str | None):
    """The default pipeline or a DigitsPipeline folder, with an optional LoRA loaded."""
    from .models import DigitsPipeline, load_default_pipeline

    if model == "default":
        pipe = load_default_pipeline()
    elif Path(model).is_dir():
        pipe = DigitsPipeline.from_pretrained(model)
        pipe.set_progress_bar_config(disable=True)
    else:
        raise UsageError(f"--model {model!r}: use 'default' or a DigitsPipeline folder")
    if lora is not None:
        try:
            pipe.load_lora_weights(lora)
        except (FileNotFoundError, ValueError) as err:
            raise UsageError(f"--lora: {err}") from None
    return pipe


def _cmd_interpolate(args: argparse.Namespace) -> int:
    labels = parse_labels(args.labels)
    if args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    out = Path(args.out)
    _check_output_path(out)
    pipe = _load_model(args.model, args.lora)
    from .images import labelled_grid
    from .metrics import interpolation_istd

    mean, values, strips = interpolation_istd(
        pipe, labels, seed=args.seed, guidance_scale=args.scale, num_inference_steps=args.steps
    )
    labelled_grid(strips.flatten(0, 1), [str(label) for label in labels]).save(out)
    print(
        f"wrote {out.resolve()}: slerp strips of 11 images; ISTD {mean:.2f} (per label: "
        + ", ".join(f"{label}: {value:.2f}" for label, value in zip(labels, values, strict=True))
        + ")"
    )
    return 0


def _cmd_export_comfy(args: argparse.Namespace) -> int:
    from .comfy.export import export_comfy

    written = export_comfy(args.folder, overwrite=args.overwrite)
    print(f"wrote {', '.join(p.name for p in written)} to {Path(args.folder).resolve()}")
    print("ComfyUI loads it from custom_nodes/ once diffguide is installed in ComfyUI's Python")
    return 0


def _cmd_app(args: argparse.Namespace) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UsageError("the demo needs Gradio: pip install 'diffguide[app]'") from None
    from .app import ModelRegistry, launch

    for folder in args.model:
        if not Path(folder).is_dir():
            raise UsageError(f"--model {folder}: not a folder (a pipeline saved with save_pretrained)")
    launch(ModelRegistry(args.model), host=args.host, port=args.port)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    if args.what == "smooth-lora":
        from diffusers import DDPMScheduler

        from .models.smooth_lora import SmoothLoraConfig, digits_batches, digits_source, train_smooth_lora
        from .smooth import training_alphas_cumprod

        pipe = _load_model(args.base, None)
        try:
            source = digits_source(pipe.unet)
            training_alphas_cumprod(pipe.scheduler)
        except ValueError as err:
            raise UsageError(f"--base {args.base}: {err}") from None
        base = SmoothLoraConfig()
        config = SmoothLoraConfig(
            steps=args.steps or base.steps, batch_size=args.batch_size or base.batch_size, learning_rate=args.lr,
            rank=args.rank, weight=args.weight, seed=args.seed, capacity=args.capacity, source=source,
            min_alpha_bar=base.min_alpha_bar if args.min_alpha_bar is None else args.min_alpha_bar,
        )  # fmt: skip
        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # the base model's own training schedule
        out = args.out or f"runs/smooth-lora-w{args.weight:g}"
        run_dir = args.run_dir or f"runs/smooth-lora-w{args.weight:g}-run"
        record = train_smooth_lora(pipe.unet, scheduler, digits_batches(config), out, run_dir, config)
        if config.capacity == "full":  # a whole pipeline folder, loadable with DigitsPipeline.from_pretrained
            pipe.save_pretrained(out)
        print(record)
        return 0
    if args.what == "fashion":
        from .models.training import FashionTrainingConfig, train_fashion

        defaults = FashionTrainingConfig()
        config = FashionTrainingConfig(
            steps=args.steps or defaults.steps,
            batch_size=args.batch_size or defaults.batch_size,
            seed=args.seed,
        )
        try:
            record = train_fashion(
                args.out or "diffguide/models/fashion", args.run_dir or "runs/fashion", config
            )
        except FileNotFoundError as err:
            raise UsageError(str(err)) from None
        print(record)
        return 0
    if args.what == "default":
        from .models.training import DefaultTrainingConfig, train_default

        defaults = DefaultTrainingConfig()
        config = DefaultTrainingConfig(
            steps=args.steps or defaults.steps,
            batch_size=args.batch_size or defaults.batch_size,
            seed=args.seed,
            corruption=args.corruption,
            spd_spectrum=args.spd_spectrum,
        )
        record = train_default(args.out or "diffguide/models/default", args.run_dir or "runs/default", config)
    else:
        from .models.judge import train_judge

        folder = {"digits": "diffguide/models/judge", "fashion": "diffguide/models/fashion_judge"}[
            args.dataset
        ]
        try:
            record = train_judge(args.out or folder, epochs=args.epochs, seed=args.seed, dataset=args.dataset)
        except FileNotFoundError as err:
            raise UsageError(str(err)) from None
    print(record)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``diffguide`` command."""
    from .models.pipeline import SAMPLERS
    from .models.training import DefaultTrainingConfig

    defaults = DefaultTrainingConfig()
    parser = argparse.ArgumentParser(
        prog="diffguide", description="Diffusion guidance methods for diffusers."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def pipeline_arguments(command, steps: int, n: int) -> None:
        command.add_argument(
            "--pipeline", default="digits", metavar="DIR",
            help="'digits' (the embedded model, default), 'fashion' (the embedded flow transformer) or a saved diffusers pipeline folder, loaded offline",
        )  # fmt: skip
        command.add_argument(
            "--labels", default=None, help="class-conditional models: e.g. 0-9 (default), 3, 1,3,5"
        )
        command.add_argument(
            "--prompt", action="append", default=[], help="text-to-image: a prompt (repeatable)"
        )
        command.add_argument("--negative-prompt", default=None, help="text-to-image: the negative prompt")
        command.add_argument(
            "--param", action="append", default=[], metavar="KEY=VALUE",
            help="a method parameter, e.g. norm_threshold=5 or apg.eta=0.5 (repeatable; checked against the registry)",
        )  # fmt: skip
        command.add_argument(
            "--preset", default="auto",
            help="named settings of the registry (e.g. digits, sdxl); 'auto' (default): the model family's; 'none'",
        )  # fmt: skip
        command.add_argument("--scale", type=float, default=3.0, help="CFG guidance scale (default 3)")
        command.add_argument("--steps", type=int, default=steps, help=f"sampling steps (default {steps})")
        command.add_argument("--n", type=int, default=n, help=f"samples per label or prompt (default {n})")
        command.add_argument("--seed", type=int, default=0, help="sample i uses seed + i (default 0)")
        command.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or mps")
        command.add_argument(
            "--dtype", default="float32", choices=DTYPES, help="weights' dtype (default float32)"
        )

    from .classifier import DEFAULT_SCHEDULE, PRESETS
    from .guidance import METHODS

    sample = sub.add_parser("sample", help="sample a pipeline under one guidance method to a labelled grid")
    pipeline_arguments(sample, steps=50, n=8)
    sample.add_argument("--method", default="cfg", help=f"one of {', '.join(METHODS)} (default cfg)")
    sample.add_argument(
        "--sampler",
        default=None,
        choices=sorted(SAMPLERS),
        help="swap the scheduler (default: the pipeline's)",
    )
    sample.add_argument("--out", default="grid.png", help="image file to write (.png, .jpg, .webp)")
    sample.set_defaults(func=_cmd_sample)

    compare = sub.add_parser("compare", help="guidance methods side by side on the same seeds")
    pipeline_arguments(compare, steps=20, n=1)
    compare.add_argument(
        "--methods", default="cfg,apg,ag,linear-ag", help=f"comma-separated, from {', '.join(METHODS)}"
    )
    compare.add_argument("--out", default="compare.png", help="image file to write")
    compare.set_defaults(func=_cmd_compare)

    classify = sub.add_parser("classify", help="zero-shot classification with the diffusion model")
    classify.add_argument("images", nargs="+", help="image files or folders")
    classify.add_argument(
        "--model",
        default="default",
        help="an embedded model (default, fashion) or a class-label pipeline folder",
    )
    classify.add_argument(
        "--schedule", default=DEFAULT_SCHEDULE, help=f"{', '.join(PRESETS)} (default {DEFAULT_SCHEDULE})"
    )
    classify.add_argument("--seed", type=int, default=0)
    classify.add_argument("--json", action="store_true", help="print JSON instead of lines")
    classify.set_defaults(func=_cmd_classify)

    interpolate = sub.add_parser("interpolate", help="slerp between two noises: a strip and its ISTD")
    interpolate.add_argument("--model", default="default", help="'default' or a DigitsPipeline folder")
    interpolate.add_argument("--lora", default=None, help="a LoRA folder or file (e.g. a Smooth-LoRA)")
    interpolate.add_argument("--labels", default="3", help="one strip per label (default 3)")
    interpolate.add_argument("--scale", type=float, default=3.0)
    interpolate.add_argument("--steps", type=int, default=50)
    interpolate.add_argument("--seed", type=int, default=0)
    interpolate.add_argument("--out", default="strip.png")
    interpolate.set_defaults(func=_cmd_interpolate)

    app = sub.add_parser("app", help="the browser demo (Gradio; pip install 'diffguide[app]')")
    app.add_argument(
        "--model", action="append", default=[], metavar="FOLDER",
        help="also offer this saved pipeline folder (DigitsPipeline or diffusers text-to-image); repeatable",
    )  # fmt: skip
    app.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    app.add_argument("--port", type=int, default=None, help="port (default: Gradio's, 7860 or the next free)")
    app.set_defaults(func=_cmd_app)

    comfy = sub.add_parser("export-comfy", help="write a ComfyUI custom-node folder for the guidance rules")
    comfy.add_argument("folder", help="e.g. ComfyUI/custom_nodes/diffguide")
    comfy.add_argument("--overwrite", action="store_true", help="replace the files of an existing export")
    comfy.set_defaults(func=_cmd_export_comfy)

    evaluate = sub.add_parser("eval", help="distribution metrics: FD, KID, FD-infinity, ISTD")
    eval_sub = evaluate.add_subparsers(dest="eval_command", required=True)
    fid = eval_sub.add_parser("fid", help="Frechet distance between two image folders or .npz statistics")
    fid.add_argument("a", help="image folder or .npz statistics (the generated side for --fd-inf)")
    fid.add_argument("b", help="image folder or .npz statistics (the reference)")
    features_help = (
        "'judge' (default), 'inception' (with --inception-weights) or a TorchScript extractor file"
    )
    inception_help = (
        "local Inception file: inception-2015-12-05.pt or torch-fidelity's .pth (never downloaded)"
    )
    fid.add_argument("--features", default="judge", help=features_help)
    fid.add_argument("--inception-weights", default=None, help=inception_help)
    fid.add_argument("--kid", action="store_true", help="also report KID (needs two folders)")
    fid.add_argument("--fd-inf", action="store_true", help="also report FD extrapolated to N = infinity")
    fid.add_argument(
        "--pr", action="store_true",
        help="also report improved precision and recall (k=3); B is the real side (a folder, or statistics "
        "saved --with-features)",
    )  # fmt: skip
    fid.add_argument(
        "--density", action="store_true",
        help="also report density and coverage (k=5); B is the real side, as for --pr",
    )  # fmt: skip
    stats = eval_sub.add_parser("stats", help="cache the feature statistics of an image folder")
    stats.add_argument("folder")
    stats.add_argument("--out", required=True, help="the .npz file to write")
    stats.add_argument(
        "--with-features", action="store_true", help="keep the features too (for eval fid --pr / --density)"
    )
    stats.add_argument("--features", default="judge", help=features_help)
    stats.add_argument("--inception-weights", default=None, help=inception_help)
    istd = eval_sub.add_parser("istd", help="interpolation smoothness (Smooth Diffusion's ISTD)")
    istd.add_argument("--model", default="default")
    istd.add_argument("--pairs", type=int, default=10, help="noise pairs, cycling over the classes")
    istd.add_argument("--scale", type=float, default=3.0)
    istd.add_argument("--steps", type=int, default=50)
    istd.add_argument("--seed", type=int, default=0)
    for parser_ in (fid, stats, istd):
        parser_.set_defaults(func=_cmd_eval)

    train = sub.add_parser("train", help="train an embedded model (default digits, fashion) or a judge")
    train.add_argument("what", choices=["default", "fashion", "judge", "smooth-lora"])
    train.add_argument("--base", default="default", help="smooth-lora: 'default' or a DigitsPipeline folder")
    train.add_argument("--weight", type=float, default=1.0, help="smooth-lora: lambda (0 = control run)")
    train.add_argument("--rank", type=int, default=8, help="smooth-lora: LoRA rank")
    train.add_argument(
        "--capacity", default="attention", choices=["attention", "attention+conv", "full"],
        help="smooth-lora: LoRA on the attention projections (the paper's), also on the ResNet convolutions, "
        "or a full fine-tune (writes a pipeline folder)",
    )  # fmt: skip
    train.add_argument("--lr", type=float, default=1e-4, help="smooth-lora: learning rate")
    train.add_argument(
        "--min-alpha-bar", type=float, default=None,
        help="smooth-lora: penalty only where alpha_bar >= this (default SD 1.5's last, 0.0047; 0 = all)",
    )  # fmt: skip
    train.add_argument("--out", default=None, help="output folder (default: inside the package)")
    train.add_argument("--run-dir", default=None, help="resumable checkpoint folder (default: runs/<what>)")
    train.add_argument(
        "--steps", type=int, default=None, help=f"default {defaults.steps} (smooth-lora: 1000)"
    )
    train.add_argument(
        "--batch-size", type=int, default=None, help=f"default {defaults.batch_size} (smooth-lora: 64)"
    )
    train.add_argument(
        "--epochs", type=int, default=None, help="judge epochs (default 30 digits, 15 fashion)"
    )
    train.add_argument(
        "--dataset", default="digits", choices=["digits", "fashion"], help="judge: its dataset"
    )
    train.add_argument(
        "--corruption",
        default="ddpm",
        choices=["ddpm", "spd"],
        help="ddpm (default) or spd: Shortest Path Diffusion",
    )
    train.add_argument(
        "--spd-spectrum",
        default="fit",
        choices=["fit", "authors", "empirical"],
        help="SPD's data spectrum D_f",
    )
    train.add_argument("--seed", type=int, default=0)
    train.set_defaults(func=_cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``diffguide`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (UsageError, ValueError, FileNotFoundError) as err:
        print(f"diffguide {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
