"""Running evaluations against an index directory: embed the queries, search, score.

Query embedding works at two scales. Up to `in_process_limit` images (Revisited Oxford's 70
queries, FID-300's 300) are decoded and embedded in this process with the index's own model, in
small batches. Larger sets (DISC21's 50,000 queries) go through the Ray Data pipeline
(`embed_source`) into an embeddings folder under `work_dir` (a temporary folder when none is
given; with one, an interrupted run resumes and a rerun reuses the vectors). Both paths decode and
resize exactly as the build did. Searching then runs in query batches over all shards
(`Searcher.search_many`), with the index's whitening and the chosen query expansion applied.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from raysearch import storage
from raysearch.metrics import retrieval as M
from raysearch.metrics.groundtruth import (
    CopyGroundTruth,
    RevisitedGroundTruth,
    id_key,
    read_copy_ground_truth,
    read_labels,
    read_revisited_ground_truth,
)
from raysearch.models.spec import ModelSpec
from raysearch.rerank import QueryExpansion
from raysearch.models.embedder import embed_image_uris
from raysearch.search import SearchResult, Searcher

log = logging.getLogger("raysearch")

IN_PROCESS_LIMIT = 1000
MAX_DEPTH = 100_000          # deepest ranking an evaluation asks for by default
MATCH_MODES = ("name", "exact")


# ---------------------------------------------------------------------------------------------
# Query sets
# ---------------------------------------------------------------------------------------------


@dataclass
class QuerySet:
    """Embedded query images: ids (image_ids as the source names them) and their vectors (n, d)
    float32 in the model's space; `problems` maps the ids of images that could not be used to why."""

    ids: list[str]
    vectors: np.ndarray
    problems: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)


def list_source(source: str) -> tuple[list[str], list[str]]:
    """(image_ids, uris) of every image of a SOURCE, in source order."""
    from raysearch.sources import open_source

    ids: list[str] = []
    uris: list[str] = []
    for batch in open_source(source).iter_batches():
        ids.extend(batch.column("image_id").to_pylist())
        uris.extend(batch.column("uri").to_pylist())
    return ids, uris


def _embed_rows_in_process(ids: list[str], uris: list[str], spec: ModelSpec, embedder, batch_size: int = 32) -> QuerySet:
    from raysearch.embed import decode_rows

    seen: dict[str, int] = {}
    dup_of: list[str | None] = []
    for i, image_id in enumerate(ids):
        dup_of.append(image_id if image_id in seen else None)
        seen.setdefault(image_id, i)
    rows = pa.table({
        "row": pa.array(np.arange(len(ids), dtype=np.int64)),
        "image_id": pa.array(ids, pa.string()),
        "uri": pa.array(uris, pa.string()),
        "duplicate_of": pa.array(dup_of, pa.string()),
    })
    kept_ids: list[str] = []
    vectors: list[np.ndarray] = []
    problems: dict[str, str] = {}
    for start in range(0, len(ids), batch_size):
        batch = decode_rows(rows.slice(start, batch_size), spec.input_size, spec.resize)
        ok = np.array([not e for e in batch["error"]], dtype=bool)
        for image_id, err in zip(batch["image_id"][~ok], batch["error"][~ok]):
            problems.setdefault(str(image_id), str(err))
        if ok.any():
            vectors.append(embedder.embed_pixels(batch["pixels"][ok]))
            kept_ids.extend(str(x) for x in batch["image_id"][ok])
    x = np.concatenate(vectors) if vectors else np.zeros((0, spec.dim), np.float32)
    return QuerySet(kept_ids, x, problems)


