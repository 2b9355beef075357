"""`diffguide eval`: FD / KID / FD-infinity between folders and cached statistics."""

import re

import numpy as np
import PIL.Image
import pytest

import diffguide as dg
from diffguide.cli import main
from diffguide.metrics.features import load_image_folder, save_stats


def _write_digits(folder, images):
    folder.mkdir()
    for i, image in enumerate(images):
        PIL.Image.fromarray((image[0].numpy() * 255).round().astype(np.uint8), mode="L").save(
            folder / f"{i:04d}.png"
        )
    return folder


@pytest.fixture(scope="module")
def digit_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    test_images, _ = dg.load_digits("test")
    train_images, _ = dg.load_digits("train")
    return _write_digits(root / "test", test_images[::5]), _write_digits(root / "train", train_images[::20])


def _fd(output):
    return float(re.search(r"FD \(judge features\): ([0-9.e-]+)", output).group(1))


def test_folder_round_trip_is_lossless(digit_folders):
    test_folder, _ = digit_folders
    images = load_image_folder(test_folder)
    expected, _ = dg.load_digits("test")
    assert images.shape == (200, 1, 28, 28)
    np.testing.assert_allclose(images.numpy(), expected[::5].numpy(), atol=0.5 / 255 + 1e-6)


def test_fid_of_a_folder_with_itself_is_zero_and_cached_stats_agree(digit_folders, tmp_path, capsys):
    test_folder, train_folder = digit_folders
    assert main(["eval", "fid", str(test_folder), str(test_folder)]) == 0
    assert _fd(capsys.readouterr().out) == pytest.approx(0, abs=1e-6)
    assert main(["eval", "fid", str(train_folder), str(test_folder), "--kid", "--fd-inf"]) == 0
    out = capsys.readouterr().out
    direct = _fd(out)
    assert direct > 0 and "KID:" in out and "FD-infinity:" in out
    stats = tmp_path / "ref.npz"
    assert main(["eval", "stats", str(test_folder), "--out", str(stats)]) == 0
    capsys.readouterr()
    assert main(["eval", "fid", str(train_folder), str(stats)]) == 0
    assert _fd(capsys.readouterr().out) == pytest.approx(direct, rel=1e-9)


def test_eval_bad_input_gets_one_line_errors(digit_folders, tmp_path, capsys):
    test_folder, _ = digit_folders
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["eval", "stats", str(empty), "--out", str(tmp_path / "x.npz")]) == 2
    assert "holds no images" in capsys.readouterr().err
    other = save_stats(tmp_path / "other.npz", np.zeros(3), np.eye(3), "features=inception")
    assert main(["eval", "fid", str(test_folder), str(other)]) == 2
    assert "not 'features=judge'" in capsys.readouterr().err
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"not a zip")
    assert main(["eval", "fid", str(test_folder), str(corrupt)]) == 2
    assert "not a diffguide statistics file" in capsys.readouterr().err
    assert main(["eval", "fid", str(test_folder), str(other), "--features", str(tmp_path / "none.pt")]) == 2
    assert "TorchScript" in capsys.readouterr().err


def test_mixed_sizes_and_modes_follow_one_rule_and_bad_files_are_named(tmp_path, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    PIL.Image.new("RGB", (28, 28), (255, 255, 255)).save(folder / "a.png")
    PIL.Image.new("L", (56, 40), 0).save(folder / "b.jpg")
    images = load_image_folder(folder)
    assert images.shape == (2, 1, 28, 28)
    assert images[0].min() == 1.0 and images[1].max() == 0.0
    (folder / "c.png").write_bytes(b"not an image")
    assert main(["eval", "stats", str(folder), "--out", str(tmp_path / "s.npz")]) == 2
    err = capsys.readouterr().err
    assert "cannot read image" in err and "c.png" in err


def _metric(output, name):
    return float(re.search(rf"{name} \(k=\d\): ([0-9.]+)", output).group(1))


def test_pr_and_density_on_folders_and_on_statistics_with_features(digit_folders, tmp_path, capsys):
    test_folder, train_folder = digit_folders
    assert main(["eval", "fid", str(test_folder), str(test_folder), "--pr", "--density"]) == 0
    out = capsys.readouterr().out
    assert (
        _metric(out, "precision") == 1.0 and _metric(out, "recall") == 1.0 and _metric(out, "coverage") == 1.0
    )
    assert main(["eval", "fid", str(train_folder), str(test_folder), "--pr", "--density"]) == 0
    from_folders = capsys.readouterr().out
    real, generated = load_image_folder(test_folder), load_image_folder(train_folder)
    judge = dg.load_judge()
    expected = dg.metrics.precision_recall(
        dg.metrics.features.extract_features(real, judge),
        dg.metrics.features.extract_features(generated, judge),
    )
    assert (_metric(from_folders, "precision"), _metric(from_folders, "recall")) == pytest.approx(
        expected, abs=1e-4
    )

    stats = tmp_path / "ref.npz"
    assert main(["eval", "stats", str(test_folder), "--out", str(stats), "--with-features"]) == 0
    capsys.readouterr()
    assert main(["eval", "fid", str(train_folder), str(stats), "--pr", "--density"]) == 0
    from_stats = capsys.readouterr().out
    for name in ("precision", "recall", "density", "coverage"):
        assert _metric(from_stats, name) == pytest.approx(_metric(from_folders, name), abs=2e-4)

    bare = tmp_path / "bare.npz"
    assert main(["eval", "stats", str(test_folder), "--out", str(bare)]) == 0
    capsys.readouterr()
    assert main(["eval", "fid", str(train_folder), str(bare), "--pr"]) == 2
    assert "--with-features" in capsys.readouterr().err
