"""Smooth-LoRA against the base model and a lambda = 0 control LoRA.

    diffguide train smooth-lora --weight 1 --out runs/smooth-lora-w1      # the Smooth-LoRA
    diffguide train smooth-lora --weight 0 --out runs/smooth-lora-w0      # control: same steps, no penalty
    python evals/smooth.py --steps 20 --pairs 100 --n-per-class 20   # the shipped LoRA and control by default

Per model: ISTD over ``--pairs`` noise pairs cycling over the 10 classes (Smooth Diffusion's
definition, DDIM eta = 0, CFG ``--scale``), and, on ``--n-per-class`` samples per class, the
judge's accuracy and the domain Frechet distance to the 1,000 test digits. A change in ISTD
counts only where the control did not show it too.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import machine, markdown_table, write_result, write_section  # noqa: E402

import diffguide as dg  # noqa: E402
from diffguide.generation import generate_samples  # noqa: E402
from diffguide.metrics import feature_frechet_distance, interpolation_istd  # noqa: E402
from diffguide.metrics.features import extract_features  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    root = Path(__file__).resolve().parents[1]
    parser.add_argument(
        "--lora", default=str(root / "diffguide" / "models" / "default" / "smooth_lora"),
        help="the Smooth-LoRA folder (default: the one shipped with the default model)",
    )  # fmt: skip
    parser.add_argument(
        "--control", default=str(root / "checkpoints" / "smooth-lora-w0"),
        help="the lambda = 0 LoRA folder (default: the project's, trained with the same steps)",
    )  # fmt: skip
    parser.add_argument("--pairs", type=int, default=100)
    parser.add_argument("--n-per-class", type=int, default=100)
    parser.add_argument("--scale", type=float, default=3.0)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    judge = dg.load_judge()
    test_features = extract_features(dg.load_digits("test")[0], judge)
    labels = torch.arange(10).repeat_interleave(args.n_per_class)
    pair_labels = [i % 10 for i in range(args.pairs)]
    rows, records = [], []
    for name, lora in (
        ("base", None),
        ("Smooth-LoRA (lambda=1)", args.lora),
        ("control LoRA (lambda=0)", args.control),
    ):
        pipe = dg.load_default_pipeline()
        if lora is not None:
            pipe.load_lora_weights(lora)
        istd, _, _ = interpolation_istd(
            pipe, pair_labels, seed=args.seed, guidance_scale=args.scale, num_inference_steps=args.steps
        )
        images = generate_samples(pipe, labels, seed=args.seed, progress=True, guidance_scale=args.scale,
                                  num_inference_steps=args.steps)  # fmt: skip
        features = extract_features(images, judge)
        accuracy = (judge.head(features.float()).argmax(1) == labels).float().mean().item()
        fd = feature_frechet_distance(features, test_features)
        records.append(
            {"model": name, "lora": lora, "istd": istd, "judge_accuracy": accuracy, "domain_fd": fd}
        )
        rows.append([name, f"{istd:.2f}", f"{accuracy:.1%}", f"{fd:.1f}"])
        print(records[-1], flush=True)
    command = "python evals/smooth.py " + " ".join(sys.argv[1:])
    write_result("smooth", {"command": command, "machine": machine(), "rows": records})
    write_section(
        "smooth",
        f"## Smooth Diffusion: Smooth-LoRA vs base and a lambda = 0 control\n\n`{command.strip()}` ({machine()}). "
        f"ISTD over {args.pairs} noise pairs (0-255 pixels), {len(labels)} samples for accuracy and FD, "
        f"CFG {args.scale}, DDIM {args.steps} steps.\n\n"
        + markdown_table(["model", "ISTD", "judge accuracy", "domain FD to test"], rows),
    )


if __name__ == "__main__":
    main()
