"""`raysearch eval ann`: recall@k of an index against exact search over the same vectors, and
latency, for each nprobe / efSearch."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from raysearch import storage
from raysearch.formats.embeddings import iter_vector_parts, sample_embeddings
from raysearch.index.exact import exact_knn
from raysearch.metrics import retrieval as M
from raysearch.search import Searcher


@dataclass(frozen=True)
class AnnEvalConfig:
    """Settings of `evaluate_ann`: how many query vectors to sample from the index's own
    embeddings, the k of each recall@k column, and the seed of the sample."""

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
    """What `evaluate_ann` measured: one row per nprobe / efSearch with recall@k (None where k
    exceeds the index's size) and milliseconds per query, batched and single (median);
    exact_seconds: the time of the exact search that gives the true neighbours."""

    rows: list[dict[str, Any]]
    n_queries: int
    n_vectors: int
    factory: str
    exact_seconds: float

    def summary(self) -> dict:
        """The report as a JSON-ready dict (exact_seconds rounded to ms)."""
        return {"factory": self.factory, "n_queries": self.n_queries, "n_vectors": self.n_vectors,
                "exact_seconds": round(self.exact_seconds, 3), "rows": self.rows}


def index_embeddings_dirs(searcher: Searcher) -> list[str]:
    """Every embeddings folder the index holds vectors of: the build's and each `raysearch add`'s."""
    folders = searcher.store.embeddings_folders()
    if not folders:
        raise ValueError(f"{searcher.store.index_dir}: the manifest names no embeddings folder")
    for path in folders:
        if not storage.exists(path):
            raise FileNotFoundError(f"the embeddings of {searcher.store.index_dir} are missing: {path}")
    return folders


def default_nprobes(searcher: Searcher) -> list[int | None]:
    """nprobe values to sweep: powers of two up to nlist for IVF (plus the index's own), an
    efSearch ladder for HNSW, [None] (one exact row) for anything else."""

    inner = searcher.inner_index
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


def exact_neighbours(searcher: Searcher, xq: np.ndarray, embeddings_dirs: list[str], k: int) -> np.ndarray:
    """Exact top-k vector ids (nq, k) of raw queries over every vector of the embeddings folders,
    compared in the index's space and metric (a brute-force scan, streamed part by part)."""
    blocks = ((searcher.to_index_space(x), rows) for folder in embeddings_dirs for x, rows in iter_vector_parts(folder))
    _, I = exact_knn(searcher.to_index_space(xq), blocks, k, searcher.store.metric)
    return I


def evaluate_ann(searcher: Searcher | str, config: AnnEvalConfig = AnnEvalConfig()) -> AnnEvalReport:
    """Recall@k of the index against exact search over the same vectors (sampled from its own
    embeddings), and latency, for each nprobe / efSearch."""

    searcher = searcher if isinstance(searcher, Searcher) else Searcher(searcher)
    embeddings_dirs = index_embeddings_dirs(searcher)
    xq = sample_embeddings(embeddings_dirs, config.n_queries, config.seed)
    ntotal = searcher.store.ntotal
    kmax = min(max(config.ks), ntotal)
    start = time.perf_counter()
    exact = exact_neighbours(searcher, xq, embeddings_dirs, kmax)
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
