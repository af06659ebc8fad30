"""Reading DISC21 ground truth, predictions, labels and revisitop's gnd pickles."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from raysearch.metrics.groundtruth import (
    id_key,
    read_copy_ground_truth,
    read_labels,
    read_predictions,
    read_revisited_ground_truth,
    write_predictions,
)
from raysearch.metrics.retrieval import Predictions


def test_disc21_ground_truth_with_header_and_empty_references(tmp_path):
    path = tmp_path / "gt.csv"
    path.write_text("query_id,reference_id\nQ00000,R000123\nQ00001,\n\n Q00002 , R000007 \nQ00003\n")
    gt = read_copy_ground_truth(str(path))
    assert gt.query_ids == ["Q00000", "Q00001", "Q00002", "Q00003"]
    assert gt.pairs == [("Q00000", "R000123"), ("Q00002", "R000007")]
    assert gt.n_matching_queries == 2


def test_disc21_ground_truth_without_header(tmp_path):
    path = tmp_path / "gt.csv"
    path.write_text("Q1,R1\nQ2,\n")
    gt = read_copy_ground_truth(str(path))
    assert gt.query_ids == ["Q1", "Q2"] and gt.pairs == [("Q1", "R1")]


def test_malformed_ground_truth_names_the_line(tmp_path):
    path = tmp_path / "gt.csv"
    path.write_text("query_id,reference_id\nQ1,R1\nQ2,R2,0.5\n")
    with pytest.raises(ValueError, match="line 3"):
        read_copy_ground_truth(str(path))
    with pytest.raises(FileNotFoundError, match="ground truth"):
        read_copy_ground_truth(str(tmp_path / "missing.csv"))


def test_predictions_round_trip_exactly(tmp_path):
    scores = np.array([0.123456789, -0.5, 0.9999999], dtype=np.float32).astype(np.float64)
    p = Predictions(np.array(["Q1", "Q1", "Q2"], object), np.array(["R1", "R2", "R1"], object), scores)
    path = str(tmp_path / "pred.csv")
    write_predictions(path, p)
    assert open(path).readline().strip() == "query_id,reference_id,score"
    back = read_predictions(path)
    assert back.query_ids.tolist() == ["Q1", "Q1", "Q2"]
    assert back.reference_ids.tolist() == ["R1", "R2", "R1"]
    np.testing.assert_array_equal(back.scores.astype(np.float32), scores.astype(np.float32))


def test_bad_prediction_score_is_reported(tmp_path):
    path = tmp_path / "pred.csv"
    path.write_text("query_id,reference_id,score\nQ1,R1,high\n")
    with pytest.raises(ValueError, match="line 2"):
        read_predictions(str(path))


def test_labels_allow_several_references_per_query(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("query_id,reference_id\n001,00012\n001,00013\n002,\n")
    labels = read_labels(str(path))
    assert labels == {"001": {"00012", "00013"}, "002": set()}


def test_id_key_matches_names_across_folders_extensions_and_zero_padding():
    assert id_key("references/R000123") == "R000123"
    assert id_key("R000123.jpg") == "R000123"
    assert id_key("tracks_cropped/00042") == id_key("42") == "42"
    assert id_key("all_souls_000013") == "all_souls_000013"
    assert id_key("scan.v2") == "scan.v2"   # not an image extension: kept


def _gnd(tmp_path, cfg) -> str:
    path = str(tmp_path / "gnd_test.pkl")
    with open(path, "wb") as f:
        pickle.dump(cfg, f)
    return path


def test_revisited_ground_truth_pickle(tmp_path):
    cfg = {
        "imlist": ["a", "b", "c"],
        "qimlist": ["q1"],
        "gnd": [{"bbx": [1.5, 2.0, 30.0, 40.25], "easy": np.array([0]), "hard": [2], "junk": np.array([1])}],
    }
    gt = read_revisited_ground_truth(_gnd(tmp_path, cfg))
    assert gt.imlist == ["a", "b", "c"]
    q = gt.queries[0]
    assert q.name == "q1" and q.bbx == (1.5, 2.0, 30.0, 40.25)
    assert q.easy.tolist() == [0] and q.hard.tolist() == [2] and q.junk.tolist() == [1]


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
@pytest.mark.parametrize("arrays", [True, False])
def test_revisited_ground_truth_reads_every_protocol_revisitop_reads(tmp_path, protocol, arrays):
    as_ = (lambda v, dt=np.int64: np.array(v, dtype=dt)) if arrays else (lambda v, dt=None: list(v))
    cfg = {
        "imlist": ["a", "b", "c"], "qimlist": ["q1", "q2"],
        "gnd": [{"bbx": as_([1.5, 2.0, 30.0, 40.25], np.float64), "easy": as_([0]), "hard": as_([2]), "junk": as_([])},
                {"bbx": as_([0, 0, 5, 5], np.float64), "easy": as_([1, 2]), "hard": as_([]), "junk": as_([0])}],
    }
    path = str(tmp_path / "gnd.pkl")
    with open(path, "wb") as f:
        pickle.dump(cfg, f, protocol=protocol)
    gt = read_revisited_ground_truth(path)
    assert [q.name for q in gt.queries] == ["q1", "q2"] and gt.queries[0].bbx == (1.5, 2.0, 30.0, 40.25)
    assert gt.queries[1].easy.tolist() == [1, 2] and gt.queries[1].junk.tolist() == [0]
    assert gt.queries[0].junk.tolist() == []


def test_revisited_ground_truth_rejects_out_of_range_indices(tmp_path):
    cfg = {"imlist": ["a"], "qimlist": ["q"], "gnd": [{"easy": [3], "hard": [], "junk": []}]}
    with pytest.raises(ValueError, match="outside"):
        read_revisited_ground_truth(_gnd(tmp_path, cfg))


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo owned",))


def test_pickle_with_code_is_refused(tmp_path):
    path = _gnd(tmp_path, {"imlist": [], "qimlist": [], "gnd": [], "x": _Exploit()})
    with pytest.raises(ValueError, match="refusing"):
        read_revisited_ground_truth(path)
