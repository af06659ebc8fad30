"""Tuning nprobe: recall@k, leave-one-out queries, the smallest value that reaches the target."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from raysearch.index.synthetic import ClusteredVectors
from raysearch.index.tune import drop_self, perturbed_queries, recall_at_k, search_param, tune, tune_queries_count


def test_recall_at_k_counts_true_neighbours_found():
    truth = np.array([[1, 2, 3, 4], [5, 6, 7, -1]])
    found = np.array([[4, 3, 9, 8], [7, 5, 6, 1]])
    assert recall_at_k(found, truth) == pytest.approx((2 + 3) / 7)


def test_drop_self_leaves_the_query_out():
    I = np.array([[7, 1, 2], [3, 4, 7], [5, 6, 8]])
    out = drop_self(I, np.array([7, 7, 9]), 2)
    np.testing.assert_array_equal(out, [[1, 2], [3, 4], [5, 6]])


def test_queries_count():
    assert tune_queries_count(100) == 10
    assert tune_queries_count(10_000_000) == 1000


def test_search_param_per_index_type():
    assert search_param(faiss.index_factory(8, "IVF64,Flat")) == ("nprobe", [1, 2, 4, 8, 16, 32, 64])
    assert search_param(faiss.index_factory(8, "IVF48,Flat"))[1][-1] == 48
    assert search_param(faiss.index_factory(8, "HNSW16"))[0] == "efSearch"
    assert search_param(faiss.IndexIDMap(faiss.index_factory(8, "Flat"))) == (None, [])


@pytest.fixture(scope="module")
def ivf():
    gen = ClusteredVectors(24, 300, seed=5)
    xb = gen.rows(0, 12_000)
    index = faiss.index_factory(24, "IVF64,Flat")
    index.train(xb[:5000])
    index.add(xb)
    q_ids = np.random.default_rng(0).choice(len(xb), 300, replace=False)
    xq = xb[q_ids]
    truth = drop_self(faiss.knn(xq, xb, 11)[1], q_ids, 10)
    return index, xq, q_ids, truth


def _search(index):
    def run(xq, k, nprobe):
        index.nprobe = nprobe
        return index.search(xq, k)[1]
    return run


def _measured(index, xq, q_ids, truth, nprobe):
    index.nprobe = nprobe
    return recall_at_k(drop_self(index.search(xq, 11)[1], q_ids, 10), truth)


@pytest.mark.parametrize("target", [0.8, 0.9, 0.97])
def test_tune_picks_the_smallest_nprobe_reaching_the_target(ivf, target):
    index, xq, q_ids, truth = ivf
    result = tune(_search(index), xq, q_ids, truth, "nprobe", [1, 2, 4, 8, 16, 32, 64], target)
    assert result.reached
    assert result.recall >= target
    assert _measured(index, xq, q_ids, truth, result.value) == pytest.approx(result.recall)
    if result.value > 1:
        assert _measured(index, xq, q_ids, truth, result.value - 1) < target
    values = [p.value for p in result.curve]
    assert values == sorted(values) and result.value in values
    assert all(p.ms_per_query > 0 for p in result.curve)
    doc = result.to_manifest()
    assert doc["nprobe"] == result.value and doc["tuned"] and doc["param"] == "nprobe"


def test_unreachable_target_keeps_the_best_recall(ivf):
    index, xq, q_ids, truth = ivf
    # Only small values allowed: the target cannot be reached, the best of them is kept.
    result = tune(_search(index), xq, q_ids, truth, "nprobe", [1, 2, 4], 0.999)
    assert not result.reached
    assert result.value == 4
    assert result.recall == max(p.recall for p in result.curve)


def test_perturbed_queries_sit_at_the_copy_cosine_and_follow_the_data():
    rng = np.random.default_rng(0)
    xb = ClusteredVectors(32, 20, seed=1).rows(0, 2000)
    q = perturbed_queries(xb[:100], xb, cosine=0.85, seed=3)
    np.testing.assert_allclose((q * xb[:100]).sum(axis=1), 0.85, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-5)
    # The moves follow the collection's covariance: their energy sits where the data varies most.
    top = np.linalg.svd(xb - xb.mean(0), full_matrices=False)[2][:4]
    moved, isotropic = q - xb[:100], rng.standard_normal((100, 32))
    share = lambda e: float((np.linalg.norm(e @ top.T, axis=1) / np.linalg.norm(e, axis=1)).mean())
    assert share(moved) > 1.5 * share(isotropic)   # 0.60 against 0.34 for isotropic noise
    np.testing.assert_array_equal(perturbed_queries(xb[:3], xb[:1]), xb[:3])   # no covariance: unchanged


@pytest.mark.slow
def test_tuned_recall_holds_for_queries_that_are_not_indexed_vectors(tmp_path):
    """Queries that are copies of indexed vectors, not the vectors themselves (as edited copies of
    images are), reach the target recall within 0.01 at the tuned nprobe."""
    from raysearch.formats.embeddings import write_embeddings
    from raysearch.index.build import IndexConfig, build_index
    from raysearch.index.exact import exact_knn
    from raysearch.search import Searcher

    n = 20_000
    xb = ClusteredVectors(64, 200, seed=5, spread=0.5).rows(0, n)
    rng = np.random.default_rng(99)   # other queries than the build's own tuning queries
    xq = perturbed_queries(xb[rng.choice(n, 500, replace=False)], xb[rng.choice(n, 2000, replace=False)], seed=123)
    _, truth = exact_knn(xq, [(xb, np.arange(n))], 10)
    write_embeddings(str(tmp_path / "emb"), xb, part_rows=5000)
    manifest = build_index(str(tmp_path / "emb"), str(tmp_path / "index"), IndexConfig(factory="IVF128,Flat"))
    assert manifest["search"]["target_recall"] == 0.95 and manifest["search"]["tuned_to"] == pytest.approx(0.96)
    assert "cosine" in manifest["search"]["queries"]
    found = Searcher(str(tmp_path / "index")).search(xq, 10).ids
    assert recall_at_k(found, truth) >= 0.95 - 0.01
