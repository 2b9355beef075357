"""evals/gpu_walltime.py: its --tiny mode runs the GPU benchmark's code on CPU, and its report
judges the goals from the numbers it is given."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "evals"))
import gpu_walltime  # noqa: E402

from diffguide.guidance.linear_ag import paper_schedule, schedule_nfe  # noqa: E402


@pytest.fixture(scope="module")
def tiny_record(tmp_path_factory):
    out = tmp_path_factory.mktemp("walltime") / "tiny.json"
    record = gpu_walltime.main(
        ["--tiny", "--models", "sdxl,flux", "--repeats", "1", "--no-section", "--out", str(out)]
    )
    assert out.exists()
    return record


def test_tiny_run_times_every_rule_at_batch_one_and_four_on_a_batched_and_a_two_call_pipeline(tiny_record):
    assert tiny_record["mode"] == "tiny" and not tiny_record["skipped"] and not tiny_record["errors"]
    for name in ("sdxl", "flux"):
        entry = tiny_record["models"][name]
        assert [block["batch"] for block in entry["blocks"]] == [1, 4]
        for block in entry["blocks"]:
            rows = block["variants"]
            assert {"untouched", "CFG", "APG", "LinearAG", "interval"} <= set(rows)
            assert all(row["seconds_per_image"] > 0 for row in rows.values())
            assert ("AG staggered" in rows) == (block["batch"] == 4)


def test_forced_ag_switches_give_the_nfe_they_promise(tiny_record):
    steps = tiny_record["models"]["sdxl"]["steps"]
    for entry in tiny_record["models"].values():
        for block in entry["blocks"]:
            rows = block["variants"]
            for name in ("untouched", "CFG", "APG"):
                assert rows[name]["nfe_per_image"] == 2 * steps
            for k in gpu_walltime.ag_steps(steps):
                assert rows[f"AG@{k}"]["nfe_per_image"] == steps + k  # k guided steps, then one call each
                assert rows[f"AG@{k}"]["nfe_saved"] == pytest.approx(1 - (steps + k) / (2 * steps))
            assert rows["LinearAG"]["nfe_per_image"] == schedule_nfe(paper_schedule(steps))
            assert steps <= rows["interval"]["nfe_per_image"] <= 2 * steps
            if "AG staggered" in rows:
                firsts = [max(1, round(steps * f)) for f in (0.3, 0.5, 0.7, 0.9)]
                assert rows["AG staggered"]["nfe_per_image"] == pytest.approx(steps + sum(firsts) / 4)


def test_cfg_through_the_hook_reproduces_the_untouched_pipeline(tiny_record):
    for entry in tiny_record["models"].values():
        for block in entry["blocks"]:
            assert block["variants"]["CFG"]["output_rel_to_untouched"] < 1e-5


def test_every_rule_gives_the_same_latents_under_another_attention_kernel(tiny_record):
    for entry in tiny_record["models"].values():
        assert [b["batch"] for b in entry["backends"]] == [1, 4]
        one_per_rule = gpu_walltime.accuracy_variants(entry["steps"])
        assert list(entry["backends"][0]["variants"]) == one_per_rule  # compared at the smallest batch
        for backends in entry["backends"]:
            assert set(backends["sdpa_modules"]) == {"sdpa"}
            assert backends["xformers"].startswith("unavailable: ")  # no CUDA here
            for errors in backends["variants"].values():
                assert errors["math_rel"] < 1e-4


def test_tiny_report_is_marked_cpu_tiny(tiny_record):
    text = gpu_walltime.report(tiny_record)
    assert "**CPU/tiny run**" in text and "| 4 | AG staggered |" in text


def _full_record(ag_time_saved: float, cfg_seconds: float, xformers_rel: float) -> dict:
    def row(seconds, nfe, time_saved):
        return {"seconds_per_image": seconds, "nfe_per_image": nfe, "nfe_saved": 1 - nfe / 20,
                "time_saved": time_saved, "time_per_nfe_saved": None}  # fmt: skip

    variants = {"untouched": row(1.0, 20, 0.0), "CFG": row(cfg_seconds, 20, 1 - cfg_seconds),
                "AG@5": row(1 - ag_time_saved, 15, ag_time_saved)}  # fmt: skip
    return {
        "mode": "full", "device": "GPU", "versions": {"torch": "x"}, "repeats": 3, "wall_s": 1.0, "skipped": [],
        "models": {"sdxl": {
            "parameters": 2.6e9, "dtype": "float16", "resolution": 1024, "steps": 10,
            "blocks": [{"batch": 1, "variants": variants}],
            "backends": [{"batch": 1, "sdpa_modules": {"sdpa": 5}, "xformers": "ok",
                          "variants": {"AG@5": {"math_rel": 1e-3, "xformers_rel": xformers_rel}}}],
        }},
    }  # fmt: skip


def test_report_meets_goals_only_within_their_limits():
    met = gpu_walltime.report(_full_record(ag_time_saved=0.24, cfg_seconds=1.005, xformers_rel=0.004))
    assert "MISSED" not in met and met.count("- met:") == 3
    missed = gpu_walltime.report(_full_record(ag_time_saved=0.20, cfg_seconds=1.02, xformers_rel=0.05))
    assert "MISSED: sdxl b1 AG@5: |time - NFE saved| 5.0 pts" in missed
    assert "MISSED: sdxl b1 hook overhead at equal NFE +2.00%" in missed
    assert "MISSED: sdxl b1 AG@5: xformers vs SDPA rel. error 5.0e-02" in missed


def test_a_run_over_its_budget_skips_what_is_left_and_says_so(tmp_path):
    record = gpu_walltime.main(
        ["--tiny", "--budget-s", "0", "--no-section", "--out", str(tmp_path / "r.json")]
    )
    assert record["models"] == {} and len(record["skipped"]) == 3
    assert "Skipped (time budget): sdxl: over the 0 s budget" in gpu_walltime.report(record)
