"""Guidance rules against CFG on the embedded models.

    python evals/guidance.py                          # digits: 1,000 samples per row, w = 3 and 8
    python evals/guidance.py --model fashion          # the flow transformer: 300 per row, w = 3
    python evals/guidance.py --n-per-class 10 --scales 3   # a quick look

Per row: network evaluations (NFE) per image, the judge's accuracy (does the sample show the class asked for), domain Frechet
distance (judge features) to the model's test split (1,000 digits; 10,000 fashion images),
and two saturation measures: the fraction of pixels of the final, unclipped sample beyond
the data range [-1, 1] (how far guidance pushes past white and black), and the fraction of
output pixels at exactly 0 or 1.
Every row uses the same seeds (sample i: seed + i) and 20 steps of the model's own sampler
(DDIM for digits, the AG paper's setting; FlowMatchEuler for fashion). The rule settings are
the same on both models (the digits-tuned ones included), which is the point: a setting tuned
on one model is shown on the other. LinearAG is calibrated once on 200 CFG trajectories with
other seeds and the fit is kept in evals/results. Wall time: ``--timing``, rules interleaved.
Rows are cached in evals/results/guidance_rows.json, keyed by model, so an interrupted run resumes and a run on one model keeps the other's rows (``--fresh`` recomputes this model's).
Writes docs/BENCHMARKS.md (section ``guidance``) and docs/figures/guidance_pareto.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
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
from diffguide.generation import generate_samples  # noqa: E402
from diffguide.guidance.linear_ag import paper_schedule  # noqa: E402
from diffguide.metrics import clipped_fraction, feature_frechet_distance  # noqa: E402
from diffguide.metrics.features import extract_features  # noqa: E402

INF = float("inf")
#: per model: default scales and samples per class (the flow transformer's rows are costlier)
DEFAULTS = {"digits": ("3,8", 100), "fashion": ("3", 30)}
#: row names before the table covered more than one model
RENAMED = {"AG 0.991 (eps, paper)": "AG 0.991 (model output, paper)"}


def rules_for(
    pipe, scale: float, steps: int, calibration: int, model: str = "digits"
) -> dict[str, dg.GuidanceRule]:
    """The rows of the table at one guidance scale, by name."""
    linear_ag = calibrated_linear_ag(model, pipe, scale, steps, calibration)
    return {
        "CFG": dg.CFG(),
        "APG eta=0 (projection only)": dg.APG(eta=0.0, norm_threshold=INF, momentum=0.0),
        "APG eta=0 r=2 beta=-0.5": dg.APG(eta=0.0, norm_threshold=2.0, momentum=-0.5),
        "AG 0.98 (x0)": dg.AdaptiveGuidance(0.98),
        "AG 0.991 (x0)": dg.AdaptiveGuidance(0.991),
        "AG 0.994 (x0)": dg.AdaptiveGuidance(0.994),
        "AG 0.996 (x0)": dg.AdaptiveGuidance(0.996),
        "AG 0.991 (model output, paper)": dg.AdaptiveGuidance(0.991, space="model_output"),
        "LinearAG (paper schedule)": linear_ag,
        "LinearAG (real every 3rd step)": linear_ag.with_schedule(paper_schedule(steps, real_every=3)),
    }


def measure_rule(pipe, judge, rule, labels, test_features, scale, steps, seed, batch_size) -> dict:
    final_latents: list[torch.Tensor] = []

    def keep_last(pipe_, step, timestep, callback_kwargs):
        if step == steps - 1:
            final_latents.append(callback_kwargs["latents"].cpu())
        return {}

    nfe: list[int] = []
    started = time.perf_counter()
    images = generate_samples(
        pipe, labels, seed=seed, batch_size=batch_size, progress=True, guidance=rule, nfe_per_sample=nfe,
        guidance_scale=scale, num_inference_steps=steps, callback_on_step_end=keep_last,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    features = extract_features(images, judge)
    predictions = judge.head(features.float()).argmax(1)
    latents = torch.cat(final_latents)
    return {
        "nfe": float(np.mean(nfe)),
        "seconds": seconds,
        "judge_accuracy": (predictions == labels).float().mean().item(),
        "domain_fd": feature_frechet_distance(features, test_features),
        "over_range": (latents.abs() > 1).float().mean().item(),
        "at_limits": clipped_fraction(images),
    }


def row_key(model: str, name: str, scale: float) -> str:
    return f"{model}: {name} @ w={scale:g}"


def load_rows(cache: Path) -> dict:
    """The cached rows, keyed by :func:`row_key` (rows from before the model column are digits')."""
    rows = json.loads(cache.read_text()) if cache.exists() else {}
    keyed = {}
    for key, row in rows.items():
        model = row.setdefault("model", "digits")
        name = key.split(": ", 1)[1] if key.startswith(f"{model}: ") else key
        name = name.rsplit(" @ w=", 1)[0]
        keyed[row_key(model, RENAMED.get(name, name), row["scale"])] = row
    return keyed


def pareto_plot(rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(row["model"], row["scale"]) for row in rows.values()})
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (model, scale) in zip(axes[0], panels, strict=True):
        for key, row in rows.items():
            if (row["model"], row["scale"]) != (model, scale):
                continue
            name = key.split(": ", 1)[1].split(" @")[0]
            marker = "s" if name.startswith("CFG") else ("^" if name.startswith("APG") else "o")
            ax.scatter(row["nfe"], row["domain_fd"], marker=marker)
            ax.annotate(
                name, (row["nfe"], row["domain_fd"]), fontsize=7, xytext=(3, 3), textcoords="offset points"
            )
        ax.set_title(f"{model}, w={scale:g}, {row_steps(rows, model)} steps")
        ax.set_xlabel("NFE per image")
        ax.set_ylabel("domain FD to the test split (lower is better)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def row_steps(rows: dict, model: str) -> int:
    return next(row["steps"] for row in rows.values() if row["model"] == model)


def timing(args) -> None:
    """Wall time of each rule relative to CFG, rules interleaved so machine noise hits all alike."""
    pipe = embedded_model(args.model)[0]
    labels = torch.arange(pipe.num_classes).repeat(args.timing // pipe.num_classes + 1)[: args.timing]
    generate_samples(pipe, labels[:10], batch_size=10, guidance_scale=3.0, num_inference_steps=2)  # warm-up
    rows = []
    for scale in [float(s) for s in args.scales.split(",")]:
        rules = rules_for(pipe, scale, args.steps, args.calibration, args.model)
        names = args.only.split(",") if args.only else list(rules)
        names = ["CFG", *[n for n in names if n != "CFG"]]
        seconds: dict[str, list[float]] = {name: [] for name in names}
        for _ in range(3):
            for name in names:
                started = time.perf_counter()
                generate_samples(pipe, labels, seed=args.seed, batch_size=args.batch_size, guidance=rules[name],
                                 guidance_scale=scale, num_inference_steps=args.steps)  # fmt: skip
                seconds[name].append(time.perf_counter() - started)
        cfg = float(np.median(seconds["CFG"]))
        rows += [
            [args.model, f"{scale:g}", name, f"{np.median(t):.2f}", f"{np.median(t) / cfg:.2f}"]
            for name, t in seconds.items()
        ]
    command = "python evals/guidance.py " + " ".join(sys.argv[1:])
    header = ["model", "w", "rule", "seconds (median)", "time / CFG"]
    write_section(
        "guidance_timing" if args.model == "digits" else f"guidance_timing_{args.model}",
        f"### Guidance rules: wall time relative to CFG ({MODELS[args.model]})\n\n`{command.strip()}` "
        f"({machine()}). {args.timing} samples per rule and round, {args.steps} steps, batch {args.batch_size}; "
        f"rules interleaved over 3 rounds, median per rule.\n\n" + markdown_table(header, rows),
    )
    print(markdown_table(header, rows))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="digits", choices=list(MODELS))
    parser.add_argument("--scales", default=None, help="guidance scales (default: digits 3,8; fashion 3)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--n-per-class", type=int, default=None, help="default: digits 100, fashion 30")
    parser.add_argument("--calibration", type=int, default=200, help="LinearAG calibration trajectories")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--only", default=None, help="comma-separated row names to run (default: all)")
    parser.add_argument("--fresh", action="store_true", help="recompute this model's cached rows")
    parser.add_argument(
        "--timing", type=int, default=0, metavar="N",
        help="instead: time every rule on N samples, interleaved over 3 rounds (wall-time ratios to CFG)",
    )  # fmt: skip
    args = parser.parse_args()
    default_scales, default_per_class = DEFAULTS[args.model]
    args.scales = args.scales or default_scales
    n_per_class = args.n_per_class or default_per_class
    if args.timing:
        timing(args)
        return

    pipe, judge, test_images, _ = embedded_model(args.model)
    test_features = extract_features(test_images, judge)
    labels = torch.arange(pipe.num_classes).repeat_interleave(n_per_class)
    cache = RESULTS / "guidance_rows.json"
    settings = {"steps": args.steps, "samples": len(labels), "seed": args.seed}
    rows = load_rows(cache)
    # this model's rows at other settings (or all of them, with --fresh) are dropped; other models' stay
    rows = {
        k: v for k, v in rows.items()
        if v["model"] != args.model or (not args.fresh and all(v.get(s) == settings[s] for s in settings))
    }  # fmt: skip

    # one untimed call first, so the first timed row does not pay for warm-up
    generate_samples(pipe, labels[:10], batch_size=10, guidance_scale=3.0, num_inference_steps=2)
    for scale in [float(s) for s in args.scales.split(",")]:
        rules = rules_for(pipe, scale, args.steps, args.calibration, args.model)
        chosen = args.only.split(",") if args.only else list(rules)
        for name in ["CFG", *[n for n in chosen if n != "CFG"]]:
            key = row_key(args.model, name, scale)
            if key in rows:
                continue
            print(f"{key}: {rules[name]!r}", flush=True)
            row = measure_rule(
                pipe, judge, rules[name], labels, test_features, scale, args.steps, args.seed, args.batch_size
            )
            rows[key] = {**row, **settings, "model": args.model, "scale": scale, "rule": repr(rules[name]),
                         "machine": machine()}  # fmt: skip
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(rows, indent=1))
            print(f"  {rows[key]}", flush=True)
    cache.write_text(json.dumps(rows, indent=1))

    rows = {
        k: v
        for k, v in rows.items()
        if v["model"] in MODELS and row_key(v["model"], "CFG", v["scale"]) in rows
    }
    models = [m for m in MODELS if any(row["model"] == m for row in rows.values())]
    table_rows = []
    for key, row in rows.items():
        cfg = rows[row_key(row["model"], "CFG", row["scale"])]
        table_rows.append([
            row["model"], f"{row['scale']:g}", key.split(": ", 1)[1].split(" @")[0], f"{row['nfe']:.1f}",
            f"{1 - row['nfe'] / cfg['nfe']:.0%}",
            f"{row['judge_accuracy']:.1%}", f"{row['domain_fd']:.1f}", f"{row['domain_fd'] / cfg['domain_fd'] - 1:+.0%}",
            f"{row['over_range']:.1%}", f"{row['at_limits']:.1%}",
        ])  # fmt: skip
    table_rows.sort(key=lambda r: (models.index(r[0]), float(r[1]), r[2] != "CFG"))
    header = ["model", "w", "rule", "NFE/image", "NFE saved", "judge acc.", "domain FD",
              "FD vs CFG", "over-range", "pixels at 0/1"]  # fmt: skip
    per_model = "; ".join(
        f"**{m}** ({MODELS[m]}): {first['samples']} samples per row, seeds {first['seed']}.."
        f"{first['seed'] + first['samples'] - 1}, {first['steps']} steps"
        for m in models
        for first in [next(row for row in rows.values() if row["model"] == m)]
    )
    command = "python evals/guidance.py " + " ".join(sys.argv[1:])
    write_result("guidance", {"command": command, "machine": machine(), "rows": rows})
    pareto_plot(rows, ROOT / "docs" / "figures" / "guidance_pareto.png")
    write_section(
        "guidance",
        f"## Guidance rules vs CFG (both embedded models)\n\n`python evals/guidance.py` (digits) and "
        f"`python evals/guidance.py --model fashion` regenerate every row; rows are cached in "
        f"evals/results/guidance_rows.json, and this table was last written by `{command.strip()}` "
        f"({machine()}). {per_model}; the same seeds for every row of a model. The rule settings are the same "
        f"on both models, the digits-tuned ones (APG r=2, AG 0.991) included. No time column: rows run one "
        f"after another under whatever else shared the CPU, so their wall times are not comparable; speed "
        f"is in the interleaved timing table (`guidance_timing`). NFE saved here is against CFG at the same "
        f"20 steps (the papers' framing); against CFG's own frontier (fewer steps, other scales) see the "
        f"frontier sections. "
        f"Over-range: pixels of the final unclipped sample outside [-1, 1]. Pixels at 0/1: of the output "
        f"(real test digits have {clipped_fraction(dg.load_digits('test')[0]):.1%} there by nature, so this is "
        f"no saturation score on digits; over-range is). Domain FD floors: see `default_model` and "
        f"`fashion_model`. NFE against FD: [figures/guidance_pareto.png](figures/guidance_pareto.png).\n\n"
        + markdown_table(header, table_rows),
    )
    print(markdown_table(header, table_rows))


if __name__ == "__main__":
    main()