def read_embeddings_folder(embeddings_dir: str) -> QuerySet:
    """Every vector of a complete embeddings folder, in row order, with its error rows."""
    from raysearch.embed import embeddings_matrix, list_parts, load_embeddings_manifest, read_errors, read_part

    load_embeddings_manifest(embeddings_dir)
    rows, ids, vectors = [], [], []
    for uri in list_parts(embeddings_dir, "parts"):
        tbl = read_part(uri, ["row", "image_id", "embedding"])
        rows.append(tbl.column("row").to_numpy())
        ids.extend(tbl.column("image_id").to_pylist())
        vectors.append(embeddings_matrix(tbl))
    if not vectors:
        dim = int(load_embeddings_manifest(embeddings_dir)["dim"])
        return QuerySet([], np.zeros((0, dim), np.float32), {})
    order = np.argsort(np.concatenate(rows), kind="stable")
    x = np.concatenate(vectors)[order]
    errors = read_errors(embeddings_dir)
    problems = dict(zip(errors.column("image_id").to_pylist(), errors.column("reason").to_pylist()))
    return QuerySet([ids[i] for i in order], np.ascontiguousarray(x), problems)


@contextmanager
def _work_folder(work_dir: str | None) -> Iterator[str]:
    if work_dir:
        storage.makedirs(work_dir)
        yield work_dir
    else:
        with tempfile.TemporaryDirectory(prefix="raysearch-eval-") as tmp:
            yield tmp


def embed_images(
    source: str,
    spec: ModelSpec,
    in_process_limit: int = IN_PROCESS_LIMIT,
    work_dir: str | None = None,
    embedder=None,
    progress: bool = False,
) -> QuerySet:
    """Embed every image of `source` with `spec`: in this process up to `in_process_limit`
    images, else with the Ray Data pipeline into `work_dir` (see the module docstring).
    `source` may also be an embeddings folder (or an index directory) made with the same model."""
    with _work_folder(work_dir) as work:
        found = embeddings_or_images(source, spec, in_process_limit, work, embedder, progress)
        return found if isinstance(found, QuerySet) else read_embeddings_folder(found)


def embeddings_or_images(
    source: str, spec: ModelSpec, in_process_limit: int, work_dir: str, embedder=None, progress: bool = False,
) -> QuerySet | str:
    """The vectors of `source` made with `spec`, as a QuerySet (embedded in this process) or as an
    embeddings folder (`source` itself, an index's, or made with Ray under `work_dir`), for callers
    that stream large sets part by part instead of holding them."""
    from raysearch.models.whitening import check_embeddings_model, resolve_embeddings_folder

    folder = resolve_embeddings_folder(source)
    if folder is not None:
        check_embeddings_model(folder, spec.to_dict(), source)
        return folder
    ids, uris = list_source(source)
    if not ids:
        raise ValueError(f"source {source!r} holds no images")
    if len(ids) <= in_process_limit:
        if embedder is None:
            from raysearch.models.embedder import Embedder

            embedder = Embedder(spec.to_dict())
        return _embed_rows_in_process(ids, uris, spec, embedder)
    from raysearch.embed import EmbedConfig, embed_source

    key = hashlib.sha256(json.dumps({"source": source, "model": spec.to_dict()}, sort_keys=True).encode()).hexdigest()[:12]
    folder = storage.join(work_dir, f"embeddings-{key}")
    log.info("embedding %d images of %s with Ray into %s", len(ids), source, folder)
    # Unreadable images are reported, not fatal: every rate of them is accepted here.
    embed_source(source, folder, EmbedConfig(progress=progress, max_error_rate=1.0), spec=spec)
    return folder


def iter_vector_blocks(vectors: QuerySet | str, block_rows: int = 65_536) -> Iterator[np.ndarray]:
    """Blocks of (n, d) float32 vectors of a QuerySet or of an embeddings folder (one part at a time)."""
    if isinstance(vectors, QuerySet):
        for start in range(0, len(vectors), block_rows):
            yield vectors.vectors[start:start + block_rows]
        return
    from raysearch.embed import embeddings_matrix, list_parts, read_part

    for uri in list_parts(vectors, "parts"):
        yield embeddings_matrix(read_part(uri, ["embedding"]))


