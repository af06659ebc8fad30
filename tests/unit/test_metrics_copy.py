"""ISC2021 copy-detection metrics against cases worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from raysearch.metrics.retrieval import (
    NOT_FOUND,
    Predictions,
    copy_detection_metrics,
    keep_best_predictions,
    match_ranks,
    precision_recall,
)


def preds(rows):
    q, r, s = zip(*rows) if rows else ((), (), ())
    return Predictions(np.asarray(q, dtype=object), np.asarray(r, dtype=object), np.asarray(s, dtype=float))


def test_tied_scores_put_wrong_predictions_first():
    # q3 has no match (an empty-reference row of DISC21): its prediction is wrong. It ties with the
    # right prediction for q1 at 0.9; pessimistic tie-breaking ranks the wrong one first:
    # order F(0.9) T(0.9) F(0.8) T(0.5) -> P = 0, 1/2, 1/3, 1/2; R = 0, 1/2, 1/2, 1
    # AP = 1/2 * 1/2 + 1/2 * 1/2 = 0.5 (optimistic ties would give 0.75).
    gt = [("q1", "r1"), ("q2", "r2")]
    p = preds([("q1", "r1", 0.9), ("q3", "r5", 0.9), ("q2", "r9", 0.8), ("q2", "r2", 0.5)])
    m = copy_detection_metrics(gt, p)
    assert m.average_precision == pytest.approx(0.5)
    np.testing.assert_allclose(m.precisions, [0, 1 / 2, 1 / 3, 1 / 2])
    np.testing.assert_allclose(m.recalls, [0, 1 / 2, 1 / 2, 1])
    np.testing.assert_allclose(m.thresholds, [0.9, 0.9, 0.8, 0.5])
    assert m.recall_at_p90 is None and m.threshold_at_p90 is None
    # q1's reference is its only prediction (rank 0); q2's comes after a better wrong one (rank 1).
    assert m.recall_at_rank1 == pytest.approx(0.5)
    assert m.recall_at_rank10 == pytest.approx(1.0)
    assert m.n_ground_truth == 2 and m.n_predictions == 4


def test_all_equal_scores_cannot_buy_precision():
    gt = [("q1", "r1")]
    p = preds([("q1", "r1", 1.0), ("q1", "r2", 1.0), ("q1", "r3", 1.0), ("q1", "r4", 1.0)])
    m = copy_detection_metrics(gt, p)
    # The match is ranked after all three tied wrong ones: precision 1/4 when recall reaches 1.
    assert m.average_precision == pytest.approx(0.25)
    # ... and its rank counts every prediction scoring at least as high.
    assert m.recall_at_rank1 == 0.0
    assert m.recall_at_rank10 == 1.0


def test_recall_at_precision_90_and_its_threshold():
    # Ten matches; nine right predictions scoring 1.0 .. 0.6, then a wrong one (0.55), then the
    # tenth right one (0.5): P stays >= 0.9 to the end (10/11), so R@P90 = 1 at threshold 0.5.
    gt = [(f"q{i}", f"r{i}") for i in range(10)]
    rows = [(f"q{i}", f"r{i}", 1.0 - 0.05 * i) for i in range(9)]
    rows += [("q9", "r0", 0.55), ("q9", "r9", 0.5)]
    m = copy_detection_metrics(gt, preds(rows))
    assert m.recall_at_p90 == pytest.approx(1.0)
    assert m.threshold_at_p90 == pytest.approx(0.5)
    assert m.average_precision == pytest.approx(0.9 + 0.1 * 10 / 11)

    # A second wrong prediction before the last match drops the final precision to 10/12 < 0.9;
    # the best operating point is then recall 0.9, first reached at the ninth right one (0.6).
    rows2 = rows[:-1] + [("q8", "r0", 0.52), ("q9", "r9", 0.5)]
    m2 = copy_detection_metrics(gt, preds(rows2))
    assert m2.recall_at_p90 == pytest.approx(0.9)
    assert m2.threshold_at_p90 == pytest.approx(0.6)
    assert m2.average_precision == pytest.approx(0.9 + 0.1 * 10 / 12)


def test_queries_without_predictions_count_as_misses():
    gt = [("q1", "r1"), ("q2", "r2"), ("q3", "r3"), ("q4", "r4")]
    p = preds([("q1", "r1", 0.9), ("q2", "r2", 0.8)])
    m = copy_detection_metrics(gt, p)
    assert m.average_precision == pytest.approx(0.5)  # recall stops at 2/4 with precision 1
    assert m.recall_at_rank1 == pytest.approx(0.5)
    ranks = match_ranks(gt, p)
    assert ranks.tolist() == [0, 0, NOT_FOUND, NOT_FOUND]


def test_recall_at_10_counts_ranks_below_ten():
    gt = [("q", "right")]
    rows = [("q", f"w{i}", 1.0 - 0.01 * i) for i in range(10)] + [("q", "right", 0.5)]
    assert copy_detection_metrics(gt, preds(rows)).recall_at_rank10 == 0.0   # rank 10 (0-based)
    assert copy_detection_metrics(gt, preds(rows[1:])).recall_at_rank10 == 1.0  # rank 9


def test_repeated_pairs_are_refused():
    with pytest.raises(ValueError, match="repeated"):
        copy_detection_metrics([("q1", "r1")], preds([("q1", "r1", 0.9), ("q1", "r1", 0.8)]))


def test_ground_truth_without_matches_is_refused():
    with pytest.raises(ValueError, match="no matching pair"):
        copy_detection_metrics([], preds([("q1", "r1", 0.9)]))


def test_non_finite_scores_are_refused():
    with pytest.raises(ValueError, match="finite"):
        preds([("q1", "r1", float("nan"))])


def test_keep_best_predictions_keeps_the_highest_scores():
    p = preds([("a", "x", 0.1), ("a", "y", 0.9), ("b", "x", 0.5), ("b", "z", 0.7)])
    kept = keep_best_predictions(p, 2)
    assert sorted(kept.scores.tolist()) == [0.7, 0.9]
    assert kept.query_ids.tolist() == ["a", "b"]  # original order kept


def _reference_style_ap(is_match: np.ndarray, scores: np.ndarray, n_pos: int) -> float:
    # The definition spelled out plainly: sort (score, not-match) tuples ascending, reverse, and sum
    # recall steps times precision.
    order = sorted(range(len(scores)), key=lambda i: (scores[i], not is_match[i]))[::-1]
    tp, ap, prev_recall = 0, 0.0, 0.0
    for n, i in enumerate(order, start=1):
        tp += bool(is_match[i])
        recall = tp / n_pos
        ap += (recall - prev_recall) * (tp / n)
        prev_recall = recall
    return ap


def test_precision_recall_matches_the_plain_definition_with_many_ties():
    rng = np.random.default_rng(3)
    for _ in range(20):
        n = int(rng.integers(1, 60))
        scores = rng.integers(0, 5, size=n).astype(float)  # heavy ties
        is_match = rng.random(n) < 0.4
        n_pos = int(is_match.sum()) + int(rng.integers(0, 3))
        if n_pos == 0:
            continue
        p, r, _ = precision_recall(is_match, scores, n_pos)
        steps = np.diff(np.concatenate([[0.0], r]))
        assert float((steps * p).sum()) == pytest.approx(_reference_style_ap(is_match, scores, n_pos))
