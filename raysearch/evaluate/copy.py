"""`raysearch eval copy`: DISC21 / ISC2021 copy detection of an index (micro-AP, recall at
precision 0.9, recall@1/@10), with optional SSCD score normalisation against a background set."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from raysearch.evaluate.queries import (
    IN_PROCESS_LIMIT,
    REPORT_DEPTH,
    QuerySet,
    TopResults,
    background_bias,
    check_match_mode,
    embed_images,
    embeddings_or_images,
    key_function,
    query_uris,
    rerank_queries,
    result_keys,
    top_results,
    truncate,
    work_folder,
)
from raysearch.index.expansion import QueryExpansion
from raysearch.metrics import retrieval as M
from raysearch.metrics.groundtruth import CopyGroundTruth, read_copy_ground_truth
from raysearch.rerank import RerankConfig
from raysearch.search import Searcher

log = logging.getLogger("raysearch")


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
    rerank: RerankConfig | None = None   # verify the top rerank.k with local features, re-order

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
    """What `evaluate_copy_detection` measured: the metrics, the pooled (query, reference, score)
    predictions they were computed from, seconds per step, and the settings used."""

    metrics: M.CopyDetectionMetrics
    predictions: M.Predictions
    n_queries: int                 # queries evaluated (listed in the ground truth and embedded)
    missing_queries: list[str]     # listed in the ground truth but not usable (absent or unreadable)
    ignored_queries: int           # query images not listed in the ground truth
    seconds: dict[str, float]
    config: dict[str, Any]
    # For reports (`--report`): the ground-truth pairs scored (as matched: keys), and each
    # evaluated query's first results with the scores ranked by.
    ground_truth: list[tuple[str, str]] = field(default_factory=list)
    top: TopResults | None = None

    def summary(self) -> dict:
        """The report as a JSON-ready dict without the predictions: the metrics' summary, the
        query counts, seconds rounded to ms and the settings used."""
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
    with work_folder(config.work_dir) as work:
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
    depth = max(config.k, config.rerank.k) if config.rerank else config.k
    result = searcher.search_many(xq, depth, config.nprobe, config.query_expansion)
    seconds["search"] = time.perf_counter() - start
    if config.rerank is not None:
        start = time.perf_counter()
        result, stages = rerank_queries(searcher, query_uris(queries, use), result, config.rerank,
                                        config.in_process_limit, config.progress)
        result = truncate(result, config.k)
        seconds["rerank"] = time.perf_counter() - start
        seconds.update({f"rerank_{k}": v for k, v in stages.items()})
    scores = result.scores.copy()
    if background is not None:
        start = time.perf_counter()
        bias = background_bias(searcher, xq, background, config.background_k)
        scores = scores - config.beta * bias[:, None]
        seconds["score_normalisation"] = time.perf_counter() - start
    keys = result_keys(searcher, result, config.match_ids)
    used_keys = [query_keys[i] for i in use]
    predictions = copy_predictions(used_keys, keys, scores)
    if config.max_predictions is not None:
        predictions = M.keep_best_predictions(predictions, config.max_predictions)
    start = time.perf_counter()
    metrics = M.copy_detection_metrics(gt.pairs, predictions)
    seconds["metrics"] = time.perf_counter() - start
    qe = config.query_expansion if config.query_expansion is not None else searcher.query_expansion
    gt_pairs = set(gt.pairs)
    correct = np.array([[(q, key) in gt_pairs for key in row[:REPORT_DEPTH]] for q, row in zip(used_keys, keys)], dtype=bool)
    return CopyEvalReport(
        metrics=metrics, predictions=predictions, n_queries=len(use), missing_queries=missing,
        ignored_queries=len(query_keys) - len(use), seconds=seconds,
        ground_truth=list(gt.pairs), top=top_results(searcher, result, scores, [queries.ids[i] for i in use], used_keys, correct.reshape(len(use), -1)),
        config={
            "k": config.k, "nprobe": config.nprobe or searcher.store.nprobe,
            "query_expansion": qe.to_dict() if isinstance(qe, QueryExpansion) else None,
            "score_normalisation": (
                {"beta": config.beta, "k": config.background_k,
                 "background": background if isinstance(background, str) else f"{len(background)} vectors"}
                if background is not None else None
            ),
            "match_ids": config.match_ids,
            "rerank": config.rerank.to_dict() if config.rerank is not None else None,
        },
    )


