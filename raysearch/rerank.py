"""Two-stage search: the global descriptor's shortlist verified with local features and geometry.

    query image -> global embedding -> top `k` candidates of the index (first stage)
                -> local features of the query and of each candidate (stored beside the shards at
                   build time, or extracted from the candidate's uri when the index has none)
                -> matches, a homography / affine fit, inliers (raysearch.verify)
                -> fused score = global + a bounded bonus for geometric evidence; re-ordered

The fused score stays comparable across queries (an unverified hit keeps its global score, or
drops by the fusion's bonus when another candidate of its query verified: the exclusive rule), so
pooled metrics such as ISC2021's micro-AP improve with it (see raysearch.verify.fusion). Flipped
copies are found by matching the query's mirror image too (`RerankConfig.mirror`), by default only
for queries whose candidates all failed directly; RootSIFT's mirror costs no extraction
(raysearch.models.local.mirror_features).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

from raysearch import storage
from raysearch.formats.local import LocalFeatureFile
from raysearch.images import DecodeError, decode_image
from raysearch.index.store import IndexStore
from raysearch.models.local import LocalExtractor, LocalFeatures, make_extractor, query_mirror
from raysearch.verify import DEFAULT_MIRROR, Verifier, VerifyConfig, mirror_mode

log = logging.getLogger("raysearch")

METHODS = ("local",)
# The extractor used when an index records none (it was built without --local): SIFT at the
# settings measured best (raysearch.models.local.SiftExtractor).
DEFAULT_LOCAL = {"name": "sift"}
DEFAULT_RERANK_K = 20
MAX_RERANK_K = 200


@dataclass(frozen=True)
class RerankConfig:
    """How to verify the shortlist: `k` candidates per query (the first stage fetches at least
    that many); `mirror`, when to match the query's mirror image too, to find flipped copies
    (raysearch.verify.MIRROR_MODES): "off", "fallback" (only for a query none of whose candidates
    verified directly; the default) or "always" (twice the matching cost); `verify` the matcher /
    geometry / fusion settings (the exclusive rule among them)."""

    k: int = DEFAULT_RERANK_K
    mirror: str = DEFAULT_MIRROR
    verify: VerifyConfig = field(default_factory=VerifyConfig)

    def __post_init__(self) -> None:
        if not 1 <= self.k <= MAX_RERANK_K:
            raise ValueError(f"--rerank-k must be between 1 and {MAX_RERANK_K}, got {self.k}")
        object.__setattr__(self, "mirror", mirror_mode(self.mirror, "--rerank-mirror"))

    def to_dict(self) -> dict[str, Any]:
        """What reports record of the second stage: method, k, mirror and the exclusive rule."""
        return {"method": "local", "k": self.k, "mirror": self.mirror, "exclusive": self.verify.fusion.exclusive}


def check_method(method: str | None) -> None:
    """Refuse an unknown --rerank value, naming the choices."""
    if method is not None and method not in METHODS:
        raise ValueError(f"--rerank must be one of {METHODS}, got {method!r}")


def local_settings(manifest: dict[str, Any]) -> dict[str, Any]:
    """The local-feature extractor an index's stored features were made with (its manifest's
    "local" record), or the default for an index without any."""
    record = manifest.get("local") or {}
    return dict(record.get("extractor") or DEFAULT_LOCAL)


def extractor_from(settings: dict[str, Any]) -> LocalExtractor:
    """The extractor named by `settings` ({"name": ..., options})."""
    options = {k: v for k, v in settings.items() if k != "name"}
    return make_extractor(str(settings["name"]), **options)


@dataclass
class Reranked:
    """One query's verified shortlist, re-ordered by fused score: positions (into the first
    stage's row), fused scores (float32), verified (bool) and inliers (int32), each (n,)."""

    order: np.ndarray
    scores: np.ndarray
    verified: np.ndarray
    inliers: np.ndarray


