"""The local-feature second stage: matching, geometric verification and the fused score."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from raysearch.formats.local import LocalFeatureFile, write_local_features
from raysearch.models.local import LocalFeatures, SiftExtractor, extract_mirrored
from raysearch.verify import (
    FusionConfig,
    GeometryConfig,
    RatioMatcher,
    Verifier,
    VerifyConfig,
    evidence_bonus,
    exclusive_scores,
    fuse_scores,
    geometric_evidence,
    mirror_mode,
    ratio_matches,
    verify_geometry,
)
from raysearch.verify.geometry import plausible_mapping

# A homography that scales, shears, rotates a little and adds keystone (a photographed screen).
H_TRUE = np.array([[0.85, 0.12, 25.0], [-0.08, 0.9, 18.0], [2.5e-4, 1.2e-4, 1.0]])


@pytest.fixture(scope="module")
def sift() -> SiftExtractor:
    return SiftExtractor(max_keypoints=400, max_side=384)


def _warped(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    return cv2.warpPerspective(img, H_TRUE, (w, h), flags=cv2.INTER_LINEAR)


def test_a_warped_copy_verifies_with_many_inliers_and_unrelated_images_with_few(photos, sift):
    query = sift.extract(_warped(photos["astronaut"]))
    names = ["astronaut", "camera", "coffee", "chelsea", "rocket", "brick", "motorcycle"]
    result = Verifier().verify(query, [sift.extract(photos[n]) for n in names], np.full(len(names), 0.5))
    assert result.n_inliers[0] >= 100, result.n_inliers
    assert result.geometries[0].model == "homography" and result.verified[0]
    assert result.n_inliers[1:].max() <= 8, result.n_inliers
    assert not result.verified[1:].any()
    # The fitted mapping (query pixels -> reference pixels) is the inverse of the warp.
    h, w = photos["astronaut"].shape[:2]
    corners = np.array([[[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]]], np.float64)
    fitted = cv2.perspectiveTransform(corners, result.geometries[0].matrix)
    truth = cv2.perspectiveTransform(corners, np.linalg.inv(H_TRUE))
    assert np.abs(fitted - truth).max() < 4.0


def test_a_verified_copy_ranks_above_an_unverified_look_alike(photos, sift):
    photo = photos["astronaut"]
    original, look_alike = photo[:256, :256], photo[256:, 256:]   # two crops that share no pixel
    query = sift.extract(_warped(original))
    candidates = [sift.extract(look_alike), sift.extract(original)]
    global_scores = np.array([0.92, 0.61], np.float32)            # the look-alike looks closer globally
    result = Verifier().verify(query, candidates, global_scores)
    assert result.verified.tolist() == [False, True]
    assert result.order().tolist() == [1, 0]
    assert result.fused[0] == pytest.approx(0.92, abs=0.01)      # next to no evidence: about its global score
    assert result.fused[1] > 1.5 and result.scores[1] == result.fused[1]
    # The exclusive rule: the query's copy is found, so the look-alike drops by the fusion's bonus.
    assert result.scores[0] == pytest.approx(result.fused[0] - FusionConfig().bonus)


def test_a_mirrored_copy_verifies_under_fallback_but_not_with_the_mirror_off(photos, sift):
    img = photos["chelsea"]
    flipped = np.ascontiguousarray(img[:, ::-1])
    ref, other = sift.extract(img), sift.extract(photos["coffee"])
    query = sift.extract(flipped)
    verifier = Verifier()
    off = verifier.verify(query, [ref, other], [0.5, 0.5], mirror="off")
    fallback = verifier.verify(query, [ref, other], [0.5, 0.5])        # the default; RootSIFT mirrored by permutation
    extracted = verifier.verify(query, [ref, other], [0.5, 0.5], mirrored=extract_mirrored(sift, flipped),
                                mirror="always")
    assert off.n_inliers[0] <= 8 and not off.verified.any() and not off.mirror_matched
    assert not off.mirrored.any()
    assert fallback.mirror_matched and fallback.verified.tolist() == [True, False]
    assert fallback.n_inliers[0] >= 60 and fallback.n_inliers[1] <= 8, fallback.n_inliers
    assert fallback.mirrored.tolist() == [True, False]
    # The permuted mirror verifies about as well as the mirror image's own features.
    assert extracted.mirrored.tolist() == [True, False]
    assert fallback.n_inliers[0] >= 0.7 * extracted.n_inliers[0], (fallback.n_inliers, extracted.n_inliers)
    # The reported mapping is from the query's own pixels: the flip, x -> w - 1 - x.
    h, w = img.shape[:2]
    pts = np.array([[[10.0, 20.0], [300.0, 200.0]]])
    for result in (fallback, extracted):
        np.testing.assert_allclose(cv2.perspectiveTransform(pts, result.geometries[0].matrix)[0],
                                   [[w - 1 - 10.0, 20.0], [w - 1 - 300.0, 200.0]], atol=2.0)


class CountingMatcher:
    """A RatioMatcher that counts the query sides it is asked to match."""

    kind = "rootsift"

    def __init__(self):
        self.inner = RatioMatcher()
        self.sides = 0

    def match_many(self, query, candidates):
        self.sides += 1
        return self.inner.match_many(query, candidates)


def test_fallback_matches_the_mirror_only_when_nothing_verified_directly(photos, sift):
    img = photos["coffee"]
    query = sift.extract(_warped(img))                       # a copy of coffee, not flipped
    candidates = [sift.extract(photos["rocket"]), sift.extract(img)]

    def never() -> LocalFeatures:
        raise AssertionError("the mirror's features were made though no mirror side was matched")

    counting = CountingMatcher()
    found = Verifier(matcher=counting).verify(query, candidates, [0.6, 0.5], mirrored=never, mirror="fallback")
    assert found.verified.tolist() == [False, True]
    assert counting.sides == 1 and not found.mirror_matched and not found.mirrored.any()
    # Nothing verifies directly (the copy is not among the candidates): the mirror side is matched.
    counting.sides = 0
    missed = Verifier(matcher=counting).verify(query, candidates[:1], [0.6], mirror="fallback")
    assert counting.sides == 2 and missed.mirror_matched and not missed.verified.any()
    # "always" matches it whatever the direct side found; a candidate keeps its better side.
    counting.sides = 0
    always = Verifier(matcher=counting).verify(query, candidates, [0.6, 0.5], mirror="always")
    assert counting.sides == 2 and always.mirror_matched
    assert always.n_inliers[1] == found.n_inliers[1] and not always.mirrored[1]


def test_mirror_choices_are_checked(photos, sift):
    assert [mirror_mode(m) for m in ("off", "fallback", "always", False, True)] == \
        ["off", "fallback", "always", "off", "always"]
    query = sift.extract(photos["camera"])
    with pytest.raises(ValueError, match="mirror must be one of 'off', 'fallback', 'always', got 'sometimes'"):
        Verifier().verify(query, [query], [0.5], mirror="sometimes")
    z = np.zeros(1, np.float32)
    aliked = LocalFeatures(np.zeros((1, 2), np.float32), z, z, z, np.zeros((1, 128), np.float16), (5, 5), "aliked")
    with pytest.raises(ValueError, match="needs the mirror image's features for aliked queries"):
        Verifier().verify(aliked, [aliked], [0.5], mirror="fallback")
    with pytest.raises(ValueError, match="mirrored features must be of the query's kind and image size"):
        Verifier().verify(query, [query], [0.5], mirrored=sift.extract(photos["coffee"]), mirror="always")


def test_the_exclusive_rule_keeps_each_querys_order_and_ranks_explained_leftovers_below_open_queries(photos, sift):
    """Query A's copy is among its candidates and verifies; query B's is not (or did not verify).
    A's unverified candidates, globally closer than B's, drop below them in the pooled ranking,
    and each query's own order stays what the fused scores give."""
    names = ["rocket", "camera", "brick", "coffee", "motorcycle"]
    refs = {n: sift.extract(photos[n]) for n in names}
    query_a = sift.extract(_warped(photos["coffee"]))
    query_b = sift.extract(_warped(photos["astronaut"]))      # its photograph is not a candidate
    a_scores = np.float32([0.95, 0.9, 0.85, 0.6, 0.8])          # A's leftovers look closer than B's
    b_scores = np.float32([0.7, 0.65, 0.6, 0.55, 0.5])
    a_candidates = [refs[n] for n in names]
    b_candidates = [refs[n] for n in names]
    exclusive, plain = Verifier(), Verifier(VerifyConfig(fusion=FusionConfig(exclusive=False)))
    a, a_plain = exclusive.verify(query_a, a_candidates, a_scores), plain.verify(query_a, a_candidates, a_scores)
    b, b_plain = exclusive.verify(query_b, b_candidates, b_scores), plain.verify(query_b, b_candidates, b_scores)
    assert a.verified.tolist() == [False, False, False, True, False] and not b.verified.any()
    # Each query's own order is unchanged by the rule.
    assert a.order().tolist() == a_plain.order().tolist() and a.order()[0] == 3
    assert b.order().tolist() == b_plain.order().tolist()
    np.testing.assert_array_equal(a.fused, a_plain.scores)
    np.testing.assert_array_equal(b.scores, b_plain.scores)   # nothing verified: nothing moves
    leftovers = a.scores[~a.verified]
    # Without the rule A's leftovers outrank B's candidates in a pooled ranking; with it, below all.
    assert a_plain.scores[~a.verified].max() > b_plain.scores.min()
    assert leftovers.max() < b.scores.min()
    np.testing.assert_allclose(leftovers, a.fused[~a.verified] - FusionConfig().bonus, rtol=0, atol=1e-6)
    assert a.scores[3] == a.fused[3] > b.scores.max()


