"""`diffguide compare` shows the benchmark's precision/recall only for the rule and setting measured."""

import json

import diffguide as dg
from diffguide import compare


def test_benchmark_point_matches_model_rule_steps_and_scale_exactly(tmp_path, monkeypatch):
    record = {"model": "digits", "rule": repr(dg.AdaptiveGuidance(0.991)), "steps": 20, "scale": 3.0,
              "samples": 200, "precision": 0.9, "precision_se": 0.02, "recall": 0.5, "recall_se": 0.03}  # fmt: skip
    path = tmp_path / "points.json"
    path.write_text(json.dumps([record]))
    monkeypatch.setattr(compare, "FRONTIER_POINTS", path)
    assert compare.benchmark_point("digits", dg.AdaptiveGuidance(0.991), 20, 3) == record
    assert compare.benchmark_point("fashion", dg.AdaptiveGuidance(0.991), 20, 3) is None
    assert compare.benchmark_point("digits", dg.AdaptiveGuidance(0.98), 20, 3) is None
    assert compare.benchmark_point("digits", dg.AdaptiveGuidance(0.991), 10, 3) is None
    assert compare.benchmark_point("digits", dg.AdaptiveGuidance(0.991), 20, 5) is None
    monkeypatch.setattr(compare, "FRONTIER_POINTS", tmp_path / "missing.json")
    assert compare.benchmark_point("digits", dg.AdaptiveGuidance(0.991), 20, 3) is None


def test_shipped_benchmark_points_name_rules_the_registry_builds():
    """The demo's methods at its settings (w=3, 20 steps) find their benchmark rows by repr."""
    assert compare.FRONTIER_POINTS.is_file(), "diffguide/frontier_points.json ships with the package"
    points = json.loads(compare.FRONTIER_POINTS.read_text())
    pipe_free = {"cfg": dg.CFG(), "ag": compare.method("ag").make("digits")}
    for name, rule in pipe_free.items():
        assert compare.benchmark_point("digits", rule, 20, 3.0) is not None, name
    assert all(0 <= p["precision"] <= 1 and 0 <= p["recall"] <= 1 for p in points)
