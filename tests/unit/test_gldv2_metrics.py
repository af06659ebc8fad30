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
    unscored_predictions,
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
    # Only Usage "Ignored" is left out: a scored row reading "None" keeps it as its ground truth.
    assert sol.private == {"t3": ["c"], "t4": ["None"]}
    assert sol.ignored == ["t2"]
    assert sol.subset("All") == {"t1": ["a", "b"], "t3": ["c"], "t4": ["None"]}
    assert sol.scored_ids() == {"t1", "t3", "t4"}

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


# The challenge's scoring code (tensorflow/models, delf/python/datasets/google_landmarks_dataset:
# dataset_file_io.ReadSolution / ReadPredictions and metrics.MeanAveragePrecision), worked by hand on
# the edge cases where a reader could differ from it.

def _solution(tmp_path, rows: str):
    path = tmp_path / "retrieval_solution_v2.1.csv"
    path.write_text("id,images,Usage\n" + rows)
    return read_retrieval_solution(str(path))


def test_a_scored_row_without_images_scores_ap_zero_and_stays_in_the_denominator(tmp_path):
    # Reference: "t2,None,Public" -> ground truth ['None']; mAP = (1 + 0) / 2.
    sol = _solution(tmp_path, "t1,a,Public\nt2,None,Public\n")
    m = retrieval_metrics({"t1": ["a"], "t2": ["a"]}, sol.subset("Public"))
    assert m.n_queries == 2 and m.map_at_100 == pytest.approx(0.5)
    # An empty images field is one empty token for the reference as well.
    sol = _solution(tmp_path, "t1,a,Public\nt2,,Private\n")
    assert sol.private == {"t2": [""]}
    assert retrieval_metrics({"t1": ["a"]}, sol.subset("All")).map_at_100 == pytest.approx(0.5)


def test_repeated_ground_truth_ids_count_in_its_length(tmp_path):
    # Reference: num_expected_retrieved = min(len(['a', 'a']), 100) = 2 -> AP = 1 / 2.
    sol = _solution(tmp_path, "t1,a a,Public\n")
    assert sol.public == {"t1": ["a", "a"]}
    assert retrieval_metrics({"t1": ["a"]}, sol.public).map_at_100 == pytest.approx(0.5)


def test_predictions_are_split_as_the_challenge_splits_them(tmp_path):
    uri = tmp_path / "predictions.csv"
    uri.write_text("id,images\nt1,a  b\nt2,a b \nt3,\n")
    back = read_retrieval_predictions(str(uri))
    # Two spaces leave an empty token that takes rank 2; one trailing empty token is dropped.
    assert back == {"t1": ["a", "", "b"], "t2": ["a", "b"], "t3": []}
    assert average_precision(back["t1"], ["a", "b"]) == pytest.approx((1 / 1 + 2 / 3) / 2)


def test_where_raysearch_is_stricter_it_says_so(tmp_path):
    with pytest.raises(ValueError, match="listed twice .*challenge's reader would keep the last row"):
        _solution(tmp_path, "t1,a,Public\nt1,b,Private\n")
    sol = _solution(tmp_path, "t1,a,Public\nt2,b,Ignored\n")
    assert unscored_predictions({"t1": ["a"], "t2": ["b"], "t9": ["c"]}, sol) == ["t9"]
