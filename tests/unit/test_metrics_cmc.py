"""CMC (labelled retrieval) and ANN recall against hand-worked cases."""

from __future__ import annotations

import numpy as np
import pytest

from raysearch.metrics.retrieval import NOT_FOUND, cmc, collection_rank, first_match_ranks, knn_recall


def _ids(rows):
    return np.array(rows, dtype=object)


def test_first_match_rank_counts_ties_against_the_query():
    ids = _ids([["a", "b", "c", "d"]])
    scores = np.array([[0.9, 0.8, 0.8, 0.1]])
    # c ties with b at 0.8: both count, so c's rank is 3, not 2.
    assert first_match_ranks(ids, scores, [{"c"}]).tolist() == [3]
    assert first_match_ranks(ids, scores, [{"a"}]).tolist() == [1]
    # With several correct references the best-scoring one counts.
    assert first_match_ranks(ids, scores, [{"d", "b"}]).tolist() == [3]
    assert first_match_ranks(ids, scores, [{"z"}]).tolist() == [NOT_FOUND]


def test_other_correct_results_do_not_push_the_first_match_down():
    # Results a=0.9, b=0.9, both correct: the first match is at rank 1 (CMC@1 = 1).
    ids = _ids([["a", "b", "c"], ["x", "a", "b"]])
    scores = np.array([[0.9, 0.9, 0.1], [0.9, 0.9, 0.9]])
    assert first_match_ranks(ids, scores, [{"a", "b"}, {"a", "b"}]).tolist() == [1, 2]


def test_missing_results_are_not_counted():
    ids = _ids([["a", None, None]])
    scores = np.array([[0.5, np.nan, np.nan]])
    assert first_match_ranks(ids, scores, [{"a"}]).tolist() == [1]


def test_collection_fractions_round_up():
    # FID-300: 1175 references -> 1% = 11.75 -> 12, 5% = 58.75 -> 59, 10% = 117.5 -> 118.
    assert [collection_rank(f, 1175) for f in (0.01, 0.05, 0.10)] == [12, 59, 118]
    assert collection_rank(0.07, 100) == 7     # 7.000000000000001 must not become 8
    assert collection_rank(0.001, 100) == 1    # never below rank 1


def test_cmc_values_and_unknown_depths():
    ranks = np.array([1, 2, 5, 30, NOT_FOUND])
    m = cmc(ranks, n_collection=200, depth=25, at_ranks=(1, 5, 10, 20, 50), fractions=(0.01, 0.1))
    assert m.at_rank[1] == pytest.approx(1 / 5)
    assert m.at_rank[5] == pytest.approx(3 / 5)
    assert m.at_rank[20] == pytest.approx(3 / 5)
    assert m.at_rank[50] is None                   # deeper than the 25 results ranked
    assert m.fraction_ranks == {0.01: 2, 0.1: 20}
    assert m.at_fraction[0.01] == pytest.approx(2 / 5)
    assert m.at_fraction[0.1] == pytest.approx(3 / 5)
    # Ranking the whole collection makes every point known.
    full = cmc(ranks, n_collection=40, depth=40, at_ranks=(50,), fractions=())
    assert full.at_rank[50] == pytest.approx(4 / 5)


def test_cmc_needs_labelled_queries():
    with pytest.raises(ValueError, match="no query"):
        cmc(np.array([], np.int64), 10, 10)


def test_knn_recall_is_the_overlap_of_top_k_sets():
    exact = np.array([[1, 2, 3], [4, 5, 6]])
    ann = np.array([[3, 1, 9], [7, 8, 4]])
    assert knn_recall(ann, exact, 1) == pytest.approx((0 + 0) / 2)      # top-1: {3} vs {1}, {7} vs {4}
    assert knn_recall(ann, exact, 3) == pytest.approx((2 / 3 + 1 / 3) / 2)
    # Fewer exact neighbours than k (tiny collection): the denominator is what exists.
    assert knn_recall(np.array([[1, -1]]), np.array([[1, -1]]), 2) == pytest.approx(1.0)
