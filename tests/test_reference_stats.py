"""Reference statistics are computed once, then read from their cache file."""

import numpy as np
import pytest
import torch

from diffguide.metrics import gaussian_stats
from diffguide.metrics.features import reference_stats


class _CountingExtractor(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, images):
        self.calls += 1
        return images.flatten(1)


def test_reference_stats_are_cached_and_reused(tmp_path):
    images = torch.rand(20, 1, 2, 3)
    extractor, cache = _CountingExtractor(), tmp_path / "ref.npz"
    mu, sigma = reference_stats(images, extractor, cache=cache, key="flat")
    expected_mu, expected_sigma = gaussian_stats(images.flatten(1).double())
    np.testing.assert_allclose(mu, expected_mu)
    np.testing.assert_allclose(sigma, expected_sigma)
    calls = extractor.calls
    cached_mu, cached_sigma = reference_stats(torch.zeros(20, 1, 2, 3), extractor, cache=cache, key="flat")
    assert extractor.calls == calls  # read from the file, not recomputed
    np.testing.assert_array_equal(cached_mu, mu)
    np.testing.assert_array_equal(cached_sigma, sigma)
    with pytest.raises(ValueError, match="recompute"):
        reference_stats(images, extractor, cache=cache, key="other")
