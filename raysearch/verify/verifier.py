"""The Verifier: a query's local features against its candidates' -> matches, inliers, fused scores."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from raysearch.models.local import LocalFeatures, mirror_features
from raysearch.verify.fusion import FusionConfig, exclusive_scores, fuse_scores
from raysearch.verify.geometry import Geometry, GeometryConfig, verify_geometry
from raysearch.verify.matching import Matcher, make_matcher


# When the query's mirror image is matched too (finds left-right and up-down flipped copies):
# "off" never; "fallback" only for a query whose direct side verified no candidate (a query copies
# one picture: one that verified needs no mirror), each candidate then keeping the side with more
# inliers; "always" for every candidate, the same way. "fallback" found as many flipped copies as
# "always" on benchmarks/rerank.py's two copy-detection sets (micro-AP 0.857 and 0.794 either way)
# and matches the mirror only for the queries that verified nothing.
MIRROR_MODES = ("off", "fallback", "always")
DEFAULT_MIRROR = "fallback"


def mirror_mode(value: str | bool, setting: str = "mirror") -> str:
    """A mirror choice checked: one of MIRROR_MODES. False and True (the former on/off switch,
    and what YAML reads `off`/`on` as) mean "off" and "always". Raises ValueError naming `setting`."""
    if value is False or value is True:
        return "always" if value else "off"
    if isinstance(value, str) and value in MIRROR_MODES:
        return value
    raise ValueError(f"{setting} must be one of {', '.join(repr(m) for m in MIRROR_MODES)}, got {value!r}")


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
    (int32), inlier_ratio, global_scores, fused (global + evidence bonus) and scores (fused after
    the exclusive rule: what ranks) (float32), verified (bool: inliers >= fusion.min_inliers) and
    mirrored (bool: the evidence came from the query's mirror image; its matches then index the
    mirrored features). `mirror_matched`: whether the mirror side was matched at all. `seconds`:
    time spent matching and fitting (and making the mirror's features, when that was needed)."""

    matches: list[np.ndarray]
    geometries: list[Geometry]
    n_matches: np.ndarray
    n_inliers: np.ndarray
    inlier_ratio: np.ndarray
    global_scores: np.ndarray
    fused: np.ndarray
    scores: np.ndarray
    verified: np.ndarray
    mirrored: np.ndarray
    mirror_matched: bool
    seconds: dict[str, float]

    def order(self) -> np.ndarray:
        """Candidate positions by decreasing score (ties by fused score, then the first stage's
        order), which keeps the order of the fused scores: the exclusive rule lowers only
        candidates below every verified one, all by the same amount."""
        return np.lexsort((-self.fused, -self.scores))


def _check_mirrored(query: LocalFeatures, mirrored: LocalFeatures) -> None:
    if mirrored.kind != query.kind or mirrored.image_size != query.image_size:
        raise ValueError("mirrored features must be of the query's kind and image size")


def _mirror_geometry(geo: Geometry, width: int) -> Geometry:
    """A mapping from the mirror image's pixels -> the same from the original's (x -> w - 1 - x)."""
    if geo.matrix is None:
        return geo
    flip = np.array([[-1.0, 0.0, width - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    return Geometry(geo.model, geo.matrix @ flip, geo.inliers)


class Verifier:
    """Verifies a query's candidates with local features and fuses the evidence into their scores.

    Candidates without stored features (None) are left unverified and keep their global score
    (lowered by the exclusive rule when another candidate of the query verifies).
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
               global_scores: Sequence[float] | np.ndarray,
               mirrored: LocalFeatures | Callable[[], LocalFeatures] | None = None,
               mirror: str = DEFAULT_MIRROR) -> Verification:
        """query: the query's features; candidates: each candidate's (or None); global_scores: (n,)
        their first-stage similarities. Returns a Verification in the candidates' order, scored
        by fusion (`fuse_scores`) and the exclusive rule (`exclusive_scores`).

        mirror: when to match the query's mirror image too, to find flipped copies (MIRROR_MODES):
        "off", "fallback" (only when no candidate verified directly) or "always"; a candidate
        matched on both sides keeps the side with more inliers. mirrored: the mirror image's
        features, or a function that makes them (called only when the mirror side is matched);
        None makes them from `query` by `mirror_features` (RootSIFT; other kinds must give them,
        e.g. `lambda: extract_mirrored(extractor, rgb)`, unless mirror is "off")."""
        mirror = mirror_mode(mirror)
        g = np.asarray(global_scores, np.float32).reshape(-1)
        n = len(candidates)
        if len(g) != n:
            raise ValueError(f"{n} candidates but {len(g)} global scores")
        for c in candidates:
            if c is not None and c.kind != query.kind:
                raise ValueError(f"candidate features are {c.kind}, the query's are {query.kind}")
        if mirror != "off" and mirrored is None:
            if query.kind != "rootsift":
                raise ValueError(f"mirror={mirror!r} needs the mirror image's features for {query.kind} queries "
                                 "(mirrored=, e.g. from extract_mirrored), or mirror='off'")
            mirrored = partial(mirror_features, query)
        if isinstance(mirrored, LocalFeatures):
            _check_mirrored(query, mirrored)
        present = [i for i, c in enumerate(candidates) if c is not None]
        chosen = [c for c in candidates if c is not None]
        matches = [np.zeros((0, 2), np.int32) for _ in range(n)]
        geometries = [Geometry("none", None, np.zeros(0, bool)) for _ in range(n)]
        flipped = np.zeros(n, bool)
        seconds = {"match": 0.0, "geometry": 0.0}
        min_inliers = self.config.fusion.min_inliers
        mirror_matched = False
        if present:
            found, geos, tm, tg = self._side(query, chosen)
            seconds["match"] += tm
            seconds["geometry"] += tg
            for i, m, geo in zip(present, found, geos):
                matches[i], geometries[i] = m, geo
            direct_verified = any(geo.n_inliers >= min_inliers for geo in geos)
            if mirror == "always" or (mirror == "fallback" and not direct_verified):
                mirror_matched = True
                if callable(mirrored):
                    start = time.perf_counter()
                    mirrored = mirrored()
                    seconds["mirror_features"] = time.perf_counter() - start
                    _check_mirrored(query, mirrored)
                found, geos, tm, tg = self._side(mirrored, chosen)
                seconds["match"] += tm
                seconds["geometry"] += tg
                for i, m, geo in zip(present, found, geos):
                    if geo.n_inliers > geometries[i].n_inliers:
                        matches[i], geometries[i] = m, _mirror_geometry(geo, query.image_size[1])
                        flipped[i] = True
        n_inliers = np.array([geo.n_inliers for geo in geometries], np.int32)
        n_matches = np.array([len(p) for p in matches], np.int32)
        fused = fuse_scores(g, n_inliers, n_matches, self.config.fusion)
        verified = n_inliers >= min_inliers
        return Verification(
            matches=matches, geometries=geometries, n_matches=n_matches, n_inliers=n_inliers,
            inlier_ratio=np.array([geo.inlier_ratio for geo in geometries], np.float32),
            global_scores=g, fused=fused, scores=exclusive_scores(fused, verified, self.config.fusion),
            verified=verified, mirrored=flipped, mirror_matched=mirror_matched, seconds=seconds,
        )