class LocalReranker:
    """The second stage for one index: its local features (stored files or extraction from the
    candidates' uris), the query extractor with the same settings, and the Verifier.

    max_cached_row_groups bounds the decoded features kept in memory per shard file (256 images a
    row group, about 26 KB an image decoded); None keeps every group read. `seconds` sums the time
    of each stage, `counts` the queries verified and the pairs matched (direct and mirror side).
    """

    def __init__(self, store: IndexStore, config: RerankConfig = RerankConfig(),
                 max_cached_row_groups: int | None = 64):
        self.store = store
        self.config = config
        self.settings = local_settings(store.manifest)
        self.extractor = extractor_from(self.settings)
        self.verifier = Verifier(config.verify)
        stored = (store.manifest.get("local") or {}).get("files") or {}
        self.files: dict[int, LocalFeatureFile] = {}
        for i, shard in enumerate(store.shards):
            name = stored.get(shard.name)
            if name:
                self.files[i] = LocalFeatureFile(store.local_path(name), max_cached_row_groups=max_cached_row_groups)
        self.missing_shards = [i for i in range(len(store.shards)) if i not in self.files]
        if self.missing_shards:
            log.warning(
                "%d of %d shards of %s hold no stored local features: their candidates' features are "
                "extracted from the images during the search (slower; build with --local to store them)",
                len(self.missing_shards), len(store.shards), store.index_dir,
            )
        self.seconds: dict[str, float] = {}
        # Queries verified, and (query, candidate) pairs matched on the direct and the mirror side.
        self.counts: dict[str, int] = {"queries": 0, "mirror_queries": 0, "pairs": 0, "mirror_pairs": 0}

    @staticmethod
    def check_index(store: IndexStore) -> None:
        """Raise before anything is deployed when `store`'s local features cannot be used here:
        an unknown extractor (ValueError) or one whose optional package is not installed
        (ImportError, naming the extra to install)."""
        extractor_from(local_settings(store.manifest))

    def _time(self, name: str, start: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def query_features(self, data: bytes, box: tuple[float, float, float, float] | None = None
                       ) -> tuple[LocalFeatures, Callable[[], LocalFeatures] | None]:
        """The query image's features and, unless config.mirror is "off", a function that makes
        its mirror image's (called by the Verifier only when it matches the mirror side: permuted
        for RootSIFT, extracted for other kinds); `box` (x1, y1, x2, y2) in original pixels crops
        the query first (revisitop's protocol). Raises DecodeError."""
        start = time.perf_counter()
        if box is None:
            rgb = decode_image(data, draft_size=getattr(self.extractor, "max_side", None))
        else:
            x1, y1, x2, y2 = (int(round(v)) for v in box)
            rgb = decode_image(data)[max(0, y1):max(0, y2), max(0, x1):max(0, x2)]
            if rgb.shape[0] < 1 or rgb.shape[1] < 1:
                raise DecodeError(f"empty crop box {box}")
        query = self.extractor.extract(rgb)
        self._time("extract_query", start)
        if self.config.mirror == "off":
            return query, None
        return query, partial(query_mirror, self.extractor, rgb, query)

    def candidate_features(self, ids: np.ndarray, shards: np.ndarray, uris: np.ndarray) -> list[LocalFeatures | None]:
        """Features of candidates (vector ids, their shards, their uris), None where neither a
        stored file holds them nor their image can be read."""
        start = time.perf_counter()
        out: list[LocalFeatures | None] = []
        for vid, shard, uri in zip(ids.tolist(), shards.tolist(), uris.tolist()):
            found = None
            if vid >= 0:
                stored = self.files.get(int(shard))
                if stored is not None:
                    found = stored.get_many([vid])[0]
                if found is None and uri is not None:
                    found = self._extract_uri(str(uri))
            out.append(found)
        self._time("candidate_features", start)
        return out

    def _extract_uri(self, uri: str) -> LocalFeatures | None:
        try:
            return self.extractor.extract(decode_image(storage.read_bytes(uri),
                                                       draft_size=getattr(self.extractor, "max_side", None)))
        except (OSError, DecodeError) as e:
            log.warning("cannot read candidate %s for verification: %s", uri, e)
            return None

    def rerank(self, query: LocalFeatures, mirrored: LocalFeatures | Callable[[], LocalFeatures] | None,
               ids: np.ndarray, shards: np.ndarray, uris: np.ndarray, scores: np.ndarray) -> Reranked:
        """Verify one query's first-stage row (ids (n,), shards (n,), uris (n,), scores (n,)) and
        re-order it by fused score; empty slots (id -1) stay last. `query` and `mirrored` come
        from query_features (mirrored None: the mirror side is not matched)."""
        valid = np.flatnonzero(np.asarray(ids) >= 0)
        n = len(ids)
        candidates = self.candidate_features(ids[valid], shards[valid], uris[valid])
        start = time.perf_counter()
        ver = self.verifier.verify(query, candidates, np.asarray(scores, np.float32)[valid], mirrored=mirrored,
                                   mirror="off" if mirrored is None else self.config.mirror)
        # Making the mirror's features (when the Verifier needed them) is timed apart from matching.
        mirror_seconds = ver.seconds.get("mirror_features", 0.0)
        self._time("verify", start + mirror_seconds)
        if mirror_seconds:
            self.seconds["mirror_query"] = self.seconds.get("mirror_query", 0.0) + mirror_seconds
        matched = sum(c is not None for c in candidates)
        self.counts["queries"] += 1
        self.counts["pairs"] += matched
        if ver.mirror_matched:
            self.counts["mirror_queries"] += 1
            self.counts["mirror_pairs"] += matched
        order = valid[ver.order()]
        fused = np.full(n, np.nan, np.float32)
        verified = np.zeros(n, bool)
        inliers = np.zeros(n, np.int32)
        fused[valid], verified[valid], inliers[valid] = ver.scores, ver.verified, ver.n_inliers
        tail = np.setdiff1d(np.arange(n), order, assume_unique=True)
        full = np.concatenate([order, tail]).astype(np.int64)
        return Reranked(full, fused[full], verified[full], inliers[full])


def rerank_rows(reranker: LocalReranker, query_uris: list[str], ids: np.ndarray, shards: np.ndarray,
                hit_uris: np.ndarray, scores: np.ndarray, skip: set[int] | None = None,
                boxes: list[tuple[float, float, float, float] | None] | None = None,
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Verify and re-order first-stage rows: one per query image in `query_uris` (cropped to its
    entry of `boxes`, when given); ids, shards, hit_uris, scores are (nq, n). Returns (ids, shards,
    fused scores, verified, inliers), each (nq, n), rows re-ordered by fused score. Rows in `skip`,
    and queries that cannot be read, keep their first-stage order, unverified."""
    ids, shards, scores = ids.copy(), shards.copy(), scores.copy()
    verified = np.zeros(ids.shape, bool)
    inliers = np.zeros(ids.shape, np.int32)
    for q, uri in enumerate(query_uris):
        if skip and q in skip:
            continue
        try:
            query, mirrored = reranker.query_features(storage.read_bytes(uri), boxes[q] if boxes else None)
        except (OSError, DecodeError) as e:
            log.warning("cannot read query %s for verification: %s", uri, e)
            continue
        row = reranker.rerank(query, mirrored, ids[q], shards[q], hit_uris[q], scores[q])
        ids[q], shards[q] = ids[q][row.order], shards[q][row.order]
        scores[q], verified[q], inliers[q] = row.scores, row.verified, row.inliers
    return ids, shards, scores, verified, inliers


def rerank_chunk(index_dir: str, config: RerankConfig, query_uris: list[str], ids: np.ndarray, shards: np.ndarray,
                 hit_uris: np.ndarray, scores: np.ndarray, boxes: list | None = None) -> tuple[np.ndarray, ...]:
    """`rerank_rows` for a chunk of queries in a process of its own (a Ray task): opens the
    index's local features itself. Returns rerank_rows' arrays and the stage's seconds."""
    reranker = LocalReranker(IndexStore(index_dir, verify=False), config)
    return (*rerank_rows(reranker, query_uris, ids, shards, hit_uris, scores, boxes=boxes), reranker.seconds)