def test_exclusive_scores_lower_only_unverified_scores_below_every_verified_one():
    fused = np.float32([1.8, 0.9, 1.2, 0.4, np.nan])
    verified = np.array([True, False, True, False, False])
    np.testing.assert_allclose(exclusive_scores(fused, verified), [1.8, -0.1, 1.2, -0.6, np.nan], atol=1e-6)
    # An unverified score above a verified one stays (the query's order is kept).
    np.testing.assert_array_equal(exclusive_scores(np.float32([0.95, 0.6]), np.array([False, True])),
                                  np.float32([0.95, 0.6]))
    np.testing.assert_array_equal(exclusive_scores(fused, np.zeros(5, bool)), fused)          # none verified
    off = FusionConfig(exclusive=False)
    np.testing.assert_array_equal(exclusive_scores(fused, verified, off), fused)
    np.testing.assert_allclose(exclusive_scores(fused, verified, FusionConfig(bonus=0.5))[[1, 3]], [0.4, -0.1],
                               atol=1e-6)
    with pytest.raises(ValueError, match="exclusive must be True or False, got 'yes'"):
        FusionConfig(exclusive="yes")


def test_stored_candidates_verify_exactly_like_fresh_ones(tmp_path, photos, sift):
    refs = [sift.extract(photos[n]) for n in ("astronaut", "coffee", "rocket")]
    uri = str(tmp_path / "shard.local.parquet")
    write_local_features(uri, [10, 11, 12], refs)
    store = LocalFeatureFile(uri)
    query = sift.extract(_warped(photos["coffee"]))
    verifier = Verifier()
    fresh = verifier.verify(query, refs, [0.3, 0.4, 0.2])
    stored = verifier.verify(query, store.get_many([10, 11, 12]), [0.3, 0.4, 0.2])
    assert fresh.n_inliers.tolist() == stored.n_inliers.tolist() and fresh.n_inliers[1] > 50
    np.testing.assert_array_equal(fresh.scores, stored.scores)


