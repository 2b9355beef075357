"""diffusers' CFG-cutoff callbacks against diffguide's interval cutoff (issue 19, item 4).

    python evals/cfg_cutoff_peers.py [--steps 20]

On the tiny offline SD build of the tests (random weights, so the images are noise and only
equality and network rows are measured): ``SDCFGCutoffCallback(cutoff_step_ratio=r)`` against
``dg.cfg_cutoff(pipe.scheduler, steps, cutoff_step_ratio=r)``, i.e.
``GuidanceInterval(sigma_lo, inf)`` with ``sigma_lo`` between the noise levels of the last
guided step and the next one. Per ratio: NFE per image of each (denoiser rows actually
evaluated, counted by a pre-hook on the UNet's first layer, over the images), the largest pixel
difference between their images for one prompt, and whether each serves 2 prompts x 2 images
(right = every image equal, within 1e-5, to that image alone through the callback, which is
right for one image). A second table runs the SDXL and SD3 callbacks on that batch too.
Writes evals/results/cfg_cutoff_peers.json and a section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from diffusers.callbacks import SD3CFGCutoffCallback, SDCFGCutoffCallback, SDXLCFGCutoffCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from report import machine, markdown_table, write_result, write_section  # noqa: E402
from tiny_pipelines import tiny_sd, tiny_sd3, tiny_sdxl  # noqa: E402

import diffguide as dg  # noqa: E402
from diffguide.adapters.cutoff import cfg_cutoff, cutoff_sigma, cutoff_step  # noqa: E402

RATIOS = (0.3, 0.5, 0.7)
FAMILIES = {
    "sd": (tiny_sd, SDCFGCutoffCallback),
    "sdxl": (tiny_sdxl, SDXLCFGCutoffCallback),
    "sd3": (tiny_sd3, SD3CFGCutoffCallback),
}
PROMPTS = ["a cat", "a dog"]
PER_PROMPT = 2
TOLERANCE = 1e-5


def run(pipe, prompt, steps: int, *, rule=None, callback=None, per_prompt: int = 1, latents=None):
    """(images, denoiser rows evaluated per image) of one call; an exception is returned as is."""
    first = pipe.unet.conv_in if hasattr(pipe, "unet") else pipe.transformer.pos_embed
    rows: list[int] = []
    handle = first.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    kwargs = {
        "prompt": prompt,
        "num_images_per_prompt": per_prompt,
        "num_inference_steps": steps,
        "guidance_scale": 5.0,
        "generator": torch.Generator().manual_seed(0),
        "latents": latents,
        "output_type": "pt",
    }
    if callback is not None:
        kwargs["callback_on_step_end"] = callback
    try:
        if rule is None:
            images = pipe(**kwargs).images
        else:
            with dg.guided(pipe, rule):
                images = pipe(**kwargs).images
    except RuntimeError as err:
        return err, None
    finally:
        handle.remove()
    return images, sum(rows) / len(images)


def batch_outcome(pipe, callback_class, steps: int, ratio: float, rule) -> dict:
    """How the callback and the rule serve 2 prompts x 2 images: each image against that image
    alone through the callback."""
    channels = pipe.unet.config.in_channels if hasattr(pipe, "unet") else pipe.transformer.config.in_channels
    latents = torch.randn(
        len(PROMPTS) * PER_PROMPT, channels, 8, 8, generator=torch.Generator().manual_seed(1)
    )
    alone = torch.cat(
        [
            run(pipe, PROMPTS[i // PER_PROMPT], steps, callback=callback_class(cutoff_step_ratio=ratio),
                latents=latents[i : i + 1])[0]
            for i in range(len(latents))
        ]
    )  # fmt: skip
    outcome = {}
    for label, kwargs in [
        ("callback", {"callback": callback_class(cutoff_step_ratio=ratio)}),
        ("interval", {"rule": rule}),
    ]:
        images, nfe = run(pipe, PROMPTS, steps, per_prompt=PER_PROMPT, latents=latents, **kwargs)
        if isinstance(images, BaseException):
            outcome[label] = {"error": f"{type(images).__name__}: {str(images).splitlines()[0]}"}
            continue
        gaps = [(images[i] - alone[i]).abs().max().item() for i in range(len(alone))]
        outcome[label] = {
            "nfe_per_image": nfe,
            "max_abs_diff_per_image": gaps,
            "right": max(gaps) <= TOLERANCE,
        }
    return outcome


def describe(entry: dict) -> str:
    if "error" in entry:  # the whole message is in the JSON
        return f"no: raises {entry['error'].split(':')[0]} at the first unguided step"
    gaps = ", ".join(f"{gap:.1e}" for gap in entry["max_abs_diff_per_image"])
    return f"{'yes' if entry['right'] else 'wrong images'} (max diff per image {gaps}; NFE/image {entry['nfe_per_image']:g})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    steps = args.steps

    pipe = tiny_sd()
    ratio_rows = []
    for ratio in RATIOS:
        k = cutoff_step(steps, cutoff_step_ratio=ratio)
        rule = cfg_cutoff(pipe.scheduler, steps, cutoff_step_ratio=ratio)
        by_callback, callback_nfe = run(
            pipe, "a cat", steps, callback=SDCFGCutoffCallback(cutoff_step_ratio=ratio)
        )
        by_rule, rule_nfe = run(pipe, "a cat", steps, rule=rule)
        ratio_rows.append(
            {
                "ratio": ratio,
                "last_guided_step": k,
                "sigma_lo": cutoff_sigma(pipe.scheduler, steps, cutoff_step_ratio=ratio),
                "callback_nfe_per_image": callback_nfe,
                "interval_nfe_per_image": rule_nfe,
                "max_abs_image_diff": (by_callback - by_rule).abs().max().item(),
                "batch": batch_outcome(pipe, SDCFGCutoffCallback, steps, ratio, rule),
            }
        )

    family_rows = []
    for name, (build, callback_class) in FAMILIES.items():
        family_pipe = pipe if name == "sd" else build()
        rule = cfg_cutoff(family_pipe.scheduler, steps, cutoff_step_ratio=0.5)
        family_rows.append(
            {"family": name, "callback": callback_class.__name__,
             "batch": batch_outcome(family_pipe, callback_class, steps, 0.5, rule)}
        )  # fmt: skip

    write_result(
        "cfg_cutoff_peers",
        {
            "machine": machine(),
            "steps": steps,
            "tolerance": TOLERANCE,
            "ratios": ratio_rows,
            "families": family_rows,
        },
    )

    def ok(entry: dict) -> str:
        return "no (error)" if "error" in entry else ("yes" if entry["right"] else "no (wrong images)")

    ratio_table = markdown_table(
        ["cutoff ratio", "guided steps (count)", "sigma_lo", "NFE/image callback", "NFE/image interval",
         "max abs image diff (1 prompt)", "2 prompts x 2 images: callback", "2 prompts x 2 images: interval"],
        [[f"{r['ratio']:g}", f"0..{r['last_guided_step']} ({r['last_guided_step'] + 1})", f"{r['sigma_lo']:.4f}",
          f"{r['callback_nfe_per_image']:g}", f"{r['interval_nfe_per_image']:g}", f"{r['max_abs_image_diff']:.1e}",
          ok(r["batch"]["callback"]), ok(r["batch"]["interval"])] for r in ratio_rows],
    )  # fmt: skip
    family_table = markdown_table(
        ["family", "callback", "callback on 2 prompts x 2 images", "interval on 2 prompts x 2 images"],
        [[r["family"], f"`{r['callback']}`", describe(r["batch"]["callback"]), describe(r["batch"]["interval"])]
         for r in family_rows],
    )  # fmt: skip
    write_section(
        "cfg_cutoff_peers",
        f"""## diffusers' CFG-cutoff callbacks against the interval cutoff (issue 19)

`python evals/cfg_cutoff_peers.py --steps {steps}` on {machine()}. Tiny offline SD build
(random weights, DDIM, {steps} steps, guidance scale 5): `SDCFGCutoffCallback(cutoff_step_ratio=r)`
against `dg.cfg_cutoff(pipe.scheduler, {steps}, cutoff_step_ratio=r)`, the interval
`(sigma_lo, inf)` with `sigma_lo` between the noise levels `sigma / alpha` of the last guided step
and the next. NFE/image: denoiser rows actually evaluated (pre-hook on the UNet's first layer)
over the images. "2 prompts x 2 images" is right when every image equals, within {TOLERANCE:g}, that
image run alone through the callback (which is right for one image).

{ratio_table}

The same batch at ratio 0.5 for each family with a cutoff callback (max abs pixel difference of
each image against it alone through the callback):

{family_table}
""",
    )
    print(ratio_table)
    print()
    print(family_table)


if __name__ == "__main__":
    main()
