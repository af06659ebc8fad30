"""The Verifier: a query's local features against its candidates' -> matches, inliers, fused scores."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from raysearch.models.local import LocalFeatures
from raysearch.verify.fusion import FusionConfig, fuse_scores
from raysearch.verify.geometry import Geometry, GeometryConfig, verify_geometry
from raysearch.verify.matching import Matcher, make_matcher


@dataclass(frozen=True)
class VerifyConfig:
    """Settings of the second stage: the matcher's (ratio, mutual: RootSIFT only), the geometry's
    and the fusion's."""

    ratio: float = 0.9
    mutual: bool = True
    geometry: GeometryConfig = field(default_factory=GeometryConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)


@dataclass
class Verification:
    """Per candidate, in the order given: (m, 2) int32 matches (query keypoint, candidate keypoint),
    the fitted Geometry (query pixels -> candidate pixels), and (n,) arrays: n_matches, n_inliers
    (int32), inlier_ratio, global_scores and scores (fused) (float32), verified (bool: inliers >=
    fusion.min_inliers) and mirrored (bool: the evidence came from the query's mirror image; its
    matches then index the mirrored features). `seconds`: time spent matching and fitting."""

    matches: list[np.ndarray]
    geometries: list[Geometry]
    n_matches: np.ndarray
    n_inliers: np.ndarray
    inlier_ratio: np.ndarray
    global_scores: np.ndarray
    scores: np.ndarray
    verified: np.ndarray
    mirrored: np.ndarray
    seconds: dict[str, float]

    def order(self) -> np.ndarray:
        """Candidate positions by decreasing fused score (stable: ties keep the first stage's order)."""
        return np.argsort(-self.scores, kind="stable")


def _mirror_geometry(geo: Geometry, width: int) -> Geometry:
    """A mapping from the mirror image's pixels -> the same from the original's (x -> w - 1 - x)."""
    if geo.matrix is None:
        return geo
    flip = np.array([[-1.0, 0.0, width - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    return Geometry(geo.model, geo.matrix @ flip, geo.inliers)


class Verifier:
    """Verifies a query's candidates with local features and fuses the evidence into their scores.

    Candidates without stored features (None) are left unverified and keep their global score.
    The matcher follows the features' kind (RootSIFT: ratio test; ALIKED: LightGlue) unless one
    is given.
    """

    def __init__(self, config: VerifyConfig = VerifyConfig(), matcher: Matcher | None = None):
        self.config = config
        self._matchers: dict[str, Matcher] = {} if matcher is None else {matcher.kind: matcher}

    def matcher(self, kind: str) -> Matcher:
        if kind not in self._matchers:
            options = {"ratio": self.config.ratio, "mutual": self.config.mutual} if kind == "rootsift" else {}
            self._matchers[kind] = make_matcher(kind, **options)
        return self._matchers[kind]

    def _side(self, query: LocalFeatures, candidates: list[LocalFeatures]
              ) -> tuple[list[np.ndarray], list[Geometry], float, float]:
        """Matches and geometry of one query side against every candidate, and the seconds each took."""
        t0 = time.perf_counter()
        found = self.matcher(query.kind).match_many(query, candidates)
        t1 = time.perf_counter()
        geos = [verify_geometry(query.keypoints[m[:, 0]], c.keypoints[m[:, 1]], query.image_size, c.image_size,
                                self.config.geometry) for m, c in zip(found, candidates)]
        return found, geos, t1 - t0, time.perf_counter() - t1

    def verify(self, query: LocalFeatures, candidates: Sequence[LocalFeatures | None],
               global_scores: Sequence[float] | np.ndarray, mirrored: LocalFeatures | None = None) -> Verification:
        """query: the query's features; candidates: each candidate's (or None); global_scores: (n,)
        their first-stage similarities; mirrored: optionally, the features of the query's mirror
        image (`raysearch.models.local.extract_mirrored`), to find flipped copies: each candidate
        keeps the side with more inliers. Returns a Verification in the candidates' order."""
        g = np.asarray(global_scores, np.float32).reshape(-1)
        n = len(candidates)
        if len(g) != n:
            raise ValueError(f"{n} candidates but {len(g)} global scores")
        for c in candidates:
            if c is not None and c.kind != query.kind:
                raise ValueError(f"candidate features are {c.kind}, the query's are {query.kind}")
        if mirrored is not None and (mirrored.kind != query.kind or mirrored.image_size != query.image_size):
            raise ValueError("mirrored features must be of the query's kind and image size")
        present = [i for i, c in enumerate(candidates) if c is not None]
        chosen = [c for c in candidates if c is not None]
        matches = [np.zeros((0, 2), np.int32) for _ in range(n)]
        geometries = [Geometry("none", None, np.zeros(0, bool)) for _ in range(n)]
        flipped = np.zeros(n, bool)
        seconds = {"match": 0.0, "geometry": 0.0}
        if present:
            found, geos, tm, tg = self._side(query, chosen)
            seconds["match"] += tm
            seconds["geometry"] += tg
            for i, m, geo in zip(present, found, geos):
                matches[i], geometries[i] = m, geo
            if mirrored is not None:
                found, geos, tm, tg = self._side(mirrored, chosen)
                seconds["match"] += tm
                seconds["geometry"] += tg
                for i, m, geo in zip(present, found, geos):
                    if geo.n_inliers > geometries[i].n_inliers:
                        matches[i], geometries[i] = m, _mirror_geometry(geo, query.image_size[1])
                        flipped[i] = True
        n_inliers = np.array([geo.n_inliers for geo in geometries], np.int32)
        n_matches = np.array([len(p) for p in matches], np.int32)
        return Verification(
            matches=matches, geometries=geometries, n_matches=n_matches, n_inliers=n_inliers,
            inlier_ratio=np.array([geo.inlier_ratio for geo in geometries], np.float32),
            global_scores=g, scores=fuse_scores(g, n_inliers, n_matches, self.config.fusion),
            verified=n_inliers >= self.config.fusion.min_inliers, mirrored=flipped, seconds=seconds,
        )
