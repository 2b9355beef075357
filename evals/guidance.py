"""Guidance rules against CFG on the embedded default model.

    python evals/guidance.py                          # 1,000 samples per row, w = 3 and 8
    python evals/guidance.py --n-per-class 10 --scales 3   # a quick look

Per row: network evaluations (NFE) per image, wall time relative to CFG measured in the same
run, the judge's accuracy (does the sample show the class asked for), domain Frechet
distance (judge features) to the 1,000 test digits, and two saturation measures: the
fraction of pixels of the final, unclipped sample beyond the data range [-1, 1] (how far
guidance pushes past white and black), and the fraction of output pixels at exactly 0 or 1.
Every row uses the same seeds (sample i: seed + i) and DDIM with 20 steps, the AG paper's
setting. LinearAG is calibrated on 200 CFG trajectories with other seeds. Rows are cached in
evals/results/guidance_rows.json so an interrupted run resumes (``--fresh`` starts over).
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

from report import RESULTS, ROOT, machine, markdown_table, write_result, write_section  # noqa: E402

import diffguide as dg  # noqa: E402
from diffguide.compare import calibrate_on_labels  # noqa: E402
from diffguide.generation import generate_samples  # noqa: E402
from diffguide.guidance.linear_ag import paper_schedule  # noqa: E402
from diffguide.metrics import clipped_fraction, feature_frechet_distance  # noqa: E402
from diffguide.metrics.features import extract_features  # noqa: E402

INF = float("inf")


def rules_for(pipe, scale: float, steps: int, calibration: int) -> dict[str, dg.GuidanceRule]:
    """The rows of the table at one guidance scale, by name."""
    linear_ag = calibrate_on_labels(pipe, scale, steps, calibration)
    linear_ag.save(RESULTS / f"linear_ag_w{scale:g}_{steps}steps.safetensors")
    return {
        "CFG": dg.CFG(),
        "APG eta=0 (projection only)": dg.APG(eta=0.0, norm_threshold=INF, momentum=0.0),
        "APG eta=0 r=2 beta=-0.5": dg.APG(eta=0.0, norm_threshold=2.0, momentum=-0.5),
        "AG 0.98 (x0)": dg.AdaptiveGuidance(0.98),
        "AG 0.991 (x0)": dg.AdaptiveGuidance(0.991),
        "AG 0.994 (x0)": dg.AdaptiveGuidance(0.994),
        "AG 0.996 (x0)": dg.AdaptiveGuidance(0.996),
        "AG 0.991 (eps, paper)": dg.AdaptiveGuidance(0.991, space="model_output"),
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


def pareto_plot(rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = sorted({row["scale"] for row in rows.values()})
    fig, axes = plt.subplots(1, len(scales), figsize=(6 * len(scales), 4.5), squeeze=False)
    for ax, scale in zip(axes[0], scales, strict=True):
        for name, row in rows.items():
            if row["scale"] != scale:
                continue
            marker = "s" if name.startswith("CFG") else ("^" if name.startswith("APG") else "o")
            ax.scatter(row["nfe"], row["domain_fd"], marker=marker)
            ax.annotate(name.split(" @")[0], (row["nfe"], row["domain_fd"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")  # fmt: skip
        ax.set_title(f"default model, w={scale:g}, DDIM 20 steps")
        ax.set_xlabel("NFE per image")
        ax.set_ylabel("domain FD to the test split (lower is better)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def timing(args) -> None:
    """Wall time of each rule relative to CFG, rules interleaved so machine noise hits all alike."""
    pipe = dg.load_default_pipeline()
    labels = torch.arange(pipe.num_classes).repeat(args.timing // pipe.num_classes + 1)[: args.timing]
    generate_samples(pipe, labels[:10], batch_size=10, guidance_scale=3.0, num_inference_steps=2)  # warm-up
    rows = []
    for scale in [float(s) for s in args.scales.split(",")]:
        rules = rules_for(pipe, scale, args.steps, args.calibration)
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
            [f"{scale:g}", name, f"{np.median(t):.2f}", f"{np.median(t) / cfg:.2f}"]
            for name, t in seconds.items()
        ]
    command = "python evals/guidance.py " + " ".join(sys.argv[1:])
    write_section(
        "guidance_timing",
        f"### Guidance rules: wall time relative to CFG\n\n`{command.strip()}` ({machine()}). {args.timing} samples "
        f"per rule and round, DDIM {args.steps} steps, batch {args.batch_size}; rules interleaved over 3 rounds, "
        f"median per rule.\n\n" + markdown_table(["w", "rule", "seconds (median)", "time / CFG"], rows),
    )
    print(markdown_table(["w", "rule", "seconds (median)", "time / CFG"], rows))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scales", default="3,8", help="moderate and high guidance scales")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--n-per-class", type=int, default=100)
    parser.add_argument("--calibration", type=int, default=200, help="LinearAG calibration trajectories")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--only", default=None, help="comma-separated row names to run (default: all)")
    parser.add_argument("--fresh", action="store_true", help="ignore cached rows")
    parser.add_argument(
        "--timing", type=int, default=0, metavar="N",
        help="instead: time every rule on N samples, interleaved over 3 rounds (wall-time ratios to CFG)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.timing:
        timing(args)
        return

    pipe, judge = dg.load_default_pipeline(), dg.load_judge()
    pipe.set_progress_bar_config(disable=True)
    test_images, _ = dg.load_digits("test")
    test_features = extract_features(test_images, judge)
    labels = torch.arange(pipe.num_classes).repeat_interleave(args.n_per_class)
    cache = RESULTS / "guidance_rows.json"
    settings = {"steps": args.steps, "samples": len(labels), "seed": args.seed}
    rows = {} if args.fresh or not cache.exists() else json.loads(cache.read_text())
    rows = {k: v for k, v in rows.items() if all(v.get(s) == settings[s] for s in settings)}

    # one untimed call first, so the first timed row does not pay for warm-up
    generate_samples(pipe, labels[:10], batch_size=10, guidance_scale=3.0, num_inference_steps=2)
    for scale in [float(s) for s in args.scales.split(",")]:
        rules = rules_for(pipe, scale, args.steps, args.calibration)
        chosen = args.only.split(",") if args.only else list(rules)
        for name in ["CFG", *[n for n in chosen if n != "CFG"]]:
            key = f"{name} @ w={scale:g}"
            if key in rows:
                continue
            print(f"{key}: {rules[name]!r}", flush=True)
            row = measure_rule(
                pipe, judge, rules[name], labels, test_features, scale, args.steps, args.seed, args.batch_size
            )
            rows[key] = {**row, **settings, "scale": scale, "rule": repr(rules[name]), "machine": machine()}
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(rows, indent=1))
            print(f"  {rows[key]}", flush=True)

    real_at_limits = clipped_fraction(test_images)
    table_rows = []
    for key, row in rows.items():
        cfg = rows[f"CFG @ w={row['scale']:g}"]
        table_rows.append([
            f"{row['scale']:g}", key.split(" @")[0], f"{row['nfe']:.1f}", f"{1 - row['nfe'] / cfg['nfe']:.0%}",
            f"{row['seconds'] / cfg['seconds']:.2f}", f"{row['judge_accuracy']:.1%}", f"{row['domain_fd']:.1f}",
            f"{row['domain_fd'] / cfg['domain_fd'] - 1:+.0%}", f"{row['over_range']:.1%}", f"{row['at_limits']:.1%}",
        ])  # fmt: skip
    table_rows.sort(key=lambda r: (float(r[0]), r[1] != "CFG"))
    header = ["w", "rule", "NFE/image", "NFE saved", "time / CFG", "judge acc.", "domain FD", "FD vs CFG",
              "over-range", "pixels at 0/1"]  # fmt: skip
    command = "python evals/guidance.py " + " ".join(sys.argv[1:])
    write_result("guidance", {"command": command, "machine": machine(), "rows": rows})
    figure = ROOT / "docs" / "figures" / "guidance_pareto.png"
    pareto_plot(rows, figure)
    write_section(
        "guidance",
        f"## Guidance rules vs CFG (default model)\n\n`python evals/guidance.py` regenerates every row; rows are "
        f"cached in evals/results/guidance_rows.json, and this table was last written by `{command.strip()}` "
        f"({machine()}). "
        f"{len(labels)} samples per row (seeds {args.seed}..{args.seed + len(labels) - 1}, the same for every "
        f"row), DDIM {args.steps} steps. Time is wall time relative to the CFG row of the same scale; rows "
        f"run one after another, and other jobs shared the CPU during some of them, so read speed from the "
        f"interleaved timing table (`guidance_timing`) instead. Over-range: pixels of the final unclipped sample outside [-1, 1]. Pixels at 0/1 of the "
        f"real test digits: {real_at_limits:.1%} (digits sit at the limits by nature, so this is no "
        f"saturation score here; over-range is). Domain FD floor (two halves of the test split): see "
        f"`metrics`. NFE against FD: [figures/guidance_pareto.png](figures/guidance_pareto.png).\n\n"
        + markdown_table(header, table_rows),
    )
    print(markdown_table(header, table_rows))


if __name__ == "__main__":
    main()
