"""Pooling functions against direct numpy computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raysearch.models.pooling import gem, mac, pool, rmac, rmac_regions, spoc


@pytest.fixture()
def fmap() -> np.ndarray:
    return np.random.default_rng(0).uniform(0.0, 2.0, size=(2, 5, 7, 9)).astype(np.float32)


def test_gem_is_the_generalised_mean(fmap):
    expected = np.mean(fmap.astype(np.float64) ** 3, axis=(2, 3)) ** (1 / 3)
    np.testing.assert_allclose(gem(torch.from_numpy(fmap), p=3.0).numpy(), expected, rtol=1e-5)


def test_gem_p1_is_average_and_large_p_approaches_max(fmap):
    x = torch.from_numpy(fmap)
    np.testing.assert_allclose(gem(x, p=1.0).numpy(), fmap.mean(axis=(2, 3)), rtol=1e-5)
    assert np.allclose(gem(x.double(), p=200.0).numpy(), fmap.max(axis=(2, 3)), rtol=0.03)


def test_mac_and_spoc(fmap):
    x = torch.from_numpy(fmap)
    np.testing.assert_array_equal(mac(x).numpy(), fmap.max(axis=(2, 3)))
    np.testing.assert_allclose(spoc(x).numpy(), fmap.mean(axis=(2, 3)), rtol=1e-6)


def test_rmac_sums_normalised_region_maxima(fmap):
    x = torch.from_numpy(fmap)
    regions = rmac_regions(7, 9, levels=3)
    expected = np.zeros(fmap.shape[:2])
    for top, left, h, w in regions:
        m = fmap[:, :, top : top + h, left : left + w].max(axis=(2, 3))
        expected += m / np.linalg.norm(m, axis=1, keepdims=True)
    np.testing.assert_allclose(rmac(x).numpy(), expected, rtol=1e-5)


def test_rmac_regions_cover_the_map_with_squares():
    for h, w in [(7, 9), (9, 7), (10, 10), (3, 20), (1, 1)]:
        regions = rmac_regions(h, w, levels=3)
        assert regions
        covered = np.zeros((h, w), bool)
        for top, left, rh, rw in regions:
            assert rh == rw or (h == 1 and w == 1)
            assert 0 <= top and top + rh <= h and 0 <= left and left + rw <= w
            covered[top : top + rh, left : left + rw] = True
        assert covered.all()
    # Level 1 is one square of the short side, level 2 has smaller ones.
    sides = sorted({r[2] for r in rmac_regions(10, 10, levels=3)}, reverse=True)
    assert sides == [10, 6, 5]


def test_unknown_pooling():
    with pytest.raises(ValueError, match="pooling"):
        pool(torch.zeros(1, 2, 3, 3), "median")
