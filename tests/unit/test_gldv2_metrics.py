"""GLDv2 retrieval metrics on hand-worked cases, and the challenge's ground-truth and prediction files."""

from __future__ import annotations

import pytest

from raysearch.evaluate.gldv2 import gldv2_key
from raysearch.metrics.gldv2 import (
    average_precision,
    first_correct_position,
    precisions_at,
    read_retrieval_predictions,
    read_retrieval_solution,
    retrieval_metrics,
    write_retrieval_predictions,
)


def test_average_precision_hand_worked():
    # Hits at ranks 1 and 3 of 2 relevant: (1/1 + 2/3) / 2.
    assert average_precision(["a", "x", "b"], {"a", "b"}) == pytest.approx((1 + 2 / 3) / 2)
    # One of two relevant found, at rank 2: (1/2) / 2.
    assert average_precision(["x", "a"], ["a", "b"]) == pytest.approx(0.25)
    # A repeated prediction is skipped but keeps its rank: hits at 2 and 4 -> (1/2 + 2/4) / 2.
    assert average_precision(["x", "a", "a", "b"], {"a", "b"}) == pytest.approx(0.5)
    # Nothing relevant predicted.
    assert average_precision([], {"a"}) == 0.0


def test_average_precision_reads_only_the_top_100_and_caps_the_denominator():
    relevant = [f"r{i}" for i in range(150)]
    # 100 relevant images in the top 100 of a 150-image ground truth: perfect (divided by 100, not 150).
    assert average_precision(relevant[:100], relevant) == pytest.approx(1.0)
    # A hit at rank 101 does not count.
    assert average_precision([f"x{i}" for i in range(100)] + ["r0"], relevant) == 0.0
    with pytest.raises(ValueError, match="at least one ground-truth"):
        average_precision(["a"], set())


def test_precisions_and_first_position_hand_worked():
    p = precisions_at(["a", "x", "b", "a"], {"a", "b"}, max_predictions=5)
    assert p.tolist() == pytest.approx([1.0, 0.5, 2 / 3, 2 / 4, 2 / 5])
    assert first_correct_position(["x", "y", "b"], {"b"}) == 3
    assert first_correct_position(["x"], {"b"}) == 101


def test_map_counts_unpredicted_scored_images_as_zero_and_ignores_others():
    solution = {"q1": ["a"], "q2": ["b", "c"], "q3": ["d"]}
    predictions = {"q1": ["a"], "q2": ["c", "z", "b"], "zz": ["a"]}   # q3 has no prediction; zz is not scored
    m = retrieval_metrics(predictions, solution)
    ap_q2 = (1 / 1 + 2 / 3) / 2
    assert m.map_at_100 == pytest.approx((1.0 + ap_q2 + 0.0) / 3)
    assert m.n_queries == 3 and m.n_predicted == 2
    assert m.precision_at[1] == pytest.approx((1 + 1 + 0) / 3)
    assert m.precision_at[5] == pytest.approx((1 / 5 + 2 / 5 + 0) / 3)
    assert m.mean_position == pytest.approx((1 + 1 + 101) / 3)
    assert m.median_position == 1.0


def test_solution_reader_splits_public_private_and_ignored(tmp_path):
    path = tmp_path / "retrieval_solution_v2.1.csv"
    path.write_text("id,images,Usage\n"
                    "t1,a b,Public\n"
                    "t2,None,Ignored\n"
                    "t3,c,Private\n"
                    "t4,None,Private\n")
    sol = read_retrieval_solution(str(path))
    assert sol.public == {"t1": ["a", "b"]}
    assert sol.private == {"t3": ["c"]}
    assert sol.ignored == ["t2", "t4"]
    assert sol.subset("All") == {"t1": ["a", "b"], "t3": ["c"]}
    assert sol.scored_ids() == {"t1", "t3"}

    path.write_text("id,images,Usage\nt1,a,Secret\n")
    with pytest.raises(ValueError, match="line 2: test image t1 has unknown Usage 'Secret'"):
        read_retrieval_solution(str(path))
    path.write_text("id,landmarks,Usage\nt1,1,Public\n")
    with pytest.raises(ValueError, match="header must be id,images,Usage"):
        read_retrieval_solution(str(path))
    with pytest.raises(FileNotFoundError, match="GLDv2 retrieval ground truth not found"):
        read_retrieval_solution(str(tmp_path / "missing.csv"))


def test_predictions_round_trip_in_the_submission_format(tmp_path):
    uri = str(tmp_path / "predictions.csv")
    preds = {"t1": [f"i{k}" for k in range(120)], "t2": []}
    write_retrieval_predictions(uri, preds)
    text = (tmp_path / "predictions.csv").read_text().splitlines()
    assert text[0] == "id,images"
    back = read_retrieval_predictions(uri)
    assert back["t1"] == preds["t1"][:100] and back["t2"] == []


def test_gldv2_key_keeps_hex_ids_as_they_are():
    assert gldv2_key("0/1/2/0123456789012345") == "0123456789012345"
    assert gldv2_key("abcdef0123456789.jpg") == "abcdef0123456789"
