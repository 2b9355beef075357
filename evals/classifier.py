"""An embedded model as a zero-shot classifier, against its judge CNN.

    python evals/classifier.py                       # all 1,000 test digits with "fast";
                                                     # the paper's schedule on 50 of them
    python evals/classifier.py --model fashion --images 1000 --paper-images 20
    python evals/classifier.py --probe               # which timesteps separate the classes

Rows: the judge (discriminative baseline), our "fast" schedule, and the paper's CIFAR-10
schedule (50 then 500 timesteps, keep 5 then 1); the paper's cost is ~3,000 network
evaluations per image, so it runs on a class-balanced subset (``--paper-images``). The "full"
cost is every class at every one of 500 grid timesteps (10 x 500 = 5,000 NFE per image).
``--probe`` evaluates every class at 50 grid timesteps on train images (never test ones) and
reports, per timestep, how often that timestep alone ranks the true class first: the basis
of the "fast" schedule's timestep band.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import MODELS, RESULTS, ROOT, embedded_model, machine, markdown_table, write_result, write_section  # noqa: E402

import diffguide as dg  # noqa: E402
from diffguide.classifier import PRESETS, ClassifierSchedule, DiffusionClassifier, timestep_grid  # noqa: E402


def balanced_subset(labels: torch.Tensor, per_class: int) -> torch.Tensor:
    """The first ``per_class`` indices of every class."""
    return torch.cat([torch.nonzero(labels == c).flatten()[:per_class] for c in range(int(labels.max()) + 1)])


def run_schedule(pipe, schedule: ClassifierSchedule, images, labels, batch_size: int) -> dict:
    classifier = DiffusionClassifier(pipe, schedule=schedule, batch_size=batch_size)
    started = time.perf_counter()
    result = classifier.classify(images, progress=True)
    seconds = time.perf_counter() - started
    return {
        "images": len(images),
        "accuracy": (result.labels == labels).float().mean().item(),
        "nfe": result.nfe.float().mean().item(),
        "seconds_per_image": seconds / len(images),
    }


def probe(pipe, n_images: int, batch_size: int) -> None:
    images, labels = dg.load_digits("train")
    chosen = balanced_subset(labels, n_images // 10)
    classifier = DiffusionClassifier(pipe, schedule=ClassifierSchedule((50,), (1,)), batch_size=batch_size)
    grid = timestep_grid(classifier.num_train_timesteps, 50)
    x0s = classifier.conditioner.encode(images[chosen])
    errors = torch.stack(
        [classifier._errors(x0, [(c, t) for c in range(10) for t in grid]).reshape(10, 50) for x0 in x0s]
    )  # (N, classes, timesteps)
    y = labels[chosen]
    true = errors[torch.arange(len(y)), y]
    others = errors.clone()
    others[torch.arange(len(y)), y] = float("inf")
    single_t_accuracy = (true < others.min(1).values).float().mean(0)
    write_result(
        "classifier_probe", {"grid": grid, "single_t_accuracy": single_t_accuracy.tolist(), "images": len(y)}
    )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(grid, single_t_accuracy.numpy(), marker=".")
    fast = PRESETS["fast"].t_range
    ax.axvspan(*fast, color="tab:green", alpha=0.15, label=f"'fast' band {fast}")
    ax.axhline(0.1, color="grey", ls="--", lw=0.6, label="chance")
    ax.set_xlabel("timestep t")
    ax.set_ylabel("true class has the lowest error")
    ax.set_title(f"one timestep at a time, {len(y)} train digits")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(ROOT / "docs" / "figures" / "classifier_timesteps.png", dpi=110)
    bands = [(0, 300), (300, 600), (600, 950), (950, 1000)]
    rows = []
    for low, high in bands:
        inside = [i for i, t in enumerate(grid) if low <= t < high]
        rows.append([f"[{low}, {high})", len(inside), f"{single_t_accuracy[inside].mean():.0%}"])
    write_section(
        "classifier_probe",
        f"### Diffusion Classifier: which timesteps separate the classes\n\n"
        f"`python evals/classifier.py {' '.join(sys.argv[1:])}` ({len(y)} train digits, every class at 50 grid timesteps; {machine()}). Plot: "
        f"[figures/classifier_timesteps.png](figures/classifier_timesteps.png).\n\n"
        + markdown_table(
            ["timestep band", "grid timesteps", "one timestep ranks the true class first"], rows
        ),
    )


def load_rows(cache: Path) -> dict:
    """Cached rows keyed ``"model: schedule"`` (rows from before the model column are digits')."""
    rows = json.loads(cache.read_text()) if cache.exists() else {}
    rows = {key if ": " in key else f"digits: {key}": row for key, row in rows.items()}
    summary = RESULTS / "classifier.json"
    if "digits: judge" not in rows and summary.exists():  # it lived in the summary before
        old = json.loads(summary.read_text())
        if "judge_accuracy" in old:
            rows["digits: judge"] = {"images": rows.get("digits: fast", {}).get("images", 1000),
                                     "accuracy": old["judge_accuracy"],
                                     "seconds_per_image": old["judge_seconds_per_image"]}  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="digits", choices=list(MODELS))
    parser.add_argument("--images", type=int, default=1000, help="test images for the judge and 'fast'")
    parser.add_argument(
        "--paper-images", type=int, default=50, help="test images for the paper's schedule (0: skip)"
    )
    parser.add_argument("--ours", default="fast", help="comma-separated presets to run on --images")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--probe", action="store_true", help="the timestep study on train images instead")
    parser.add_argument("--probe-images", type=int, default=50)
    args = parser.parse_args()

    if args.probe and args.model != "digits":
        raise SystemExit("--probe studies the digits model's train split; run it without --model")
    pipe, judge, images, labels = embedded_model(args.model)
    if args.probe:
        probe(pipe, args.probe_images, args.batch_size)
        return
    # the first --images of the test split (the fashion split is in random class order)
    chosen = torch.arange(min(args.images, len(images)))
    paper_chosen = balanced_subset(labels, max(1, args.paper_images // 10))

    started = time.perf_counter()
    with torch.no_grad():
        judge_accuracy = (judge(images[chosen]).argmax(1) == labels[chosen]).float().mean().item()
    judge_seconds = (time.perf_counter() - started) / len(chosen)

    full_nfe = 10 * PRESETS["full"].n_samples[-1]
    # rows are cached per model and schedule, so one can be (re)run without the others
    cache = RESULTS / "classifier_rows.json"
    rows = load_rows(cache)
    rows[f"{args.model}: judge"] = {"images": len(chosen), "accuracy": judge_accuracy,
                                    "seconds_per_image": judge_seconds}  # fmt: skip
    for name in args.ours.split(","):
        rows[f"{args.model}: {name}"] = run_schedule(
            pipe, PRESETS[name], images[chosen], labels[chosen], args.batch_size
        )
        cache.write_text(json.dumps(rows, indent=1))
    if args.paper_images > 0:
        rows[f"{args.model}: paper-cifar10"] = run_schedule(
            pipe, PRESETS["paper-cifar10"], images[paper_chosen], labels[paper_chosen], args.batch_size
        )
    cache.write_text(json.dumps(rows, indent=1))
    command = "python evals/classifier.py " + " ".join(sys.argv[1:])
    write_result("classifier", {"command": command, "machine": machine(), "full_nfe": full_nfe, "rows": rows})
    table = []
    for model in MODELS:
        keys = [k for k in rows if k.startswith(f"{model}: ")]
        for key in sorted(keys, key=lambda k: k != f"{model}: judge"):  # the judge first
            row = rows[key]
            name = key.split(": ", 1)[1]
            if name == "judge":
                table.append([model, "judge CNN (discriminative)", row["images"], f"{row['accuracy']:.1%}",
                              "1 forward", "", f"{row['seconds_per_image'] * 1000:.2f} ms"])  # fmt: skip
                continue
            schedule = PRESETS[name]
            table.append([
                model,
                f"`{name}` {schedule.n_samples} keep {schedule.keep}" + (f", t in {schedule.t_range}" if schedule.t_range else "")
                + (f", stop at z >= {schedule.stop_z}" if schedule.stop_z else ""),
                row["images"], f"{row['accuracy']:.1%}", f"{row['nfe']:.0f}", f"{row['nfe'] / full_nfe:.1%}",
                f"{row['seconds_per_image']:.2f} s",
            ])  # fmt: skip
    table.append(["any", "every class at every grid timestep (`full`)", "-", "-", f"{full_nfe}", "100%", "-"])
    write_section(
        "classifier",
        f"## Diffusion Classifier on the embedded models\n\nLast written by `{command.strip()}` ({machine()}); "
        f"each model's rows by `python evals/classifier.py --model NAME ...` (cached in "
        f"evals/results/classifier_rows.json). Held-out test images: the first N of each test split; the "
        f"paper's schedule on a class-balanced subset (its cost). l2 loss on the implied noise (for the flow "
        f"model: the velocity error weighted by (1 - s)^2), noise seed 0. Models: "
        + "; ".join(f"{m}: {MODELS[m]}" for m in MODELS)
        + ".\n\n"
        + markdown_table(
            ["model", "classifier", "test images", "accuracy", "NFE / image", "of full cost", "time / image"],
            table,
        ),
    )
    print(table)


if __name__ == "__main__":
    main()
