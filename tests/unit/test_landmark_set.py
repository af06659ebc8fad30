"""The landmark set generator (raysearch.datasets.landmarks): the files read back in revisitop's
format, the labels follow what each view shows (measured here independently, by rasterising the
recorded geometry), the pixels are what the records say, and revisitop's mAP consumes the set."""

from __future__ import annotations

import math
import os

import cv2
import numpy as np
import pytest

from raysearch.datasets.landmarks import LandmarkSetConfig, write_landmark_set
from raysearch.images import decode_image
from raysearch.metrics.groundtruth import read_revisited_ground_truth
from raysearch.metrics.retrieval import revisited_metrics

CONFIG = LandmarkSetConfig(n_landmarks=8, views_per_landmark=6, n_distractors=20, distractor_photos=3, seed=3)
SUPERSAMPLE_SIDE = 600     # the rasterised landmark's longer side, pixels (area error well under 1%)


@pytest.fixture(scope="module")
def lset(tmp_path_factory, photos):
    return write_landmark_set(str(tmp_path_factory.mktemp("landmarks")), CONFIG, photos)


def _landmark_views(lset):
    return [r for r in lset.records.values() if r.role in ("easy", "hard", "junk")]


def _rasterised_visible(lset, record) -> float:
    """Share of the landmark's box covered by the view's quad and not by its occluder, counted on a
    supersampled pixel grid (no polygon clipping, unlike the generator)."""
    lm = lset.landmarks[record.landmark]
    sx0, sy0, sx1, sy1 = lm.site
    f = SUPERSAMPLE_SIDE / max(lm.box[2] - lm.box[0], lm.box[3] - lm.box[1])
    shape = (int(math.ceil((sy1 - sy0) * f)) + 1, int(math.ceil((sx1 - sx0) * f)) + 1)

    def fill(points) -> np.ndarray:
        mask = np.zeros(shape, np.uint8)
        pts = ((np.asarray(points, np.float64) - [sx0, sy0]) * f * 16).round().astype(np.int32)
        cv2.fillConvexPoly(mask, pts, 1, lineType=cv2.LINE_8, shift=4)
        return mask.astype(bool)

    x0, y0, x1, y1 = lm.box
    box = fill([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
    seen = box & fill(record.quad)
    if record.occluder is not None:
        ox0, oy0, ox1, oy1 = record.occluder
        corners = np.array([[ox0, oy0], [ox1, oy0], [ox1, oy1], [ox0, oy1]], np.float64).reshape(-1, 1, 2)
        back = cv2.perspectiveTransform(corners, np.linalg.inv(np.asarray(record.homography))).reshape(-1, 2)
        seen &= ~fill(back)
    return float(seen.sum()) / float(box.sum())


def _expected_label(visible: float, warp: float, light: float) -> str:
    # The rules as the module docstring states them, written out here again.
    if visible < 0.25:
        return "junk"
    if visible >= 0.7 and warp <= 0.04 and light <= 0.12:
        return "easy"
    return "hard"


def test_ground_truth_reads_back_with_valid_indices(lset):
    gnd = read_revisited_ground_truth(lset.gnd)
    assert gnd.imlist == lset.imlist and [q.name for q in gnd.queries] == lset.qimlist
    assert len(lset.landmarks) == 8 and len(gnd.queries) == 8
    assert len(gnd.imlist) == 8 * 6 + 20
    for q in gnd.queries:
        lm = lset.records[q.name].landmark
        for label in ("easy", "hard", "junk"):
            idx = getattr(q, label)
            assert idx.size == 0 or (idx.min() >= 0 and idx.max() < len(gnd.imlist))
            # Exactly this landmark's views of this label, by name.
            expected = {r.name for r in lset.records.values() if r.landmark == lm and r.role == label}
            assert {gnd.imlist[i] for i in idx} == expected
        assert not set(q.easy) & set(q.hard) and not set(q.junk) & (set(q.easy) | set(q.hard))
        assert q.bbx is not None and len(q.bbx) == 4
    # No query is a database image (as in rOxford), and distractors are in no list.
    assert not set(gnd.imlist) & {q.name for q in gnd.queries}
    listed = {int(i) for q in gnd.queries for i in np.concatenate([q.easy, q.hard, q.junk])}
    assert all(lset.records[gnd.imlist[i]].role != "distractor" for i in listed)
    assert sum(r.role == "distractor" for r in lset.records.values()) == 20


def test_every_image_exists_decodes_and_the_lists_name_them(lset):
    files = sorted(os.listdir(lset.jpg))
    assert files == sorted(n + ".jpg" for n in lset.imlist + lset.qimlist)
    for name in lset.imlist + lset.qimlist:
        with open(os.path.join(lset.jpg, name + ".jpg"), "rb") as f:
            arr = decode_image(f.read())
        w, h = lset.records[name].size
        assert arr.shape == (h, w, 3) and arr.dtype == np.uint8
    for path, names in ((lset.database_list, lset.imlist), (lset.query_list, lset.qimlist)):
        with open(path) as f:
            lines = f.read().split()
        assert lines == [f"jpg/{n}.jpg" for n in names]
        assert all(os.path.exists(os.path.join(os.path.dirname(path), line)) for line in lines)


def test_labels_follow_the_visible_share_measured_independently(lset):
    views = _landmark_views(lset)
    for r in views:
        visible = _rasterised_visible(lset, r)
        assert visible == pytest.approx(r.visible, abs=0.01), r.name
        x0, y0, x1, y1 = r.window
        corners = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
        warp = float(np.linalg.norm(np.asarray(r.quad) - corners, axis=1).max()) / min(x1 - x0, y1 - y0)
        light = max(abs(math.log(r.light["gamma"])), abs(math.log(r.light["gain"])),
                    abs(math.log(r.light["contrast"])), abs(r.light["temperature"]))
        assert _expected_label(visible, warp, light) == r.role, (r.name, visible, warp, light)
        if r.role == "easy":
            assert r.blur == 0 and r.noise == 0      # easy views are never blurred or noisy
    # Each landmark gets the view_mix it asks for: 3 easy, 2 hard, 1 junk of 6.
    for lm in lset.landmarks:
        roles = sorted(r.role for r in views if r.landmark == lm.index)
        assert roles == ["easy"] * 3 + ["hard"] * 2 + ["junk"]
    # Junk views are slivers; hard views include clearly partial ones and strongly distorted ones.
    assert max(r.visible for r in views if r.role == "junk") < 0.25
    assert any(r.visible < 0.7 for r in views if r.role == "hard")
    assert any(r.visible >= 0.7 for r in views if r.role == "hard")


def test_views_hold_the_pixels_their_records_describe(lset, photos):
    checked = 0
    for r in lset.records.values():
        w, h = r.size
        expected = cv2.warpPerspective(photos[r.photo], np.asarray(r.homography), (w, h), flags=cv2.INTER_LINEAR)
        with open(os.path.join(lset.jpg, r.name + ".jpg"), "rb") as f:
            got = decode_image(f.read())
        keep = np.ones((h, w), bool)
        if r.occluder is not None:
            ox0, oy0, ox1, oy1 = (int(round(v)) for v in r.occluder)
            keep[oy0:oy1, ox0:ox1] = False
        a = expected.mean(axis=2)[keep]
        b = got.astype(np.float64).mean(axis=2)[keep]
        if a.std() < 8:
            continue   # a nearly flat patch: sensor noise alone would swamp a correlation
        checked += 1
        # Relighting is monotonic per channel, so the grey levels stay strongly correlated (blur and
        # sensor noise on hard views take some of it: 0.79 is the lowest seen on this set).
        assert np.corrcoef(a, b)[0, 1] > 0.7, r.name
        # The warped photograph's mean colour is not that of some other place: a shifted window disagrees.
        shifted = np.roll(expected, (h // 2, w // 2), axis=(0, 1)).mean(axis=2)[keep]
        assert np.corrcoef(a, b)[0, 1] > np.corrcoef(shifted, b)[0, 1]
    assert checked >= 0.9 * len(lset.records)


def test_query_boxes_surround_the_whole_landmark_inside_its_surroundings(lset):
    for name in lset.qimlist:
        r = lset.records[name]
        lm = lset.landmarks[r.landmark]
        assert _rasterised_visible(lset, r) == pytest.approx(1.0, abs=0.005)
        x0, y0, x1, y1 = lm.box
        corners = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float64).reshape(-1, 1, 2)
        mapped = cv2.perspectiveTransform(corners, np.asarray(r.homography)).reshape(-1, 2)
        assert r.bbx == pytest.approx([*mapped.min(axis=0), *mapped.max(axis=0)], abs=1e-3)
        w, h = r.size
        bx0, by0, bx1, by1 = r.bbx
        assert 0 <= bx0 < bx1 <= w and 0 <= by0 < by1 <= h
        # The query shows surroundings that the box crop removes.
        assert (bx1 - bx0) * (by1 - by0) < 0.8 * w * h


def test_distractor_photographs_never_hold_a_landmark(lset):
    landmark_photos = {lm.photo for lm in lset.landmarks}
    assert lset.photos["distractors"] and not landmark_photos & set(lset.photos["distractors"])
    for r in lset.records.values():
        if r.role == "distractor":
            assert r.photo in lset.photos["distractors"] and r.landmark == -1
        else:
            assert r.photo == lset.landmarks[r.landmark].photo
    # Every view stays inside its landmark's site and sites never overlap: no image of one landmark
    # shows a pixel of another.
    for r in lset.records.values():
        if r.role != "distractor":
            sx0, sy0, sx1, sy1 = lset.landmarks[r.landmark].site
            q = np.asarray(r.quad)
            assert (q[:, 0] >= sx0).all() and (q[:, 0] <= sx1).all() and (q[:, 1] >= sy0).all() and (q[:, 1] <= sy1).all()
    for a in lset.landmarks:
        for b in lset.landmarks:
            if a.index < b.index and a.photo == b.photo:
                w = min(a.site[2], b.site[2]) - max(a.site[0], b.site[0])
                h = min(a.site[3], b.site[3]) - max(a.site[1], b.site[1])
                assert w <= 0 or h <= 0


def test_same_seed_same_files_other_seed_other_set(tmp_path, photos):
    small = LandmarkSetConfig(n_landmarks=4, views_per_landmark=4, n_distractors=6, distractor_photos=2, seed=5)
    a = write_landmark_set(str(tmp_path / "a"), small, photos)
    b = write_landmark_set(str(tmp_path / "b"), small, photos)
    c = write_landmark_set(str(tmp_path / "c"), LandmarkSetConfig(**{**small.__dict__, "seed": 6}), photos)

    def contents(folder: str) -> dict[str, bytes]:
        out = {}
        for root, _, files in os.walk(folder):
            for f in files:
                path = os.path.join(root, f)
                out[os.path.relpath(path, folder)] = open(path, "rb").read()
        return out

    ca, cb = contents(a.folder), contents(b.folder)
    assert len(ca) == 4 * 4 + 6 + 4 + 4 and ca == cb
    assert contents(c.folder)["gnd_synthlandmarks.pkl"] != ca["gnd_synthlandmarks.pkl"]


def test_revisitop_map_is_one_on_the_ground_truth_order_and_low_at_random(lset):
    gnd = read_revisited_ground_truth(lset.gnd)
    index_of = {name: i for i, name in enumerate(gnd.imlist)}
    rng = np.random.default_rng(0)
    exact = []
    for q in gnd.queries:
        # Built from the generator's records, not from the pickle: the pickle must agree with them.
        lm = lset.records[q.name].landmark
        by_role = {role: [index_of[r.name] for r in lset.records.values() if r.landmark == lm and r.role == role]
                   for role in ("easy", "hard", "junk")}
        first = by_role["easy"] + by_role["hard"] + by_role["junk"]
        rest = [i for i in rng.permutation(len(gnd.imlist)).tolist() if i not in set(first)]
        exact.append(np.asarray(first + rest))
    metrics = revisited_metrics(exact, [q.as_dict() for q in gnd.queries])
    assert metrics.map == pytest.approx({"easy": 1.0, "medium": 1.0, "hard": 1.0})
    assert metrics.n_queries == {"easy": 8, "medium": 8, "hard": 8}
    # Junk first: every protocol ignores junk, so all stay perfect (junk read as negatives would not).
    junk_first = []
    for q, r in zip(gnd.queries, exact):
        junk = set(q.junk.tolist())
        junk_first.append(np.asarray([i for i in r if i in junk] + [i for i in r if i not in junk]))
    assert revisited_metrics(junk_first, [q.as_dict() for q in gnd.queries]).map == pytest.approx(
        {"easy": 1.0, "medium": 1.0, "hard": 1.0})
    # Ten negatives first: every protocol drops.
    negatives_first = [np.concatenate([r[len(r) - 10:], r[: len(r) - 10]]) for r in exact]
    assert revisited_metrics(negatives_first, [q.as_dict() for q in gnd.queries]).map["medium"] < 0.5
    random_maps = [revisited_metrics([rng.permutation(len(gnd.imlist)) for _ in gnd.queries],
                                     [q.as_dict() for q in gnd.queries]).map for _ in range(5)]
    assert np.mean([m["medium"] for m in random_maps]) < 0.25
    assert np.mean([m["hard"] for m in random_maps]) < 0.2


@pytest.mark.parametrize("change, message", [
    ({"n_landmarks": 0}, "n_landmarks"),
    ({"views_per_landmark": 0}, "views_per_landmark"),
    ({"n_distractors": 5, "distractor_photos": 0}, "distractor_photos"),
    ({"quality": 0}, "quality"),
    ({"junk_below": 0.8}, "junk_below"),
    ({"visible_junk": (0.1, 0.3)}, "visible_junk"),
    ({"strong_warp": (0.02, 0.1)}, "strong ranges"),
    ({"context": 0.02}, "context"),
    ({"view_mix": (0.0, 0.0, 0.0)}, "view_mix"),
    ({"name": "a/b"}, "name"),
    ({"scale": (1.5, 1.0)}, "scale"),
])
def test_config_rejects_bad_settings(change, message):
    with pytest.raises(ValueError, match=message):
        LandmarkSetConfig(**change)


def test_too_few_photographs_are_refused(tmp_path, photos):
    two = {k: photos[k] for k in sorted(photos)[:2]}
    with pytest.raises(ValueError, match="distractor_photos"):
        write_landmark_set(str(tmp_path), LandmarkSetConfig(distractor_photos=2), two)
    with pytest.raises(ValueError, match="uint8"):
        write_landmark_set(str(tmp_path), CONFIG, {"a": np.zeros((64, 64), np.uint8), **photos})
