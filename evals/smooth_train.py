"""Train one point of the Smooth Diffusion map, keeping a snapshot at each budget.

    python evals/smooth_train.py --base checkpoints/digits8-linear --capacity attention+conv --weight 1 \
        --budgets 300,1000 --out runs/smooth/map

Each point is ``diffguide train smooth-lora``'s loop (``train_smooth_lora``) stopped at every
budget in turn and resumed from its checkpoint, so the 300-step snapshot is the first 300
steps of the 1,000-step run (the largest budget is part of the run's config: a longer list
needs a new ``--out``). A snapshot is a LoRA folder or, for ``--capacity full``, a
pipeline folder; ``evals/smooth.py --map`` scores them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from diffusers import DDPMScheduler

import diffguide as dg
from diffguide.models.smooth_lora import (
    SmoothLoraConfig,
    digits_batches,
    digits_source,
    save_trained,
    train_smooth_lora,
    training_record,
)
from diffguide.smooth import training_alphas_cumprod

#: the learning rates of the map: LoRA at 10x the paper's 1e-4 (budgets 30-100x shorter), a
#: full fine-tune at the paper's (1e-3 diverged in a 3-step trial: penalty 4.0 against 0.04)
LEARNING_RATES = {"attention": 1e-3, "attention+conv": 1e-3, "full": 1e-4}


def point_name(capacity: str, weight: float, bands: int = 1) -> str:
    return f"{capacity}{f'-bands{bands}' if bands > 1 else ''}-w{weight:g}"


def train_point(base: str, capacity: str, weight: float, budgets: list[int], out: Path, batch_size: int = 32,
                learning_rate: float | None = None, seed: int = 0, bands: int = 1) -> list[Path]:  # fmt: skip
    """Snapshots ``out/<point>/<budget>`` of one training run; returns their folders."""
    name = point_name(capacity, weight, bands)
    snapshots = []
    for budget in budgets:
        folder = out / name / str(budget)
        snapshots.append(folder)
        if (folder / "training.json").exists():
            continue
        pipe = dg.DigitsPipeline.from_pretrained(base)
        config = SmoothLoraConfig(
            steps=max(budgets), batch_size=batch_size, seed=seed, weight=weight, capacity=capacity,
            learning_rate=learning_rate or LEARNING_RATES[capacity], source=digits_source(pipe.unet),
            target_bands=bands,
        )  # fmt: skip
        training_alphas_cumprod(pipe.scheduler)  # refuses SPD and flow bases
        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        record = train_smooth_lora(pipe.unet, scheduler, digits_batches(config), folder, out / name / "run", config,
                                   progress=False, stop_after_steps=budget)  # fmt: skip
        if record is None:  # stopped at this budget: write the snapshot from its checkpoint
            state = torch.load(out / name / "run" / "checkpoint.pt", weights_only=True)
            trained = [p for p in pipe.unet.parameters() if p.requires_grad]
            record = training_record(state["config"], state["step"], state["elapsed"], state["losses"],
                                     state["regularizer"]["target"], trained)  # fmt: skip
            save_trained(pipe.unet, capacity, folder, record)
        if capacity == "full":
            pipe.scheduler.save_pretrained(folder / "scheduler")
            dg.DigitsPipeline(unet=pipe.unet, scheduler=pipe.scheduler).save_config(folder)
        print(name, budget, {k: v for k, v in record.items() if k != "config"}, flush=True)
    return snapshots


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", default="checkpoints/digits8-linear")
    parser.add_argument("--capacity", required=True, choices=["attention", "attention+conv", "full"])
    parser.add_argument("--weight", type=float, required=True)
    parser.add_argument("--budgets", default="300,1000")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--target-bands", type=int, default=1, help="1: the paper's target; more: one per band (ours)"
    )
    parser.add_argument("--out", default="runs/smooth/map")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    budgets = sorted(int(b) for b in args.budgets.split(","))
    train_point(args.base, args.capacity, args.weight, budgets, Path(args.out), args.batch_size, args.lr,
                bands=args.target_bands)  # fmt: skip


if __name__ == "__main__":
    main()
