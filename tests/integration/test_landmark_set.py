"""A generated landmark set (raysearch.datasets.landmarks) through the real landmark evaluation: an
index built over its database list, its queries cropped to their boxes, revisitop's mAP."""

from __future__ import annotations

import numpy as np
import pytest

from raysearch.builder import build
from raysearch.datasets.landmarks import LandmarkSetConfig, write_landmark_set
from raysearch.embed import EmbedConfig
from raysearch.evaluate.landmarks import LandmarkEvalConfig, evaluate_landmarks
from raysearch.index.build import IndexConfig
from raysearch.metrics.groundtruth import read_revisited_ground_truth
from raysearch.metrics.retrieval import revisited_metrics

pytestmark = pytest.mark.slow


def test_generated_set_evaluates_end_to_end(tmp_path, photos, ray_local):
    lset = write_landmark_set(str(tmp_path / "set"), LandmarkSetConfig(
        n_landmarks=6, views_per_landmark=6, n_distractors=18, distractor_photos=3, seed=4), photos)
    index_dir = str(tmp_path / "index")
    build(lset.database_list, index_dir, EmbedConfig(progress=False), IndexConfig(factory="Flat"))

    report = evaluate_landmarks(index_dir, lset.query_list, lset.gnd, LandmarkEvalConfig())
    assert report.n_queries == 6 and report.depth == lset.n_database
    # The index holds exactly the imlist: queries are not indexed, every database image is.
    assert report.not_in_imlist == 0 and report.imlist_not_indexed == 0
    for protocol in ("easy", "medium", "hard"):
        assert 0.0 <= report.metrics.map[protocol] <= 1.0
        assert report.metrics.n_queries[protocol] == 6
    # The built-in descriptor finds the landmarks far better than chance does on the same ground truth.
    gnd = read_revisited_ground_truth(lset.gnd)
    rng = np.random.default_rng(0)
    chance = np.mean([revisited_metrics([rng.permutation(len(gnd.imlist)) for _ in gnd.queries],
                                        [q.as_dict() for q in gnd.queries]).map["medium"] for _ in range(20)])
    assert report.metrics.map["medium"] > chance + 0.2
