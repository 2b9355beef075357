"""Smooth Diffusion: does the regularizer do its own job, and does that make interpolation smooth?

    python evals/smooth.py --map                 # the 8x8 map trained by evals/smooth_train.py
    python evals/smooth.py --model default       # the 28x28 model: base, shipped Smooth-LoRA, control

Every model (a base, or a base with a LoRA or a fully fine-tuned UNet) is scored on the same
held-out draws:

- **variation spread**: ``v = ||d <x0_hat, n> / d eps||`` (the regularizer's quantity) for
  ``--spread-images`` test images at 16 timesteps spread over the range the penalty sees
  (``abar >= 0.0047``), one fresh noise and probe per image and timestep (seeded, the same for
  every model); reported as its coefficient of variation, split into within-timestep and
  between-timestep parts (``diffguide.smooth.spread_statistics``);
- **ISTD on random noise pairs** (the project's earlier measure): ``--pairs`` pairs cycling over
  the classes, CFG ``--scale``, DDIM ``--steps``;
- **ISTD on real pairs** (as the paper evaluates): two test images of one class are DDIM-inverted
  (``diffguide.inversion``, no guidance) and the slerp between their noises is sampled without
  guidance, so both ends reconstruct the real images (the reconstruction error is reported);
- for both, the paper's pixel ISTD, the scale-free relative ISTD (std over mean step) in pixels
  and (28x28) in the judge's feature space, and the largest step's share of the path;
- **quality**: the Frechet distance of ``--n-per-class`` samples per class (CFG ``--scale``) to
  the test split, in the judge's features (28x28) or in pixels (8x8, 64 dimensions).

A change counts only against the lambda = 0 control trained for the same steps.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch
from diffusers import DDPMScheduler

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import RESULTS, cached_row, machine, markdown_table, write_result, write_section  # noqa: E402

import diffguide as dg  # noqa: E402
from diffguide.attention import use_twice_differentiable_attention  # noqa: E402
from diffguide.generation import generate_samples  # noqa: E402
from diffguide.inversion import ddim_invert  # noqa: E402
from diffguide.metrics import feature_frechet_distance  # noqa: E402
from diffguide.metrics.features import extract_features  # noqa: E402
from diffguide.metrics.istd import noise_pairs, path_statistics, step_distances, strips_between  # noqa: E402
from diffguide.models.smooth_lora import digits_source  # noqa: E402
from diffguide.smooth import SD15_MIN_ALPHA_BAR, spread_statistics, variation_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CACHE = RESULTS / "smooth_rows.json"  # the 8x8 map's rows
MODEL_CACHE = RESULTS / "smooth_model_rows.json"  # one process writes each file
GRADIENT_CACHE = RESULTS / "smooth_gradient_rows.json"


def load_variant(base: str, variant: str | None) -> dg.DigitsPipeline:
    """``base`` (a pipeline folder or 'default') with ``variant`` applied: a LoRA folder, or a
    pipeline folder holding a fully fine-tuned UNet."""
    pipe = dg.load_default_pipeline() if base == "default" else dg.DigitsPipeline.from_pretrained(base)
    if variant is not None:
        if (Path(variant) / "unet").is_dir():
            pipe = dg.DigitsPipeline(
                unet=type(pipe.unet).from_pretrained(Path(variant) / "unet"), scheduler=pipe.scheduler
            )
        else:
            pipe.load_lora_weights(variant)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def real_pairs(labels: torch.Tensor, count: int, seed: int) -> list[tuple[int, int]]:
    """``count`` pairs of distinct test indices of one class, cycling over the classes."""
    generator = torch.Generator().manual_seed(seed)
    by_class = [torch.nonzero(labels == c).flatten() for c in range(int(labels.max()) + 1)]
    pairs = []
    for i in range(count):
        pool = by_class[i % len(by_class)]
        first, second = torch.randperm(len(pool), generator=generator)[:2].tolist()
        pairs.append((int(pool[first]), int(pool[second])))
    return pairs


def penalised_timesteps(alphas_cumprod: torch.Tensor, count: int = 16) -> torch.Tensor:
    """``count`` timesteps spread evenly over those the penalty sees (``abar >= 0.0047``)."""
    kept = torch.nonzero(alphas_cumprod >= SD15_MIN_ALPHA_BAR).flatten()
    return kept[torch.linspace(0, len(kept) - 1, count).round().long()]


def score(pipe: dg.DigitsPipeline, data: dict, args: argparse.Namespace) -> dict:
    """Every measurement of the module docstring for one model."""
    unet = pipe.unet
    use_twice_differentiable_attention(unet)  # the spread takes a gradient through attention
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    images, labels = data["images"], data["labels"]
    embed = data["embed"]

    # the regularizer's own quantity, on held-out images and draws
    timesteps = penalised_timesteps(scheduler.alphas_cumprod)
    spread_x0 = images[: args.spread_images] * 2 - 1
    spread_y = labels[: args.spread_images]
    with torch.enable_grad():
        table = variation_table(lambda x, t: unet(x, t, class_labels=spread_y).sample, spread_x0, timesteps,
                                scheduler.alphas_cumprod, seed=args.seed)  # fmt: skip
    record = {"spread": spread_statistics(table), "spread_by_timestep": {
        "timesteps": timesteps.tolist(), "mean": table.mean(1).tolist(), "std": table.std(1, unbiased=False).tolist()}}  # fmt: skip

    def paths(strips: torch.Tensor) -> dict:
        pixel = torch.stack([step_distances(strip) for strip in strips])
        result = {"pixel": path_statistics(pixel), "largest_step_index": pixel.argmax(1).tolist()}
        if embed is not None:
            result["feature"] = path_statistics(
                torch.stack([step_distances(strip, embed) for strip in strips])
            )
        return result

    with torch.no_grad():
        pair_labels = [i % 10 for i in range(args.pairs)]
        start, end = noise_pairs(tuple(pipe.image_shape), args.pairs, args.seed)
        record["random"] = paths(strips_between(pipe, start, end, pair_labels, guidance_scale=args.scale,
                                                num_inference_steps=args.steps))  # fmt: skip
        pairs = real_pairs(labels, args.real_pairs, args.seed)
        first, second = torch.tensor([a for a, _ in pairs]), torch.tensor([b for _, b in pairs])
        real_labels = labels[first].tolist()
        z0 = ddim_invert(pipe, images[first], real_labels, args.steps)
        z1 = ddim_invert(pipe, images[second], real_labels, args.steps)
        strips = strips_between(pipe, z0, z1, real_labels, guidance_scale=1.0, num_inference_steps=args.steps)
        record["real"] = paths(strips)
        ends = torch.cat([images[first], images[second]])
        record["real"]["reconstruction_rmse"] = float(
            (torch.cat([strips[:, 0], strips[:, -1]]) - ends).pow(2).mean().sqrt()
        )

        sample_labels = torch.arange(10).repeat_interleave(args.n_per_class)
        samples = generate_samples(pipe, sample_labels, seed=args.seed, guidance_scale=args.scale,
                                   num_inference_steps=args.steps)  # fmt: skip
        features = samples.flatten(1) if embed is None else embed(samples)
        record["fd"] = feature_frechet_distance(features, data["test_features"])
        if data["judge"] is not None:
            predicted = data["judge"].head(features.float()).argmax(1)
            record["judge_accuracy"] = float((predicted == sample_labels).float().mean())
    return record


def held_out(base: str) -> dict:
    """The test split of ``base``'s data and the feature space FD is taken in."""
    if digits_source(load_variant(base, None).unet) == "mnist":
        images, labels = dg.load_digits("test")
        judge = dg.load_judge()

        def embed(x: torch.Tensor) -> torch.Tensor:
            return extract_features(x, judge)

        return {"images": images, "labels": labels, "judge": judge, "embed": embed,
                "test_features": embed(images)}  # fmt: skip
    images, labels = dg.load_digits("test", source="sklearn")
    return {
        "images": images,
        "labels": labels,
        "judge": None,
        "embed": None,
        "test_features": images.flatten(1),
    }


