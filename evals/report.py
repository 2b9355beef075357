"""Writing eval results: a JSON file per run and a marked section of docs/BENCHMARKS.md."""

from __future__ import annotations

import json
import platform
import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "docs" / "BENCHMARKS.md"
RESULTS = ROOT / "evals" / "results"


def machine() -> str:
    """One line naming the hardware the numbers came from."""
    device = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"CPU, {torch.get_num_threads()} threads"
    )
    return f"{platform.machine()}, {device}, torch {torch.__version__}"


def write_result(name: str, record: dict) -> Path:
    """Save ``record`` as evals/results/<name>.json."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def cached_row(cache: Path, key: str, compute, fresh: bool = False):
    """``compute()``'s result for ``key``, kept in the JSON file ``cache`` so that an
    interrupted or extended run recomputes only the rows it lacks (``fresh``: recompute)."""
    rows = json.loads(cache.read_text()) if cache.exists() else {}
    if fresh or key not in rows:
        rows[key] = compute()
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(rows, indent=2) + "\n")
    return rows[key]


def write_section(name: str, markdown: str) -> None:
    """Replace (or append) the section between ``<!-- BEGIN name -->`` and ``<!-- END name -->``."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    text = (
        pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    )
    BENCHMARKS.parent.mkdir(parents=True, exist_ok=True)
    BENCHMARKS.write_text(text)


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


#: the embedded models the evals run on: --model name -> what it is, for table captions
MODELS = {
    "digits": "digits UNet (epsilon, DDIM)",
    "fashion": "fashion flow transformer (velocity, FlowMatchEuler)",
}


def embedded_model(name: str):
    """(pipeline, judge, test images, test labels) of the embedded model ``name``."""
    import diffguide as dg

    if name not in MODELS:
        raise SystemExit(f"--model {name!r}: choose from {', '.join(MODELS)}")
    pipe, judge = dg.load_pipeline(name), dg.load_judge(name)
    pipe.set_progress_bar_config(disable=True)
    return (pipe, judge, *load_split(name, "test"))


def load_split(name: str, split: str):
    """(images, labels) of the data split ``split`` the embedded model ``name`` was trained on."""
    import diffguide as dg

    return (dg.load_digits if name == "digits" else dg.load_fashion)(split)


def calibrated_linear_ag(
    model: str, pipe, scale: float, steps: int, trajectories: int = 200, space: str = "model_output"
):
    """LinearAG fitted on ``trajectories`` CFG runs of the embedded model ``model`` at (scale,
    steps) in ``space``, kept in evals/results and loaded from there after the first fit, so a
    table rewrite neither refits nor changes it."""
    import diffguide as dg
    from diffguide.compare import calibrate_on_labels

    prefix = ("" if model == "digits" else f"{model}_") + ("" if space == "model_output" else "x0_")
    path = RESULTS / f"{prefix}linear_ag_w{scale:g}_{steps}steps.safetensors"
    if path.exists():
        return dg.LinearAG.load(path)
    rule = calibrate_on_labels(pipe, scale, steps, trajectories, space)
    rule.save(path)
    return rule
