"""Why the digits model's samples have speckled backgrounds: a measurement.

    python evals/speckle.py                  # 200 samples per sampler row (about 8 minutes on 2 cores)

A speck is a pixel above 0.1 whose 8 neighbours are all below 0.3: a grey dot on black,
which a stroke's edge never is. Rows:

- real test digits (the floor) and the training digits;
- samples of the shipped model under its sampler (DDIM 50 steps, CFG 3) and under others:
  DDIM with 20 / 100 steps, DDPM's ancestral sampler and Euler (50 steps);
- one-step x0 predictions of noised *test* digits at several noise levels (t = 1, 10, 50, 100,
  200): a trained denoiser returns black backgrounds there unless its low-noise predictions
  are themselves speckled.

Writes docs/BENCHMARKS.md section ``digits_speckle`` and evals/results/digits_speckle.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import machine, markdown_table, write_result, write_section  # noqa: E402

import diffguide as dg  # noqa: E402
from diffguide.generation import generate_samples  # noqa: E402
from diffguide.models.pipeline import use_sampler  # noqa: E402


def specks_per_image(images: torch.Tensor) -> float:
    """Mean number of isolated grey pixels per image (B, 1, H, W) in [0, 1]."""
    height, width = images.shape[2:]
    padded = F.pad(images, (1, 1, 1, 1))
    ring = [
        padded[:, :, 1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width]
        for dy in (-1, 0, 1)
        for dx in (-1, 0, 1)
        if (dy, dx) != (0, 0)
    ]
    specks = (images > 0.1) & (torch.stack(ring).amax(0) < 0.3)
    return specks.flatten(1).sum(1).double().mean().item()


def grey_background(images: torch.Tensor) -> float:
    """Fraction of pixels in (0.05, 0.5): neither black background nor stroke."""
    return ((images > 0.05) & (images < 0.5)).double().mean().item()


@torch.no_grad()
def one_step_denoised(pipe, images: torch.Tensor, labels: torch.Tensor, t: int, seed: int) -> torch.Tensor:
    """The model's one-step x0 prediction (CFG 3, true labels) from test digits noised to ``t``."""
    abar = pipe.scheduler.alphas_cumprod[t].double()
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
    x_t = (abar.sqrt() * (images * 2 - 1) + (1 - abar).sqrt() * noise).float()
    both = pipe.unet(
        torch.cat([x_t, x_t]), t, class_labels=torch.cat([torch.full_like(labels, 10), labels])
    ).sample
    uncond, cond = both.double().chunk(2)
    eps = uncond + 3.0 * (cond - uncond)
    x0 = (x_t.double() - (1 - abar).sqrt() * eps) / abar.sqrt()
    return (x0 / 2 + 0.5).clamp(0, 1).float()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n-per-class", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    pipe = dg.load_default_pipeline()
    labels = torch.arange(10).repeat_interleave(args.n_per_class)
    test, test_labels = dg.load_digits("test")
    train, _ = dg.load_digits("train")
    rows = [["real test digits (1,000)", specks_per_image(test), grey_background(test)],
            ["real train digits (4,000)", specks_per_image(train), grey_background(train)]]  # fmt: skip
    print(rows, flush=True)

    def sampled(name: str, sampler: str | None, steps: int) -> None:
        pipe_ = dg.load_default_pipeline()
        if sampler is not None:
            use_sampler(pipe_, sampler)
        images = generate_samples(
            pipe_, labels, seed=args.seed, batch_size=100, guidance_scale=3.0, num_inference_steps=steps
        )
        rows.append([name, specks_per_image(images), grey_background(images)])
        print(rows[-1], flush=True)

    sampled("samples, DDIM 50 steps (the shipped sampler)", None, 50)
    sampled("samples, DDIM 20 steps", None, 20)
    sampled("samples, DDIM 100 steps", None, 100)
    sampled("samples, Euler 50 steps", "euler", 50)
    sampled("samples, DDPM ancestral 50 steps", "ddpm", 50)
    chosen = torch.cat([torch.nonzero(test_labels == c).flatten()[: args.n_per_class] for c in range(10)])
    for t in (1, 10, 50, 100, 200):
        denoised = one_step_denoised(pipe, test[chosen], test_labels[chosen], t, args.seed)
        rows.append([f"x0 predicted in one step from test digits noised to t={t}", specks_per_image(denoised),
                     grey_background(denoised)])  # fmt: skip
        print(rows[-1], flush=True)
    command = "python evals/speckle.py " + " ".join(sys.argv[1:])
    write_result("digits_speckle", {"command": command, "machine": machine(), "rows": rows})
    table = markdown_table(
        ["images", "isolated grey pixels per image", "share of grey pixels (0.05-0.5)"],
        [[name, f"{specks:.2f}", f"{grey:.2%}"] for name, specks, grey in rows],
    )
    write_section(
        "digits_speckle",
        f"### Digits model: speckled backgrounds\n\nA speck: a pixel above 0.1 whose 8 neighbours are all "
        f"below 0.3. {args.n_per_class} samples per class, CFG 3, seeds {args.seed}+. "
        f"`{command.strip()}` ({machine()})\n\n{table}",
    )


if __name__ == "__main__":
    main()
