"""Tuning the search: the smallest nprobe (IVF) or efSearch (HNSW) that reaches a target recall@k.

Real queries are not indexed vectors: an edited copy of an image lands near its original but off
the collection's own points, in cells around it that the original's own search may not reach. A
random sample of the indexed vectors, searched with their own id left out, is therefore an easier
test than real queries: on 1,500 photographs with the built-in model, nprobe tuned to 0.95 that
way gave 0.90-0.93 recall@10 for edited copies (benchmarks/tune_queries.py). So by default each
tuning query is a sampled indexed vector moved along a random direction drawn from the
collection's own covariance until its cosine to the original is COPY_COSINE (0.85: the median
similarity of an edited copy to its original there), and the target carries a small margin.
Each query's exact neighbours come from an exact scan done by the shard builders while they add.
`queries="database"` keeps the leave-one-out sample of indexed vectors instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import faiss
import numpy as np

MAX_TUNE_QUERIES = 1000
QUERY_KINDS = ("perturbed", "database")
COPY_COSINE = 0.85      # cosine of a tuning query to the indexed vector it was made from
TUNE_MARGIN = 0.01      # tuned to target + margin: the queries only model real ones
COVARIANCE_SAMPLE = 256


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

    def to_manifest(self, queries: str = "indexed vectors sampled at random, their own id left out",
                    target: float | None = None) -> dict:
        """manifest["search"]: nprobe (also efSearch), tuned, the queries used, and the measured
        curve; `target` is the user's target when `self.target` includes a margin."""
        return {
            "nprobe": self.value,
            "param": self.param,
            "tuned": self.param is not None,
            "target_recall": self.target if target is None else target,
            "tuned_to": self.target,
            "recall_at_k": round(self.recall, 4),
            "k": self.k,
            "reached": self.reached,
            "n_queries": self.n_queries,
            "queries": queries,
            "curve": [
                {"value": p.value, "recall_at_k": round(p.recall, 4), "ms_per_query": round(p.ms_per_query, 4)}
                for p in self.curve
            ],
        }


def tune_queries_count(n: int) -> int:
    """How many of `n` indexed vectors to use as tuning queries."""
    return int(min(MAX_TUNE_QUERIES, max(1, n // 10))) if n > 1 else 0


def perturbed_queries(x: np.ndarray, sample: np.ndarray, cosine: float = COPY_COSINE, seed: int = 0) -> np.ndarray:
    """Queries that look like edited copies of the vectors x (n, d) float32: each moved along a
    random direction with the covariance of `sample` (m, d) (a random combination of its centred
    rows), orthogonal to itself, so that cos(query, x) = `cosine` exactly; norms are kept.
    Returns (n, d) float32. With fewer than 2 sample rows the vectors come back unchanged."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if len(sample) < 2 or len(x) == 0:
        return x.copy()
    rng = np.random.default_rng(seed)
    rows = sample[rng.choice(len(sample), size=min(COVARIANCE_SAMPLE, len(sample)), replace=False)]
    centred = rows - rows.mean(axis=0)
    e = rng.standard_normal((len(x), len(centred))).astype(np.float32) @ centred
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    unit = x / np.maximum(norms, 1e-12)
    e -= (e * unit).sum(axis=1, keepdims=True) * unit     # orthogonal to the vector it perturbs
    e /= np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    q = unit + np.sqrt(1.0 / cosine ** 2 - 1.0) * e
    q *= norms / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    return q.astype(np.float32)


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
