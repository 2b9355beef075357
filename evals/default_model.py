"""Quality of the embedded default model, measured on the held-out test split.

    python evals/default_model.py                        # the main table (1,000 samples)
    python evals/default_model.py --sweep 1,2,3,5 --n-per-class 20 --steps 25

The main run draws 100 samples per class with CFG at ``--scale`` and 50 DDIM steps, then
reports the judge's accuracy on them (does each sample show the class asked for?), the domain
Frechet distance (judge features) between the samples and the 1,000 test digits, the same
distance between the 4,000 train and the 1,000 test digits (the real-data floor), and the
judge's own test accuracy. ``--sweep`` compares guidance scales on fewer samples.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import machine, markdown_table, write_result, write_section  # noqa: E402

import diffguide as dg  # noqa: E402
from diffguide.generation import generate_samples  # noqa: E402
from diffguide.metrics import feature_frechet_distance  # noqa: E402
from diffguide.metrics.features import extract_features  # noqa: E402


@torch.no_grad()
def judge_features_and_predictions(judge, images: torch.Tensor):
    """The judge's penultimate features (float64) and its predicted classes."""
    features = extract_features(images, judge)
    return features, judge.head(features.float()).argmax(1)


def measure(
    pipe, judge, test_features, scale: float, steps: int, n_per_class: int, seed: int, batch_size: int
):
    labels = torch.arange(pipe.num_classes).repeat_interleave(n_per_class)
    started = time.perf_counter()
    samples = generate_samples(
        pipe, labels, seed=seed, batch_size=batch_size, progress=True,
        guidance_scale=scale, num_inference_steps=steps,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    features, predictions = judge_features_and_predictions(judge, samples)
    return {
        "scale": scale,
        "steps": steps,
        "samples": len(labels),
        "judge_accuracy": (predictions == labels).float().mean().item(),
        "domain_fd_to_test": feature_frechet_distance(features, test_features),
        "seconds_per_sample": seconds / len(labels),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scale", type=float, default=3.0)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--n-per-class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--sweep", default=None, help="comma-separated guidance scales to compare")
    args = parser.parse_args()

    pipe, judge = dg.load_default_pipeline(), dg.load_judge()
    test_images, test_labels = dg.load_digits("test")
    train_images, _ = dg.load_digits("train")
    test_features, test_predictions = judge_features_and_predictions(judge, test_images)
    train_features, _ = judge_features_and_predictions(judge, train_images)
    command = "python evals/default_model.py " + " ".join(sys.argv[1:])

    if args.sweep:
        rows = [
            measure(
                pipe, judge, test_features, float(s), args.steps, args.n_per_class, args.seed, args.batch_size
            )
            for s in args.sweep.split(",")
        ]
        write_result("default_model_sweep", {"command": command, "machine": machine(), "rows": rows})
        table = markdown_table(
            ["CFG scale", "judge accuracy", "domain FD to test"],
            [[r["scale"], f"{r['judge_accuracy']:.1%}", f"{r['domain_fd_to_test']:.2f}"] for r in rows],
        )
        write_section(
            "default_model_sweep",
            f"### Default model: guidance scale sweep\n\n{args.n_per_class} samples per class, "
            f"{args.steps} DDIM steps, seed {args.seed}. `{command.strip()}` ({machine()})\n\n{table}",
        )
        return

    row = measure(
        pipe, judge, test_features, args.scale, args.steps, args.n_per_class, args.seed, args.batch_size
    )
    record = {
        **row,
        "floor_domain_fd_train_vs_test": feature_frechet_distance(train_features, test_features),
        "judge_test_accuracy": (test_predictions == test_labels).float().mean().item(),
        "command": command,
        "machine": machine(),
    }
    write_result("default_model", record)
    table = markdown_table(
        ["measure", "value", "target"],
        [
            [f"judge accuracy on {row['samples']} samples (CFG {args.scale}, {args.steps} DDIM steps)",
             f"{row['judge_accuracy']:.1%}", ">= 95%"],
            ["domain FD, samples vs test split", f"{row['domain_fd_to_test']:.2f}", ""],
            ["domain FD, train vs test split (real-data floor)", f"{record['floor_domain_fd_train_vs_test']:.2f}", ""],
            ["judge accuracy on the test split", f"{record['judge_test_accuracy']:.1%}", ">= 98%"],
            ["sampling time per sample", f"{row['seconds_per_sample'] * 1000:.0f} ms", ""],
        ],
    )  # fmt: skip
    write_section(
        "default_model",
        f"### Default model\n\nDomain FD = Frechet distance of the judge's 128-d penultimate features. "
        f"Seeds {args.seed}..{args.seed + row['samples'] - 1}, one per sample. "
        f"`{command.strip()}` ({machine()})\n\n{table}",
    )
    print(record)


if __name__ == "__main__":
    main()
