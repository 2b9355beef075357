"""NFE against quality: each guidance rule against CFG's own frontier (steps x scale).

    python evals/frontier.py                      # both embedded models, every point
    python evals/frontier.py --model fashion      # one model
    python evals/frontier.py --quick              # a look: 5 samples per class, fewer points
    python evals/frontier.py --report             # tables and plots from the cached points only

A user who wants fewer network evaluations (NFE) than CFG at 20 steps has two ways: a rule
that skips unconditional passes, or CFG itself with fewer steps or another scale. This eval
samples CFG over steps {6, 8, 10, 12, 15, 20, 30} at three scales around the recommended one
(the frontier), and each rule over its own knob at several step counts, all on the same seeds
(sample i: seed + i, class i // n_per_class). Per point it reports NFE per image, the judge's
accuracy, improved precision and recall (k=3) and density and coverage (k=5) in judge features
against a class-balanced real set of the same size from the test split, domain FD to the whole
test split, faithfulness (per-sample distance to CFG at 20 steps and the same scale, same seed,
in pixels and in judge features), and over-range (pixels of the final unclipped sample outside
[-1, 1]).

NFE saved at parity is given twice: against CFG at the same step count (the papers' framing),
and against the cheapest CFG point of the frontier that is at least as good on accuracy,
precision and recall, each within the standard error of the difference (ours). A rule
no CFG point matches is reported as beyond the frontier grid.

Each point's images, features and NFE are cached in runs/frontier/<model>/ (git-ignored), so an
interrupted run resumes and ``--report`` rewrites the tables without sampling. Writes
docs/BENCHMARKS.md (sections ``frontier_<model>``), evals/results/frontier.json and
docs/figures/frontier_<model>.png.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import (  # noqa: E402
    MODELS,
    RESULTS,
    ROOT,
    calibrated_linear_ag,
    embedded_model,
    machine,
    markdown_table,
    write_result,
    write_section,
)

import diffguide as dg  # noqa: E402
from diffguide.compare import FRONTIER_POINTS, SHIPPED_LINEAR_AG  # noqa: E402
from diffguide.generation import generate_samples  # noqa: E402
from diffguide.guidance.linear_ag import LinearAG, paper_schedule  # noqa: E402
from diffguide.metrics import Distance  # noqa: E402
from diffguide.metrics.features import extract_features  # noqa: E402
from diffguide.models import DEFAULT_MODEL_DIR  # noqa: E402

CACHE = ROOT / "runs" / "frontier"
INF = float("inf")
CFG_STEPS = (6, 8, 10, 12, 15, 20, 30)
REFERENCE_STEPS = 20
#: the models diffusers' FasterCache runs on: its denoiser hook reads a tensor, tuple or
#: Transformer2DModelOutput and fails on the digits UNet's UNet2DOutput
PEER_MODELS = ("fashion",)
#: per model: recommended scale, the frontier's scales, samples per class
SETTINGS = {
    "digits": {"scale": 3.0, "scales": (2.0, 3.0, 5.0), "n_per_class": 20},
    "fashion": {"scale": 3.0, "scales": (2.0, 3.0, 5.0), "n_per_class": 30},
}


@dataclass(frozen=True)
class Point:
    """One sampler setting: a rule family, its knob, the step count and the guidance scale."""

    family: str
    knob: str
    steps: int
    scale: float
    make: Callable[..., dg.GuidanceRule]

    @property
    def slug(self) -> str:
        knob = "".join(c if c.isalnum() or c in ".-" else "_" for c in self.knob)
        return f"{self.family}-{knob}-s{self.steps}-w{self.scale:g}"

    @property
    def label(self) -> str:
        return f"{self.family} {self.knob}".strip()


def linear_ag(
    model: str, pipe, scale: float, steps: int, real_every: int = 2, space: str = "model_output"
) -> LinearAG:
    """LinearAG at (scale, steps) in ``space`` under the paper's schedule with ``real_every``: the
    shipped coefficients where `diffguide compare` and the demo use them, else the evals' fit."""
    shipped = SHIPPED_LINEAR_AG.get((scale, steps)) if model == "digits" and space == "model_output" else None
    if shipped is not None:
        rule = LinearAG.load(DEFAULT_MODEL_DIR / shipped)
    else:
        rule = calibrated_linear_ag(model, pipe, scale, steps, space=space)
    return rule.with_schedule(paper_schedule(steps, real_every=real_every))