# ---------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------


def check_match_mode(match_ids: str) -> None:
    if match_ids not in MATCH_MODES:
        raise ValueError(f"--match-ids must be one of {MATCH_MODES}, got {match_ids!r}")


def key_function(match_ids: str):
    check_match_mode(match_ids)
    return id_key if match_ids == "name" else str


def result_keys(searcher: Searcher, result: SearchResult, match_ids: str) -> np.ndarray:
    """Result ids -> the keys they are matched by (object array like result.ids; None = no result).
    Raises ValueError when two different indexed images of one result list share a key."""
    keyf = key_function(match_ids)
    image_ids, _ = searcher.lookup(result)
    keys = np.full(image_ids.shape, None, dtype=object)
    for i in range(image_ids.shape[0]):
        seen: dict[str, str] = {}
        for j, image_id in enumerate(image_ids[i]):
            if image_id is None:
                continue
            key = keyf(image_id)
            if seen.setdefault(key, image_id) != image_id:
                raise ValueError(
                    f"indexed images {seen[key]!r} and {image_id!r} both match the name {key!r}; "
                    "use --match-ids exact and full ids in the ground truth"
                )
            keys[i, j] = key
    return keys


def search_depth(requested: int | None, ntotal: int, needed: int) -> int:
    """How many results per query to rank: the request, or `needed` bounded by the collection."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"--k must be >= 1, got {requested}")
        return int(requested)
    return int(max(1, min(ntotal, needed, MAX_DEPTH)))


def background_bias(searcher: Searcher, xq: np.ndarray, background: QuerySet | str, k: int = 3) -> np.ndarray:
    """SSCD score normalisation term: for each raw query vector, the mean of its top-k similarities
    to the background set (a QuerySet or an embeddings folder, streamed), both mapped into the
    index's space. An exact scan: nq * n_background * d multiply-adds. Returns (nq,) float32."""
    import faiss

    xs = searcher.to_index_space(xq)
    heap = faiss.ResultHeap(xs.shape[0], k, keep_max=True)
    seen = 0
    for block in iter_vector_blocks(background):
        if len(block) == 0:
            continue
        xb = searcher.to_index_space(block)
        D, I = faiss.knn(xs, xb, min(k, len(xb)), faiss.METRIC_INNER_PRODUCT)
        heap.add_result(D, I + seen)
        seen += len(xb)
    if seen < k:
        raise ValueError(f"the background set needs at least {k} images, it has {seen}")
    heap.finalize()
    return heap.D.mean(axis=1).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Copy detection
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CopyEvalConfig:
    """`raysearch eval copy` settings. query_expansion: None = the index's default, False = off."""

    k: int = 10
    nprobe: int | None = None
    query_expansion: Any = None
    background: str | None = None
    beta: float = 1.0
    background_k: int = 3
    max_predictions: int | None = None
    match_ids: str = "name"
    in_process_limit: int = IN_PROCESS_LIMIT
    work_dir: str | None = None
    progress: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.k <= 1000:
            raise ValueError(f"--k must be between 1 and 1000, got {self.k}")
        if self.background_k < 1:
            raise ValueError(f"--background-k must be >= 1, got {self.background_k}")
        if not math.isfinite(self.beta):
            raise ValueError(f"--beta must be a number, got {self.beta}")
        if self.in_process_limit < 0:
            raise ValueError(f"--in-process-limit must be >= 0, got {self.in_process_limit}")
        check_match_mode(self.match_ids)


@dataclass
class CopyEvalReport:
    metrics: M.CopyDetectionMetrics
    predictions: M.Predictions
    n_queries: int                 # queries evaluated (listed in the ground truth and embedded)
    missing_queries: list[str]     # listed in the ground truth but not usable (absent or unreadable)
    ignored_queries: int           # query images not listed in the ground truth
    seconds: dict[str, float]
    config: dict[str, Any]

    def summary(self) -> dict:
        return {
            **self.metrics.summary(),
            "n_queries": self.n_queries,
            "n_missing_queries": len(self.missing_queries),
            "n_ignored_queries": self.ignored_queries,
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
            "config": self.config,
        }


