"""Small, real experiments for the training callbacks (docs/callbacks.md).

    python evals/callbacks.py                       # all three sections
    python evals/callbacks.py --only noise          # noise | grokking | diffusion

- noise: the judge's architecture trained on the digits train split with 40% symmetric label
  noise (each corrupted label drawn uniformly from the 9 wrong classes, seed 0): plain
  cross-entropy, ELR (beta 0.7, lambda 3) and PS-KD (alpha_T 0.8); clean test accuracy.
- grokking: modular addition (a + b) mod 97, 40% of the pairs for training, an MLP with
  learned embeddings, full-batch AdamW *without* weight decay: softmax CE, CE + OrthoGrad,
  StableMax CE + OrthoGrad (the paper's pair), and softmax CE with weight decay 1 as the
  classic grokking reference; epochs until test accuracy reaches 95%.
- diffusion: the default model's training for ``--steps`` steps at batch 64, plain, with
  ScheduledDropPath (0.1, on every ResNet block's residual branch) and with SSA (keep ratio
  0.5, the last 10% dense); judge accuracy and domain FD of ``--samples-per-class`` x 10
  samples (CFG 3, DDIM 20), and time per step from short runs of the three interleaved in one
  process (``--timing-steps``).

Rows are cached in ``evals/results/callbacks_rows.json`` (``--fresh`` recomputes).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import RESULTS, cached_row, machine, markdown_table, write_result, write_section  # noqa: E402

import diffguide as dg  # noqa: E402
from diffguide.callbacks import CallbackRunner  # noqa: E402
from diffguide.callbacks.drop_path import ScheduledDropPath  # noqa: E402
from diffguide.callbacks.elr import ELR  # noqa: E402
from diffguide.callbacks.orthograd import OrthoGrad, stablemax_cross_entropy  # noqa: E402
from diffguide.callbacks.pskd import PSKD  # noqa: E402
from diffguide.callbacks.ssa import SubsampledAttention  # noqa: E402
from diffguide.models.judge import DigitJudge, _augment  # noqa: E402

ROWS = RESULTS / "callbacks_rows.json"


def _cached(key: str, fresh: bool, compute):
    return cached_row(ROWS, key, compute, fresh)


# -- label noise ---------------------------------------------------------------------------------


def symmetric_noise(labels: torch.Tensor, rate: float, num_classes: int, seed: int) -> torch.Tensor:
    """Replace a ``rate`` share of labels by a uniformly drawn *other* class."""
    generator = torch.Generator().manual_seed(seed)
    noisy = labels.clone()
    flip = torch.rand(len(labels), generator=generator) < rate
    offset = torch.randint(1, num_classes, (len(labels),), generator=generator)
    noisy[flip] = (labels[flip] + offset[flip]) % num_classes
    return noisy


def train_with_noise(method: str, epochs: int, rate: float, augment: bool = True, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images, clean = dg.load_digits("train")
    labels = symmetric_noise(clean, rate, 10, seed)
    test_images, test_labels = dg.load_digits("test")
    model = DigitJudge()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    batch, n = 128, len(images)
    steps = epochs * ((n + batch - 1) // batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 2e-3, total_steps=steps)
    callbacks = {"ce": [], "elr": [ELR(n, 10, beta=0.7, weight=3.0)], "pskd": [PSKD(n, epochs, alpha_T=0.8)]}[
        method
    ]
    runner = CallbackRunner(callbacks, model, optimizer, total_steps=steps)
    started, history = time.perf_counter(), []
    runner.train_begin()
    for epoch in range(epochs):
        model.train()
        runner.epoch_begin(epoch)
        order = torch.randperm(n, generator=generator)
        for i in range(0, n, batch):
            index = order[i : i + batch]
            ctx = runner.step_begin((images[index], labels[index], index))
            inputs = _augment(images[index], generator) if augment else images[index]
            ctx.outputs = model(inputs)
            task = torch.zeros(()) if method == "pskd" else F.cross_entropy(ctx.outputs, labels[index])
            runner.total_loss(task).backward()
            runner.optimizer_step()
            schedule.step()
        runner.epoch_end()
        model.eval()
        with torch.no_grad():
            history.append((model(test_images).argmax(1) == test_labels).float().mean().item())
    runner.train_end()
    return {
        "method": method, "epochs": epochs, "noise": rate, "augment": augment, "final_test_accuracy": history[-1],
        "best_test_accuracy": max(history), "history": history,
        "label_noise_realised": float((labels != clean).float().mean()), "seconds": time.perf_counter() - started,
    }  # fmt: skip


# -- grokking --------------------------------------------------------------------------------------


class ModularMLP(torch.nn.Module):
    def __init__(self, p: int, width: int = 256):
        super().__init__()
        self.embed = torch.nn.Embedding(p, 128)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(256, width), torch.nn.ReLU(), torch.nn.Linear(width, p)
        )

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.embed(pairs).flatten(1))


def grok(method: str, epochs: int, p: int = 97, train_fraction: float = 0.4, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    pairs = torch.cartesian_prod(torch.arange(p), torch.arange(p))
    targets = pairs.sum(1) % p
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed))
    cut = int(train_fraction * len(pairs))
    train, test = order[:cut], order[cut:]
    model = ModularMLP(p)
    decay = 1.0 if method == "ce+wd" else 0.0
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=decay)
    callbacks = [OrthoGrad()] if "orthograd" in method else []
    loss_fn = stablemax_cross_entropy if method.startswith("stablemax") else F.cross_entropy
    runner = CallbackRunner(callbacks, model, optimizer, total_steps=epochs)
    generalised, train_acc, test_acc, started = None, 0.0, 0.0, time.perf_counter()
    for epoch in range(epochs):
        ctx = runner.step_begin((pairs[train], targets[train]))
        ctx.outputs = model(pairs[train])
        runner.total_loss(loss_fn(ctx.outputs, targets[train])).backward()
        runner.optimizer_step()
        if epoch % 10 == 9 or epoch == epochs - 1:
            with torch.no_grad():
                train_acc = (ctx.outputs.argmax(1) == targets[train]).float().mean().item()
                test_acc = (model(pairs[test]).argmax(1) == targets[test]).float().mean().item()
            if generalised is None and test_acc >= 0.95:
                generalised = epoch + 1
    return {
        "method": method, "epochs": epochs, "epochs_to_95_test": generalised, "final_train_accuracy": train_acc,
        "final_test_accuracy": test_acc, "seconds": time.perf_counter() - started,
    }  # fmt: skip


# -- diffusion training --------------------------------------------------------------------------


def train_diffusion(method: str, steps: int, samples_per_class: int = 50) -> dict:
    from diffguide.generation import generate_samples
    from diffguide.metrics import feature_frechet_distance
    from diffguide.metrics.features import extract_features
    from diffguide.models.training import train_default

    out, run = Path(f"runs/callbacks-{method}"), Path(f"runs/callbacks-{method}-run")
    record = train_default(
        out, run, _diffusion_config(steps), progress=True, callbacks=_diffusion_callbacks(method)
    )
    pipe = dg.DigitsPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    judge = dg.load_judge()
    labels = torch.arange(10).repeat_interleave(samples_per_class)
    images = generate_samples(pipe, labels, seed=0, guidance_scale=3.0, num_inference_steps=20, progress=True)
    features = extract_features(images, judge)
    accuracy = (judge.head(features.float()).argmax(1) == labels).float().mean().item()
    fd = feature_frechet_distance(features, extract_features(dg.load_digits("test")[0], judge))
    return {
        "method": method, "steps": steps, "batch_size": 64, "train_seconds": record["train_seconds"],
        "final_loss": record["final_loss_mean_last_100"], "judge_accuracy": accuracy, "domain_fd": fd,
        "samples": len(labels),
    }  # fmt: skip


def _diffusion_config(steps: int):
    from diffguide.models.training import DefaultTrainingConfig

    return DefaultTrainingConfig(
        steps=steps, batch_size=64, warmup_steps=min(100, steps // 5), checkpoint_every=steps
    )


def _diffusion_callbacks(method: str) -> list:
    if method == "drop-path":
        unet_names = [f"{block}.resnets.{i}.conv2" for block, count in _resnet_blocks() for i in range(count)]
        return [ScheduledDropPath(drop_prob=0.1, wrap=unet_names)]
    if method == "ssa":
        return [SubsampledAttention(ratio=0.5, dense_fraction=0.1, seed=0)]
    return []


def time_diffusion(methods: tuple[str, ...], steps: int, rounds: int = 2) -> dict[str, float]:
    """Seconds per training step of each method: short runs interleaved ``rounds`` times in one
    process, the fastest round per method, so that the ratios share the machine's state (the
    long runs' wall times do not, on a shared machine)."""
    import tempfile

    from diffguide.models.training import train_default

    best = dict.fromkeys(methods, float("inf"))
    for _ in range(rounds):
        for method in methods:
            with tempfile.TemporaryDirectory() as folder:
                record = train_default(
                    Path(folder) / "out", Path(folder) / "run", _diffusion_config(steps), progress=False,
                    callbacks=_diffusion_callbacks(method),
                )  # fmt: skip
            best[method] = min(best[method], record["train_seconds"] / steps)
    return best


