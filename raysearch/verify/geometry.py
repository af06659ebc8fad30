"""Geometric verification: how many putative matches one plane-to-plane mapping explains.

A copy of an image (cropped, scaled, rotated, keystoned, pasted onto something) maps onto its
original by a homography, so the number of matches consistent with one homography (the
inliers) measures how much of the query is a copy; matches between unrelated pictures agree with
no single mapping. The homography is fitted by OpenCV's USAC MAGSAC++; with fewer than
`min_homography_matches` matches (where a homography fits noise too easily) a 6-parameter affine
map is fitted instead, also by MAGSAC++, and with fewer than 3 matches nothing is. OpenCV's USAC
seeds its own generator, so a pair always gives the same answer.

Both images' keypoints are first scaled so that each image's longer side measures `FRAME` units:
the threshold then means the same for a 200-pixel query and a 4000-pixel reference. Mappings that
fold the picture (the query's corners land as a non-convex or self-intersecting quadrilateral, or
a corner is sent to infinity), mirror it, or change its area by more than `max_area_change` are
refused: MAGSAC finds such models on clustered, repetitive matches, and no edit produces them.
Mirrored copies are found by matching the query's mirror image instead (`Verifier.verify(...,
mirror=...)`); OpenCV's USAC refuses orientation-reversing homographies in any case.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FRAME = 512.0
GEOMETRY_MODELS = ("homography", "affine", "none")


@dataclass(frozen=True)
class Geometry:
    """The result of verifying one pair.

    model: "homography", "affine" or "none"; matrix: (3, 3) float64 from query frame to candidate
    frame (pixels of each image), None when model is "none"; inliers: (m,) bool over the matches.
    """

    model: str
    matrix: np.ndarray | None
    inliers: np.ndarray

    @property
    def n_inliers(self) -> int:
        return int(self.inliers.sum())

    @property
    def inlier_ratio(self) -> float:
        """Inliers over matches (0 without matches)."""
        return float(self.inliers.mean()) if len(self.inliers) else 0.0


@dataclass(frozen=True)
class GeometryConfig:
    threshold: float = 6.0                # reprojection error, in FRAME units (~1.2% of the longer side)
    min_homography_matches: int = 10
    max_iters: int = 1000                 # 2000 gave the same inliers on the tuning set, in twice the time
    confidence: float = 0.999
    max_area_change: float = 400.0        # the query's area may shrink or grow at most this much

    def __post_init__(self) -> None:
        if not self.threshold > 0:
            raise ValueError(f"threshold must be > 0, got {self.threshold!r}")
        if self.min_homography_matches < 4:
            raise ValueError(f"min_homography_matches must be >= 4, got {self.min_homography_matches!r}")
        if self.max_iters < 1:
            raise ValueError(f"max_iters must be >= 1, got {self.max_iters!r}")
        if not 0.0 < self.confidence < 1.0:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence!r}")
        if not self.max_area_change > 1.0:
            raise ValueError(f"max_area_change must be > 1, got {self.max_area_change!r}")


def frame_scale(image_size: tuple[int, int]) -> float:
    """Factor from an image's pixels to the FRAME-unit working frame."""
    return FRAME / float(max(image_size))


def _to_pixels(matrix: np.ndarray, s_query: float, s_cand: float) -> np.ndarray:
    """A mapping between working frames -> the same mapping between the images' pixels."""
    return np.diag([1.0 / s_cand, 1.0 / s_cand, 1.0]) @ matrix @ np.diag([s_query, s_query, 1.0])


def plausible_mapping(matrix: np.ndarray, query_size: tuple[int, int], max_area_change: float) -> bool:
    """Whether a (3, 3) frame-to-frame mapping sends the query's frame to a convex, finite,
    unmirrored quadrilateral whose area is within `max_area_change` of the query's (both in FRAME
    units)."""
    s = frame_scale(query_size)
    h, w = query_size[0] * s, query_size[1] * s
    p = matrix @ np.array([[0.0, w, w, 0.0], [0.0, 0.0, h, h], [1.0, 1.0, 1.0, 1.0]])
    if not np.all(np.isfinite(p)) or np.any(p[2] <= 1e-9):
        return False                       # a corner at or beyond the horizon: a fold
    x, y = p[0] / p[2], p[1] / p[2]
    ex, ey = x[[1, 2, 3, 0]] - x, y[[1, 2, 3, 0]] - y
    turns = ex * ey[[1, 2, 3, 0]] - ey * ex[[1, 2, 3, 0]]
    if not np.all(turns > 0):
        # Concave or self-intersecting: no edit makes that; all turns negative: a mirror image
        # (the identity's turns are all positive), which the query's mirror side handles.
        return False
    area = 0.5 * abs(float(np.dot(x, y[[1, 2, 3, 0]]) - np.dot(x[[1, 2, 3, 0]], y)))
    return 1.0 / max_area_change <= area / (w * h) <= max_area_change


def verify_geometry(query_points: np.ndarray, candidate_points: np.ndarray, query_size: tuple[int, int],
                    candidate_size: tuple[int, int], config: GeometryConfig = GeometryConfig()) -> Geometry:
    """Fit one mapping to matched keypoints and count the matches it explains.

    query_points, candidate_points: (m, 2) float32 (x, y) pixels of the matched keypoints in the
    query and candidate images, row i matched to row i; *_size: (height, width) of each image.
    """
    import cv2

    m = len(query_points)
    none = Geometry("none", None, np.zeros(m, bool))
    if m < 3:
        return none
    sq, sc = frame_scale(query_size), frame_scale(candidate_size)
    src = (np.asarray(query_points, np.float64) * sq).astype(np.float32)
    dst = (np.asarray(candidate_points, np.float64) * sc).astype(np.float32)
    if m >= config.min_homography_matches:
        H, mask = cv2.findHomography(src, dst, cv2.USAC_MAGSAC, config.threshold, maxIters=config.max_iters,
                                     confidence=config.confidence)
        if H is None or mask is None or not plausible_mapping(H, query_size, config.max_area_change):
            return none
        return Geometry("homography", _to_pixels(H, sq, sc), mask.ravel().astype(bool))
    A, mask = cv2.estimateAffine2D(src, dst, method=cv2.USAC_MAGSAC, ransacReprojThreshold=config.threshold,
                                   maxIters=config.max_iters, confidence=config.confidence)
    if A is None or mask is None:
        return none
    A3 = np.vstack([A, [0.0, 0.0, 1.0]])
    if not plausible_mapping(A3, query_size, config.max_area_change):
        return none
    return Geometry("affine", _to_pixels(A3, sq, sc), mask.ravel().astype(bool))