def copy_predictions(query_keys: list[str], keys: np.ndarray, scores: np.ndarray) -> M.Predictions:
    """Pooled predictions from per-query result keys (nq, k) and scores (nq, k)."""
    q_out, r_out, s_out = [], [], []
    for q, row_keys, row_scores in zip(query_keys, keys, scores):
        for key, score in zip(row_keys, row_scores):
            if key is None or not np.isfinite(score):
                continue
            q_out.append(q)
            r_out.append(key)
            s_out.append(float(score))
    return M.Predictions(np.asarray(q_out, dtype=object), np.asarray(r_out, dtype=object), np.asarray(s_out))


def evaluate_copy_detection(
    searcher: Searcher | str,
    queries: QuerySet | str,
    ground_truth: CopyGroundTruth | str,
    config: CopyEvalConfig = CopyEvalConfig(),
    background: QuerySet | str | None = None,
) -> CopyEvalReport:
    """DISC21 / ISC2021 evaluation of an index: micro-AP, recall at precision 0.9, recall@1/@10.

    `queries`: an image SOURCE or an already embedded QuerySet; `ground_truth`: a DISC21 CSV or a
    CopyGroundTruth; `background` (a QuerySet or embeddings folder; or config.background, a SOURCE
    or embeddings folder) switches on SSCD score normalisation:
    score -= beta * mean(top-k similarities to the background).
    """
    with _work_folder(config.work_dir) as work:
        return _evaluate_copy_detection(searcher, queries, ground_truth, config, background, work)


def _evaluate_copy_detection(searcher, queries, ground_truth, config: CopyEvalConfig, background, work: str) -> CopyEvalReport:
    seconds: dict[str, float] = {}
    searcher = searcher if isinstance(searcher, Searcher) else Searcher(searcher)
    gt = ground_truth if isinstance(ground_truth, CopyGroundTruth) else read_copy_ground_truth(ground_truth)
    keyf = key_function(config.match_ids)
    if config.match_ids == "name":
        gt = gt.keyed()
    spec = searcher.store.model_spec
    if isinstance(queries, str):
        start = time.perf_counter()
        queries = embed_images(queries, spec, config.in_process_limit, work, searcher.embedder(), config.progress)
        seconds["embed_queries"] = time.perf_counter() - start
    if background is None and config.background:
        start = time.perf_counter()
        # Large backgrounds (DISC21's 1M training images) stay in their embeddings folder, streamed.
        background = embeddings_or_images(config.background, spec, config.in_process_limit, work,
                                          searcher.embedder(), config.progress)
        seconds["embed_background"] = time.perf_counter() - start

    listed = set(gt.query_ids)
    query_keys = [keyf(q) for q in queries.ids]
    if len(set(query_keys)) != len(query_keys):
        raise ValueError("two query images share a name; use --match-ids exact")
    use = [i for i, q in enumerate(query_keys) if q in listed]
    if not use:
        raise ValueError(
            f"none of the {len(query_keys)} query images is listed in the ground truth "
            f"(e.g. query {query_keys[0] if query_keys else None!r}, ground truth {gt.query_ids[0]!r}); check --match-ids"
        )
    used = {query_keys[i] for i in use}
    missing = [q for q in gt.query_ids if q not in used]
    if missing:
        log.warning("%d queries of the ground truth are not usable query images (e.g. %s); their matches count as missed",
                    len(missing), missing[:3])
    xq = queries.vectors[use]
    start = time.perf_counter()
    result = searcher.search_many(xq, config.k, config.nprobe, config.query_expansion)
    seconds["search"] = time.perf_counter() - start
    scores = result.scores.copy()
    if background is not None:
        start = time.perf_counter()
        bias = background_bias(searcher, xq, background, config.background_k)
        scores = scores - config.beta * bias[:, None]
        seconds["score_normalisation"] = time.perf_counter() - start
    keys = result_keys(searcher, result, config.match_ids)
    predictions = copy_predictions([query_keys[i] for i in use], keys, scores)
    if config.max_predictions is not None:
        predictions = M.keep_best_predictions(predictions, config.max_predictions)
    start = time.perf_counter()
    metrics = M.copy_detection_metrics(gt.pairs, predictions)
    seconds["metrics"] = time.perf_counter() - start
    qe = config.query_expansion if config.query_expansion is not None else searcher.query_expansion
    return CopyEvalReport(
        metrics=metrics, predictions=predictions, n_queries=len(use), missing_queries=missing,
        ignored_queries=len(query_keys) - len(use), seconds=seconds,
        config={
            "k": config.k, "nprobe": config.nprobe or searcher.store.nprobe,
            "query_expansion": qe.to_dict() if isinstance(qe, QueryExpansion) else None,
            "score_normalisation": (
                {"beta": config.beta, "k": config.background_k,
                 "background": background if isinstance(background, str) else f"{len(background)} vectors"}
                if background is not None else None
            ),
            "match_ids": config.match_ids,
        },
    )


