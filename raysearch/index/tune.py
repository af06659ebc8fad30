"""Tuning the search: the smallest nprobe (IVF) or efSearch (HNSW) that reaches a target recall@k.

The queries are a random sample of the indexed vectors themselves. Each query's exact neighbours
come from an exact scan done by the shard builders while they add; the query's own vector is left out of both the exact
and the approximate lists ("leave one out"), so a query is not credited for finding itself and the
recall measured is that of finding *other* close vectors, as a real query would.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import faiss
import numpy as np

MAX_TUNE_QUERIES = 1000


@dataclass(frozen=True)
class TunePoint:
    value: int | None
    recall: float
    ms_per_query: float


@dataclass(frozen=True)
class TuneResult:
    """param: "nprobe", "efSearch" or None (nothing to tune: exact or single-setting index)."""

    param: str | None
    value: int | None
    recall: float
    target: float
    reached: bool
    k: int
    n_queries: int
    curve: list[TunePoint] = field(default_factory=list)

    def to_manifest(self) -> dict:
        """manifest["search"]: nprobe (also efSearch), tuned, and the measured curve."""
        return {
            "nprobe": self.value,
            "param": self.param,
            "tuned": self.param is not None,
            "target_recall": self.target,
            "recall_at_k": round(self.recall, 4),
            "k": self.k,
            "reached": self.reached,
            "n_queries": self.n_queries,
            "queries": "indexed vectors sampled at random, their own id left out",
            "curve": [
                {"value": p.value, "recall_at_k": round(p.recall, 4), "ms_per_query": round(p.ms_per_query, 4)}
                for p in self.curve
            ],
        }


def tune_queries_count(n: int) -> int:
    """How many of `n` indexed vectors to use as tuning queries."""
    return int(min(MAX_TUNE_QUERIES, max(1, n // 10))) if n > 1 else 0


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each query's true top-k (truth, (nq, k); -1 = none) found in `found` (nq, k)."""
    hits, total = 0, 0
    for f, t in zip(found, truth):
        t = t[t >= 0]
        total += t.size
        hits += np.intersect1d(f[f >= 0], t).size
    return hits / total if total else 1.0


def drop_self(I: np.ndarray, self_ids: np.ndarray, k: int) -> np.ndarray:
    """Remove each query's own id from its result row and keep the first k: (nq, k) int64."""
    out = np.full((I.shape[0], k), -1, dtype=np.int64)
    for q in range(I.shape[0]):
        row = I[q][I[q] != self_ids[q]][:k]
        out[q, : row.size] = row
    return out


def search_param(index: faiss.Index) -> tuple[str | None, list[int]]:
    """What to tune on `index` and the candidate values, smallest first."""
    try:
        ivf = faiss.extract_index_ivf(index)
        nlist = int(ivf.nlist)
        values = [1 << i for i in range(nlist.bit_length()) if (1 << i) < nlist] + [nlist]
        return "nprobe", values
    except RuntimeError:
        pass
    base = faiss.downcast_index(index.index) if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)) else faiss.downcast_index(index)
    if isinstance(base, faiss.IndexPreTransform):
        base = faiss.downcast_index(base.index)
    if isinstance(base, faiss.IndexHNSW):
        return "efSearch", [16, 32, 64, 128, 256, 512, 1024, 2048]
    return None, []


def tune(
    search: Callable[[np.ndarray, int, int | None], np.ndarray],
    xq: np.ndarray,
    q_ids: np.ndarray,
    truth: np.ndarray,
    param: str | None,
    values: list[int],
    target: float = 0.95,
    k: int = 10,
) -> TuneResult:
    """Find the smallest value of `param` whose recall@k reaches `target`.

    search(xq, k', value) -> ids (nq, k') searches every shard with that setting. `truth` (nq, k)
    holds the exact neighbours with each query's own id already left out. Powers of two are tried
    first, then the gap below the first one that reaches the target is bisected. When no value
    reaches the target, the smallest value that gives the best recall is kept (reached=False).
    """
    nq = xq.shape[0]

    def measure(value: int | None) -> TunePoint:
        start = time.perf_counter()
        found = search(xq, k + 1, value)
        ms = 1000 * (time.perf_counter() - start) / max(1, nq)
        return TunePoint(value, recall_at_k(drop_self(found, q_ids, k), truth), ms)

    if param is None:
        point = measure(None)
        return TuneResult(None, None, point.recall, target, point.recall >= target, k, nq, [point])
    curve: list[TunePoint] = []
    for value in values:
        curve.append(measure(value))
        if curve[-1].recall >= target:
            break
    best = curve[-1]
    if best.recall >= target and len(curve) > 1:
        lo, hi = curve[-2].value, best.value  # lo fails, hi passes
        assert lo is not None and hi is not None
        while hi - lo > 1:
            mid = (lo + hi) // 2
            point = measure(mid)
            curve.append(point)
            if point.recall >= target:
                hi, best = mid, point
            else:
                lo = mid
    if best.recall < target:
        top = max(p.recall for p in curve)
        best = min((p for p in curve if p.recall >= top - 1e-9), key=lambda p: p.value or 0)
    curve.sort(key=lambda p: p.value or 0)
    return TuneResult(param, best.value, best.recall, target, best.recall >= target, k, nq, curve)