def shown(path: str) -> str:
    """A path as the docs show it: relative to the repository when inside it."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def measured(args: argparse.Namespace, quality: str) -> str:
    """The sentence that says on what each row was measured."""
    return (f"{args.spread_images} test images for the spread, {args.pairs} random and {args.real_pairs} real "
            f"pairs, {10 * args.n_per_class} samples for {quality}; CFG {args.scale:g}, DDIM {args.steps}.")  # fmt: skip


def settings_key(args: argparse.Namespace) -> str:
    return (f"pairs{args.pairs}/real{args.real_pairs}/n{args.n_per_class}/spread{args.spread_images}/"
            f"w{args.scale:g}/s{args.steps}/seed{args.seed}")  # fmt: skip


def row(name: str, steps: int | str, record: dict, with_features: bool) -> list:
    spread = record["spread"]
    cells = [name, steps, f"{spread['cv']:.3f}", f"{spread['within_cv']:.3f}", f"{spread['between_cv']:.3f}",
             f"{record['random']['pixel']['istd']:.1f}", f"{record['random']['pixel']['relative_istd']:.3f}",
             f"{record['real']['pixel']['istd']:.1f}", f"{record['real']['pixel']['relative_istd']:.3f}"]  # fmt: skip
    if with_features:
        cells += [
            f"{record['random']['feature']['relative_istd']:.3f}",
            f"{record['real']['feature']['relative_istd']:.3f}",
        ]
    cells += [f"{record['real']['pixel']['largest_share']:.2f}", f"{record['fd']:.3g}"]
    return cells


def against(record: dict, control: dict | None) -> list[str]:
    """ISTD reduction (control / model, > 1 is smoother) and FD change against the control."""
    if control is None or control is record:
        return ["-", "-", "-"]
    return [f"{control['random']['pixel']['istd'] / record['random']['pixel']['istd']:.2f}x",
            f"{control['real']['pixel']['istd'] / record['real']['pixel']['istd']:.2f}x",
            f"{record['fd'] / control['fd'] - 1:+.0%}"]  # fmt: skip


def header(with_features: bool) -> list[str]:
    cells = ["model", "steps", "v: CV", "within-t CV", "between-t CV", "ISTD random", "rel. ISTD random",
             "ISTD real", "rel. ISTD real"]  # fmt: skip
    if with_features:
        cells += ["rel. ISTD random (features)", "rel. ISTD real (features)"]
    return cells + ["largest step share (real)", "FD to test", "ISTD random: control / this",
                    "ISTD real: control / this", "FD vs control"]  # fmt: skip


def run_map(args: argparse.Namespace) -> None:
    data = held_out(args.base)
    map_dir = Path(args.map_dir)
    points = sorted(p for p in map_dir.iterdir() if p.is_dir()) if map_dir.is_dir() else []
    entries = [("base", 0, None)] + [
        (point.name, int(snap.name), snap)
        for point in points
        for snap in sorted((s for s in point.iterdir() if s.name.isdigit()), key=lambda s: int(s.name))
        if (snap / "training.json").exists()
    ]
    records = []
    for name, steps, folder in entries:
        trained = json.loads((folder / "training.json").read_text())["config"] if folder else {}
        fingerprint = ",".join(
            f"{k}={v}" for k, v in sorted(trained.items())
        )  # a retrained point is rescored
        key = f"map/{shown(args.base)}/{name}/{steps}/{fingerprint}/{settings_key(args)}"
        record = cached_row(
            CACHE,
            key,
            lambda folder=folder: score(load_variant(args.base, folder and str(folder)), data, args),
        )
        training = json.loads((folder / "training.json").read_text()) if folder else {}
        records.append({"name": name, "steps": steps, "training": training, **record})
        print(
            name,
            steps,
            record["spread"]["cv"],
            record["real"]["pixel"]["relative_istd"],
            record["fd"],
            flush=True,
        )

    def control_of(record: dict) -> dict | None:
        capacity = re.sub(
            r"-bands\d+$", "", record["name"].rsplit("-w", 1)[0]
        )  # banded targets: same control
        return next(
            (r for r in records if r["name"] == f"{capacity}-w0" and r["steps"] == record["steps"]), None
        )

    order = {"base": 0, "attention": 1, "attention+conv": 2, "full": 3}
    records.sort(key=lambda r: (order.get(r["name"].rsplit("-w", 1)[0], 9), r["steps"],
                                float(r["name"].rsplit("-w", 1)[-1]) if "-w" in r["name"] else 0))  # fmt: skip
    rows = [row(r["name"], r["steps"], r, False) + against(r, control_of(r)) for r in records]
    command = "python evals/smooth.py " + " ".join(sys.argv[1:])
    write_result("smooth_map", {"command": command, "machine": machine(), "rows": records})
    write_section("smooth_map", f"## Smooth Diffusion: the 8x8 map (capacity x lambda x steps)\n\n"
                  f"`{command.strip()}` ({machine()}); points trained by `evals/smooth_train.py` from "
                  f"`{shown(args.base)}`. {measured(args, 'FD (pixels, 64 dims)')}\n\n"
                  + markdown_table(header(False), rows))  # fmt: skip


def strip_figure(
    base: str, variants: list[str], map_dir: Path, args: argparse.Namespace, pairs: int = 3
) -> Path:
    """Real-pair strips (DDIM-inverted ends, no guidance) of the base and of each map snapshot
    ``point/steps``, the same pairs in every block: docs/figures/smooth_strips_<base>.png."""
    from diffguide.images import labelled_grid

    data = held_out(base)
    chosen = real_pairs(data["labels"], pairs, args.seed)
    first, second = torch.tensor([a for a, _ in chosen]), torch.tensor([b for _, b in chosen])
    labels = data["labels"][first].tolist()
    rows, names = [], []
    for variant in ["base", *variants]:
        pipe = load_variant(base, None if variant == "base" else str(map_dir / variant))
        z0 = ddim_invert(pipe, data["images"][first], labels, args.steps)
        z1 = ddim_invert(pipe, data["images"][second], labels, args.steps)
        strips = strips_between(pipe, z0, z1, labels, guidance_scale=1.0, num_inference_steps=args.steps)
        rows.append(strips.flatten(0, 1))
        names += [f"{variant} #{i}" for i in range(pairs)]
    zoom = max(1, 56 // data["images"].shape[-1])
    grid = labelled_grid(torch.cat(rows), names, zoom=zoom, margin=170)
    path = ROOT / "docs" / "figures" / f"smooth_strips_{Path(base).name}.png"
    grid.save(path)
    return path


def gradient_scales(base: str, capacity: str, batches: int = 8, batch_size: int = 32, seed: int = 0) -> dict:
    """The penalty's gradient against the denoising loss's, on the parameters ``capacity`` trains,
    at the start of a fine-tune of ``base`` (LoRA freshly injected; the running target set to the
    model's own mean ``v`` so the penalty is the spread, not the start-up pull from ``a = 0``)."""
    import torch.nn.functional as F

    from diffguide.models.smooth_lora import SmoothLoraConfig, digits_batches
    from diffguide.smooth import CAPACITIES, VariationRegularizer, add_lora

    pipe = load_variant(base, None)
    unet = pipe.unet
    use_twice_differentiable_attention(unet)
    if CAPACITIES[capacity] is None:
        unet.requires_grad_(True)
    else:
        add_lora(unet, 8, CAPACITIES[capacity])
    parameters = [p for p in unet.parameters() if p.requires_grad]
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    source = digits_source(unet)
    sample = digits_batches(SmoothLoraConfig(batch_size=batch_size, source=source))
    generator = torch.Generator().manual_seed(seed)
    regularizer = VariationRegularizer(weight=1.0, min_alpha_bar=SD15_MIN_ALPHA_BAR)
    rows = []
    for index in range(batches + 1):
        x0, cond = sample(generator)
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=generator)

        def denoise(x, timesteps, cond=cond):
            return unet(x, timesteps, **cond).sample

        if index == 0:  # the target starts where the model is: its mean v over the timesteps the penalty sees
            grid = penalised_timesteps(scheduler.alphas_cumprod)
            regularizer.target = float(variation_table(denoise, x0, grid, scheduler.alphas_cumprod).mean())
            continue
        mse = F.mse_loss(denoise(scheduler.add_noise(x0, noise, t), t), noise)
        penalty = regularizer.loss(denoise, x0, noise, t, scheduler.alphas_cumprod, generator=generator)
        g_mse = torch.cat([g.flatten() for g in torch.autograd.grad(mse, parameters, allow_unused=True,
                                                                     materialize_grads=True)])  # fmt: skip
        g_pen = torch.cat([g.flatten() for g in torch.autograd.grad(penalty, parameters, allow_unused=True,
                                                                     materialize_grads=True)])  # fmt: skip
        rows.append([float(mse), float(penalty), float(g_mse.norm()), float(g_pen.norm()),
                     float(torch.nn.functional.cosine_similarity(g_mse, g_pen, dim=0)), float((g_mse + g_pen).norm())])  # fmt: skip
    table = torch.tensor(rows, dtype=torch.float64)
    median = table.median(dim=0).values.tolist()
    return {"capacity": capacity, "trained_parameters": sum(p.numel() for p in parameters), "batches": batches,
            "mse": median[0], "penalty": median[1], "grad_mse": median[2], "grad_penalty": median[3],
            "cosine": median[4], "grad_total": median[5],
            "clipped_share": float((table[:, 5] > 1.0).double().mean())}  # fmt: skip


