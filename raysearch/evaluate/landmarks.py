"""`raysearch eval landmarks`: Revisited Oxford / Paris (revisitop's mAP, Easy / Medium / Hard)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from raysearch.evaluate.queries import rerank_head
from raysearch.evaluate.queries import (
    REPORT_DEPTH,
    TopResults,
    check_match_mode,
    key_function,
    list_source,
    result_keys,
    search_depth,
    top_results,
)
from raysearch.index.expansion import QueryExpansion
from raysearch.metrics import retrieval as M
from raysearch.metrics.groundtruth import RevisitedGroundTruth, read_revisited_ground_truth
from raysearch.models.embedder import embed_image_uris
from raysearch.rerank import RerankConfig
from raysearch.search import Searcher


@dataclass(frozen=True)
class LandmarkEvalConfig:
    """Settings of `evaluate_landmarks`: nprobe (None: the index's tuned value), query_expansion
    (None: the index's default, False: none), kappas (the k of each mP@k), crop (crop each query
    image to its ground-truth bounding box before embedding) and match_ids ("name" or "exact")."""

    k: int | None = None            # ranking depth; default: the whole collection (up to MAX_DEPTH)
    nprobe: int | None = None
    query_expansion: Any = None
    kappas: tuple[int, ...] = (1, 5, 10)
    crop: bool = True
    match_ids: str = "name"
    rerank: RerankConfig | None = None   # verify the top rerank.k with local features, re-order them

    def __post_init__(self) -> None:
        check_match_mode(self.match_ids)
        if not self.kappas or any(k < 1 for k in self.kappas):
            raise ValueError(f"precision ranks must be >= 1, got {self.kappas}")


@dataclass
class LandmarkEvalReport:
    """What `evaluate_landmarks` measured: the metrics, the ranking depth, the number of queries,
    how the index and the ground truth's imlist differ, seconds per step and the settings used."""

    metrics: M.LandmarkMetrics
    depth: int
    n_queries: int
    not_in_imlist: int        # indexed images outside the ground truth's imlist (left out of rankings)
    imlist_not_indexed: int   # imlist images the index does not hold (count as never retrieved)
    seconds: dict[str, float]
    config: dict[str, Any]
    # For reports (`--report`): each query's first results, correct = a positive of the Medium
    # protocol (easy or hard); junk = a junk image of that protocol (neither right nor wrong);
    # query_uris: the query images, in the ground truth's order.
    top: TopResults | None = None
    junk: np.ndarray | None = None
    query_uris: list[str] | None = None

    def summary(self) -> dict:
        """The report as a JSON-ready dict: the metrics' summary, the counts, seconds rounded to ms
        and the settings used."""
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
    if config.rerank is not None:
        start = time.perf_counter()
        result = rerank_head(searcher, [uri_of[keyf(q.name)] for q in gnd.queries], result, config.rerank,
                             boxes=[q.bbx if config.crop else None for q in gnd.queries])
        seconds["rerank"] = time.perf_counter() - start
    index_of = {keyf(name): i for i, name in enumerate(gnd.imlist)}
    keys = result_keys(searcher, result, config.match_ids)
    rankings = []
    for row in keys:
        rankings.append(np.asarray([index_of[k] for k in row if k is not None and k in index_of], dtype=np.int64))
    indexed = _indexed_keys(searcher, keyf)
    gnd_dicts = [q.as_dict() for q in gnd.queries]
    metrics = M.revisited_metrics(rankings, gnd_dicts, config.kappas)
    # What a report shows of each query's first results: Medium-protocol positives and junk.
    top_keys = keys[:, :REPORT_DEPTH]
    correct = np.zeros(top_keys.shape, dtype=bool)
    junk = np.zeros(top_keys.shape, dtype=bool)
    for i, (row, g) in enumerate(zip(top_keys, gnd_dicts)):
        positives, junk_ids = M.protocol_sets(g, "medium")
        where = [index_of.get(k, -1) if k is not None else -1 for k in row]
        correct[i], junk[i] = np.isin(where, positives), np.isin(where, junk_ids)
    qe = config.query_expansion if config.query_expansion is not None else searcher.query_expansion
    return LandmarkEvalReport(
        metrics=metrics, depth=depth, n_queries=len(gnd.queries),
        not_in_imlist=len(indexed - set(index_of)), imlist_not_indexed=len(set(index_of) - indexed),
        seconds=seconds,
        top=top_results(searcher, result, result.scores, [q.name for q in gnd.queries],
                        [keyf(q.name) for q in gnd.queries], correct),
        junk=junk, query_uris=[uri_of[keyf(q.name)] for q in gnd.queries],
        config={"k": depth, "nprobe": config.nprobe or searcher.store.nprobe, "crop": config.crop,
                "query_expansion": qe.to_dict() if isinstance(qe, QueryExpansion) else None,
                "rerank": config.rerank.to_dict() if config.rerank is not None else None},
    )