# ---------------------------------------------------------------------------------------------
# Landmark retrieval (Revisited Oxford / Paris)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LandmarkEvalConfig:
    k: int | None = None            # ranking depth; default: the whole collection (up to MAX_DEPTH)
    nprobe: int | None = None
    query_expansion: Any = None
    kappas: tuple[int, ...] = (1, 5, 10)
    crop: bool = True
    match_ids: str = "name"

    def __post_init__(self) -> None:
        check_match_mode(self.match_ids)
        if not self.kappas or any(k < 1 for k in self.kappas):
            raise ValueError(f"precision ranks must be >= 1, got {self.kappas}")


@dataclass
class LandmarkEvalReport:
    metrics: M.LandmarkMetrics
    depth: int
    n_queries: int
    not_in_imlist: int        # indexed images outside the ground truth's imlist (left out of rankings)
    imlist_not_indexed: int   # imlist images the index does not hold (count as never retrieved)
    seconds: dict[str, float]
    config: dict[str, Any]

    def summary(self) -> dict:
        return {
            **self.metrics.summary(),
            "depth": self.depth,
            "n_queries": self.n_queries,
            "indexed_not_in_imlist": self.not_in_imlist,
            "imlist_not_indexed": self.imlist_not_indexed,
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
            "config": self.config,
        }


def _indexed_keys(searcher: Searcher, keyf) -> set[str]:
    keys: set[str] = set()
    for id_map in searcher.id_maps:
        keys.update(keyf(x) for x in id_map.image_ids.to_pylist())
    return keys


