"""`raysearch eval gldv2`: an index built over GLDv2's index images, scored with the challenge's
mAP@100 on its test images (the ground truth and metrics are in `raysearch.metrics.gldv2`)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from raysearch import storage
from raysearch.evaluate.queries import embed_images, embed_rows, list_source, result_keys
from raysearch.index.expansion import QueryExpansion
from raysearch.metrics.gldv2 import (
    MAX_PREDICTIONS,
    RetrievalMetrics,
    RetrievalSolution,
    read_retrieval_solution,
    retrieval_metrics,
)
from raysearch.search import Searcher

log = logging.getLogger("raysearch")


def gldv2_key(image_id: str) -> str:
    """The name a GLDv2 image is matched by: its file name without folders or extension (an index
    built from the a/b/c/ folders directly has ids 'a/b/c/abc...'). Unlike copy detection's keys,
    all-digit hex ids stay strings."""
    name = str(image_id).replace("\\", "/").rsplit("/", 1)[-1].strip()
    dot = name.rfind(".")
    return name[:dot] if dot > 0 else name


@dataclass(frozen=True)
class Gldv2EvalConfig:
    """`raysearch eval gldv2` settings. query_expansion: None = the index's default, False = off."""

    k: int = MAX_PREDICTIONS
    nprobe: int | None = None
    query_expansion: Any = None
    match_ids: str = "name"
    in_process_limit: int = 1000
    work_dir: str | None = None
    progress: bool = False

    def __post_init__(self) -> None:
        if not MAX_PREDICTIONS <= self.k <= 1000:
            raise ValueError(f"--k must be between {MAX_PREDICTIONS} and 1000 (the metric reads the top 100), got {self.k}")
        if self.match_ids not in ("name", "exact"):
            raise ValueError(f"--match-ids must be 'name' or 'exact', got {self.match_ids!r}")
        if self.in_process_limit < 0:
            raise ValueError(f"--in-process-limit must be >= 0, got {self.in_process_limit}")


@dataclass
class Gldv2EvalReport:
    """What `evaluate_gldv2` measured: metrics per subset, each test image's predictions, seconds
    per step and the settings used. missing_queries also lists the test images that could not be
    embedded (they score AP 0 too)."""

    metrics: dict[str, RetrievalMetrics]     # "Public", "Private", "All"
    predictions: dict[str, list[str]]        # test id -> ranked index ids (top k)
    n_ignored: int                           # test images the ground truth ignores
    missing_queries: list[str]               # scored test images not found among the query images
    seconds: dict[str, float]
    config: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict:
        """The report as a JSON-ready dict without the predictions: each subset's metrics under its
        name, the counts, seconds rounded to ms and the settings used."""
        return {
            **{usage: m.summary() for usage, m in self.metrics.items()},
            "n_ignored": self.n_ignored, "n_missing_queries": len(self.missing_queries),
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()}, "config": self.config,
        }


def _embed_selected(ids: list[str], uris: list[str], spec, config: Gldv2EvalConfig, work: str, embedder):
    """Embed the chosen query images: in-process when few, else with Ray via a list file."""
    if len(ids) <= config.in_process_limit:
        return embed_rows(ids, uris, spec, embedder)
    import pyarrow as pa
    import pyarrow.parquet as pq

    listing = storage.join(work, "gldv2-queries.parquet")
    buf = pa.BufferOutputStream()
    pq.write_table(pa.table({"path": pa.array(uris, pa.string()), "id": pa.array(ids, pa.string())}), buf)
    storage.atomic_write(listing, buf.getvalue().to_pybytes())
    return embed_images(listing, spec, in_process_limit=0, work_dir=work, progress=config.progress)


def evaluate_gldv2(searcher, queries: str, solution: RetrievalSolution | str,
                   config: Gldv2EvalConfig = Gldv2EvalConfig()) -> Gldv2EvalReport:
    """GLDv2 retrieval evaluation of an index built over GLDv2's index images.

    `queries`: an image SOURCE holding the test images (e.g. 'gldv2:ROOT:test'); only the ones the
    ground truth scores are embedded. Returns mAP@100, mP@k and positions for the Public and
    Private subsets and both together ("All").
    """
    import tempfile

    seconds: dict[str, float] = {}
    searcher = searcher if isinstance(searcher, Searcher) else Searcher(searcher)
    sol = solution if isinstance(solution, RetrievalSolution) else read_retrieval_solution(solution)
    keyf = gldv2_key if config.match_ids == "name" else str
    scored = sol.scored_ids()
    start = time.perf_counter()
    ids, uris = list_source(queries)
    chosen: dict[str, str] = {}
    for image_id, uri in zip(ids, uris):
        key = keyf(image_id)
        if key in scored and key not in chosen:
            chosen[key] = uri
    missing = sorted(scored - set(chosen))
    if not chosen:
        raise ValueError(f"none of the {len(ids)} images of {queries} is a scored test image of the ground truth "
                         f"(e.g. image {keyf(ids[0]) if ids else None!r}); check --queries and --match-ids")
    if missing:
        log.warning("%d scored test images are not among the query images (e.g. %s); they count as AP 0",
                    len(missing), missing[:3])
    spec = searcher.store.model_spec
    with tempfile.TemporaryDirectory(prefix="raysearch-gldv2-") as tmp:
        work = config.work_dir or tmp
        storage.makedirs(work)
        query_set = _embed_selected(list(chosen), list(chosen.values()), spec, config, work, searcher.embedder())
    seconds["embed_queries"] = time.perf_counter() - start
    query_keys = [keyf(q) for q in query_set.ids]
    for key, problem in query_set.problems.items():
        log.warning("query image %s cannot be used: %s", key, problem)
    start = time.perf_counter()
    depth = int(min(config.k, searcher.store.ntotal))
    result = searcher.search_many(query_set.vectors, depth, config.nprobe, config.query_expansion)
    seconds["search"] = time.perf_counter() - start
    keys = result_keys(searcher, result, "exact")
    predictions: dict[str, list[str]] = {}
    for q, row in zip(query_keys, keys):
        predictions[q] = [keyf(k) for k in row if k is not None]
    metrics = {usage: retrieval_metrics(predictions, sol.subset(usage))
               for usage in ("Public", "Private", "All") if sol.subset(usage)}
    qe = config.query_expansion if config.query_expansion is not None else searcher.query_expansion
    return Gldv2EvalReport(
        metrics=metrics, predictions=predictions, n_ignored=len(sol.ignored),
        missing_queries=missing + sorted(keyf(k) for k in query_set.problems), seconds=seconds,
        config={"k": depth, "nprobe": config.nprobe or searcher.store.nprobe, "match_ids": config.match_ids,
                "query_expansion": qe.to_dict() if isinstance(qe, QueryExpansion) else None},
    )