def _resnet_blocks() -> list[tuple[str, int]]:
    from diffguide.models.pipeline import default_unet

    unet = default_unet(sample_size=28, num_classes=10)
    blocks = [(f"down_blocks.{i}", len(b.resnets)) for i, b in enumerate(unet.down_blocks)]
    blocks.append(("mid_block", len(unet.mid_block.resnets)))
    blocks += [(f"up_blocks.{i}", len(b.resnets)) for i, b in enumerate(unet.up_blocks)]
    return blocks


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", default="noise,grokking,diffusion")
    parser.add_argument("--epochs", type=int, default=15, help="label-noise epochs")
    parser.add_argument(
        "--no-augment",
        dest="augment",
        action="store_false",
        help="label noise: train without the judge's augmentation (memorisation sets in sooner)",
    )
    parser.add_argument("--grok-epochs", type=int, default=3000)
    parser.add_argument("--steps", type=int, default=300, help="diffusion training steps")
    parser.add_argument(
        "--samples-per-class", type=int, default=50, help="diffusion: samples per class for FD"
    )
    parser.add_argument(
        "--timing-steps", type=int, default=40, help="diffusion: steps of each interleaved timing run"
    )
    parser.add_argument("--fresh", action="store_true")
    args = parser.parse_args()
    sections = args.only.split(",")
    command = "python evals/callbacks.py " + " ".join(sys.argv[1:])
    records = {}
    if "noise" in sections:
        rows = []
        for method in ("ce", "elr", "pskd"):
            row = _cached(
                f"noise/{method}/{args.epochs}" + ("" if args.augment else "/no-augment"),
                args.fresh,
                lambda m=method: train_with_noise(m, args.epochs, 0.4, augment=args.augment),
            )
            print({k: v for k, v in row.items() if k != "history"}, flush=True)
            rows.append([method.upper() if method != "pskd" else "PS-KD", f"{row['final_test_accuracy']:.1%}",
                         f"{row['best_test_accuracy']:.1%}", f"{row['seconds']:.0f} s"])  # fmt: skip
            records[f"noise/{method}"] = row
        write_section(
            "callbacks_noise" + ("" if args.augment else "_no_augment"),
            f"## Callbacks: ELR and PS-KD under 40% symmetric label noise, {args.epochs} epochs"
            f"{'' if args.augment else ', no augmentation'}\n\n`{command.strip()}` ({machine()}). "
            f"The judge's CNN, {args.epochs} epochs on the 4,000 train digits with 40% of labels replaced by a "
            f"wrong class, {'with' if args.augment else 'without'} the judge's augmentation; accuracy on the "
            "1,000 clean test digits after every epoch.\n\n"
            + markdown_table(["loss", "final test accuracy", "best epoch", "time"], rows),
        )
    if "grokking" in sections:
        rows = []
        for method in ("ce", "ce+orthograd", "stablemax+orthograd", "ce+wd"):
            row = _cached(
                f"grok/{method}/{args.grok_epochs}", args.fresh, lambda m=method: grok(m, args.grok_epochs)
            )
            print(row, flush=True)
            reached = row["epochs_to_95_test"] or f"not in {args.grok_epochs}"
            rows.append(
                [method, reached, f"{row['final_train_accuracy']:.1%}", f"{row['final_test_accuracy']:.1%}"]
            )
            records[f"grok/{method}"] = row
        write_section(
            "callbacks_grokking",
            f"## Callbacks: OrthoGrad and StableMax on modular addition\n\n`{command.strip()}` ({machine()}). "
            "(a + b) mod 97, 40% of pairs for training, full-batch AdamW lr 1e-3; weight decay 0 except `ce+wd` "
            "(1.0).\n\n"
            + markdown_table(["loss / optimizer", "epochs to 95% test", "final train", "final test"], rows),
        )
    if "diffusion" in sections:
        methods = ("plain", "drop-path", "ssa")
        timing = _cached(
            f"diffusion-timing/{args.timing_steps}",
            args.fresh,
            lambda: time_diffusion(methods, args.timing_steps),
        )
        rows = []
        for method in methods:
            row = _cached(
                f"diffusion/{method}/{args.steps}",
                args.fresh,
                lambda m=method: train_diffusion(m, args.steps, args.samples_per_class),
            )
            print(row, flush=True)
            ratio = timing[method] / timing["plain"]
            rows.append([method, f"{timing[method]:.2f} s ({ratio:.2f}x)", f"{row['train_seconds']:.0f} s",
                         f"{row['final_loss']:.4f}", f"{row['judge_accuracy']:.1%}", f"{row['domain_fd']:.1f}"])  # fmt: skip
            records[f"diffusion/{method}"] = {**row, "seconds_per_step": timing[method]}
        write_section(
            "callbacks_diffusion",
            f"## Callbacks: ScheduledDropPath and SSA in the default model's training\n\n`{command.strip()}` "
            f"({machine()}). {args.steps} steps at batch 64 each (the shipped model: 1,800 at 128), same seed; "
            f"{10 * args.samples_per_class} samples, CFG 3, DDIM 20 steps. Time per step: {args.timing_steps}-step "
            "runs of the three, interleaved twice in one process, fastest of the two (ratio to plain); the long "
            "runs' wall times are listed too but were not measured side by side.\n\n"
            + markdown_table(
                [
                    "training",
                    "time per step",
                    "wall time (long run)",
                    "final MSE",
                    "judge accuracy",
                    "domain FD",
                ],
                rows,
            ),
        )
    write_result("callbacks", {"command": command, "machine": machine(), "rows": records})


if __name__ == "__main__":
    main()
