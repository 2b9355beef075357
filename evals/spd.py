"""Shortest Path Diffusion against DDPM at an equal training budget.

    diffguide train default --corruption spd --run-dir runs/spd --out runs/spd-model    # ~75 min on 2 CPU cores
    python evals/spd.py --spd runs/spd-model --cells 25:50,100:50,1000:10              # DDPM: the shipped model

Both models share the architecture, data, steps, batch, optimizer and seed
(``DefaultTrainingConfig``); only the corruption differs. The shipped default model *is*
the DDPM run of that config. Both are sampled ancestrally (DDPM's scheduler for the DDPM
model, SPD's Fourier-space sampler for SPD) at each ``--cells`` step count (1000 is the full T
the authors use) with that many samples per class, without guidance by default, and scored
by the judge's accuracy and the domain Frechet distance to the 1,000 test digits.

``--ddpm-full-start 981`` adds, at full-T cells, a DDPM chain that takes every step from
t = 981 down (where the shipped sampler starts) instead of from t = 999, where the cosine
schedule's alpha_bar is 2.4e-9: it separates DDPM's end-point trouble from SPD's corruption.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from diffusers import DDPMScheduler

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import RESULTS, cached_row, machine, markdown_table, write_result, write_section  # noqa: E402

import diffguide as dg  # noqa: E402
from diffguide.generation import generate_samples  # noqa: E402
from diffguide.metrics import feature_frechet_distance  # noqa: E402
from diffguide.metrics.features import extract_features  # noqa: E402


def _ddpm_from(ddpm, start: int):
    """The DDPM pipeline with a scheduler that takes every step from ``start`` down to 0,
    whatever step count the pipeline asks for."""
    scheduler = DDPMScheduler.from_config(ddpm.scheduler.config)
    every_step = list(range(start, -1, -1))
    scheduler.set_timesteps = lambda num_inference_steps=None, device=None: DDPMScheduler.set_timesteps(
        scheduler, device=device, timesteps=every_step
    )
    return dg.DigitsPipeline(unet=ddpm.unet, scheduler=scheduler)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--spd", default=str(Path(__file__).resolve().parents[1] / "checkpoints" / "spd-digits"),
        help="folder of the SPD-trained pipeline (default: the one trained for this project, checkpoints/spd-digits)",
    )  # fmt: skip
    parser.add_argument(
        "--cells", default="50:100,250:100,1000:100",
        help="sampling steps:samples per class, comma-separated (the full T = 1000 is the authors' setting)",
    )  # fmt: skip
    parser.add_argument(
        "--scale", type=float, default=1.0, help="CFG scale (1 = the conditional model alone)"
    )
    parser.add_argument(
        "--ddpm-full-start", type=int, default=None,
        help="at full-T cells, also sample DDPM at every step from this t down (e.g. 981)",
    )  # fmt: skip
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
    cells = [tuple(int(v) for v in cell.split(":")) for cell in args.cells.split(",")]
    # the shipped config ("leading" spacing, steps_offset=1) would ask for t = 1000 at full T
    ddpm_full_t = dg.DigitsPipeline(
        unet=ddpm.unet, scheduler=DDPMScheduler.from_config(ddpm.scheduler.config, steps_offset=0)
    )
    num_train_timesteps = ddpm.scheduler.config.num_train_timesteps

    def measure(name: str, pipe, labels: torch.Tensor, steps: int, steps_taken: int) -> dict:
        pipe.set_progress_bar_config(disable=True)
        images = generate_samples(
            pipe, labels, seed=args.seed, batch_size=args.batch_size, progress=True,
            guidance_scale=args.scale, num_inference_steps=steps,
        )  # fmt: skip
        features = extract_features(images, judge)
        accuracy = (judge.head(features.float()).argmax(1) == labels).float().mean().item()
        record = {"model": name, "steps": steps_taken, "samples": len(labels), "judge_accuracy": accuracy,
                  "domain_fd": feature_frechet_distance(features, test_features)}  # fmt: skip
        print(record, flush=True)
        return record

    rows, records = [], []
    for steps, n_per_class in cells:
        labels = torch.arange(10).repeat_interleave(n_per_class)
        full_t = steps >= num_train_timesteps
        models = [("DDPM", ddpm_full_t if full_t else ddpm, steps), ("SPD", spd, steps)]
        if args.ddpm_full_start is not None and full_t:
            start = args.ddpm_full_start
            models.insert(1, (f"DDPM from t={start}", _ddpm_from(ddpm, start), start + 1))
        for name, pipe, steps_taken in models:
            record = cached_row(
                RESULTS / "spd_rows.json",
                f"{name}/{steps}/{len(labels)}/{args.scale:g}/{args.seed}",
                lambda: measure(name, pipe, labels, steps, steps_taken),  # noqa: B023 (called at once)
            )
            records.append(record)
            rows.append([name, record["steps"], len(labels), f"{record['judge_accuracy']:.1%}",
                         f"{record['domain_fd']:.1f}"])  # fmt: skip
    command = "python evals/spd.py " + " ".join(sys.argv[1:])
    write_result("spd", {"command": command, "machine": machine(), "rows": records})
    write_section(
        "spd",
        f"## Shortest Path Diffusion vs DDPM at equal training budget\n\n`{command.strip()}` ({machine()}). "
        f"Ancestral sampling, CFG {args.scale:g} (1 = no guidance); FD in the judge's feature space against "
        "the 1,000 test digits, so it is biased upwards for small sample counts: compare rows of equal size only.\n\n"
        + markdown_table(
            ["corruption", "sampling steps", "samples", "judge accuracy", "domain FD to test"], rows
        ),
    )


if __name__ == "__main__":
    main()
