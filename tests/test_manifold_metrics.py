"""Precision/recall, density/coverage and faithfulness against brute-force references."""

import numpy as np
import pytest
import torch

import diffguide as dg
from diffguide.metrics import manifold


def brute_force(real: np.ndarray, fake: np.ndarray, k: int) -> dict[str, float]:
    """The papers' definitions, one loop per sample."""

    def radius(points, i):
        distances = sorted(float(np.linalg.norm(points[i] - points[j])) for j in range(len(points)) if j != i)
        return distances[k - 1]

    real_r = [radius(real, i) for i in range(len(real))]
    fake_r = [radius(fake, j) for j in range(len(fake))]
    inside = [[float(np.linalg.norm(f - r)) <= real_r[i] for i, r in enumerate(real)] for f in fake]
    precision = np.mean([any(row) for row in inside])
    recall = np.mean([any(np.linalg.norm(r - f) <= fake_r[j] for j, f in enumerate(fake)) for r in real])
    density = sum(sum(row) for row in inside) / (k * len(fake))
    coverage = np.mean([any(inside[j][i] for j in range(len(fake))) for i in range(len(real))])
    return {"precision": precision, "recall": recall, "density": density, "coverage": coverage}


@pytest.mark.parametrize("k", [3, 5])
def test_manifold_metrics_match_the_papers_definitions(k):
    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(40, 6)), rng.normal(0.4, 1.2, size=(33, 6))
    expected = brute_force(real, fake, k)
    precision, recall = dg.metrics.precision_recall(real, fake, k=k)
    density, coverage = dg.metrics.density_coverage(real, fake, k=k)
    assert (precision, recall) == pytest.approx((expected["precision"], expected["recall"]), abs=1e-12)
    assert (density, coverage) == pytest.approx((expected["density"], expected["coverage"]), abs=1e-12)


def test_blocked_distances_equal_one_block(monkeypatch):
    rng = np.random.default_rng(1)
    real, fake = rng.normal(size=(50, 4)), rng.normal(size=(45, 4))
    whole = (dg.metrics.precision_recall(real, fake), dg.metrics.density_coverage(real, fake))
    monkeypatch.setattr(manifold, "BLOCK", 7)
    assert (dg.metrics.precision_recall(real, fake), dg.metrics.density_coverage(real, fake)) == whole


def test_identical_sets_have_full_precision_recall_and_coverage():
    features = torch.randn(60, 8, generator=torch.Generator().manual_seed(2))
    assert dg.metrics.precision_recall(features, features.clone()) == (1.0, 1.0)
    assert dg.metrics.density_coverage(features, features.clone())[1] == 1.0


def test_a_shifted_set_loses_precision_and_density():
    rng = np.random.default_rng(3)
    real, fake = rng.normal(size=(300, 4)), rng.normal(size=(300, 4))
    shifted = fake + 3.0
    assert dg.metrics.precision_recall(real, shifted)[0] < dg.metrics.precision_recall(real, fake)[0] - 0.5
    assert dg.metrics.density_coverage(real, shifted)[0] < dg.metrics.density_coverage(real, fake)[0] - 0.5


def test_a_collapsed_set_keeps_precision_but_loses_recall_and_coverage():
    rng = np.random.default_rng(4)
    real = rng.normal(size=(300, 4))
    collapsed = real[0] + 0.01 * rng.normal(size=(300, 4))  # every fake near one real sample
    precision, recall = dg.metrics.precision_recall(real, collapsed)
    _, coverage = dg.metrics.density_coverage(real, collapsed)
    assert precision == 1.0
    assert recall < 0.05 and coverage < 0.05


def test_density_is_near_one_for_samples_of_the_real_distribution():
    # Naeem et al.: E[density] = 1 when fakes follow the real distribution
    rng = np.random.default_rng(5)
    density, coverage = dg.metrics.density_coverage(rng.normal(size=(2000, 3)), rng.normal(size=(2000, 3)))
    assert density == pytest.approx(1.0, abs=0.08)
    assert coverage > 0.9


@pytest.mark.parametrize(
    ("real", "fake", "k", "message"),
    [
        (np.zeros((10, 3)), np.zeros((10, 4)), 3, "dimensions differ"),
        (np.zeros((10, 3)), np.zeros((3, 3)), 3, "smaller than both set sizes"),
        (np.zeros((10, 3)), np.zeros((10, 3)), 0, "k must be >= 1"),
        (np.full((10, 3), np.nan), np.zeros((10, 3)), 3, "real_features: features contain NaN"),
    ],
)
def test_bad_input_is_refused_with_the_reason(real, fake, k, message):
    with pytest.raises(ValueError, match=message):
        dg.metrics.precision_recall(real, fake, k=k)


def test_faithfulness_is_the_per_sample_distance_to_the_same_seed():
    reference = torch.zeros(4, 1, 2, 2)
    samples = reference.clone()
    samples[:, 0, 0, 0] = torch.tensor([0.0, 0.3, 0.6, 0.9])  # distances 0, .3, .6, .9
    result = dg.metrics.faithfulness(samples, reference, samples.flatten(1), reference.flatten(1))
    expected = np.array([0.0, 0.3, 0.6, 0.9])
    for distance in result.values():
        assert distance.mean == pytest.approx(expected.mean())
        assert distance.std == pytest.approx(expected.std(ddof=1))
        assert distance.stderr == pytest.approx(expected.std(ddof=1) / 2)
    assert dg.metrics.faithfulness(reference, reference)["pixel"].mean == 0.0


def test_faithfulness_refuses_unpaired_sets():
    with pytest.raises(ValueError, match="same seeds"):
        dg.metrics.faithfulness(torch.zeros(4, 1, 2, 2), torch.zeros(5, 1, 2, 2))
    with pytest.raises(ValueError, match="for both samples and reference"):
        dg.metrics.faithfulness(torch.zeros(4, 1, 2, 2), torch.zeros(4, 1, 2, 2), features=torch.zeros(4, 3))
