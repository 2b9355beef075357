"""How similar are the conditional and unconditional predictions along a CFG trajectory?

    python evals/ag_similarity.py                # default model, 200 samples, DDIM 20, w=3 and 8

Adaptive Guidance switches guidance off per sample once ``cos(c, u)`` reaches a threshold.
This measures that cosine per step, in the model's output space (epsilon, as the paper) and
in denoised (x0) space, under plain CFG (the rule is given an unreachable threshold, so it
records without ever switching). Writes docs/figures/ag_similarity.png (median and 10-90%
band per step) and a table to docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import RESULTS, ROOT, machine, markdown_table, write_result, write_section  # noqa: E402

import diffguide as dg  # noqa: E402
from diffguide.generation import generate_samples  # noqa: E402

THRESHOLDS = (0.991, 0.994, 0.996)


def similarity_trajectories(pipe, labels, scale: float, steps: int, space: str, seed: int, batch_size: int):
    """(steps, N) cosine similarities of cond/uncond predictions under plain CFG."""
    recorder = dg.AdaptiveGuidance(threshold=2.0, space=space)  # never switches: CFG that records
    rows = []
    for start in range(0, len(labels), batch_size):
        batch = labels[start : start + batch_size]
        generate_samples(
            pipe, batch, seed=seed + start, batch_size=len(batch), guidance=recorder,
            guidance_scale=scale, num_inference_steps=steps,
        )  # fmt: skip
        rows.append(torch.stack(recorder.similarities))  # one call per batch: its whole trajectory
    return torch.cat(rows, dim=1).numpy()


def crossing_step(median: np.ndarray, threshold: float) -> int | None:
    above = np.nonzero(median >= threshold)[0]
    return int(above[0]) if len(above) else None


def plot(summary: dict, timesteps: list[int], path: Path) -> None:
    """1 - cos per step on a log axis (median, 10-90% band), one panel per guidance scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = sorted({key.split("/")[0] for key in summary}, key=float)
    fig, axes = plt.subplots(1, len(scales), figsize=(5.5 * len(scales), 4), sharey=True, squeeze=False)
    for ax, scale in zip(axes[0], scales, strict=True):
        for space, color in (("model_output", "tab:red"), ("denoised", "tab:blue")):
            curve = summary[f"{scale}/{space}"]
            steps = np.arange(len(curve["median"]))
            gap = {name: 1 - np.asarray(curve[name]) for name in ("median", "p10", "p90")}
            label = "eps (model output)" if space == "model_output" else "denoised x0"
            ax.plot(steps, gap["median"].clip(1e-7), color=color, label=f"{label}, median")
            ax.fill_between(steps, gap["p90"].clip(1e-7), gap["p10"].clip(1e-7), color=color, alpha=0.2)
        for threshold in THRESHOLDS:
            ax.axhline(1 - threshold, color="grey", lw=0.6, ls="--")
        ax.set_yscale("log")
        ax.set_title(f"default model, CFG w={scale}, DDIM {len(timesteps)} steps")
        ax.set_xlabel("step (timestep)")
        ax.set_xticks(steps[::4], [f"{i}\n({t})" for i, t in zip(steps[::4], timesteps[::4], strict=True)])
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("1 - cos(cond, uncond); dashed: AG thresholds")
    axes[0][0].legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--scales", default="3,8")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--n-per-class", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--replot", action="store_true", help="redraw the figure from the saved results")
    args = parser.parse_args()
    figure = ROOT / "docs" / "figures" / "ag_similarity.png"
    if args.replot:
        saved = json.loads((RESULTS / "ag_similarity.json").read_text())
        plot(saved["results"], saved["timesteps"], figure)
        return

    pipe = dg.load_default_pipeline()
    pipe.set_progress_bar_config(disable=True)
    labels = torch.arange(10).repeat_interleave(args.n_per_class)
    results: dict[float, dict[str, np.ndarray]] = {}
    for scale in [float(s) for s in args.scales.split(",")]:
        results[scale] = {
            space: similarity_trajectories(pipe, labels, scale, args.steps, space, args.seed, args.batch_size)
            for space in ("model_output", "denoised")
        }
    pipe.scheduler.set_timesteps(args.steps)
    timesteps = [int(t) for t in pipe.scheduler.timesteps]
    rows, record = [], {"machine": machine(), "args": vars(args), "timesteps": timesteps, "results": {}}
    for scale, spaces in results.items():
        for space, sims in spaces.items():
            median = np.median(sims, axis=1)
            record["results"][f"{scale:g}/{space}"] = {
                "median": median.tolist(),
                "p10": np.percentile(sims, 10, axis=1).tolist(),
                "p90": np.percentile(sims, 90, axis=1).tolist(),
            }
            crossings = [crossing_step(median, t) for t in THRESHOLDS]
            rows.append(
                [f"{scale:g}", space, f"{median[0]:.4f}", f"{median.min():.4f} (step {int(median.argmin())})",
                 f"{median[-1]:.4f}", *[("never" if c is None else f"step {c}") for c in crossings]]
            )  # fmt: skip
    write_result("ag_similarity", record)
    plot(record["results"], timesteps, figure)
    header = ["w", "space", "median at step 0", "lowest median", "median at last step"]
    header += [f"median reaches {t}" for t in THRESHOLDS]
    write_section(
        "ag_similarity",
        f"## Adaptive Guidance: cond/uncond similarity per step\n\n"
        f"`python evals/ag_similarity.py` ({len(labels)} samples, DDIM {args.steps} steps, plain CFG; "
        f"{machine()}). Plot: [figures/ag_similarity.png](figures/ag_similarity.png).\n\n"
        + markdown_table(header, rows),
    )
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
