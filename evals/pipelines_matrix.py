"""The support matrix of docs/pipelines.md, generated from the reach tests' own results.

    python evals/pipelines_matrix.py

Runs tests/test_reach.py and tests/test_guider.py in this process, records each check's outcome per pipeline build and
the errors the tests measured, adds the support table (kind, where the scale lives, quirks,
refusals) from ``diffguide.adapters.support``, and measures the rounding of the two-call return
``u' = (g - s c) / (1 - s)`` in fp32 and bf16. Writes docs/pipelines.md and
evals/results/pipelines_matrix.json.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import ROOT, machine, markdown_table, write_result  # noqa: E402

from diffguide.adapters.support import PIPELINES  # noqa: E402
from diffguide.adapters.two_call import return_through_formula  # noqa: E402

CHECKS = {
    "test_cfg_through_diffguide_equals_the_pipeline": "CFG identity",
    "test_rules_at_their_off_settings_equal_cfg-apg-off": "APG-off identity",
    "test_rules_at_their_off_settings_equal_cfg-ag-never": "AG-never identity",
    "test_remove_restores_the_untouched_pipeline": "remove exact",
    "test_nfe_counts_equal_the_rows_the_network_sees": "NFE exact",
    "test_per_sample_skipping_gives_each_sample_its_own_image": "skipping saves",
    "test_denoised_prediction_is_the_schedulers_own_x0": "x0 = scheduler's",
}
ERRORS = {"cfg": "CFG", "APG": "APG-off", "AdaptiveGuidance": "AG-never", "skipping": "skipping", "x0": "x0"}


class _Outcomes:
    def __init__(self):
        self.outcomes: dict[tuple[str, str], str] = {}
        self.guider: dict[str, str] = {}

    def pytest_runtest_logreport(self, report):
        if report.when != "call" and not (report.when == "setup" and report.outcome != "passed"):
            return
        if "test_guider.py" in report.nodeid:
            self.guider[report.nodeid.split("::", 1)[1]] = report.outcome
            return
        match = re.match(r".*::(\w+)\[(.+)\]$", report.nodeid)
        if not match:
            return
        test, case = match.groups()
        for variant in ("apg-off", "ag-never"):
            if case.endswith(f"-{variant}"):
                case, test = case[: -len(variant) - 1], f"{test}-{variant}"
        self.outcomes[(case, test)] = report.outcome


def formula_rounding(dtype: torch.dtype, scale: float = 5.0, samples: int = 64) -> float:
    """Max relative error of ``u' + s (c - u')`` against ``g`` when ``u'`` is stored in ``dtype``,
    computed as a pipeline would (in ``dtype``), for CFG-sized differences."""
    generator = torch.Generator().manual_seed(0)
    cond = torch.randn(samples, 4096, generator=generator)
    uncond = cond + 0.3 * torch.randn(samples, 4096, generator=generator)
    guided = (uncond + scale * (cond - uncond)).to(dtype)
    cond = cond.to(dtype)
    returned = return_through_formula(guided, cond, scale)  # no uncond given: always the inversion
    result = returned + scale * (cond - returned)
    return float((result.double() - guided.double()).abs().max() / guided.double().abs().max())


def own_cfg_rounding_bf16(scale: float = 5.0, samples: int = 64) -> float:
    """The pipeline's own bf16 rounding of ``u + s (c - u)``, for comparison."""
    generator = torch.Generator().manual_seed(0)
    cond = torch.randn(samples, 4096, generator=generator)
    uncond = cond + 0.3 * torch.randn(samples, 4096, generator=generator)
    cond, uncond = cond.bfloat16(), uncond.bfloat16()
    exact = uncond.double() + scale * (cond.double() - uncond.double())
    rounded = uncond + scale * (cond - uncond)
    return float((rounded.double() - exact).abs().max() / exact.abs().max())


def pipeline_rounding_bf16() -> dict[str, float]:
    """APG at its CFG settings (returned through the inversion) and CFG (returned exactly)
    through diffguide against the untouched tiny Flux, all run in bf16; and the untouched bf16
    run against fp32, the noise floor."""
    sys.path.insert(0, str(ROOT / "tests"))
    import tiny_flow_two_call

    import diffguide as dg

    build, kwargs = tiny_flow_two_call.CASES["flux"]
    pipe = build()

    def run():
        images = pipe(**kwargs, num_inference_steps=4, generator=torch.Generator().manual_seed(0)).images
        return images.double()

    def relative(a, b):
        return float((a - b).abs().max() / b.abs().max())

    fp32 = run()
    pipe.to(torch.bfloat16)
    reference = run()
    with dg.guided(pipe, dg.CFG()):
        cfg = run()
    with dg.guided(pipe, dg.APG(eta=1.0, norm_threshold=float("inf"), momentum=0.0, space="model_output")):
        apg = run()
    return {
        "cfg": relative(cfg, reference),
        "apg_off": relative(apg, reference),
        "bf16_vs_fp32": relative(reference, fp32),
    }


