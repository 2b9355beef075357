"""`diffguide sample`: a labelled grid, time and NFE printed, one-line errors on bad input."""

import subprocess
import sys

import PIL.Image
import pytest

from diffguide.classifier import DEFAULT_SCHEDULE, PRESETS
from diffguide.cli import main, parse_labels


def test_parse_labels_forms():
    assert parse_labels("0-9") == list(range(10))
    assert parse_labels("3") == [3]
    assert parse_labels("1,3,5") == [1, 3, 5]
    assert parse_labels("0-2,7") == [0, 1, 2, 7]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--labels", "0-10"], "label 10 is out of range"),
        (["--labels", "x"], "cannot read labels"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--n", "0"], "--n must be >= 1"),
        (["--out", "grid.bmpx"], "unknown output type"),
    ],
)
def test_sample_bad_input_exits_with_one_line(extra, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["sample", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_sample_unwritable_path(capsys, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main(["sample", "--out", str(blocker / "grid.png")]) == 2
    assert "cannot create the folder" in capsys.readouterr().err


def test_sample_writes_labelled_grid_and_reports(tmp_path):
    out = tmp_path / "sub" / "grid.png"
    result = subprocess.run(
        [sys.executable, "-m", "diffguide.cli", "sample", "--labels", "1,2", "--n", "3", "--steps", "2",
         "--out", str(out)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert str(out) in result.stdout and "6 samples" in result.stdout
    cfg_row = result.stdout.splitlines()[2].split()
    assert cfg_row[:2] == ["cfg", "4.0"]  # 2 steps x (cond + uncond)
    grid = PIL.Image.open(out)
    assert grid.size == (24 + 3 * (56 + 2), 2 * (56 + 2))


def test_every_subcommand_has_help():
    for command in (["--help"], ["sample", "--help"], ["compare", "--help"], ["train", "--help"]):
        result = subprocess.run(
            [sys.executable, "-m", "diffguide.cli", *command], capture_output=True, text=True
        )
        assert result.returncode == 0 and "usage:" in result.stdout


def test_compare_runs_each_method_on_the_same_seeds(tmp_path, capsys):
    out = tmp_path / "compare.png"
    args = [
        "compare",
        "--methods",
        "cfg,apg,ag,linear-ag",
        "--labels",
        "1,7",
        "--steps",
        "4",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    table = {line.split()[0]: line.split() for line in lines[2:-1]}
    assert "norm_threshold=2.0" in " ".join(table["apg"]) and "(preset digits)" in lines[3]
    assert set(table) == {"cfg", "apg", "ag", "linear-ag"}
    assert float(table["cfg"][1]) == 8.0 and float(table["apg"][1]) == 8.0
    # distance to the cfg row on the same seeds; no benchmark point at 4 steps, so no P / R
    assert float(table["cfg"][5]) == 0.0 and float(table["apg"][5]) > 0 and table["ag"][6] == "-"
    assert lines[-1].startswith("L2 to cfg:")
    assert float(table["linear-ag"][1]) == 2 + 1 + 1 + 1  # paper schedule at 4 steps
    assert PIL.Image.open(out).size == (
        8 + 6 * len("linear-ag 1") + 56 + 2,
        8 * (56 + 2),
    )  # a row per method and label


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--methods", "cfg,magic"], "unknown method 'magic'"),
        (["--scale", "1"], "CFG scale > 1"),
        (["--steps", "0"], "must be >= 1"),
    ],
)
def test_compare_bad_input_exits_with_one_line(extra, message, capsys, tmp_path):
    assert main(["compare", "--out", str(tmp_path / "c.png"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_classify_reads_images_and_prints_labels_with_margins(tmp_path, capsys):
    import json

    import numpy as np

    import diffguide as dg

    images, labels = dg.load_digits("test")
    folder = tmp_path / "digits"
    folder.mkdir()
    for i in (0, 100, 200):
        PIL.Image.fromarray((images[i, 0].numpy() * 255).astype(np.uint8)).save(
            folder / f"{i}_{int(labels[i])}.png"
        )
    assert main(["classify", str(folder), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["label"] for row in rows] == [int(labels[i]) for i in (0, 100, 200)]
    default = PRESETS[DEFAULT_SCHEDULE]
    assert all(
        row["margin"] > 0 and 10 * default.n_samples[0] <= row["nfe"] <= default.max_nfe(10) for row in rows
    )


def test_classify_under_two_processes_prints_what_one_process_does(tmp_path):
    """`accelerate launch` over two processes (gloo on CPU): each classifies a share, the first
    prints all of them, in order, as one process would."""
    import json

    import numpy as np
    import torch
    from conftest import default_sampling_scheduler, tiny_digits_unet

    import diffguide as dg

    model = tmp_path / "model"
    dg.DigitsPipeline(unet=tiny_digits_unet(), scheduler=default_sampling_scheduler()).save_pretrained(model)
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(torch.rand(5, 8, 8, generator=torch.Generator().manual_seed(0))):
        PIL.Image.fromarray((image.numpy() * 255).astype(np.uint8)).save(folder / f"{i}.png")
    args = ["-m", "diffguide", "classify", str(folder), "--model", str(model), "--json"]
    one = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300)
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
    two = subprocess.run([*launcher, *args], capture_output=True, text=True, timeout=300)
    assert one.returncode == 0 and two.returncode == 0, one.stderr[-2000:] + two.stderr[-2000:]
    rows_one, rows_two = json.loads(one.stdout), json.loads(two.stdout)
    assert (
        [r["image"] for r in rows_two]
        == [r["image"] for r in rows_one]
        == sorted(r["image"] for r in rows_one)
    )
    assert [(r["label"], r["nfe"]) for r in rows_two] == [(r["label"], r["nfe"]) for r in rows_one]
    assert [r["margin"] for r in rows_two] == pytest.approx(
        [r["margin"] for r in rows_one], rel=1e-4, abs=1e-6
    )


def test_classify_bad_input_exits_with_one_line(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    for args, message in [
        ([str(tmp_path / "missing.png")], "does not exist"),
        ([str(empty)], "no images"),
        ([str(broken)], "cannot read image"),
        ([str(broken), "--schedule", "magic"], "unknown --schedule"),
    ]:
        assert main(["classify", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1


def _saved(build, folder):
    build().save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_compare_runs_on_a_saved_text_to_image_pipeline(family, tmp_path, capsys):
    from tiny_flow_two_call import tiny_flux
    from tiny_pipelines import tiny_sd

    folder = _saved({"sd": tiny_sd, "flux": tiny_flux}[family], tmp_path / family)
    out = tmp_path / "grid.png"
    args = ["compare", "--pipeline", folder, "--prompt", "a cat", "--methods", "cfg,apg,ag", "--steps", "2"]
    assert main([*args, "--param", "ag.threshold=-1", "--out", str(out)]) == 0, capsys.readouterr().err
    lines = capsys.readouterr().out.splitlines()
    table = {line.split()[0]: line.split() for line in lines[2:-1]}
    assert set(table) == {"cfg", "apg", "ag"}
    assert [float(table[m][1]) for m in ("cfg", "apg", "ag")] == [4.0, 4.0, 3.0]  # AG switches at step 0
    assert "AdaptiveGuidance(threshold=-1.0" in lines[-2]
    assert "P / R" not in lines[-1]  # no benchmark for a user's pipeline: the footnote says only L2
    assert PIL.Image.open(out).size[1] > 0


def test_sample_refuses_what_a_pipeline_cannot_take(tmp_path, capsys):
    from tiny_pipelines import tiny_sd

    folder = _saved(tiny_sd, tmp_path / "sd")
    out = ["--out", str(tmp_path / "g.png")]
    cases = [
        (["--pipeline", folder], "takes prompts: give --prompt TEXT"),
        (["--pipeline", folder, "--labels", "3"], "not --labels"),
        (["--prompt", "a cat"], "is class-conditional: give --labels"),
        (["--pipeline", str(tmp_path)], "is not a diffusers pipeline folder: no model_index.json"),
        (["--pipeline", str(tmp_path / "missing")], "is not a folder"),
        (["--method", "apg", "--param", "norm_threshold=-2"], "norm_threshold must be from 0 to 1000"),
        (["--method", "apg", "--param", "momentum=x"], "momentum must be from -0.99 to 0.99, got 'x'"),
        (["--method", "apg", "--param", "threshold=0.9"], "no chosen method has a parameter 'threshold'"),
        (["--method", "apg", "--param", "eta"], "write key=value"),
        (
            ["--method", "apg", "--preset", "sd15"],
            "--preset sd15: none of apg has it (presets: digits, edm2-xxl, fashion, sdxl",
        ),
        (["--device", "cuda:7"] if not torch_cuda() else ["--device", "nowhere"], "--device"),
        (
            ["--pipeline", folder, "--prompt", "a", "--method", "linear-ag"],
            "needs coefficients calibrated on it",
        ),
    ]
    capsys.readouterr()
    for extra, message in cases:
        assert main(["sample", "--steps", "1", "--n", "1", *extra, *out]) == 2, extra
        errors = [
            line for line in capsys.readouterr().err.splitlines() if "error" in line
        ]  # not the loading bars
        assert len(errors) == 1 and message in errors[0], (extra, errors)


def torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_dtype_preset_and_sampler_flags(tmp_path, capsys, tiny_pipe):
    from tiny_flow_two_call import tiny_flux

    digits = tmp_path / "digits"
    tiny_pipe.save_pretrained(digits)
    out = ["--out", str(tmp_path / "g.png"), "--steps", "2", "--labels", "1"]
    # bfloat16 weights: the judge-free digits folder samples, and the grid is written from float images
    assert main(["sample", "--pipeline", str(digits), "--dtype", "bfloat16", "--method", "apg", *out]) == 0
    assert "guidance_scale=3" in capsys.readouterr().out
    # a named preset applies to the methods that have it; the others keep the registry defaults
    assert main(["compare", "--pipeline", str(digits), "--preset", "sdxl", "--methods", "cfg,apg", *out]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "(preset sdxl)" in lines[3] and "preset" not in lines[2]
    assert (
        main(["compare", "--pipeline", str(digits), "--preset", "edm2-xxl", "--methods", "cfg,apg", *out])
        == 2
    )
    assert "none of cfg, apg has it" in capsys.readouterr().err
    flux = _saved(tiny_flux, tmp_path / "flux")
    capsys.readouterr()
    assert (
        main(["sample", "--pipeline", flux, "--prompt", "a", "--sampler", "ddim", "--steps", "1", "--n", "1"])
        == 2
    )
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and "drives a flow-matching model" in errors[0]
