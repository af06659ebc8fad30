"""PCA-whitening: what it learns, how it sits in a FAISS index, and how to read it back."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch

from raysearch.index.transforms import (
    WhiteningConfig,
    learn_pca_whitening,
    read_whitening,
    split_pretransform,
    wrap_index,
)
from raysearch.search import VectorLookup


def _anisotropic(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scales = np.geomspace(10.0, 0.1, d)
    rotation, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return ((rng.standard_normal((n, d)) * scales) @ rotation + 3.0).astype(np.float32)


def test_plain_pca_whitening_gives_isotropic_covariance():
    # Raw variances span 10^4; whitened ones are all equal (FAISS scales them by 1/n, which the L2
    # normalisation after it removes) and uncorrelated.
    x = _anisotropic(4000, 16)
    y = learn_pca_whitening(x, shrinkage=0.0).apply(x)
    cov = np.cov(y, rowvar=False)
    np.testing.assert_allclose(cov / np.diag(cov).mean(), np.eye(16), atol=0.01)
    np.testing.assert_allclose(y.mean(axis=0) / np.sqrt(np.diag(cov)), 0.0, atol=1e-3)


def test_shrinkage_damps_the_smallest_variances():
    x = _anisotropic(4000, 16)
    var = learn_pca_whitening(x, shrinkage=1.0).apply(x).var(axis=0)
    # Principal axes come first: the largest keeps most of its (whitened) variance, the smallest is
    # pulled far down instead of being blown up to the same size.
    assert var[-1] / var[0] < 0.01


def test_output_dimension_is_capped_by_the_training_set():
    x = _anisotropic(10, 16)
    assert learn_pca_whitening(x).d_out == 9
    assert learn_pca_whitening(_anisotropic(100, 16), dim=4).d_out == 4
    with pytest.raises(ValueError, match="--whiten-dim"):
        WhiteningConfig(dim=0)


@pytest.mark.parametrize("factory", ["Flat", "IVF4,Flat"])
def test_wrapped_index_whitens_queries_and_exposes_the_transform(factory):
    x = _anisotropic(600, 16)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    pca = learn_pca_whitening(x, dim=8, shrinkage=0.1)
    index = wrap_index(pca, faiss.index_factory(8, factory))
    index.train(x)
    ids = np.arange(600, dtype=np.int64) * 10 + 3
    index.add_with_ids(x, ids)

    w = read_whitening(index)
    assert w.A.shape == (8, 16) and w.b.shape == (8,) and w.normalize
    y = w.apply(x)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, rtol=1e-5)
    # Searching the wrapped index with raw vectors == searching its inner index with whitened ones.
    parts = split_pretransform(index)
    np.testing.assert_allclose(parts.apply(x[:5]), y[:5], rtol=1e-4, atol=1e-5)
    D1, I1 = index.search(x[:5], 3)
    D2, I2 = parts.inner.search(y[:5], 3)
    np.testing.assert_array_equal(I1, I2)
    assert I1[:, 0].tolist() == ids[:5].tolist()
    # The inner index gives back the whitened database vectors by id (for query expansion).
    np.testing.assert_allclose(VectorLookup(parts.inner).vectors(ids[[7, 2]]), y[[7, 2]], rtol=1e-4, atol=1e-5)
    # The torch module computes the same map, differentiably.
    t = torch.from_numpy(x[:4]).requires_grad_(True)
    out = w.torch_module()(t)
    np.testing.assert_allclose(out.detach().numpy(), y[:4], rtol=1e-4, atol=1e-5)
    out.sum().backward()
    assert t.grad is not None and torch.isfinite(t.grad).all()


def test_unwhitened_index_has_no_whitening():
    assert read_whitening(faiss.IndexFlatL2(4)) is None
