"""Query sets and what every evaluation protocol shares: embedding the queries (in this process or
with Ray), matching result ids to ground-truth names, and score normalisation.

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
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from raysearch import storage
from raysearch.embed import EmbedConfig, decode_rows, embed_source
from raysearch.formats.embeddings import (
    check_embeddings_model,
    embeddings_matrix,
    list_parts,
    load_embeddings_manifest,
    read_errors,
    read_part,
    resolve_embeddings_folder,
)
from raysearch.index.exact import exact_knn
from raysearch.metrics.groundtruth import id_key
from raysearch.models.embedder import Embedder
from raysearch.models.spec import ModelSpec
from raysearch.progress import Progress
from raysearch.rerank import RerankConfig, rerank_chunk, rerank_rows
from raysearch.search import SearchResult, Searcher
from raysearch.sources import open_source

log = logging.getLogger("raysearch")

IN_PROCESS_LIMIT = 1000
MAX_DEPTH = 100_000          # deepest ranking an evaluation asks for by default
MATCH_MODES = ("name", "exact")
REPORT_DEPTH = 10            # results per query that a report keeps (`TopResults`)


@dataclass
class QuerySet:
    """Embedded query images: ids (image_ids as the source names them) and their vectors (n, d)
    float32 in the model's space; `problems` maps the ids of images that could not be used to why;
    `uris` (one per id, when known) locate the images, for a second stage that reads them again."""

    ids: list[str]
    vectors: np.ndarray
    problems: dict[str, str] = field(default_factory=dict)
    uris: list[str] | None = None

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class TopResults:
    """The first results of each evaluated query, kept for reports (`raysearch eval ... --report`):
    query_ids as the query set names them and query_keys as the ground truth is matched by (nq,),
    and (nq, depth) arrays: image_ids and uris (object,
    None where there is no result), scores (float64, NaN where none) and correct (bool: the result
    is a true match by the protocol's ground truth)."""

    query_ids: list[str]
    query_keys: list[str]
    image_ids: np.ndarray
    uris: np.ndarray
    scores: np.ndarray
    correct: np.ndarray


def top_results(searcher: Searcher, result: SearchResult, scores: np.ndarray, query_ids: list[str],
                query_keys: list[str], correct: np.ndarray, depth: int = REPORT_DEPTH) -> TopResults:
    """The first `depth` columns of a search `result` as TopResults; `scores` (nq, k) are the scores
    the protocol ranked by (e.g. after score normalisation), `correct` (nq, k) bool its verdicts."""
    ids = result.ids[:, :depth]
    image_ids, uris = searcher.lookup(SearchResult(result.scores[:, :depth], ids, result.shard[:, :depth]))
    kept = np.where(ids >= 0, np.asarray(scores, dtype=np.float64)[:, :depth], np.nan)
    return TopResults(list(query_ids), list(query_keys), image_ids, uris, kept, np.asarray(correct, dtype=bool)[:, :depth] & (ids >= 0))


def list_source(source: str) -> tuple[list[str], list[str]]:
    """(image_ids, uris) of every image of a SOURCE, in source order."""

    ids: list[str] = []
    uris: list[str] = []
    for batch in open_source(source).iter_batches():
        ids.extend(batch.column("image_id").to_pylist())
        uris.extend(batch.column("uri").to_pylist())
    return ids, uris


def embed_rows(ids: list[str], uris: list[str], spec: ModelSpec, embedder, batch_size: int = 32) -> QuerySet:
    """Embed images by (image_id, uri) in this process, decoded and resized as a build does; a repeated
    id and unreadable images are recorded in `problems` instead of embedded."""

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
    kept_uris: list[str] = []
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
            kept_uris.extend(str(x) for x in batch["uri"][ok])
    x = np.concatenate(vectors) if vectors else np.zeros((0, spec.dim), np.float32)
    return QuerySet(kept_ids, x, problems, kept_uris)


def read_embeddings_folder(embeddings_dir: str) -> QuerySet:
    """Every vector of a complete embeddings folder, in row order, with its error rows."""

    load_embeddings_manifest(embeddings_dir)
    rows, ids, uris, vectors = [], [], [], []
    for uri in list_parts(embeddings_dir, "parts"):
        tbl = read_part(uri, ["row", "image_id", "uri", "embedding"])
        rows.append(tbl.column("row").to_numpy())
        ids.extend(tbl.column("image_id").to_pylist())
        uris.extend(tbl.column("uri").to_pylist())
        vectors.append(embeddings_matrix(tbl))
    if not vectors:
        dim = int(load_embeddings_manifest(embeddings_dir)["dim"])
        return QuerySet([], np.zeros((0, dim), np.float32), {}, [])
    order = np.argsort(np.concatenate(rows), kind="stable")
    x = np.concatenate(vectors)[order]
    errors = read_errors(embeddings_dir)
    problems = dict(zip(errors.column("image_id").to_pylist(), errors.column("reason").to_pylist()))
    return QuerySet([ids[i] for i in order], np.ascontiguousarray(x), problems, [uris[i] for i in order])


@contextmanager
def work_folder(work_dir: str | None) -> Iterator[str]:
    """`work_dir` (created), or a temporary folder removed afterwards when None."""
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
    with work_folder(work_dir) as work:
        found = embeddings_or_images(source, spec, in_process_limit, work, embedder, progress)
        return found if isinstance(found, QuerySet) else read_embeddings_folder(found)


def embeddings_or_images(
    source: str, spec: ModelSpec, in_process_limit: int, work_dir: str, embedder=None, progress: bool = False,
) -> QuerySet | str:
    """The vectors of `source` made with `spec`, as a QuerySet (embedded in this process) or as an
    embeddings folder (`source` itself, an index's, or made with Ray under `work_dir`), for callers
    that stream large sets part by part instead of holding them."""

    folder = resolve_embeddings_folder(source)
    if folder is not None:
        check_embeddings_model(folder, spec.to_dict(), source)
        return folder
    ids, uris = list_source(source)
    if not ids:
        raise ValueError(f"source {source!r} holds no images")
    if len(ids) <= in_process_limit:
        if embedder is None:

            embedder = Embedder(spec.to_dict())
        return embed_rows(ids, uris, spec, embedder)

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

    for uri in list_parts(vectors, "parts"):
        yield embeddings_matrix(read_part(uri, ["embedding"]))




def check_match_mode(match_ids: str) -> None:
    """Raise ValueError unless `match_ids` is "name" or "exact"."""
    if match_ids not in MATCH_MODES:
        raise ValueError(f"--match-ids must be one of {MATCH_MODES}, got {match_ids!r}")


def key_function(match_ids: str):
    """The function ids are matched by: `id_key` for "name", `str` for "exact"."""
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
    xs = searcher.to_index_space(xq)
    blocks = ((searcher.to_index_space(block), np.zeros(len(block), np.int64)) for block in iter_vector_blocks(background))
    D, I = exact_knn(xs, blocks, k, "ip")
    if (I < 0).any():
        raise ValueError(f"the background set needs at least {k} images, it has fewer")
    return D.mean(axis=1).astype(np.float32)




def rerank_queries(searcher: Searcher, query_uris: list[str], result: SearchResult, config: RerankConfig,
                   in_process_limit: int = IN_PROCESS_LIMIT, progress: bool = False,
                   boxes: list | None = None) -> tuple[SearchResult, dict[str, float]]:
    """Verify the first-stage `result` of query images (one row per uri; cropped to `boxes` when
    given) with local features and re-order every row (raysearch.rerank). Up to `in_process_limit` queries in this process, more
    spread over Ray tasks of about 100 queries (each opens the index's local features itself).
    Returns the re-ranked result and the seconds per stage (summed over tasks)."""
    _, hit_uris = searcher.lookup(result)
    if len(query_uris) <= in_process_limit:
        reranker = searcher.reranker(config)
        ids, shards, scores, verified, inliers = rerank_rows(reranker, query_uris, result.ids, result.shard,
                                                             hit_uris, result.scores, boxes=boxes)
        return SearchResult(scores, ids, shards, verified, inliers), dict(reranker.seconds)
    import ray

    from raysearch.runtime import ensure_ray

    ensure_ray()
    task = ray.remote(num_cpus=1)(rerank_chunk)
    size = 100
    refs = [task.remote(searcher.store.index_dir, config, query_uris[i:i + size], result.ids[i:i + size],
                        result.shard[i:i + size], hit_uris[i:i + size], result.scores[i:i + size],
                        boxes[i:i + size] if boxes else None)
            for i in range(0, len(query_uris), size)]
    parts = []
    with Progress("verifying", len(query_uris), "queries", enabled=progress) as shown:
        for i, ref in enumerate(refs):
            parts.append(ray.get(ref))
            shown.update(min(size, len(query_uris) - i * size))
    seconds: dict[str, float] = {}
    for part in parts:
        for name, value in part[5].items():
            seconds[name] = seconds.get(name, 0.0) + value
    ids, shards, scores, verified, inliers = (np.concatenate([p[j] for p in parts]) for j in range(5))
    return SearchResult(scores, ids, shards, verified, inliers), seconds


def truncate(result: SearchResult, k: int) -> SearchResult:
    """The first k columns of every array of `result`."""
    def cut(a):
        return None if a is None else a[:, :k]

    return SearchResult(cut(result.scores), cut(result.ids), cut(result.shard), cut(result.verified), cut(result.inliers))


def query_uris(queries: QuerySet, rows: list[int]) -> list[str]:
    """The image uris of the query set's rows `rows`; ValueError when the set does not know them
    (vectors given without images cannot be verified)."""
    if queries.uris is None:
        raise ValueError("re-ranking reads the query images: give the queries as a SOURCE of images")
    return [queries.uris[i] for i in rows]


def rerank_head(searcher: Searcher, uris: list[str], result: SearchResult, config: RerankConfig,
                boxes: list | None = None, in_process_limit: int = IN_PROCESS_LIMIT) -> SearchResult:
    """Re-rank the first config.k results of each row of a deep ranking and keep the rest after
    them (a verified hit only gains, an unverified one keeps its score, so the tail stays below;
    in a row with a verified hit the exclusive rule lowers the tail by the fusion's bonus, as it
    lowers the head's unverified hits, so that it stays below them too)."""
    k = min(config.k, result.ids.shape[1])
    head, _ = rerank_queries(searcher, uris, truncate(result, k), config, in_process_limit, boxes=boxes)
    n, depth = result.ids.shape
    verified = np.zeros((n, depth), bool)
    inliers = np.zeros((n, depth), np.int32)
    verified[:, :k], inliers[:, :k] = head.verified, head.inliers
    tail = result.scores[:, k:].copy()
    fusion = config.verify.fusion
    if fusion.exclusive:
        tail[head.verified.any(axis=1)] -= np.float32(fusion.bonus)
    return SearchResult(np.concatenate([head.scores, tail], axis=1),
                        np.concatenate([head.ids, result.ids[:, k:]], axis=1),
                        np.concatenate([head.shard, result.shard[:, k:]], axis=1), verified, inliers)
