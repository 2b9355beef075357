"""Shortest Path Diffusion against DDPM at an equal training budget.

    diffguide train default --corruption spd --run-dir runs/spd --out runs/spd-model    # ~75 min on 2 CPU cores
    python evals/spd.py --spd runs/spd-model                                           # DDPM: the shipped model

Both models share the architecture, data, steps, batch, optimizer and seed
(``DefaultTrainingConfig``); only the corruption differs. The shipped default model *is*
the DDPM run of that config. Both are sampled ancestrally (DDPM's scheduler for the DDPM
model, SPD's Fourier-space sampler for SPD) with CFG at ``--scale`` and at each of
``--steps`` (the last default, 1000, is the full T the authors use), and scored by the judge's
accuracy and the domain Frechet distance to the 1,000 test digits.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from diffusers import DDPMScheduler

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import machine, markdown_table, write_result, write_section  # noqa: E402

import diffguide as dg  # noqa: E402
from diffguide.generation import generate_samples  # noqa: E402
from diffguide.metrics import feature_frechet_distance  # noqa: E402
from diffguide.metrics.features import extract_features  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--spd", required=True, help="folder of the SPD-trained pipeline (save_pretrained)")
    parser.add_argument("--steps", default="50,250,1000")
    parser.add_argument("--n-per-class", type=int, default=100)
    parser.add_argument("--scale", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=100)
    args = parser.parse_args()

    spd = dg.DigitsPipeline.from_pretrained(args.spd)
    if not isinstance(spd.scheduler, dg.ShortestPathScheduler):
        raise SystemExit(
            f"{args.spd} does not sample with ShortestPathScheduler; train it with --corruption spd"
        )
    ddpm = dg.load_default_pipeline()
    ddpm.scheduler = DDPMScheduler.from_config(ddpm.scheduler.config)
    judge = dg.load_judge()
    test_images, _ = dg.load_digits("test")
    test_features = extract_features(test_images, judge)
    labels = torch.arange(10).repeat_interleave(args.n_per_class)

    rows, records = [], []
    for steps in [int(s) for s in args.steps.split(",")]:
        for name, pipe in (("DDPM", ddpm), ("SPD", spd)):
            pipe.set_progress_bar_config(disable=True)
            images = generate_samples(
                pipe, labels, seed=args.seed, batch_size=args.batch_size, progress=True,
                guidance_scale=args.scale, num_inference_steps=steps,
            )  # fmt: skip
            features = extract_features(images, judge)
            accuracy = (judge.head(features.float()).argmax(1) == labels).float().mean().item()
            fd = feature_frechet_distance(features, test_features)
            records.append({"model": name, "steps": steps, "judge_accuracy": accuracy, "domain_fd": fd})
            rows.append([name, steps, f"{accuracy:.1%}", f"{fd:.1f}"])
            print(records[-1], flush=True)
    command = "python evals/spd.py " + " ".join(sys.argv[1:])
    write_result("spd", {"command": command, "machine": machine(), "rows": records})
    write_section(
        "spd",
        f"## Shortest Path Diffusion vs DDPM at equal training budget\n\n`{command.strip()}` ({machine()}). "
        f"{len(labels)} samples per row, ancestral sampling, CFG {args.scale}.\n\n"
        + markdown_table(["corruption", "sampling steps", "judge accuracy", "domain FD to test"], rows),
    )


if __name__ == "__main__":
    main()