def test_candidates_without_features_keep_their_global_score(photos, sift):
    query = sift.extract(photos["camera"])
    candidates = [None, sift.extract(photos["camera"]), None]
    result = Verifier().verify(query, candidates, [0.7, 0.5, 0.3])
    assert result.n_inliers.tolist()[0::2] == [0, 0] and result.n_inliers[1] > 100
    np.testing.assert_array_equal(result.fused[0::2], np.float32([0.7, 0.3]))
    # Unverified like any other: the exclusive rule lowers them once a candidate verified.
    np.testing.assert_allclose(result.scores[0::2], [-0.3, -0.7], atol=1e-6)
    plain = Verifier(VerifyConfig(fusion=FusionConfig(exclusive=False))).verify(query, candidates, [0.7, 0.5, 0.3])
    np.testing.assert_array_equal(plain.scores[0::2], np.float32([0.7, 0.3]))
    with pytest.raises(ValueError, match="3 candidates but 2 global scores"):
        Verifier().verify(query, [None, None, None], [0.1, 0.2])


def test_ratio_test_and_mutual_check():
    # Query 0: nearest 0.9, second 0.1 -> distinct. Query 1: 0.80 vs 0.79 -> ambiguous.
    # Query 2: best is candidate 0, but query 0 is more similar to it -> not mutual.
    sim = np.array([[0.90, 0.10, 0.00], [0.05, 0.80, 0.79], [0.85, 0.20, 0.10]], np.float32)
    assert ratio_matches(sim[:, None, :].copy(), 0.8, True)[0].tolist() == [[0, 0]]
    assert ratio_matches(sim[:, None, :].copy(), 0.8, False)[0].tolist() == [[0, 0], [2, 0]]
    # A looser ratio lets query 1's ambiguous nearest through.
    assert [1, 1] in ratio_matches(sim[:, None, :].copy(), 1.0, False)[0].tolist()