def points_for(
    model: str, quick: bool = False, max_steps: int | None = None, scales: tuple[float, ...] | None = None
) -> list[Point]:
    """CFG's grid first (the frontier every rule is read against), then the rules; ``max_steps``
    and ``scales`` narrow the grid for a larger-sample check (CFG at the reference steps stays,
    at the rules' scale, for faithfulness)."""
    points = _all_points(model, quick)
    if max_steps is None and scales is None:
        return points
    w = SETTINGS[model]["scale"]
    return [
        p for p in points
        if (p.family != "CFG" or scales is None or p.scale in scales)
        and (p.steps <= (max_steps or p.steps) or (p.family == "CFG" and p.steps == REFERENCE_STEPS and p.scale == w))
    ]  # fmt: skip


def _all_points(model: str, quick: bool) -> list[Point]:
    settings = SETTINGS[model]
    w = settings["scale"]
    # the recommended scale first, so a run cut short has its whole grid
    scales = (w,) if quick else sorted(settings["scales"], key=lambda scale: scale != w)
    cfg_steps = (6, 10, 20) if quick else CFG_STEPS
    rule_steps = (6, 10, 20) if not quick else (20,)
    points = [Point("CFG", "", s, scale, lambda **_: dg.CFG()) for scale in scales for s in cfg_steps]
    for steps in rule_steps:
        for threshold in (0.98, 0.991, 0.996):
            points.append(
                Point("AG", f"{threshold}", steps, w, lambda t=threshold, **_: dg.AdaptiveGuidance(t))
            )
        points += [
            Point("LinearAG", "paper", steps, w, lambda pipe, steps, **_: linear_ag(model, pipe, w, steps)),
            Point("interval", "(0.28,5.42]", steps, w, lambda **_: dg.GuidanceInterval(0.28, 5.42)),
            Point("interval", "cutoff 1.0", steps, w, lambda **_: dg.GuidanceInterval(1.0, INF)),
            Point("APG", "r=2 beta=-0.5", steps, w, lambda **_: dg.APG(eta=0.0, norm_threshold=2.0, momentum=-0.5)),
            # combinations: AG's per-sample switch inside an interval
            Point("AG+interval", "0.991 in cutoff 1.0", steps, w,
                  lambda **_: dg.WithinInterval(dg.AdaptiveGuidance(0.991), 1.0, INF)),
            Point("AG+interval", "0.991 in (0.28,5.42]", steps, w,
                  lambda **_: dg.WithinInterval(dg.AdaptiveGuidance(0.991), 0.28, 5.42)),
            # AG's switch on LinearAG's real steps, both in x0 space
            Point("AG+LinearAG", "0.991, paper schedule (x0)", steps, w,
                  lambda pipe, steps, **_: linear_ag(model, pipe, w, steps, space="denoised").with_switch(0.991)),
        ]  # fmt: skip
    if model in PEER_MODELS:
        points += [
            Point("FasterCache", f"uncond every {n}", steps, w, lambda n=n, **_: FasterCacheUncondSkip(n))
            for n in (2, 5) for steps in rule_steps
        ]  # fmt: skip
    if model in PEER_MODELS and not quick:
        apg = dg.APG(eta=0.0, norm_threshold=2.0, momentum=-0.5)
        points += [
            Point("CFG+FirstBlockCache", f"threshold {t}", steps, w, lambda t=t, **_: FirstBlockCacheWith(t, dg.CFG()))
            for t in (0.2, 0.3, 0.5) for steps in (10, 20)
        ] + [
            Point("APG+FirstBlockCache", "r=2 beta=-0.5, threshold 0.3", 20, w,
                  lambda **_: FirstBlockCacheWith(0.3, apg)),
        ]  # fmt: skip
    if not quick:
        points += [
            Point("AG", "0.991 model-output", 20, w, lambda **_: dg.AdaptiveGuidance(0.991, space="model_output")),
            Point("LinearAG", "real every 3rd", 20, w, lambda pipe, steps, **_: linear_ag(model, pipe, w, steps, 3)),
            Point("interval", "cutoff 0.5", 20, w, lambda **_: dg.GuidanceInterval(0.5, INF)),
            Point("APG", "eta=0 projection", 20, w, lambda **_: dg.APG(eta=0.0, norm_threshold=INF, momentum=0.0)),
        ]  # fmt: skip
    return points


