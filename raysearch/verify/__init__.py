"""The local-feature second stage: verify a search's top candidates with local features and
geometry, and fuse the evidence into scores that stay comparable across queries.

    matching.py   putative matches (RootSIFT: mutual nearest neighbours + ratio test; ALIKED: LightGlue)
    geometry.py   one homography (MAGSAC++) or, with few matches, an affine map; inlier counts
    fusion.py     global + a bounded, saturating bonus for geometric evidence beyond chance; the
                  exclusive rule (a query's unverified candidates drop once one verifies)
    verifier.py   the Verifier that runs the three for one query and its candidates, and matches
                  the query's mirror image too (MIRROR_MODES: "off", "fallback", "always")

Features come from `raysearch.models.local` (extraction) and `raysearch.formats.local` (the
references' stored features). Nothing here knows about indexes, Ray or serving.

Measured (SIFT defaults: 384 px, contrast 0.01, 256 keypoints; ratio 0.9; 6-unit threshold;
1000 MAGSAC iterations; default fusion), on copy-detection sets cut from the judging photographs
(`write_copy_detection_set`, 300 queries of which 150 copies, the whole edit suite, default
model, exact cosine search, top 20 verified, ISC2021 metrics over the pooled top-20 predictions):

    set (references)       global only            verified + fused       + query mirror
                           micro-AP  R@1   R@P90  micro-AP  R@1   R@P90  micro-AP  R@1   R@P90
    seed 0 (307)           0.477   0.733  0.193   0.817   0.860  0.753   0.844   0.880  0.800
    seed 1 (325)           0.576   0.753  0.327   0.843   0.840  0.787   0.851   0.840  0.813
    seed 2, small crops    0.377   0.713  0.067   0.732   0.780  0.587   0.756   0.767  0.667
      (510)

The copy is among the top 20 for 145, 141 and 140 of the 150 queries (micro-AP ceilings 0.97, 0.94, 0.93);
most of the copies left unverified come from flat crops with next to no keypoints (a 48-pixel
crop of scikit-image's colour wheel) or from pixelation. Fusions compared on the same pairs
(seed 0, without / with mirror): linear 0.02 * min(inliers, 50) 0.802 / 0.827; a step of +1 at
12 inliers 0.791 / 0.811; saturating in raw inliers (no ratio weighting) 0.770 / 0.803; inliers
alone 0.694 / 0.748; pushing down unverified pairs that had keypoints enough to verify lowered
micro-AP on the tuning set (0.797 -> 0.75-0.79).

Time on this 2-core machine (shared with other work, load 5-7), BLAS on one thread: SIFT
extraction 34-47 ms of CPU an image; verifying a query's top 20: median 21-28 ms wall (15-17 ms
CPU, under 1 ms a pair), 35-56 ms wall (24-31 ms CPU) with the query's mirror; reading 20
candidates from a stored file once its row groups are cached: 0.4-0.9 ms. With OpenBLAS's
default two threads on the loaded machine the same verification took 51 ms: run it with one BLAS
thread per process (OPENBLAS_NUM_THREADS=1). Stored features: 24 KB an image (LZ4). ALIKED +
LightGlue on the same CPU: 2.4 s of CPU an image, 2.6 s a pair.

The defaults since (the figures above predate them; `benchmarks/rerank.py` has rows for both, and
new end-to-end figures await its next run). Three changes, measured offline on the inlier and
match counts of every verified pair of the benchmark's two copy-detection sets ("default": 306
references, 300 queries; "harder": 402 references, 400 queries, crops of 8-30%; micro-AP of the
pooled top-10 predictions, top 20 verified):

- the query's mirror for RootSIFT is its features permuted (`raysearch.models.local.mirror_features`),
  not a second extraction: micro-AP 0.857 / 0.794 against 0.857 / 0.796 with the mirror
  extracted anew, matched for every query;
- the mirror is matched only when no candidate verified directly (mirror "fallback"): the same
  micro-AP as matching it always (0.857 / 0.794), matching it for the queries that need it;
- the exclusive rule (`fusion.FusionConfig.exclusive`): 0.857 -> 0.872 and 0.794 -> 0.819 with the
  mirror fallback.

Together, top 20 verified: global only 0.490 -> 0.872 on the default set (1.78x; the previous
defaults, no mirror and no exclusive rule, 0.841), 0.402 -> 0.819 on the harder one (2.04x; 0.773);
top 50: 0.883 and 0.835.
"""

from raysearch.verify.fusion import (
    FusionConfig,
    evidence_bonus,
    exclusive_scores,
    fuse_scores,
    geometric_evidence,
)
from raysearch.verify.geometry import FRAME, Geometry, GeometryConfig, verify_geometry
from raysearch.verify.matching import LightGlueMatcher, Matcher, RatioMatcher, make_matcher, ratio_matches
from raysearch.verify.verifier import (
    DEFAULT_MIRROR,
    MIRROR_MODES,
    Verification,
    Verifier,
    VerifyConfig,
    mirror_mode,
)

__all__ = [
    "DEFAULT_MIRROR", "FRAME", "FusionConfig", "Geometry", "GeometryConfig", "LightGlueMatcher", "MIRROR_MODES",
    "Matcher", "RatioMatcher", "Verification", "Verifier", "VerifyConfig", "evidence_bonus", "exclusive_scores",
    "fuse_scores", "make_matcher", "geometric_evidence", "mirror_mode", "ratio_matches", "verify_geometry",
]
