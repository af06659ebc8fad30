"""`raysearch eval cmc`: cumulative match characteristic of labelled queries (e.g. FID-300)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from raysearch.evaluate.queries import (
    query_uris,
    rerank_head,
    IN_PROCESS_LIMIT,
    REPORT_DEPTH,
    QuerySet,
    TopResults,
    check_match_mode,
    embed_images,
    key_function,
    result_keys,
    search_depth,
    top_results,
)
from raysearch.index.expansion import QueryExpansion
from raysearch.metrics import retrieval as M
from raysearch.metrics.groundtruth import read_labels
from raysearch.rerank import RerankConfig
from raysearch.search import Searcher

log = logging.getLogger("raysearch")


@dataclass(frozen=True)
class CmcEvalConfig:
    """Settings of `evaluate_cmc`: nprobe (None: the index's tuned value), query_expansion (None:
    the index's default, False: none, or a QueryExpansion), the ranks and collection fractions to
    report, match_ids ("name": ids matched by basename without extension, "exact": as given), and
    how query images are embedded (in_process_limit, work_dir, progress: see `embed_images`)."""

    k: int | None = None            # default: deep enough for the largest rank / fraction asked
    nprobe: int | None = None
    query_expansion: Any = None
    ranks: tuple[int, ...] = M.CMC_RANKS
    fractions: tuple[float, ...] = M.CMC_FRACTIONS
    match_ids: str = "name"
    in_process_limit: int = IN_PROCESS_LIMIT
    work_dir: str | None = None
    progress: bool = False
    rerank: RerankConfig | None = None   # verify the top rerank.k with local features, re-order them

    def __post_init__(self) -> None:
        check_match_mode(self.match_ids)
        if any(r < 1 for r in self.ranks) or any(not 0 < f <= 1 for f in self.fractions):
            raise ValueError(f"CMC ranks must be >= 1 and fractions in (0, 1], got {self.ranks} and {self.fractions}")


@dataclass
class CmcEvalReport:
    """What `evaluate_cmc` measured: the CMC metrics; unlabelled_queries, how many labelled queries
    have no reference; missing_queries, the labelled queries not among the query images (counted
    as misses); seconds per step ("embed_queries", "search"); and the k, nprobe and query
    expansion used."""

    metrics: M.CmcMetrics
    unlabelled_queries: int
    missing_queries: list[str]
    seconds: dict[str, float]
    config: dict[str, Any]
    # For reports (`--report`): the 1-based rank of each labelled query's first correct result
    # (metrics.retrieval.NOT_FOUND where none; the missing queries last), the correct references
    # of each searched query (keys), and the searched queries' first results.
    first_ranks: np.ndarray | None = None
    correct_keys: list[set[str]] = field(default_factory=list)
    top: TopResults | None = None

    def summary(self) -> dict:
        """The report as a JSON-ready dict: the metrics' summary, the query counts, seconds rounded
        to ms and the settings used."""
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
    if config.rerank is not None:
        start = time.perf_counter()
        result = rerank_head(searcher, query_uris(queries, use), result, config.rerank,
                             in_process_limit=config.in_process_limit)
        seconds["rerank"] = time.perf_counter() - start
    keys = result_keys(searcher, result, config.match_ids)
    correct_keys = [keyed[query_keys[i]] for i in use]
    ranks = M.first_match_ranks(keys, result.scores, correct_keys)
    correct = np.array([[key in refs for key in row[:REPORT_DEPTH]] for row, refs in zip(keys, correct_keys)], dtype=bool)
    # Labelled queries that could not be searched at all are misses at every rank.
    ranks = np.concatenate([ranks, np.full(len(missing), M.NOT_FOUND, np.int64)])
    metrics = M.cmc(ranks, n, depth, config.ranks, config.fractions)
    qe = config.query_expansion if config.query_expansion is not None else searcher.query_expansion
    return CmcEvalReport(
        metrics=metrics, unlabelled_queries=unlabelled, missing_queries=missing, seconds=seconds,
        first_ranks=ranks, correct_keys=correct_keys,
        top=top_results(searcher, result, result.scores, [queries.ids[i] for i in use],
                        [query_keys[i] for i in use], correct.reshape(len(use), -1)),
        config={"k": depth, "nprobe": config.nprobe or searcher.store.nprobe,
                "query_expansion": qe.to_dict() if isinstance(qe, QueryExpansion) else None,
                "rerank": config.rerank.to_dict() if config.rerank is not None else None},
    )


