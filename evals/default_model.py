"""Quality of an embedded model (the digits default, or ``--model fashion``), measured on its
held-out test split.

    python evals/default_model.py                        # the main table (1,000 samples)
    python evals/default_model.py --sweep 1,2,3,5 --n-per-class 20 --steps 25
    python evals/default_model.py --model fashion        # the Fashion-MNIST flow transformer

The main run draws 100 samples per class with CFG at ``--scale`` and 50 steps of the model's
sampler, then reports the judge's accuracy on them (does each sample show the class asked
for?), the domain Frechet distance (judge features) between the samples and the test split,
the same distance from real images (the floors: the whole train split, as many train images
as there are samples, and two halves of the test split), per-class accuracies, and the
judge's own test accuracy. FD is biased upward at small sample counts, so the floor to read a
sample FD against is the one at the same count. ``--sweep`` compares guidance scales on fewer
samples.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import MODELS, embedded_model, load_split, machine, markdown_table, write_result, write_section  # noqa: E402

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
    correct = predictions == labels
    return {
        "scale": scale,
        "steps": steps,
        "samples": len(labels),
        "judge_accuracy": correct.float().mean().item(),
        "judge_accuracy_per_class": [
            correct[labels == c].float().mean().item() for c in range(pipe.num_classes)
        ],
        "domain_fd_to_test": feature_frechet_distance(features, test_features),
        "seconds_per_sample": seconds / len(labels),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="digits", choices=list(MODELS))
    parser.add_argument("--scale", type=float, default=3.0)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--n-per-class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--sweep", default=None, help="comma-separated guidance scales to compare")
    args = parser.parse_args()

    pipe, judge, test_images, test_labels = embedded_model(args.model)
    test_features, test_predictions = judge_features_and_predictions(judge, test_images)
    command = "python evals/default_model.py " + " ".join(sys.argv[1:])
    name = "default_model" if args.model == "digits" else f"{args.model}_model"
    title = "Default model" if args.model == "digits" else "Fashion-MNIST model"
    sampler = type(pipe.scheduler).__name__

    if args.sweep:
        rows = [
            measure(
                pipe, judge, test_features, float(s), args.steps, args.n_per_class, args.seed, args.batch_size
            )
            for s in args.sweep.split(",")
        ]
        write_result(f"{name}_sweep", {"command": command, "machine": machine(), "rows": rows})
        table = markdown_table(
            ["CFG scale", "judge accuracy", "domain FD to test"],
            [[r["scale"], f"{r['judge_accuracy']:.1%}", f"{r['domain_fd_to_test']:.2f}"] for r in rows],
        )
        write_section(
            f"{name}_sweep",
            f"### {title}: guidance scale sweep\n\n{args.n_per_class} samples per class, "
            f"{args.steps} steps of {sampler}, seed {args.seed}. `{command.strip()}` ({machine()})\n\n{table}",
        )
        return

    row = measure(
        pipe, judge, test_features, args.scale, args.steps, args.n_per_class, args.seed, args.batch_size
    )
    train_features, _ = judge_features_and_predictions(
        judge, load_split(args.model, "train")[0]
    )  # floors only
    half = len(test_features) // 2
    # as many train images as samples, spread over the split (seeded), for the floor at that count
    same_count = torch.randperm(len(train_features), generator=torch.Generator().manual_seed(0))[
        : row["samples"]
    ]
    record = {
        **row,
        "floor_domain_fd_train_vs_test": feature_frechet_distance(train_features, test_features),
        "floor_domain_fd_same_count": feature_frechet_distance(train_features[same_count], test_features),
        "floor_domain_fd_test_halves": feature_frechet_distance(test_features[:half], test_features[half:]),
        "judge_test_accuracy": (test_predictions == test_labels).float().mean().item(),
        "command": command,
        "machine": machine(),
    }
    write_result(name, record)
    classes = ", ".join(f"{c}: {a:.0%}" for c, a in enumerate(row["judge_accuracy_per_class"]))
    table = markdown_table(
        ["measure", "value", "target"],
        [
            [f"judge accuracy on {row['samples']} samples (CFG {args.scale}, {args.steps} steps of {sampler})",
             f"{row['judge_accuracy']:.1%}", ">= 95%" if args.model == "digits" else ""],
            ["per class", classes, ""],
            [f"domain FD, {row['samples']} samples vs test split ({len(test_features)})", f"{row['domain_fd_to_test']:.2f}", ""],
            [f"domain FD, {len(same_count)} train images vs test split (real-data floor at the sample count)",
             f"{record['floor_domain_fd_same_count']:.2f}", ""],
            [f"domain FD, train split ({len(train_features)}) vs test split", f"{record['floor_domain_fd_train_vs_test']:.2f}", ""],
            [f"domain FD, two halves of the test split ({half} each)", f"{record['floor_domain_fd_test_halves']:.2f}", ""],
            ["judge accuracy on the test split", f"{record['judge_test_accuracy']:.1%}",
             ">= 98%" if args.model == "digits" else ">= 91%"],
            ["sampling time per sample", f"{row['seconds_per_sample'] * 1000:.0f} ms", ""],
        ],
    )  # fmt: skip
    write_section(
        name,
        f"### {title}\n\nDomain FD = Frechet distance of the judge's 128-d penultimate features. "
        f"Seeds {args.seed}..{args.seed + row['samples'] - 1}, one per sample. "
        f"`{command.strip()}` ({machine()})\n\n{table}",
    )
    print(record)


if __name__ == "__main__":
    main()