def evaluate_landmarks(
    searcher: Searcher | str, queries: str, gnd: RevisitedGroundTruth | str,
    config: LandmarkEvalConfig = LandmarkEvalConfig(),
) -> LandmarkEvalReport:
    """Revisited Oxford / Paris evaluation: each query image (found in the `queries` SOURCE by its
    qimlist name) is cropped to its bounding box, embedded, searched; the ranking is mapped onto
    the ground truth's imlist and scored with revisitop's compute_map (Easy / Medium / Hard)."""
    seconds: dict[str, float] = {}
    searcher = searcher if isinstance(searcher, Searcher) else Searcher(searcher)
    gnd = gnd if isinstance(gnd, RevisitedGroundTruth) else read_revisited_ground_truth(gnd)
    keyf = key_function(config.match_ids)
    ids, uris = list_source(queries)
    uri_of = {keyf(i): u for i, u in zip(ids, uris)}
    missing = [q.name for q in gnd.queries if keyf(q.name) not in uri_of]
    if missing:
        raise ValueError(f"{len(missing)} query images of the ground truth are not in {queries} (e.g. {missing[:3]})")
    spec = searcher.store.model_spec
    start = time.perf_counter()
    xq, problems = embed_image_uris(
        [uri_of[keyf(q.name)] for q in gnd.queries], spec, searcher.embedder(),
        boxes=[q.bbx if config.crop else None for q in gnd.queries],
    )
    seconds["embed_queries"] = time.perf_counter() - start
    bad = [(q.name, p) for q, p in zip(gnd.queries, problems) if p is not None]
    if bad:
        raise ValueError(f"query image {bad[0][0]} cannot be used: {bad[0][1]}")
    depth = search_depth(config.k, searcher.store.ntotal, searcher.store.ntotal)
    start = time.perf_counter()
    result = searcher.search_many(xq, depth, config.nprobe, config.query_expansion, batch_size=256)
    seconds["search"] = time.perf_counter() - start
    index_of = {keyf(name): i for i, name in enumerate(gnd.imlist)}
    keys = result_keys(searcher, result, config.match_ids)
    rankings = []
    for row in keys:
        rankings.append(np.asarray([index_of[k] for k in row if k is not None and k in index_of], dtype=np.int64))
    indexed = _indexed_keys(searcher, keyf)
    metrics = M.revisited_metrics(rankings, [q.as_dict() for q in gnd.queries], config.kappas)
    qe = config.query_expansion if config.query_expansion is not None else searcher.query_expansion
    return LandmarkEvalReport(
        metrics=metrics, depth=depth, n_queries=len(gnd.queries),
        not_in_imlist=len(indexed - set(index_of)), imlist_not_indexed=len(set(index_of) - indexed),
        seconds=seconds,
        config={"k": depth, "nprobe": config.nprobe or searcher.store.nprobe, "crop": config.crop,
                "query_expansion": qe.to_dict() if isinstance(qe, QueryExpansion) else None},
    )


# ---------------------------------------------------------------------------------------------
# CMC (labelled retrieval, e.g. FID-300)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CmcEvalConfig:
    k: int | None = None            # default: deep enough for the largest rank / fraction asked
    nprobe: int | None = None
    query_expansion: Any = None
    ranks: tuple[int, ...] = M.CMC_RANKS
    fractions: tuple[float, ...] = M.CMC_FRACTIONS
    match_ids: str = "name"
    in_process_limit: int = IN_PROCESS_LIMIT
    work_dir: str | None = None
    progress: bool = False

    def __post_init__(self) -> None:
        check_match_mode(self.match_ids)
        if any(r < 1 for r in self.ranks) or any(not 0 < f <= 1 for f in self.fractions):
            raise ValueError(f"CMC ranks must be >= 1 and fractions in (0, 1], got {self.ranks} and {self.fractions}")


@dataclass
class CmcEvalReport:
    metrics: M.CmcMetrics
    unlabelled_queries: int
    missing_queries: list[str]
    seconds: dict[str, float]
    config: dict[str, Any]

    def summary(self) -> dict:
        return {
            **self.metrics.summary(),
            "n_unlabelled_queries": self.unlabelled_queries,
            "n_missing_queries": len(self.missing_queries),
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
            "config": self.config,
        }


