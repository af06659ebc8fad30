"""Searching several shards of one index and merging their answers: the primitives every search path
shares (the in-process Searcher, the index build's tuning, the service's shard searchers).

Shards built from one trained index hold vectors quantised by the same quantiser, so their top-k
lists merged by distance are exactly the top-k of one index holding all of them. Scores are "higher
is more similar" whatever the metric: for L2 indexes, score = 1 - d/2 where d is the squared L2
distance (the cosine similarity for unit vectors); for inner-product indexes, the inner product.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

PARALLEL_OVER_QUERIES = 3  # faiss.IndexIVF.parallel_mode


@dataclass
class SearchResult:
    """Top-k per query: scores (nq, k) float32 (higher = more similar, NaN where fewer than k
    results), ids (nq, k) int64 vector ids (-1 there), shard (nq, k) int32 index of the shard that
    holds each id (-1 there)."""

    scores: np.ndarray
    ids: np.ndarray
    shard: np.ndarray
    # With local verification (raysearch.rerank): per hit, whether its geometry was verified and
    # its inlier count, each (nq, k); None without it.
    verified: np.ndarray | None = None
    inliers: np.ndarray | None = None

    @classmethod
    def empty(cls, k: int) -> SearchResult:
        """A result for no query: arrays of shape (0, k)."""
        return cls(np.zeros((0, k), np.float32), np.zeros((0, k), np.int64), np.zeros((0, k), np.int32))


@dataclass
class MergedTopK:
    """The global top-k of several lists: D (nq, k) float32 distances or scores (NaN where no
    result), I (nq, k) int64 ids (-1 where none), source (nq, k) int32 the list each result came
    from and rank (nq, k) int64 its position there (-1 where none)."""

    D: np.ndarray
    I: np.ndarray
    source: np.ndarray
    rank: np.ndarray


def merge_topk(D_list: list[np.ndarray], I_list: list[np.ndarray], k: int, keep_max: bool) -> MergedTopK:
    """Merge per-list top-k results, each (D, I) of shape (nq, k_i) sorted best first, into the
    global top-k with FAISS's heap merge (`faiss.merge_knn_results`). keep_max: larger D is better
    (scores, inner products); else smaller (L2 distances). Missing results (id -1) sort last; ties
    keep list order, then rank order within a list.
    """
    nq = D_list[0].shape[0] if D_list else 0
    n = len(D_list)
    if n == 0 or nq == 0:
        empty = np.full((nq, k), -1, np.int64)
        return MergedTopK(np.full((nq, k), np.nan, np.float32), empty, empty.astype(np.int32), empty.copy())
    # The merge works on positions (list * k + rank) so that every result points back at its list.
    D_all = np.full((n, nq, k), np.inf, np.float32)
    pos_all = np.full((n, nq, k), -1, np.int64)
    I_all = np.full((n, nq, k), -1, np.int64)
    for s, (D, I) in enumerate(zip(D_list, I_list)):
        width = min(k, D.shape[1])
        D, I = D[:, :width], np.asarray(I[:, :width], np.int64)
        valid = I >= 0
        # FAISS's CMax merge breaks ties toward later lists; merging negated values with the CMin
        # merge keeps the list order (checked against a stable sort of the concatenation).
        D_all[s, :, :width] = np.where(valid, -D if keep_max else D, np.inf)
        pos_all[s, :, :width] = np.where(valid, s * k + np.arange(width), -1)
        I_all[s, :, :width] = I
    D_merged, pos = faiss.merge_knn_results(D_all, pos_all, keep_max=False)
    found = pos >= 0
    source = np.where(found, pos // k, -1)
    rank = np.where(found, pos % k, -1)
    rows = np.arange(nq)[:, None]
    ids = np.where(found, I_all[np.clip(source, 0, None), rows, np.clip(rank, 0, None)], -1)
    D_out = np.where(found, -D_merged if keep_max else D_merged, np.nan).astype(np.float32)
    return MergedTopK(D_out, ids.astype(np.int64), source.astype(np.int32), rank.astype(np.int64))


def distances_to_scores(D: np.ndarray, metric: str) -> np.ndarray:
    """FAISS distances -> scores, higher = more similar: 1 - d/2 for squared L2, the value for IP."""
    if metric == "l2":
        return (1.0 - D / 2.0).astype(np.float32)
    return D.astype(np.float32)


def set_search_params(index: faiss.Index, nprobe: int | None) -> None:
    """Set nprobe (IVF) or efSearch (HNSW) through any wrapper (pre-transform, IDMap)."""
    if nprobe is None:
        return
    ps = faiss.ParameterSpace()
    try:
        faiss.extract_index_ivf(index)
        ps.set_index_parameter(index, "nprobe", int(nprobe))
        return
    except RuntimeError:
        pass
    base = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    if isinstance(base, faiss.IndexHNSW):
        base.hnsw.efSearch = int(nprobe)


class ShardGroup:
    """The shards of one index, searched together: (D, I) per shard, in shard order.

    Shards built from one trained index share its coarse quantiser. When every shard is a plain
    IVF index over identical centroids, a query batch is assigned to its nprobe lists once and
    each shard only scans its own lists (`search_preassigned`): the same results as searching
    every shard on its own, without repeating the quantisation (at low nprobe most of the cost
    of a small batch: 160 of 175 us per shard for 1024 x 1280-d centroids). FAISS has no
    primitive for this (IndexShards quantises in every shard), hence the code here. Any other mix
    of shards (HNSW, a pre-transform in front of the IVF, differing centroids) is searched shard by
    shard.
    """

    def __init__(self, indexes: list[faiss.Index], share: bool = True):
        self.indexes = list(indexes)
        self.ivfs = _same_coarse_quantizer(self.indexes) if share and len(self.indexes) > 1 else None
        for ivf in self.ivfs or []:
            # FAISS splits a batch over threads in `search` (mode 0) but not in
            # `search_preassigned`; mode 3 splits the queries there too (same per-query work, so the
            # same results, and `search` itself runs as fast in this mode).
            ivf.parallel_mode = PARALLEL_OVER_QUERIES

    @property
    def shared(self) -> bool:
        """True when the shards share one coarse quantisation per batch."""
        return self.ivfs is not None

    def search(self, xq: np.ndarray, k: int, nprobe: int | None) -> list[tuple[np.ndarray, np.ndarray]]:
        """(D, I) of every shard for queries xq (nq, d) float32, each (nq, k)."""
        xq = np.ascontiguousarray(xq, dtype=np.float32)
        if self.ivfs is None:
            out = []
            for index in self.indexes:
                set_search_params(index, nprobe)
                out.append(index.search(xq, k))
            return out
        first = self.ivfs[0]
        probe = min(int(nprobe or first.nprobe), int(first.nlist))
        coarse_d, coarse_i = first.quantizer.search(xq, probe)
        # nprobe goes in per-call parameters, not into the shared indexes: threads searching the
        # same shards with different nprobe values do not disturb each other.
        params = faiss.SearchParametersIVF()
        params.nprobe = probe
        n = xq.shape[0]
        out = []
        for ivf in self.ivfs:
            D, I = np.empty((n, k), np.float32), np.empty((n, k), np.int64)
            ivf.search_preassigned_c(n, faiss.swig_ptr(xq), k, faiss.swig_ptr(coarse_i), faiss.swig_ptr(coarse_d),
                                     faiss.swig_ptr(D), faiss.swig_ptr(I), False, params)
            out.append((D, I))
        return out


def _same_coarse_quantizer(indexes: list[faiss.Index]) -> list[faiss.IndexIVF] | None:
    """The indexes as IndexIVF objects when each is a plain IVF index (no wrapper) and all have
    the same metric and identical coarse centroids; None otherwise."""
    ivfs = []
    for index in indexes:
        ivf = faiss.downcast_index(index)
        if not isinstance(ivf, faiss.IndexIVF):
            return None
        ivfs.append(ivf)
    first = ivfs[0]
    if any(ivf.nlist != first.nlist or ivf.d != first.d or ivf.metric_type != first.metric_type for ivf in ivfs):
        return None
    try:
        centroids = first.quantizer.reconstruct_n(0, first.nlist)
        if any(not np.array_equal(ivf.quantizer.reconstruct_n(0, ivf.nlist), centroids) for ivf in ivfs[1:]):
            return None
    except RuntimeError:  # a quantiser that cannot give its centroids back: do not assume
        return None
    return ivfs


def search_shards(shards: list[faiss.Index] | ShardGroup, xq: np.ndarray, k: int, nprobe: int | None,
                  metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Search every shard and merge the top-k exactly, in the distance domain: (D, I, shard), each
    (nq, k); D float32 (squared L2 or inner product, NaN where no result), I int64 (-1 where no
    result), shard int32 (-1 where no result)."""
    group = shards if isinstance(shards, ShardGroup) else ShardGroup(shards)
    if not group.indexes:
        empty = np.full((xq.shape[0], k), -1, dtype=np.int64)
        return np.full(empty.shape, np.nan, np.float32), empty, empty.astype(np.int32)
    per_shard = group.search(xq, k, nprobe)
    merged = merge_topk([D for D, _ in per_shard], [I for _, I in per_shard], k, keep_max=metric != "l2")
    return merged.D, merged.I, merged.source