def main() -> None:
    collector = _Outcomes()
    tests = [str(ROOT / "tests" / name) for name in ("test_reach.py", "test_guider.py")]
    code = pytest.main(["-q", "-p", "no:warnings", *tests], plugins=[collector])
    measured = sys.modules["test_reach"].measured
    zoo = sys.modules["test_reach"].ZOO
    cases = list(zoo)
    rows = []
    for case in cases:
        built = sys.modules["test_reach"]._BUILT.get(case)
        cells = [case, f"`{type(built).__name__}`" if built is not None else "not built"]
        for test, _label in CHECKS.items():
            outcome = collector.outcomes.get((case, test))
            cells.append({"passed": "yes", "failed": "**FAILED**", None: "-"}.get(outcome, outcome))
        errors = measured.get(case, {})
        worst = max(errors.values()) if errors else float("nan")
        cells.append(f"{worst:.1e}")
        rows.append(cells)
    matrix = markdown_table(["build", "pipeline class", *CHECKS.values(), "max relative error"], rows)

    tested = {type(built).__name__ for built in sys.modules["test_reach"]._BUILT.values()}
    tested |= {"StableDiffusionXLModularPipeline", "HunyuanVideo15Pipeline"}  # guider tests
    table_rows = []
    for name, entry in PIPELINES.items():
        scale = ", ".join(f"{k}: {v}" if k != "*" else v for k, v in entry.scale.items())
        notes = entry.reason if entry.kind == "refused" else "; ".join(entry.quirks)
        layout = {"batched": f"batched {entry.order}", "two_call": "two calls", "refused": "refused"}[
            entry.kind
        ]
        built = "yes" if name in tested else ("-" if entry.kind == "refused" else "no")
        table_rows.append(
            [f"`{name}`", layout, "" if entry.kind == "refused" else f"`{scale}`", built, notes]
        )
    support = markdown_table(
        ["pipeline class", "kind", "CFG scale read from", "tiny build tested", "quirks / reason"], table_rows
    )

    guider = markdown_table(
        ["test (tests/test_guider.py)", "outcome"],
        [
            [f"`{name}`", {"passed": "yes", "failed": "**FAILED**"}.get(o, o)]
            for name, o in collector.guider.items()
        ],
    )
    rounding = {
        "fp32": formula_rounding(torch.float32),
        "bf16": formula_rounding(torch.bfloat16),
        "own_bf16": own_cfg_rounding_bf16(),
        **{f"flux_bf16_{k}": v for k, v in pipeline_rounding_bf16().items()},
    }
    write_result("pipelines_matrix", {"machine": machine(), "pytest_exit": int(code), "errors": measured,
                                      "outcomes": {f"{c}::{t}": o for (c, t), o in collector.outcomes.items()},
                                      "rounding": rounding})  # fmt: skip
    text = f"""# Pipelines diffguide serves

Generated by `python evals/pipelines_matrix.py` from the results of `tests/test_reach.py` on tiny
offline builds (random weights, 2 prompts x 2 images, negative prompts, 4 steps); do not edit by
hand. Machine: {machine()}. pytest exit code: {int(code)}.

## What each build passes

- **CFG identity**: `dg.CFG()` through diffguide against the untouched pipeline; bit-identical
  on batched pipelines, within 1e-6 relative on two-call ones (they return through the
  pipeline's own formula).
- **APG-off / AG-never**: APG at eta=1 without cap or momentum, AG with threshold 1.01, against
  CFG, within 1e-5 relative, at 2 NFE per step.
- **remove exact**: after `dg.remove`, bit-identical to the untouched pipeline and its class restored.
- **NFE exact**: `dg.stats` per-sample counts equal the rows the network's first layer sees.
- **skipping saves**: a rule that skips the unconditional branch for odd samples gives them the
  conditional-only image and the others CFG's, and only the even samples pay for it.
- **x0 = scheduler's**: the denoised prediction diffguide forms equals the x0 the scheduler
  lands on at its last step (checks the noise level on pipelines whose denoiser timestep is
  not the scheduler's).

Max relative error: the largest of the measured errors of that build (|error| / |reference|).

{matrix}

## Rounding of the two-call return

On a two-call pipeline the hook returns `u' = (g - s c) / (1 - s)` (computed in float64, stored
in the model's dtype) so that the pipeline's `u' + s (c - u')` is the rule's `g`. Two cases skip
the inversion and are exact: a sample whose `g` is `c` gets `c`, and one whose `g` is bit for bit
CFG's gets its real `u` (so CFG through diffguide is the pipeline's own output in any dtype).
For every other result, at s = 5 with CFG-sized differences, the round trip's max relative
error is **{rounding["fp32"]:.1e} in fp32** and **{rounding["bf16"]:.1e} in bf16**, against
{rounding["own_bf16"]:.1e} for the pipeline's own bf16 rounding of `u + s (c - u)` on the same
inputs. The tiny Flux run whole in bf16, 4 steps: APG at its CFG settings (through the
inversion) differs from the untouched bf16 pipeline by {rounding["flux_bf16_apg_off"]:.1e}
relative, CFG by {rounding["flux_bf16_cfg"]:.1e}; the untouched bf16 run differs from fp32 by
{rounding["flux_bf16_bf16_vs_fp32"]:.1e}.

## The guider face (`dg.as_guider`)

Modular pipelines (and HunyuanVideo 1.5's `guider` component) take a rule as a diffusers guider:
`pipe.update_components(guider=dg.as_guider(rule, guidance_scale=5.0, scheduler=pipe))`.
Skipping there is batch-level (a guider chooses how many batches run, not their rows); x0
rules read x_t from the denoiser's input and the noise level from the bound scheduler
(`diffguide/adapters/guider.py` says why). The SDXL tests compare the modular pipeline with
`dg.apply` on the classic SDXL pipeline built from the same components (1e-5 relative, same NFE).

{guider}

## The support table (`diffguide/adapters/support.py`)

"tiny build tested: no" marks classes served through the same adapter and table entry as a
tested sibling (img2img variants, Qwen-Image Edit Plus, Wan I2V, Kandinsky 5 T2V) or by their
reading of the source alone (Kandinsky 3, Allegro), without a build of their own yet.

{support}
"""
    (ROOT / "docs" / "pipelines.md").write_text(text)
    print(f"wrote docs/pipelines.md ({len(cases)} builds, pytest exit {int(code)})")


if __name__ == "__main__":
    main()