def evaluate_cmc(
    searcher: Searcher | str, queries: QuerySet | str, labels: dict[str, set[str]] | str,
    config: CmcEvalConfig = CmcEvalConfig(),
) -> CmcEvalReport:
    """CMC of an index for labelled queries: ranks 1/5/10/20 and 1/5/10 % of the collection."""
    seconds: dict[str, float] = {}
    searcher = searcher if isinstance(searcher, Searcher) else Searcher(searcher)
    keyf = key_function(config.match_ids)
    raw = labels if isinstance(labels, dict) else read_labels(labels)
    keyed: dict[str, set[str]] = {}
    for q, refs in raw.items():
        keyed.setdefault(keyf(q), set()).update(keyf(r) for r in refs)
    unlabelled = sum(1 for refs in keyed.values() if not refs)
    spec = searcher.store.model_spec
    if isinstance(queries, str):
        start = time.perf_counter()
        queries = embed_images(queries, spec, config.in_process_limit, config.work_dir, searcher.embedder(), config.progress)
        seconds["embed_queries"] = time.perf_counter() - start
    query_keys = [keyf(q) for q in queries.ids]
    use = [i for i, q in enumerate(query_keys) if keyed.get(q)]
    used = {query_keys[i] for i in use}
    missing = [q for q, refs in keyed.items() if refs and q not in used]
    if not use:
        raise ValueError("no query image has a labelled reference (check the ids of the labels file)")
    if missing:
        log.warning("%d labelled queries are not usable query images (e.g. %s); they count as misses", len(missing), missing[:3])
    n = searcher.store.ntotal
    needed = max(max(config.ranks), *(M.collection_rank(f, n) for f in config.fractions))
    depth = search_depth(config.k, n, needed)
    start = time.perf_counter()
    result = searcher.search_many(queries.vectors[use], depth, config.nprobe, config.query_expansion)
    seconds["search"] = time.perf_counter() - start
    keys = result_keys(searcher, result, config.match_ids)
    ranks = M.first_match_ranks(keys, result.scores, [keyed[query_keys[i]] for i in use])
    # Labelled queries that could not be searched at all are misses at every rank.
    ranks = np.concatenate([ranks, np.full(len(missing), M.NOT_FOUND, np.int64)])
    metrics = M.cmc(ranks, n, depth, config.ranks, config.fractions)
    qe = config.query_expansion if config.query_expansion is not None else searcher.query_expansion
    return CmcEvalReport(
        metrics=metrics, unlabelled_queries=unlabelled, missing_queries=missing, seconds=seconds,
        config={"k": depth, "nprobe": config.nprobe or searcher.store.nprobe,
                "query_expansion": qe.to_dict() if isinstance(qe, QueryExpansion) else None},
    )


# ---------------------------------------------------------------------------------------------
# ANN quality
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AnnEvalConfig:
    n_queries: int = 1000
    ks: tuple[int, ...] = (1, 10, 100)
    nprobes: tuple[int, ...] | None = None   # default: powers of two up to nlist (IVF), efSearch ladder (HNSW)
    seed: int = 0
    single_queries: int = 100               # queries timed one by one for the latency column

    def __post_init__(self) -> None:
        if self.n_queries < 1:
            raise ValueError(f"--queries must be >= 1, got {self.n_queries}")
        if not self.ks or any(k < 1 for k in self.ks):
            raise ValueError(f"--ks must be >= 1, got {self.ks}")
        if self.nprobes is not None and any(p < 1 for p in self.nprobes):
            raise ValueError(f"--nprobe values must be >= 1, got {self.nprobes}")


@dataclass
class AnnEvalReport:
    rows: list[dict[str, Any]]
    n_queries: int
    n_vectors: int
    factory: str
    exact_seconds: float

    def summary(self) -> dict:
        return {"factory": self.factory, "n_queries": self.n_queries, "n_vectors": self.n_vectors,
                "exact_seconds": round(self.exact_seconds, 3), "rows": self.rows}


def index_embeddings_dir(searcher: Searcher) -> str:
    """The embeddings folder an index was built from (its manifest's `embeddings`)."""
    emb = (searcher.store.manifest.get("embeddings") or [None])[0]
    if not emb:
        raise ValueError(f"{searcher.store.index_dir}: the manifest names no embeddings folder")
    path = emb if ("://" in emb or os.path.isabs(emb)) else storage.join(searcher.store.index_dir, emb)
    if not storage.exists(path):
        raise FileNotFoundError(f"the embeddings of {searcher.store.index_dir} are missing: {path}")
    return path