class FasterCacheUncondSkip:
    """A peer, not a diffguide rule: diffusers' FasterCache (Lv et al., arXiv 2410.19355) with only
    its unconditional-branch skipping (``FasterCacheConfig(unconditional_batch_skip_range=n)``;
    attention caching off) on the pipeline's own batched CFG. Inside its timestep range it
    evaluates the unconditional half every ``n``-th call only and approximates it otherwise from
    the cached frequency-split difference to the conditional output."""

    def __init__(self, skip_range: int, timestep_range: tuple[int, int] = (-1, 641)):
        self.skip_range, self.timestep_range = skip_range, timestep_range

    def __repr__(self) -> str:
        return (
            f"FasterCacheConfig(unconditional_batch_skip_range={self.skip_range}, "
            f"unconditional_batch_timestep_skip_range={self.timestep_range}, spatial_attention_block_skip_range=None)"
        )

    @contextmanager
    def attached(self, pipe, nfe_per_sample: list[int]):
        """FasterCache on ``pipe``'s denoiser for the block; appends each sample's NFE, counted
        as rows reaching its first layer, to ``nfe_per_sample``; the hooks are removed after."""
        from diffusers.hooks import FasterCacheConfig, HookRegistry, apply_faster_cache

        denoiser = pipe.denoiser
        first_layer = getattr(denoiser, "pos_embed", None) or denoiser.conv_in
        state = {"timestep": float("inf"), "rows": 0, "images": 0}
        config = FasterCacheConfig(
            spatial_attention_block_skip_range=None, unconditional_batch_skip_range=self.skip_range,
            unconditional_batch_timestep_skip_range=self.timestep_range, tensor_format="BCHW",
            current_timestep_callback=lambda: state["timestep"],
            _unconditional_conditional_input_kwargs_identifiers=["hidden_states", "timestep", "class_labels"],
        )  # fmt: skip
        apply_faster_cache(denoiser, config)
        registry = HookRegistry.check_if_exists_or_initialize(denoiser)

        def before_denoiser(module, args, kwargs):
            timestep = float(
                torch.as_tensor(kwargs.get("timestep", args[1] if len(args) > 1 else 0)).flatten()[0]
            )
            if timestep > state["timestep"]:  # a new trajectory: the cache must not carry over
                flush()
                registry.reset_stateful_hooks()
            state["timestep"] = timestep
            state["images"] = len(args[0] if args else kwargs["hidden_states"]) // 2

        def flush():
            if state["images"]:
                nfe_per_sample.extend([state["rows"] // state["images"]] * state["images"])
            state["rows"] = 0

        def count_rows(module, args):
            state["rows"] += len(args[0])

        handles = [denoiser.register_forward_pre_hook(before_denoiser, with_kwargs=True),
                   first_layer.register_forward_pre_hook(count_rows)]  # fmt: skip
        try:
            yield
            flush()
        finally:
            for handle in handles:
                handle.remove()
            registry.remove_hook("faster_cache_denoiser", recurse=True)


class FirstBlockCacheWith:
    """A composition: a diffguide rule (CFG or APG, the rules that compose with caches) under
    diffusers' FirstBlockCache (``FirstBlockCacheConfig(threshold)``), which runs the first
    transformer block and skips the others, reusing the last call's residual, while the first
    block's output changes little. A skipped block is no network evaluation saved, so the cost is
    counted as block-equivalent NFE: NFE x (blocks run / blocks called). The decision is per call,
    over the whole batch, so results depend on the batch (all points here use batches of 100)."""

    def __init__(self, threshold: float, rule: dg.GuidanceRule):
        self.threshold, self.rule = threshold, rule

    def __repr__(self) -> str:
        return f"FirstBlockCacheConfig(threshold={self.threshold}) + {self.rule!r}"

    @contextmanager
    def attached(self, pipe, counts: dict):
        """FirstBlockCache on ``pipe``'s denoiser for the block; ``counts["block_fraction"]`` is
        set on exit to the blocks run over the blocks called; the hooks are removed after."""
        from diffusers.hooks import FirstBlockCacheConfig, HookRegistry, apply_first_block_cache

        denoiser = pipe.denoiser
        apply_first_block_cache(denoiser, FirstBlockCacheConfig(threshold=self.threshold))
        counts.update(run=0, calls=0)

        def block_ran(module, args, kwargs):  # norm1 runs only inside a block that is not skipped
            counts["run"] += 1

        def denoiser_called(module, args, kwargs):
            counts["calls"] += 1

        blocks = denoiser.transformer_blocks
        handles = [block.norm1.register_forward_pre_hook(block_ran, with_kwargs=True) for block in blocks]
        handles.append(denoiser.register_forward_pre_hook(denoiser_called, with_kwargs=True))
        try:
            yield
        finally:
            counts["block_fraction"] = counts["run"] / max(1, counts["calls"] * len(blocks))
            for handle in handles:
                handle.remove()
            registry = HookRegistry.check_if_exists_or_initialize(denoiser)
            for name in ("fbc_leader_block_hook", "fbc_block_hook"):
                registry.remove_hook(name, recurse=True)


def sample_point(
    pipe, judge, point: Point, labels: torch.Tensor, seed: int, batch_size: int, rule=None
) -> dict:
    """Images, judge features and NFE of one point (its rule, or ``rule`` when already built),
    all samples on seeds seed + i."""
    final_latents: list[torch.Tensor] = []

    def keep_last(pipe_, step, timestep, callback_kwargs):
        if step == point.steps - 1:
            final_latents.append(callback_kwargs["latents"].cpu())
        return {}

    rule = rule if rule is not None else point.make(pipe=pipe, steps=point.steps)
    nfe: list[int] = []
    peer = isinstance(rule, FasterCacheUncondSkip)
    cached = isinstance(rule, FirstBlockCacheWith)
    counts: dict = {}
    started = time.perf_counter()
    with rule.attached(pipe, nfe) if peer else (rule.attached(pipe, counts) if cached else nullcontext()):
        images = generate_samples(
            pipe, labels, seed=seed, batch_size=batch_size, guidance=None if peer else (rule.rule if cached else rule),
            nfe_per_sample=None if peer else nfe, guidance_scale=point.scale, num_inference_steps=point.steps,
            callback_on_step_end=keep_last,
        )  # fmt: skip
    seconds = time.perf_counter() - started
    if cached:  # block-equivalent NFE
        nfe = [n * counts["block_fraction"] for n in nfe]
    features = extract_features(images, judge).float()
    return {
        "images": images.half().numpy(),
        "features": features.numpy(),
        "predictions": judge.head(features).argmax(1).numpy(),
        "labels": labels.numpy(),
        "nfe": np.asarray(nfe, dtype=np.float32),
        "over_range": np.float32((torch.cat(final_latents).abs() > 1).float().mean()),
        "seconds": np.float32(seconds),
        "rule": np.array(repr(rule)),
    }


def cache_folder(model: str, samples: int, seed: int, batch_size: int) -> Path:
    """Where a run's points are cached; batches other than 100 apart (FirstBlockCache decides per batch)."""
    return CACHE / model / (f"n{samples}-seed{seed}" + ("" if batch_size == 100 else f"-b{batch_size}"))


def run_points(model: str, points: list[Point], n_per_class: int, seed: int, batch_size: int) -> Path:
    """Sample every point not cached yet, or cached with another rule (a changed setting or fit)."""
    pipe, judge, _, _ = embedded_model(model)
    labels = torch.arange(pipe.num_classes).repeat_interleave(n_per_class)
    folder = cache_folder(model, len(labels), seed, batch_size)
    folder.mkdir(parents=True, exist_ok=True)
    for i, point in enumerate(points):
        path = folder / f"{point.slug}.npz"
        rule = point.make(pipe=pipe, steps=point.steps)
        if path.exists() and str(np.load(path)["rule"]) == repr(rule):
            continue
        print(f"[{model} {i + 1}/{len(points)}] {point.slug}", flush=True)
        record = sample_point(pipe, judge, point, labels, seed, batch_size, rule)
        np.savez(path.with_suffix(".tmp.npz"), **record)
        path.with_suffix(".tmp.npz").rename(path)
        print(f"  NFE {record['nfe'].mean():.1f}, {record['seconds']:.0f} s, "
              f"acc {(record['predictions'] == record['labels']).mean():.1%}", flush=True)  # fmt: skip
    return folder


# -- metrics per point ---------------------------------------------------------------------


def binomial_se(p: float, n: int) -> float:
    """Standard error of a fraction measured on n independent samples."""
    return float(np.sqrt(max(p * (1 - p), 0.0) / n))


def real_subset(labels: torch.Tensor, n_per_class: int) -> torch.Tensor:
    """Indices of the first ``n_per_class`` images of each class: a class-balanced real set the
    size of the generated one (k-NN radii depend on the set size)."""
    chosen = [torch.nonzero(labels == c).flatten()[:n_per_class] for c in range(int(labels.max()) + 1)]
    if any(len(c) < n_per_class for c in chosen):
        raise SystemExit(f"the test split has fewer than {n_per_class} images of some class")
    return torch.cat(chosen)


def measure_points(model: str, points: list[Point], folder: Path, n_per_class: int) -> dict[str, dict]:
    """Metrics of every cached point (points not sampled yet are left out)."""
    _, judge, test_images, test_labels = embedded_model(model)
    test_features = extract_features(test_images, judge)
    real = test_features[real_subset(test_labels, n_per_class)]
    records = {
        p.slug: dict(np.load(folder / f"{p.slug}.npz")) for p in points if (folder / f"{p.slug}.npz").exists()
    }
    rows = {}
    for point in points:
        if point.slug not in records:
            continue
        record = records[point.slug]
        features = torch.from_numpy(record["features"]).double()
        n = len(features)
        correct = record["predictions"] == record["labels"]
        accuracy = float(correct.mean())
        fake_in_real, real_in_fake = dg.metrics.manifold_membership(real, features, k=3)
        precision, recall = float(fake_in_real.double().mean()), float(real_in_fake.double().mean())
        density, coverage = dg.metrics.density_coverage(real, features, k=5)
        row = {
            "family": point.family, "knob": point.knob, "label": point.label, "steps": point.steps,
            "scale": point.scale, "samples": n, "nfe": float(record["nfe"].mean()),
            "judge_accuracy": accuracy, "judge_accuracy_se": binomial_se(accuracy, n),
            "precision": precision, "precision_se": binomial_se(precision, n),
            "recall": recall, "recall_se": binomial_se(recall, len(real)),
            "density": density, "coverage": coverage,
            "domain_fd": dg.metrics.feature_frechet_distance(features, test_features),
            "over_range": float(record["over_range"]), "seconds": float(record["seconds"]),
            "rule": str(record["rule"]),
            # per-sample values, paired across points (same seeds, same real set); not written out
            "_per_sample": {"judge_accuracy": correct.astype(float), "precision": fake_in_real.double().numpy(),
                            "recall": real_in_fake.double().numpy()},
        }  # fmt: skip
        reference = records.get(Point("CFG", "", REFERENCE_STEPS, point.scale, dg.CFG).slug)
        if reference is not None:
            pixel = dg.metrics.per_sample_distance(
                torch.from_numpy(record["images"]).float(), torch.from_numpy(reference["images"]).float()
            )
            feature = dg.metrics.per_sample_distance(
                features, torch.from_numpy(reference["features"]).double()
            )
            row["faithfulness"] = {"pixel": vars(Distance.of(pixel)), "feature": vars(Distance.of(feature))}
            row["_per_sample"]["pixel_l2"] = pixel.numpy()
        rows[point.slug] = row
    return rows


MEASURES = ("judge_accuracy", "precision", "recall")


def shortfall(candidate: dict, target: dict, measure: str) -> float:
    """How far ``candidate`` falls short of ``target`` on ``measure``, in standard errors of the
    paired difference (same seeds, same real set: sample i of both runs shares its noise, so the
    difference is measured sample by sample); <= 0 where it is at least as good. Pixel distance
    to the reference is lower-better, the others higher-better."""
    diff = candidate["_per_sample"][measure] - target["_per_sample"][measure]
    if measure != "pixel_l2":
        diff = -diff
    se = diff.std(ddof=1) / np.sqrt(len(diff))
    if se == 0:
        return 0.0 if diff.mean() <= 0 else np.inf
    return float(diff.mean() / se)


def at_least_as_good(
    candidate: dict, target: dict, measures: tuple[str, ...] = MEASURES, margin: float = 1.0
) -> bool:
    """Whether ``candidate`` is no worse than ``target`` on each measure by more than ``margin``
    paired standard errors."""
    return all(shortfall(candidate, target, m) <= margin for m in measures)


def closest_miss(cfg: list[dict], target: dict) -> tuple[dict, str, float]:
    """The CFG point whose worst shortfall against ``target`` is smallest, that measure and its size."""
    worst = [(max((shortfall(c, target, m), m) for m in MEASURES), c) for c in cfg]
    (size, measure), point = min(worst, key=lambda item: (item[0][0], item[1]["nfe"]))
    return point, measure, size


def savings(rows: dict[str, dict]) -> dict[str, dict]:
    """Per rule point: NFE saved against CFG at the same steps and scale, and against the
    cheapest CFG point of the frontier (any steps and scale) at least as good."""
    cfg = [row for row in rows.values() if row["family"] == "CFG"]
    result = {}
    for slug, row in rows.items():
        if row["family"] == "CFG":
            continue
        same = next((c for c in cfg if c["steps"] == row["steps"] and c["scale"] == row["scale"]), None)
        matching = [c for c in cfg if at_least_as_good(c, row)]
        cheapest = min(matching, key=lambda c: (c["nfe"], c["steps"])) if matching else None
        # the same at a 2-SE margin: CFG may trail the rule by more, so this saving is the cautious one
        lenient = [c for c in cfg if at_least_as_good(c, row, margin=2.0)]
        cheapest_2se = min(lenient, key=lambda c: c["nfe"]) if lenient else None
        faithful = [
            c for c in cfg
            if c["scale"] == row["scale"] and "pixel_l2" in c["_per_sample"] and "pixel_l2" in row["_per_sample"]
            and at_least_as_good(c, row, ("pixel_l2",))
        ]  # fmt: skip
        as_faithful = min(faithful, key=lambda c: c["nfe"]) if faithful else None
        result[slug] = {
            "as_faithful_cfg_steps": None if as_faithful is None else as_faithful["steps"],
            "vs_as_faithful": None if as_faithful is None else 1 - row["nfe"] / as_faithful["nfe"],
            "vs_same_steps": None if same is None else 1 - row["nfe"] / same["nfe"],
            "parity_with_same_steps": None if same is None else at_least_as_good(row, same),
            "cheapest_cfg": None
            if cheapest is None
            else f"CFG {cheapest['steps']} steps, w={cheapest['scale']:g}",
            "cheapest_cfg_nfe": None if cheapest is None else cheapest["nfe"],
            "vs_frontier": None if cheapest is None else 1 - row["nfe"] / cheapest["nfe"],
            "vs_frontier_2se": None if cheapest_2se is None else 1 - row["nfe"] / cheapest_2se["nfe"],
        }
        if cheapest is None:
            point, measure, size = closest_miss(cfg, row)
            result[slug]["closest_miss"] = (
                f"closest: CFG {point['steps']} steps, w={point['scale']:g}, {measure.replace('judge_', '')} "
                f"short by {size:.1f} SE"
            )
    return result


# -- report ---------------------------------------------------------------------------------

PLOTTED = [
    ("judge_accuracy", "judge accuracy", True),
    ("precision", "precision (k=3)", True),
    ("recall", "recall (k=3)", True),
    ("density", "density (k=5)", True),
    ("coverage", "coverage (k=5)", True),
    ("domain_fd", "domain FD (lower is better)", False),
    ("faithfulness", "pixel L2 to CFG-20 at the rules' scale, same seed (lower)", False),
]


def _value(row: dict, key: str) -> float:
    if key == "faithfulness":
        return row.get("faithfulness", {}).get("pixel", {}).get("mean", np.nan)
    return row[key]


def frontier_plot(model: str, rows: dict[str, dict], path: Path) -> None:
    """NFE against each measure: CFG per scale as lines, CFG's best-so-far envelope, rules as markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(20, 9))
    families = sorted({row["family"] for row in rows.values()} - {"CFG"})
    markers = dict(zip(families, itertools.cycle("o^vsDP*Xh<>"), strict=False))
    cfg = sorted((row for row in rows.values() if row["family"] == "CFG"), key=lambda r: r["nfe"])
    recommended = SETTINGS[model]["scale"]
    all_cfg = cfg
    for ax, (key, title, higher_better) in zip(axes.flat, PLOTTED, strict=False):
        # faithfulness is to CFG-20 at each point's own scale: only the rules' scale is comparable
        cfg = [row for row in all_cfg if key != "faithfulness" or row["scale"] == recommended]
        for scale in sorted({row["scale"] for row in cfg}):
            line = [row for row in cfg if row["scale"] == scale]
            ax.plot([r["nfe"] for r in line], [_value(r, key) for r in line], "-", marker=".", alpha=0.5,
                    label=f"CFG w={scale:g} (steps 6-30)")  # fmt: skip
        # CFG's frontier: the best value any CFG point reaches at this NFE or fewer
        best, envelope = None, []
        for row in cfg:
            value = _value(row, key)
            if np.isnan(value):
                continue
            best = value if best is None else (max if higher_better else min)(best, value)
            envelope.append((row["nfe"], best))
        if envelope:
            ax.step(*zip(*envelope, strict=True), where="post", color="black", lw=1.5, label="CFG frontier")
        for family in families:
            pts = [row for row in rows.values() if row["family"] == family]
            ax.scatter(
                [r["nfe"] for r in pts], [_value(r, key) for r in pts], marker=markers[family], label=family
            )
        ax.set_title(title)
        ax.set_xlabel("NFE per image")
        ax.grid(alpha=0.3)
    axes.flat[-1].axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    axes.flat[-1].legend(handles, labels, loc="center")
    fig.suptitle(f"{MODELS[model]}: every point against CFG over steps x scale")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _with_se(row: dict, key: str) -> str:
    return f"{row[key]:.3f} ± {row[f'{key}_se']:.3f}"


def report(
    model: str, rows: dict[str, dict], saved: dict[str, dict], command: str, tag: str | None = None
) -> str:
    """The BENCHMARKS.md section of one model: the savings table, then every point."""
    first = next(iter(rows.values()))
    cfg_steps = sorted({r["steps"] for r in rows.values() if r["family"] == "CFG"})
    cfg_scales = sorted({r["scale"] for r in rows.values() if r["family"] == "CFG"})
    header = ["point", "steps", "w", "NFE", "judge acc.", "precision", "recall", "density", "coverage",
              "domain FD", "pixel L2 to CFG-20", "feature L2", "over-range"]  # fmt: skip
    table = []
    for row in sorted(
        rows.values(), key=lambda r: (r["family"] != "CFG", r["family"], r["knob"], r["scale"], r["steps"])
    ):
        faith = row.get("faithfulness")
        table.append([
            row["label"], row["steps"], f"{row['scale']:g}", f"{row['nfe']:.1f}", _with_se(row, "judge_accuracy"),
            _with_se(row, "precision"), _with_se(row, "recall"), f"{row['density']:.3f}", f"{row['coverage']:.3f}",
            f"{row['domain_fd']:.1f}",
            "-" if faith is None else f"{faith['pixel']['mean']:.2f} ± {faith['pixel']['stderr']:.2f}",
            "-" if faith is None else f"{faith['feature']['mean']:.2f} ± {faith['feature']['stderr']:.2f}",
            f"{row['over_range']:.1%}",
        ])  # fmt: skip
    saving_header = ["rule", "steps", "NFE", "saved vs CFG same steps", "at parity with it?",
                     "cheapest CFG at least as good", "its NFE", "saved vs CFG's frontier", "same, 2-SE margin",
                     "CFG steps as faithful", "saved vs it"]  # fmt: skip
    saving_rows = []
    # rules no CFG point matches first (a quality CFG does not reach at any cost on the grid), then by saving
    order = sorted(
        saved.items(), key=lambda kv: (kv[1]["vs_frontier"] is not None, -(kv[1]["vs_frontier"] or 0))
    )
    for slug, s in order:
        row = rows[slug]
        saving_rows.append([
            row["label"], row["steps"], f"{row['nfe']:.1f}", _pct(s["vs_same_steps"]),
            {None: "-", True: "yes", False: "no"}[s["parity_with_same_steps"]],
            s["cheapest_cfg"] or f"none ({s['closest_miss']})", "-" if s["cheapest_cfg_nfe"] is None else f"{s['cheapest_cfg_nfe']:.0f}",
            _pct(s["vs_frontier"]), _pct(s["vs_frontier_2se"]), s["as_faithful_cfg_steps"] or "-",
            _pct(s["vs_as_faithful"]),
        ])  # fmt: skip
    best = max((s["vs_frontier"] for s in saved.values() if s["vs_frontier"] is not None), default=None)
    return (
        f"### The NFE frontier: {MODELS[model]}"
        + (
            ""
            if tag in (None, model)
            else ", a larger-sample check on a narrowed grid (only the points cached are shown)"
        )
        + f"\n\n`{command}` ({machine()}). {first['samples']} samples per "
        f"point ({first['samples'] // 10} per class, seeds 0..{first['samples'] - 1}, the same for every point). "
        f"Judge accuracy, improved precision/recall (k=3) and density/coverage (k=5) in judge features against "
        f"{first['samples']} class-balanced test images (the same count, since k-NN radii shrink with the set "
        f"size); ± is the binomial standard error. Domain FD against the whole test split. Faithfulness: mean "
        f"per-sample L2 distance (± standard error) to CFG at {REFERENCE_STEPS} steps and the same scale on the "
        f"same seed, in [0, 1] pixels and in judge features. Plots: "
        f"[figures/frontier_{tag or model}.png](figures/frontier_{tag or model}.png).\n\n"
        f"**NFE saved.** Against CFG at the same step count (the papers' framing; 'at parity' means no worse "
        f"on accuracy, precision and recall by more than one standard error of the paired difference: the "
        f"same seeds and real set make every point's samples pairs, so differences are measured sample by "
        f"sample), and against the "
        f"cheapest CFG point, over steps {{{', '.join(map(str, cfg_steps))}}} and scales "
        f"{{{', '.join(f'{x:g}' for x in cfg_scales)}}}, that is at least as "
        f"good as the rule on the same three measures (ours). A negative figure: CFG's frontier reaches the "
        f"rule's quality for fewer NFE. The last two columns read the same against faithfulness: the "
        f"fewest CFG steps, at the rule's scale, whose images are at least as close to CFG-{REFERENCE_STEPS}'s "
        f"(pixel L2 within one paired standard error). With {first['samples']} samples a standard error is 2-3 "
        f"points of precision or recall, so a saving decided by one CFG point's margin moves when the noise "
        f"does; the 'closest' note says how near a rule without a match came, and the 2-SE column lets CFG trail "
        f"the rule by two paired standard errors before it stops counting as a match (the cautious saving). Best saving against the frontier: **{_pct(best)}** "
        f"(target: 40%).\n\n"
        + markdown_table(saving_header, saving_rows)
        + "\n\nEvery point:\n\n"
        + markdown_table(header, table)
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, choices=list(MODELS), help="default: every embedded model")
    parser.add_argument("--quick", action="store_true", help="5 samples per class and a reduced grid")
    parser.add_argument("--n-per-class", type=int, default=None, help="default: digits 20, fashion 30")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--report", action="store_true", help="only tables and plots from cached points")
    parser.add_argument(
        "--max-steps", type=int, default=None, help="a narrower grid: points up to this many steps"
    )
    parser.add_argument(
        "--scales", default=None, help="a narrower grid: CFG at these scales only (comma-separated)"
    )
    args = parser.parse_args()
    scales = tuple(float(x) for x in args.scales.split(",")) if args.scales else None
    narrowed = args.max_steps is not None or scales is not None
    results = {}
    for model in [args.model] if args.model else list(MODELS):
        n_per_class = args.n_per_class or (5 if args.quick else SETTINGS[model]["n_per_class"])
        points = points_for(model, args.quick, args.max_steps, scales)
        folder = cache_folder(model, n_per_class * 10, args.seed, args.batch_size)
        if not args.report:
            folder = run_points(model, points, n_per_class, args.seed, args.batch_size)
        rows = measure_points(model, points, folder, n_per_class)
        if not rows:
            raise SystemExit(f"no cached points in {folder}; run without --report first")
        saved = savings(rows)
        command = "python evals/frontier.py " + " ".join(sys.argv[1:])
        written = {
            slug: {k: v for k, v in row.items() if not k.startswith("_")} for slug, row in rows.items()
        }
        # a narrowed or larger-sample run is a check beside the main frontier, under its own name
        tag = model if not narrowed and args.n_per_class is None else f"{model}_n{n_per_class * 10}"
        if narrowed:
            tag += f"_steps{args.max_steps}" if args.max_steps else ""
            tag += f"_w{'-'.join(f'{x:g}' for x in scales)}" if scales else ""
        results[tag] = {
            "command": command.strip(),
            "machine": machine(),
            "points": written,
            "savings": saved,
        }
        frontier_plot(model, rows, ROOT / "docs" / "figures" / f"frontier_{tag}.png")
        section = report(model, rows, saved, command.strip(), tag)
        if args.quick:
            print(section)
            continue
        write_section(f"frontier_{tag}", section)
        print(section)
    if not args.quick:
        previous = (
            json.loads((RESULTS / "frontier.json").read_text())
            if (RESULTS / "frontier.json").exists()
            else {}
        )
        merged = {**previous, **results}
        write_result("frontier", merged)
        # what `diffguide compare` shows beside its few samples, labelled as the benchmark's
        points = [
            {"model": model, "rule": row["rule"], "steps": row["steps"], "scale": row["scale"], "samples": row["samples"],
             **{key: round(row[key], 4) for key in ("precision", "precision_se", "recall", "recall_se")}}
            for model, record in merged.items() if model in MODELS for row in record["points"].values()
        ]  # fmt: skip
        FRONTIER_POINTS.write_text(json.dumps(points, indent=0) + "\n")


if __name__ == "__main__":
    main()
