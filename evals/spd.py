"""Shortest Path Diffusion against DDPM at an equal training budget.

    diffguide train default --corruption spd --run-dir runs/spd --out runs/spd-model    # ~75 min on 2 CPU cores
    python evals/spd.py --spd runs/spd-model --cells 25:50,100:50,1000:10              # DDPM: the shipped model

Both models share the architecture, data, steps, batch, optimizer and seed
(``DefaultTrainingConfig``); only the corruption differs. The shipped default model *is*
the DDPM run of that config. Both are sampled ancestrally (DDPM's scheduler for the DDPM
model, SPD's Fourier-space sampler for SPD) at each ``--cells`` step count (1000 is the full T
the authors use) with that many samples per class, without guidance by default, and scored
by the judge's accuracy and the domain Frechet distance to the 1,000 test digits.

``--sampler ddim`` samples both deterministically instead: the shipped DDIM scheduler for DDPM
and ``ShortestPathScheduler(sampler="ddim")`` (DDIM per frequency, ours) for SPD; the pair is
fair because both use the same update family.

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
    parser.add_argument(
        "--sampler", default="ancestral", choices=["ancestral", "ddim"],
        help="ancestral (the authors'; DDPM's scheduler for DDPM) or ddim (deterministic, both models)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    spd = dg.DigitsPipeline.from_pretrained(args.spd)
    if not isinstance(spd.scheduler, dg.ShortestPathScheduler):
        raise SystemExit(
            f"{args.spd} does not sample with ShortestPathScheduler; train it with --corruption spd"
        )
    ddpm = dg.load_default_pipeline()
    if args.sampler == "ancestral":
        ddpm.scheduler = DDPMScheduler.from_config(ddpm.scheduler.config)
    else:  # the shipped DDIM sampler, and DDIM per frequency for SPD
        spd.scheduler = dg.ShortestPathScheduler.from_config(spd.scheduler.config, sampler="ddim")
    judge = dg.load_judge()
    test_images, _ = dg.load_digits("test")
    test_features = extract_features(test_images, judge)
    cells = [tuple(int(v) for v in cell.split(":")) for cell in args.cells.split(",")]
    # the shipped config ("leading" spacing, steps_offset=1) would ask for t = 1000 at full T
    ddpm_full_t = dg.DigitsPipeline(
        unet=ddpm.unet, scheduler=type(ddpm.scheduler).from_config(ddpm.scheduler.config, steps_offset=0)
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
    if args.sampler == "ddim" and any(steps >= num_train_timesteps for steps, _ in cells):
        raise SystemExit(
            "--sampler ddim takes fewer steps than T: at full T the DDIM chain would start where alpha_bar = 2.4e-9"
        )
    for steps, n_per_class in cells:
        labels = torch.arange(10).repeat_interleave(n_per_class)
        full_t = steps >= num_train_timesteps
        suffix = "" if args.sampler == "ancestral" else " (DDIM)"
        models = [("DDPM" + suffix, ddpm_full_t if full_t else ddpm, steps), ("SPD" + suffix, spd, steps)]
        if args.ddpm_full_start is not None and full_t and args.sampler == "ancestral":
            start = args.ddpm_full_start
            models.insert(1, (f"DDPM from t={start}", _ddpm_from(ddpm, start), start + 1))
        for name, pipe, steps_taken in models:
            record = cached_row(
                RESULTS / "spd_rows.json",
                f"{name}/{steps}/{len(labels)}/{args.scale:g}/{args.seed}",
                lambda: measure(name, pipe, labels, steps, steps_taken),  # noqa: B023 (called at once)
            )
            record = {
                key: value for key, value in record.items() if key != "kid_x1000"
            }  # an abandoned column
            records.append(record)
            rows.append([name, record["steps"], len(labels), f"{record['judge_accuracy']:.1%}",
                         f"{record['domain_fd']:.1f}"])  # fmt: skip
    command = "python evals/spd.py " + " ".join(sys.argv[1:])
    section = "spd" if args.sampler == "ancestral" else f"spd_{args.sampler}"
    write_result(section, {"command": command, "machine": machine(), "rows": records})
    write_section(
        section,
        f"## Shortest Path Diffusion vs DDPM at equal training budget ({args.sampler} sampling)\n\n"
        f"`{command.strip()}` ({machine()}). CFG {args.scale:g} (1 = no guidance); FD in the judge's feature space "
        "against the 1,000 test digits, biased upwards for small sample counts: compare rows of equal size.\n\n"
        + markdown_table(
            ["corruption", "sampling steps", "samples", "judge accuracy", "domain FD to test"], rows
        )
        + "\n\n"
        + steps_curve(records),
    )


def steps_curve(records: list[dict]) -> str:
    """SPD's FD over DDPM's at each sample count and step count (the gap closing or not)."""
    by_cell = {}
    for record in records:
        family = (
            "SPD"
            if record["model"].startswith("SPD")
            else "DDPM"
            if "from t=" not in record["model"]
            else None
        )
        if family:
            by_cell.setdefault((record["samples"], record["steps"]), {})[family] = record
    rows = []
    for (samples, steps), pair in sorted(by_cell.items()):
        if len(pair) == 2:
            ddpm, spd = pair["DDPM"], pair["SPD"]
            rows.append([samples, steps, f"{ddpm['domain_fd']:.1f}", f"{spd['domain_fd']:.1f}",
                         f"{spd['domain_fd'] / ddpm['domain_fd']:.2f}", f"{ddpm['judge_accuracy']:.0%}",
                         f"{spd['judge_accuracy']:.0%}"])  # fmt: skip
    return (
        "The steps curve (SPD against DDPM at each cell; FD compares within a sample count):\n\n"
        + markdown_table(
            ["samples", "steps", "DDPM FD", "SPD FD", "SPD / DDPM FD", "DDPM accuracy", "SPD accuracy"], rows
        )
    )


if __name__ == "__main__":
    main()