def test_geometry_falls_back_to_affine_with_few_matches_and_refuses_folds():
    rng = np.random.default_rng(3)
    src = rng.uniform(0, 400, size=(7, 2)).astype(np.float32)
    A = np.array([[0.7, -0.2, 30.0], [0.2, 0.7, 10.0]])
    dst = (src @ A[:, :2].T + A[:, 2]).astype(np.float32)
    geo = verify_geometry(src, dst, (400, 400), (400, 400))
    assert geo.model == "affine" and geo.n_inliers == 7
    assert verify_geometry(src[:2], dst[:2], (400, 400), (400, 400)).model == "none"
    fold = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [-0.004, 0.0, 1.0]])   # sends x = 250 to infinity
    assert not plausible_mapping(fold, (512, 512), 400.0)
    assert plausible_mapping(np.eye(3), (300, 500), 400.0)
    assert not plausible_mapping(np.diag([-1.0, 1.0, 1.0]) + np.array([[0, 0, 500.0], [0, 0, 0], [0, 0, 0]]),
                                 (300, 500), 400.0)                             # a mirror image
    assert not plausible_mapping(np.diag([0.01, 0.01, 1.0]), (512, 512), 400.0)   # area / 10,000


def test_fusion_is_bounded_saturating_and_leaves_chance_evidence_alone():
    cfg = FusionConfig()
    evidence = np.linspace(0, 200, 801)
    bonus = evidence_bonus(evidence, cfg)
    assert np.all(np.diff(bonus) >= 0) and bonus.max() <= cfg.bonus and bonus[-1] > 0.99 * cfg.bonus
    assert np.all(bonus[evidence <= cfg.chance] == 0) and np.all(bonus[evidence > cfg.chance] > 0)
    # Evidence is inliers weighted by the inlier ratio: 20 of 25 matches beat 20 of 400.
    np.testing.assert_allclose(geometric_evidence(np.array([20, 20, 0]), np.array([25, 400, 0])), [16.0, 1.0, 0.0])
    g = np.float32([0.3, 0.3, 0.95])
    fused = fuse_scores(g, np.array([20, 20, 3]), np.array([25, 400, 30]), cfg)
    assert fused[1] == g[1] and fused[2] == g[2]                # chance evidence: global score kept
    # Comparable across queries: a clearly verified pair of one query outranks an unverified pair
    # of another, whatever their global scores (cosines in [0, 1]).
    assert fused[0] > 1.0 >= fused[2]
    with pytest.raises(ValueError, match="saturation must be > 0, got 0"):
        FusionConfig(saturation=0)
    with pytest.raises(ValueError, match="inlier counts must lie between 0 and the match counts"):
        geometric_evidence(np.array([5]), np.array([4]))
    with pytest.raises(ValueError, match="threshold must be > 0, got -1"):
        GeometryConfig(threshold=-1)
    with pytest.raises(ValueError, match="ratio must be in \\(0, 1\\], got 1.5"):
        Verifier(VerifyConfig(ratio=1.5)).matcher("rootsift")


def test_features_of_another_kind_are_refused(photos, sift):
    query = sift.extract(photos["camera"])
    z = np.zeros(1, np.float32)
    other = LocalFeatures(np.zeros((1, 2), np.float32), z, z, z, np.zeros((1, 128), np.float16), (5, 5), "aliked")
    with pytest.raises(ValueError, match="candidate features are aliked, the query's are rootsift"):
        Verifier().verify(query, [other], [0.1])
