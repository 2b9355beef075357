"""Smooth Diffusion's variation norm v per timestep on the default model.

    python evals/smooth_variation_profile.py

Shows why the unfloored penalty is dominated by the last timesteps of a cosine schedule
(docs/smooth.md): v = ||d <x0_hat, n> / d eps|| grows like 1 / sqrt(abar) as abar -> 0.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from diffusers import DDPMScheduler

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import machine, markdown_table, write_result, write_section  # noqa: E402

import diffguide as dg  # noqa: E402
from diffguide.attention import use_twice_differentiable_attention  # noqa: E402
from diffguide.models.pipeline import default_scheduler_config  # noqa: E402
from diffguide.smooth import variation_norms  # noqa: E402

TIMESTEPS = (20, 100, 300, 500, 700, 900, 950, 980, 995, 999)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    unet = dg.load_default_pipeline().unet
    use_twice_differentiable_attention(unet)
    images, labels = dg.load_digits("train")
    x0, labels = images[: args.batch] * 2 - 1, labels[: args.batch]
    alphas_cumprod = DDPMScheduler(**default_scheduler_config()).alphas_cumprod
    records = []
    for t in TIMESTEPS:
        timesteps = torch.full((args.batch,), t)
        norms = variation_norms(
            lambda x, tt: unet(x, tt, class_labels=labels).sample,
            x0,
            torch.randn_like(x0),
            timesteps,
            alphas_cumprod,
        )
        records.append({"t": t, "alpha_bar": float(alphas_cumprod[t]), "v_mean": float(norms.mean()),
                        "v_std": float(norms.std())})  # fmt: skip
        print(records[-1], flush=True)
    command = "python evals/smooth_variation_profile.py " + " ".join(sys.argv[1:])
    write_result("smooth_variation_profile", {"command": command, "machine": machine(), "rows": records})
    rows = [[r["t"], f"{r['alpha_bar']:.3g}", f"{r['v_mean']:.4g}", f"{r['v_std']:.3g}"] for r in records]
    write_section(
        "smooth_variation_profile",
        f"## Smooth Diffusion: the variation norm v per timestep (default model)\n\n`{command.strip()}` "
        f"({machine()}). {args.batch} train digits with their labels, one noise and probe each. Why the "
        "unfloored penalty is dominated by t near 999 on a cosine schedule: docs/smooth.md.\n\n"
        + markdown_table(["t", "alpha_bar", "mean v", "std v"], rows),
    )


if __name__ == "__main__":
    main()
