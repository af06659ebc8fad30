"""alpha query expansion and database-side augmentation (pure numpy)."""

from __future__ import annotations

import numpy as np
import pytest

from raysearch.index.expansion import (
    DatabaseAugmentation,
    QueryExpansion,
    alpha_query_expansion,
    database_side_augmentation,
    neighbour_weights,
)


def test_alpha_qe_weights_neighbours_by_similarity_to_the_power_alpha():
    q = np.array([[1.0, 0.0]], np.float32)
    top = np.array([[[0.0, 1.0]]], np.float32)
    # alpha = 1: q + 0.5 * n = (1, 0.5) -> normalised.
    out = alpha_query_expansion(q, top, np.array([[0.5]]), alpha=1.0)
    np.testing.assert_allclose(out, [[1 / np.sqrt(1.25), 0.5 / np.sqrt(1.25)]], rtol=1e-6)
    # alpha = 3: weight 0.125.
    out3 = alpha_query_expansion(q, top, np.array([[0.5]]), alpha=3.0)
    np.testing.assert_allclose(out3, [[1, 0.125]] / np.linalg.norm([1, 0.125]), rtol=1e-6)
    # alpha = 0: plain average of query and neighbour.
    out0 = alpha_query_expansion(q, top, np.array([[0.5]]), alpha=0.0)
    np.testing.assert_allclose(out0, [[np.sqrt(0.5), np.sqrt(0.5)]], rtol=1e-6)


def test_negative_similarities_and_missing_results_get_no_weight():
    assert neighbour_weights(np.array([[-0.4, 0.5, np.nan]]), 0.5).tolist() == [[0.0, pytest.approx(0.5 ** 0.5), 0.0]]
    q = np.array([[0.6, 0.8]], np.float32)
    top = np.array([[[1.0, 0.0], [0.0, 1.0]]], np.float32)
    out = alpha_query_expansion(q, top, np.array([[0.9, 0.9]]), 3.0, valid=np.array([[False, False]]))
    np.testing.assert_allclose(out, q, rtol=1e-6)


def test_dba_excludes_the_vector_itself_and_keeps_k_neighbours():
    xb = np.array([[1.0, 0.0]], np.float32)
    # Neighbour list as FAISS returns it: the vector itself first, then two others.
    ids = np.array([[7, 3, 5]])
    vecs = np.array([[[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]]], np.float32)
    sims = np.array([[1.0, 0.5, 0.5]])
    out = database_side_augmentation(xb, np.array([7]), ids, vecs, sims, k=1, alpha=1.0)
    # Only neighbour 3 counts (k=1, self excluded): (1, 0) + 0.5 * (0, 1).
    np.testing.assert_allclose(out, [[1, 0.5]] / np.linalg.norm([1, 0.5]), rtol=1e-6)
    # With k=2 the two opposite neighbours cancel out.
    out2 = database_side_augmentation(xb, np.array([7]), ids, vecs, sims, k=2, alpha=1.0)
    np.testing.assert_allclose(out2, [[1.0, 0.0]], atol=1e-6)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="--qe"):
        QueryExpansion(0)
    with pytest.raises(ValueError, match="--dba-alpha"):
        DatabaseAugmentation(2, alpha=-1.0)
    assert QueryExpansion.from_dict({"k": 2, "alpha": 1.5}) == QueryExpansion(2, 1.5)
    assert QueryExpansion.from_dict(None) is None
    with pytest.raises(ValueError, match="neighbours"):
        alpha_query_expansion(np.zeros((2, 3), np.float32), np.zeros((2, 1, 4), np.float32), np.zeros((2, 1)), 1.0)