def run_gradients(args: argparse.Namespace) -> None:
    records = []
    for capacity in ("attention", "attention+conv", "full"):
        key = f"gradients/{shown(args.base)}/{capacity}/{args.seed}"
        records.append(
            cached_row(
                GRADIENT_CACHE,
                key,
                lambda capacity=capacity: gradient_scales(args.base, capacity, seed=args.seed),
            )
        )
        print(records[-1], flush=True)
    rows = [[r["capacity"], f"{r['trained_parameters']:,}", f"{r['mse']:.4f}", f"{r['penalty']:.2e}",
             f"{r['grad_mse']:.3g}", f"{r['grad_penalty']:.3g}", f"{r['grad_penalty'] / r['grad_mse']:.3g}",
             f"{r['cosine']:+.2f}", f"{r['clipped_share']:.0%}"] for r in records]  # fmt: skip
    command = "python evals/smooth.py " + " ".join(sys.argv[1:])
    write_section("smooth_gradients", f"## Smooth Diffusion: the penalty's gradient against the denoising loss's\n\n"
                  f"`{command.strip()}` ({machine()}); `{shown(args.base)}`, medians over 8 batches of 32 at the start of "
                  "a fine-tune, lambda = 1, the running target set to the model's mean v.\n\n"
                  + markdown_table(["trained", "parameters", "MSE", "penalty", "grad MSE (norm)", "grad penalty (norm)",
                                    "ratio", "cosine", "steps clipped (norm > 1)"], rows))  # fmt: skip


