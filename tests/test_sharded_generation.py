"""Generation sharded over 2 CPU processes with accelerate merges to the single-process result."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_two_process_generation_equals_one_process(tiny_pipe, tmp_path):
    tiny_pipe.save_pretrained(tmp_path / "model")
    common = ["--model", str(tmp_path / "model"), "--n-per-class", "1", "--steps", "2", "--batch-size", "3"]
    script = str(ROOT / "evals" / "generate.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, script, *common, "--out", str(tmp_path / "one")], check=True, env=env)
    sharded = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", script, *common, "--out", str(tmp_path / "two")],
        check=True, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert sharded.stdout.count("wrote 5 images") == 2, sharded.stdout + sharded.stderr
    one = sorted((tmp_path / "one").iterdir())
    two = sorted((tmp_path / "two").iterdir())
    assert [p.name for p in one] == [p.name for p in two] == [f"{i:06d}_{i}.png" for i in range(10)]
    for a, b in zip(one, two, strict=True):
        assert a.read_bytes() == b.read_bytes()