def default_nprobes(searcher: Searcher) -> list[int | None]:
    """nprobe values to sweep: powers of two up to nlist for IVF (plus the index's own), an
    efSearch ladder for HNSW, [None] (one exact row) for anything else."""
    import faiss

    inner = searcher._parts[0].inner if searcher._parts else None
    try:
        nlist = faiss.extract_index_ivf(inner).nlist
    except (RuntimeError, TypeError):
        base = faiss.downcast_index(inner.index) if isinstance(inner, faiss.IndexIDMap) else inner
        if isinstance(base, faiss.IndexHNSW):
            return [16, 32, 64, 128, 256, 512]
        return [None]
    values = {2 ** i for i in range(0, int(math.log2(nlist)) + 1)} | {nlist}
    if searcher.store.nprobe:
        values.add(searcher.store.nprobe)
    return sorted(values)


def exact_neighbours(searcher: Searcher, xq: np.ndarray, embeddings_dir: str, k: int) -> np.ndarray:
    """Exact top-k vector ids (nq, k) of raw queries over every vector of the embeddings folder,
    compared in the index's space and metric (a brute-force scan, streamed part by part)."""
    import faiss

    from raysearch.embed import embeddings_matrix, list_parts, read_part

    ip = searcher.store.metric == "ip"
    xs = searcher.to_index_space(xq)
    heap = faiss.ResultHeap(xs.shape[0], k, keep_max=ip)
    for uri in list_parts(embeddings_dir, "parts"):
        tbl = read_part(uri, ["row", "embedding"])
        xb = searcher.to_index_space(embeddings_matrix(tbl))
        D, I = faiss.knn(xs, xb, min(k, xb.shape[0]), faiss.METRIC_INNER_PRODUCT if ip else faiss.METRIC_L2)
        rows = tbl.column("row").to_numpy()
        heap.add_result(D, np.where(I >= 0, rows[np.clip(I, 0, None)], -1))
    heap.finalize()
    return heap.I


def evaluate_ann(searcher: Searcher | str, config: AnnEvalConfig = AnnEvalConfig()) -> AnnEvalReport:
    """Recall@k of the index against exact search over the same vectors (sampled from its own
    embeddings), and latency, for each nprobe / efSearch."""
    from raysearch.models.whitening import sample_embeddings

    searcher = searcher if isinstance(searcher, Searcher) else Searcher(searcher)
    embeddings_dir = index_embeddings_dir(searcher)
    xq = sample_embeddings(embeddings_dir, config.n_queries, config.seed)
    ntotal = searcher.store.ntotal
    kmax = min(max(config.ks), ntotal)
    start = time.perf_counter()
    exact = exact_neighbours(searcher, xq, embeddings_dir, kmax)
    exact_seconds = time.perf_counter() - start
    nprobes = list(config.nprobes) if config.nprobes else default_nprobes(searcher)
    rows = []
    for nprobe in nprobes:
        searcher.search_many(xq[:1], kmax, nprobe, False)  # warm the pages this nprobe touches
        start = time.perf_counter()
        res = searcher.search_many(xq, kmax, nprobe, False)
        batch_ms = 1000 * (time.perf_counter() - start) / len(xq)
        single = []
        for i in range(min(config.single_queries, len(xq))):
            t = time.perf_counter()
            searcher.search_many(xq[i:i + 1], kmax, nprobe, False)
            single.append(1000 * (time.perf_counter() - t))
        row: dict[str, Any] = {"nprobe": nprobe}
        for k in config.ks:
            row[f"recall@{k}"] = M.knn_recall(res.ids, exact, min(k, kmax)) if k <= ntotal else None
        row["ms_per_query_batch"] = batch_ms
        row["ms_per_query_single_median"] = float(np.median(single)) if single else None
        rows.append(row)
    return AnnEvalReport(rows, len(xq), ntotal, str(searcher.store.manifest.get("factory")), exact_seconds)
