"""Generate N labelled samples to an image folder, shardable over processes.

    python evals/generate.py --n-per-class 100 --scale 3 --steps 50 --out samples/cfg3
    accelerate launch --multi_gpu --num_processes 2 evals/generate.py --n-per-class 100 --out samples/cfg3

On a CPU-only machine ``--multi_gpu`` still applies: it starts the processes with torchrun
and they meet over gloo. Sample ``i`` (class ``i // n_per_class``) uses seed ``seed + i`` and is written to
``{i:06d}_{label}.png``, so a sharded run writes exactly the files of a single-process one.
"""

from __future__ import annotations

import argparse

import torch

import diffguide as dg
from diffguide.generation import generate_to_folder


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="default", help="'default' or a DigitsPipeline folder")
    parser.add_argument("--n-per-class", type=int, default=100)
    parser.add_argument("--scale", type=float, default=3.0)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    if args.model == "default":
        pipe = dg.load_default_pipeline()
    else:
        pipe = dg.DigitsPipeline.from_pretrained(args.model)
        pipe.set_progress_bar_config(disable=True)
    labels = torch.arange(pipe.num_classes).repeat_interleave(args.n_per_class)
    written = generate_to_folder(
        pipe, labels, args.out, seed=args.seed, batch_size=args.batch_size, progress=True,
        guidance_scale=args.scale, num_inference_steps=args.steps,
    )  # fmt: skip
    print(f"wrote {len(written)} images to {args.out}")


if __name__ == "__main__":
    main()
