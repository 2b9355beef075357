"""What diffguide's hook costs at equal NFE: the untouched pipeline against rules through diffguide.

    python evals/hook_overhead.py [--rounds 40] [--steps 8]

On the tiny offline Flux (true CFG, two calls per step) and Wan 2.1 builds of the tests, and on
the tiny SD build (batched), the two variants run interleaved in one process (A B A B ...), so
the machine's drift hits both alike; the ratio is the median of the per-round ratios (with
their interquartile range). Tiny
builds make the hook's fixed per-call cost as visible as it can be: on real models, whose
network evaluations take 10-1000x longer, the same cost is a smaller share. Writes
evals/results/hook_overhead.json and a section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import tiny_flow_two_call  # noqa: E402
import tiny_video_two_call  # noqa: E402
from report import machine, markdown_table, write_result, write_section  # noqa: E402
from tiny_pipelines import tiny_sd  # noqa: E402

import diffguide as dg  # noqa: E402

BUILDS = {
    "flux (two calls)": tiny_flow_two_call.CASES["flux"],
    "wan 2.1 (two calls)": tiny_video_two_call.CASES["wan"],
    "sd (batched)": (
        tiny_sd,
        {
            "prompt": ["a cat", "a dog"],
            "negative_prompt": ["bad", "ugly"],
            "num_images_per_prompt": 2,
            "guidance_scale": 5.0,
            "output_type": "latent",
        },
    ),  # fmt: skip
}


#: CFG takes the pipeline's own formula where every sample is guided; APG at its CFG settings
#: runs the whole path (rule, return through the pipeline's formula) at the same NFE
RULES = {
    "CFG": dg.CFG,
    "APG-as-CFG": lambda: dg.APG(eta=1.0, norm_threshold=float("inf"), momentum=0.0, space="model_output"),
}


def time_call(pipe, kwargs: dict, steps: int) -> float:
    start = time.perf_counter()
    pipe(**kwargs, num_inference_steps=steps, generator=torch.Generator().manual_seed(0))
    return time.perf_counter() - start


def measure(name: str, rounds: int, steps: int) -> dict:
    build, kwargs = BUILDS[name]
    pipe = build()
    for _ in range(3):  # warm-up
        time_call(pipe, kwargs, steps)
    times: dict[str, list[float]] = {"untouched": [], **{rule: [] for rule in RULES}}
    for _ in range(rounds):
        times["untouched"].append(time_call(pipe, kwargs, steps))
        for label, make in RULES.items():
            with dg.guided(pipe, make()):
                times[label].append(time_call(pipe, kwargs, steps))
                nfe = dg.stats(pipe)["nfe"]
    record = {"build": name, "untouched_s": statistics.median(times["untouched"])}
    calls_per_step = 2 if "two calls" in name else 1
    for label in RULES:
        paired = sorted(b / a for a, b in zip(times["untouched"], times[label], strict=True))
        quartiles = statistics.quantiles(paired, n=4)
        record[label] = {
            "s": statistics.median(times[label]),
            "ratio": statistics.median(paired),
            "ratio_q1": quartiles[0],
            "ratio_q3": quartiles[2],
            "added_ms_per_denoiser_call": (statistics.median(times[label]) - record["untouched_s"])
            * 1e3
            / (calls_per_step * steps),
        }
    return {
        **record,
        "nfe": nfe,
        "steps": steps,
        "rounds": rounds,
        "denoiser_calls_per_image": nfe,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    rows = [measure(name, args.rounds, args.steps) for name in BUILDS]
    write_result("hook_overhead", {"machine": machine(), "rows": rows})

    def cell(entry: dict) -> str:
        return (
            f"{entry['s']:.4f} s, {entry['ratio']:.3f} ({entry['ratio_q1']:.3f}-{entry['ratio_q3']:.3f}), "
            f"+{entry['added_ms_per_denoiser_call']:.2f} ms/denoiser call"
        )

    table = markdown_table(
        ["build", "untouched (s/call)", *(f"{label} through diffguide: s/call, ratio (IQR)" for label in RULES),
         "NFE/image"],
        [[r["build"], f"{r['untouched_s']:.4f}", *(cell(r[label]) for label in RULES), f"{r['nfe']:g}"]
         for r in rows],
    )  # fmt: skip
    write_section(
        "hook_overhead",
        f"""## Hook overhead at equal NFE (issue 16)

`python evals/hook_overhead.py --rounds {args.rounds} --steps {args.steps}` on {machine()}: the
untouched pipeline, CFG through diffguide (which leaves the pipeline's own formula in place
where every sample is guided) and APG at its CFG settings (the whole path: the rule, and on
two-call pipelines the return through the pipeline's formula), interleaved in one process;
median wall time per call of the tiny offline builds (4 images, {args.steps} steps), the ratio
the median of the per-round ratios, and the added time per denoiser call. Goal: ratio <= 1.02.
The added time is a fixed cost per denoiser call (Python and a few small tensor ops), so its
share falls as the network grows; these builds' networks take 2-5 ms a call.

{table}
""",
    )
    print(table)


if __name__ == "__main__":
    main()
