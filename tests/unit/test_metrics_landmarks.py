"""Revisited Oxford / Paris mAP and mP@k (revisitop's compute_map) against hand-worked cases."""

from __future__ import annotations

import numpy as np
import pytest

from raysearch.metrics.retrieval import (
    average_precision_trapezoid,
    mean_average_precision,
    positions_without_junk,
    protocol_sets,
    revisited_metrics,
)


def test_trapezoidal_ap_of_positives_at_ranks_0_and_2():
    # j=0 at rank 0: precisions 1 and 1/1 -> (1 + 1)/2 * 1/2 = 0.5
    # j=1 at rank 2: precisions 1/2 and 2/3 -> (1/2 + 2/3)/2 * 1/2 = 0.291666...
    assert average_precision_trapezoid(np.array([0, 2]), 2) == pytest.approx(0.5 + 7 / 24)


def test_junk_images_are_taken_out_of_the_ranking():
    ranking = np.array([10, 99, 11, 12])   # 99 is junk: 12 moves from position 3 to 2
    assert positions_without_junk(ranking, np.array([10, 12]), np.array([99])).tolist() == [0, 2]
    m, aps, _, _ = mean_average_precision([ranking], [np.array([10, 12])], [np.array([99])])
    assert m == pytest.approx(0.5 + 7 / 24)
    # Junk ranked after every positive changes nothing.
    same, _, _, _ = mean_average_precision([np.array([10, 11, 12, 99])], [np.array([10, 12])], [np.array([99])])
    assert same == pytest.approx(m)


def test_positive_missing_from_a_truncated_ranking_adds_nothing():
    # Three positives, only two retrieved (at 0 and 2): recall steps of 1/3.
    m, _, _, _ = mean_average_precision([np.array([10, 11, 12])], [np.array([10, 12, 13])], [np.array([], int)])
    assert m == pytest.approx((2 / 2) / 3 + (1 / 2 + 2 / 3) / 2 / 3)


def test_query_whose_ranking_holds_no_positive_scores_zero():
    m, aps, mp, prs = mean_average_precision([np.array([5, 6])], [np.array([7])], [np.array([], int)], kappas=(1, 5))
    assert m == 0.0 and aps[0] == 0.0
    assert prs[0].tolist() == [0.0, 0.0]


def test_precision_at_k_uses_the_last_positive_when_it_is_above_k():
    # One-based positions [1, 3]: P@1 = 1/1; P@5 uses k' = min(3, 5) = 3 -> 2/3; P@10 -> 2/3.
    _, _, mp, prs = mean_average_precision([np.array([10, 11, 12, 13, 14])], [np.array([10, 12])],
                                           [np.array([], int)], kappas=(1, 5, 10))
    np.testing.assert_allclose(prs[0], [1.0, 2 / 3, 2 / 3])
    np.testing.assert_allclose(mp, [1.0, 2 / 3, 2 / 3])


def test_queries_without_positives_are_left_out_of_the_mean():
    rankings = [np.array([1, 2, 3]), np.array([1, 2, 3])]
    m, aps, mp, _ = mean_average_precision(rankings, [np.array([2]), np.array([], int)], [np.array([], int)] * 2,
                                           kappas=(1,))
    # Query 0: positive at rank 1 -> (0 + 1/2)/2 = 0.25; query 1 has none and is not averaged.
    assert aps[0] == pytest.approx(0.25) and np.isnan(aps[1])
    assert m == pytest.approx(0.25)
    assert mp.tolist() == [0.0]  # k' = min(2, 1) = 1: no positive at rank 1


def test_easy_medium_hard_protocols():
    gnd = [{"easy": [0], "hard": [1], "junk": [2]}]
    ranking = [np.array([1, 2, 3, 0])]
    m = revisited_metrics(ranking, gnd, kappas=(1, 5))
    # Easy: positive 0, junk {2, 1}: 0 sits at 3, two junk before it -> position 1:
    #   AP = (0/1 + 1/2)/2 = 0.25; P@1 = 0, P@5 with k' = 2 -> 1/2.
    assert m.map["easy"] == pytest.approx(0.25)
    assert m.mean_precision_at["easy"] == {1: 0.0, 5: 0.5}
    # Medium: positives {0, 1}, junk {2}: positions 0 and 3 - 1 = 2 -> 0.5 + 7/24.
    assert m.map["medium"] == pytest.approx(0.5 + 7 / 24)
    # Hard: positive 1 at the top -> 1.
    assert m.map["hard"] == pytest.approx(1.0)
    assert m.n_queries == {"easy": 1, "medium": 1, "hard": 1}


def test_hard_protocol_skips_queries_without_hard_positives():
    gnd = [{"easy": [0], "hard": [], "junk": []}, {"easy": [], "hard": [1], "junk": []}]
    m = revisited_metrics([np.array([0, 1]), np.array([0, 1])], gnd)
    assert m.n_queries == {"easy": 1, "medium": 2, "hard": 1}
    assert m.map["hard"] == pytest.approx((0 + 1 / 2) / 2)   # query 1: positive at rank 1
    assert np.isnan(m.aps["hard"][0])


def test_protocol_sets_follow_revisitop():
    g = {"easy": [1, 2], "hard": [3], "junk": [4]}
    pos, junk = protocol_sets(g, "easy")
    assert sorted(pos) == [1, 2] and sorted(junk) == [3, 4]
    pos, junk = protocol_sets(g, "medium")
    assert sorted(pos) == [1, 2, 3] and sorted(junk) == [4]
    pos, junk = protocol_sets(g, "hard")
    assert sorted(pos) == [3] and sorted(junk) == [1, 2, 4]
    with pytest.raises(ValueError, match="protocol"):
        protocol_sets(g, "extreme")