def trained_steps(folder: str | None) -> int | str:
    """The fine-tuning steps recorded in a LoRA or pipeline folder ('' for the base)."""
    record = Path(folder) / "training.json" if folder else None
    return json.loads(record.read_text())["steps"] if record and record.exists() else ("" if folder else 0)


def run_model(args: argparse.Namespace) -> None:
    data = held_out(args.model)
    records = []
    # (name, folder, the folder of its lambda = 0 control or None)
    variants = [
        ("base", None, None),
        ("Smooth-LoRA", args.lora, args.control),
        ("control", args.control, None),
    ]
    for extra in args.extra:
        name, _, paths = extra.rpartition("=")
        folder, _, control = paths.partition(":")
        if not folder:
            raise SystemExit(f"--extra {extra!r}: use NAME=FOLDER or NAME=FOLDER:CONTROL_FOLDER")
        variants.append((name, folder, control or None))
    by_folder = {}
    for name, variant, control in variants:
        if variant is not None and not Path(variant).exists():
            print(f"skipping {name}: {variant} does not exist", flush=True)
            continue
        key = f"model/{args.model}/{variant}/{settings_key(args)}"
        record = cached_row(
            Path(args.cache) if args.cache else MODEL_CACHE, key,
            lambda variant=variant: score(load_variant(args.model, variant), data, args),
        )  # fmt: skip
        if variant is not None and (Path(variant) / "training.json").exists():
            config = json.loads((Path(variant) / "training.json").read_text())["config"]
            name = f"{name}: {config.get('capacity', 'attention')}, lambda = {config['weight']:g}, lr {config['learning_rate']:g}"
        records.append({"name": name, "variant": variant, "control": control, **record})
        by_folder[variant] = records[-1]
        print(
            name, record["spread"]["cv"], record["real"]["pixel"]["relative_istd"], record["fd"], flush=True
        )
    rows = [
        row(r["name"], trained_steps(r["variant"]), r, True)
        + against(r, by_folder[r["control"]] if r["control"] else None)
        + [f"{r['judge_accuracy']:.1%}"]
        for r in records
    ]
    command = "python evals/smooth.py " + " ".join(sys.argv[1:])
    write_result("smooth", {"command": command, "machine": machine(), "rows": records})
    write_section("smooth", f"## Smooth Diffusion: Smooth-LoRA vs base and a lambda = 0 control ({args.model})\n\n"
                  f"`{command.strip()}` ({machine()}). {measured(args, 'FD and accuracy (judge features)')}\n\n"
                  + markdown_table(header(True) + ["judge accuracy"], rows))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--map", action="store_true", help="score the map in --map-dir against --base")
    parser.add_argument("--base", default=str(ROOT / "checkpoints" / "digits8-linear"))
    parser.add_argument("--map-dir", default=str(ROOT / "runs" / "smooth" / "map"))
    parser.add_argument(
        "--model", default=None, help="'default': base, --lora and --control on the 28x28 model"
    )
    parser.add_argument("--gradients", action="store_true", help="the penalty's gradient scale on --base")
    parser.add_argument(
        "--figure", default=None, help="comma-separated map snapshots (point/steps) to draw beside --base"
    )
    parser.add_argument("--lora", default=str(ROOT / "diffguide" / "models" / "default" / "smooth_lora"))
    parser.add_argument("--control", default=str(ROOT / "checkpoints" / "smooth-lora-w0"))
    parser.add_argument(
        "--extra",
        action="append",
        default=[],
        help="--model: another NAME=FOLDER (a LoRA or a fine-tuned pipeline)",
    )
    parser.add_argument(
        "--cache", default=None, help="--model: another row cache, for a second process beside a running one"
    )
    parser.add_argument("--pairs", type=int, default=50)
    parser.add_argument("--real-pairs", type=int, default=50)
    parser.add_argument("--n-per-class", type=int, default=36)
    parser.add_argument("--spread-images", type=int, default=100)
    parser.add_argument("--scale", type=float, default=3.0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if sum([args.map, args.model is not None, args.gradients, args.figure is not None]) != 1:
        parser.error("give one of --map, --model, --gradients or --figure")
    if args.figure is not None:
        print(strip_figure(args.base, args.figure.split(","), Path(args.map_dir), args))
    elif args.gradients:
        run_gradients(args)
    elif args.map:
        run_map(args)
    else:
        run_model(args)


if __name__ == "__main__":
    main()
