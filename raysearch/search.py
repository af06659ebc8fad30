"""Searching an index directory in-process: fan out over shards, merge the top-k exactly.

Scores are "higher is more similar" whatever the metric: for L2 indexes, score = 1 - d/2 where d is
the squared L2 distance, which equals the cosine similarity for unit vectors; for inner-product
indexes, score is the inner product.

Index space: an index built with whitening is a faiss.IndexPreTransform; its shards whiten whatever
raw query they get. The Searcher whitens each query batch once (`to_index_space`) and searches the
inner indexes, which also lets alpha query expansion build its expanded queries in the whitened
space, from database vectors reconstructed by the index itself (`VectorLookup`).
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

from raysearch import storage
from raysearch.index.store import IdMap, IndexStore
from raysearch.models.embedder import embed_image_uris, preprocess_image
from raysearch.models.whitening import PreTransformParts, split_pretransform
from raysearch.rerank import QueryExpansion, alpha_query_expansion

MAX_K = 1000
PARALLEL_OVER_QUERIES = 3  # faiss.IndexIVF.parallel_mode


@dataclass
class SearchResult:
    """Top-k per query: scores (nq, k) float32 (higher = more similar), ids (nq, k) int64 vector ids
    (-1 where fewer than k results), shard (nq, k) int32 index of the shard that holds each id."""

    scores: np.ndarray
    ids: np.ndarray
    shard: np.ndarray


def distances_to_scores(D: np.ndarray, metric: str) -> np.ndarray:
    if metric == "l2":
        return (1.0 - D / 2.0).astype(np.float32)
    return D.astype(np.float32)


def merge_topk(scores: list[np.ndarray], ids: list[np.ndarray], k: int) -> SearchResult:
    """Merge per-shard top-k lists (higher score first) into the global top-k.

    Missing results (id -1) sort last. Ties keep shard order, then rank order within a shard.
    """
    nq = scores[0].shape[0] if scores else 0
    if not scores:
        return SearchResult(np.zeros((0, k), np.float32), np.zeros((0, k), np.int64), np.zeros((0, k), np.int32))
    S = np.concatenate(scores, axis=1)
    I = np.concatenate(ids, axis=1)
    shard = np.concatenate([np.full(s.shape, i, dtype=np.int32) for i, s in enumerate(scores)], axis=1)
    S = np.where(I < 0, -np.inf, S)
    order = np.argsort(-S, axis=1, kind="stable")[:, :k]
    rows = np.arange(nq)[:, None]
    S, I, shard = S[rows, order], I[rows, order], shard[rows, order]
    if S.shape[1] < k:  # fewer candidates than k in total: pad
        pad = k - S.shape[1]
        S = np.pad(S, ((0, 0), (0, pad)), constant_values=-np.inf)
        I = np.pad(I, ((0, 0), (0, pad)), constant_values=-1)
        shard = np.pad(shard, ((0, 0), (0, pad)), constant_values=-1)
    S = np.where(I < 0, np.float32(np.nan), S).astype(np.float32)
    return SearchResult(S, I.astype(np.int64), shard.astype(np.int32))


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


def search_index(index: faiss.Index, xq: np.ndarray, k: int, nprobe: int | None, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """One shard: (scores, ids), each (nq, k)."""
    set_search_params(index, nprobe)
    D, I = index.search(np.ascontiguousarray(xq, dtype=np.float32), k)
    return distances_to_scores(D, metric), I


class ShardGroup:
    """The shards of one index, searched together: (D, I) per shard, in shard order.

    Shards built from one trained index share its coarse quantiser. When every shard is a plain
    IVF index over identical centroids, a query batch is assigned to its nprobe lists once and
    each shard only scans its own lists (`search_preassigned`): the same results as searching
    every shard on its own, without repeating the quantisation (at low nprobe most of the cost
    of a small batch: 160 of 175 us per shard for 1024 x 1280-d centroids). Any other mix of
    shards (HNSW, a pre-transform in front of the IVF, differing centroids) is searched shard by
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


def search_shards(
    shards: list[faiss.Index] | ShardGroup, xq: np.ndarray, k: int, nprobe: int | None, metric: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Search every shard and merge the top-k exactly, in the distance domain: (D, I, shard), each
    (nq, k); D float32 (squared L2 or inner product, NaN where no result), I int64 (-1 where no
    result), shard int32 (-1 where no result).

    Every shard holds vectors quantised by the same trained index, so the shards' top-k lists
    merged by distance are exactly the top-k of one index holding all of them.
    """
    largest_first = metric != "l2"
    group = shards if isinstance(shards, ShardGroup) else ShardGroup(shards)
    D_list, I_list, S_list = [], [], []
    for s, (D, I) in enumerate(group.search(xq, k, nprobe)):
        D_list.append(D)
        I_list.append(I)
        S_list.append(np.full(I.shape, s, dtype=np.int32))
    if not group.indexes:
        empty = np.full((xq.shape[0], k), -1, dtype=np.int64)
        return np.full(empty.shape, np.nan, np.float32), empty, empty.astype(np.int32)
    D = np.concatenate(D_list, axis=1)
    I = np.concatenate(I_list, axis=1)
    S = np.concatenate(S_list, axis=1)
    key = np.where(I < 0, np.inf, -D if largest_first else D)
    order = np.argsort(key, axis=1, kind="stable")[:, :k]
    D, I, S = (np.take_along_axis(a, order, axis=1) for a in (D, I, S))
    missing = I < 0
    return np.where(missing, np.float32(np.nan), D).astype(np.float32), I.astype(np.int64), np.where(missing, -1, S).astype(np.int32)


class VectorLookup:
    """Database vectors of one shard by vector id, reconstructed by the index (in its own space).

    Exact for Flat, IVF-Flat and HNSW-Flat indexes (they store the vectors); for PQ / SQ codes it is
    the decoded code, i.e. the vector the index actually scores against.
    """

    def __init__(self, index: faiss.Index):
        self.index = index
        self._ivf = None
        self._positions: tuple[np.ndarray, np.ndarray] | None = None
        try:
            self._ivf = faiss.extract_index_ivf(index)
        except RuntimeError:
            if not isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
                raise ValueError(f"cannot look up vectors by id in a {type(index).__name__}") from None
            id_map = faiss.vector_to_array(index.id_map)
            order = np.argsort(id_map, kind="stable")
            self._positions = (id_map[order], order)
            self._base = faiss.downcast_index(index.index)
        else:
            # A hash table from id to list position, built once by scanning the ids of every list
            # (8 bytes per vector; the codes stay on disk).
            self._ivf.set_direct_map_type(faiss.DirectMap.Hashtable)

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """(n,) int64 ids held by this shard -> (n, d) float32."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if ids.size == 0:
            return np.zeros((0, self.index.d), np.float32)
        try:
            if self._ivf is not None:
                return self._ivf.reconstruct_batch(ids)
            sorted_ids, order = self._positions  # type: ignore[misc]
            pos = np.searchsorted(sorted_ids, ids)
            pos = np.clip(pos, 0, max(0, sorted_ids.size - 1))
            if sorted_ids.size == 0 or not np.all(sorted_ids[pos] == ids):
                raise KeyError(f"ids not in this shard: {ids[sorted_ids[pos] != ids][:5].tolist()}")
            return self._base.reconstruct_batch(order[pos].astype(np.int64))
        except RuntimeError as e:
            raise ValueError(f"this index cannot reconstruct its vectors ({str(e).splitlines()[0]})") from e


class Searcher:
    """All shards of an index in one process (read into memory, or memory-mapped where FAISS allows
    when they would take more than a quarter of the available memory: `IndexStore.prefers_mmap`).

    `query_expansion`: the alpha-QE applied by `search` when it is not given per call; by default
    the one recorded in the index manifest at build time (or none).
    """

    def __init__(self, index_dir: str | IndexStore, mmap: bool | None = None, verify: bool = True,
                 query_expansion: QueryExpansion | None | bool = None):
        self.store = index_dir if isinstance(index_dir, IndexStore) else IndexStore(index_dir, verify=verify)
        self.shards = [self.store.load_shard(i, mmap=mmap) for i in range(len(self.store.shards))]
        self.id_maps: list[IdMap] = [self.store.load_ids(i) for i in range(len(self.store.shards))]
        self._embedder = None
        # Shards are [whitening ->] inner index; every shard holds the same transform.
        self._parts: list[PreTransformParts] = [split_pretransform(ix) for ix in self.shards]
        self._group = ShardGroup([parts.inner for parts in self._parts])
        self._lookups: dict[int, VectorLookup] = {}
        if query_expansion is None:
            query_expansion = QueryExpansion.from_dict(self.store.manifest.get("query_expansion"))
        self.query_expansion: QueryExpansion | None = query_expansion or None

    @property
    def dim(self) -> int:
        return self.store.dim

    def to_index_space(self, xq: np.ndarray) -> np.ndarray:
        """Raw query vectors (n, dim) -> the vectors the inner indexes compare (whitened if the
        index whitens; unchanged otherwise)."""
        xq = check_queries(xq, self.dim)
        return self._parts[0].apply(xq) if self._parts else xq

    def search(self, xq: np.ndarray, k: int = 10, nprobe: int | None = None,
               query_expansion: QueryExpansion | None | bool = None) -> SearchResult:
        """Top-k for raw query vectors (nq, dim). `query_expansion`: None = the Searcher's default,
        False = none, or a QueryExpansion for this call."""
        check_k(k)
        return self.search_many(xq, k, nprobe, query_expansion)

    def search_many(self, xq: np.ndarray, k: int, nprobe: int | None = None,
                    query_expansion: QueryExpansion | None | bool = None, batch_size: int = 4096) -> SearchResult:
        """Like `search`, in query batches and without the k <= 1000 limit (evaluation ranks
        whole collections)."""
        xq = check_queries(xq, self.dim)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if nprobe is not None and nprobe < 1:
            raise ValueError(f"--nprobe must be >= 1, got {nprobe}")
        qe = self.query_expansion if query_expansion is None else (query_expansion or None)
        nprobe = nprobe or self.store.nprobe
        if xq.shape[0] == 0:
            return SearchResult(np.zeros((0, k), np.float32), np.zeros((0, k), np.int64), np.zeros((0, k), np.int32))
        results = [self._search_batch(xq[i:i + batch_size], k, nprobe, qe) for i in range(0, max(1, len(xq)), batch_size)]
        if len(results) == 1:
            return results[0]
        return SearchResult(*(np.concatenate([getattr(r, f) for r in results]) for f in ("scores", "ids", "shard")))

    def _search_batch(self, xq: np.ndarray, k: int, nprobe: int | None, qe: QueryExpansion | None) -> SearchResult:
        xs = self.to_index_space(xq)
        if qe is None:
            return self.search_index_space(xs, k, nprobe)
        first = self.search_index_space(xs, qe.k, nprobe)
        valid = first.ids >= 0
        top = self.vectors(first.ids, first.shard)
        return self.search_index_space(alpha_query_expansion(xs, top, first.scores, qe.alpha, valid), k, nprobe)

    def search_index_space(self, xs: np.ndarray, k: int, nprobe: int | None = None) -> SearchResult:
        """Search vectors that are already in the index's space (see `to_index_space`)."""
        per_shard = self._group.search(xs, k, nprobe)
        return merge_topk([distances_to_scores(D, self.store.metric) for D, _ in per_shard], [I for _, I in per_shard], k)

    def vectors(self, ids: np.ndarray, shard: np.ndarray) -> np.ndarray:
        """Database vectors in the index's space for result ids (any shape) and their shards;
        zeros where id < 0. Returns ids.shape + (d,) float32."""
        ids, shard = np.asarray(ids, np.int64), np.asarray(shard)
        d = self._parts[0].inner.d if self._parts else self.dim
        out = np.zeros(ids.shape + (d,), np.float32)
        for s in np.unique(shard[ids >= 0]):
            mask = (shard == s) & (ids >= 0)
            if int(s) not in self._lookups:
                self._lookups[int(s)] = VectorLookup(self._parts[int(s)].inner)
            out[mask] = self._lookups[int(s)].vectors(ids[mask])
        return out

    def lookup(self, result: SearchResult) -> tuple[np.ndarray, np.ndarray]:
        """image_ids and uris (object arrays shaped like result.ids; None where no result)."""
        image_ids = np.full(result.ids.shape, None, dtype=object)
        uris = np.full(result.ids.shape, None, dtype=object)
        for s, id_map in enumerate(self.id_maps):
            mask = (result.shard == s) & (result.ids >= 0)
            if not mask.any():
                continue
            image_ids[mask], uris[mask] = lookup_ids(id_map, result.ids[mask])
        return image_ids, uris

    def embedder(self):
        """The index's own model, loaded once, for embedding query images in this process."""
        if self._embedder is None:
            from raysearch.models.embedder import Embedder

            self._embedder = Embedder(self.store.model_spec.to_dict(), device=None)
        return self._embedder

    def preprocess(self, data: bytes) -> np.ndarray:
        """Image bytes -> (S, S, 3) uint8, exactly as the build preprocessed (raises DecodeError)."""
        return preprocess_image(data, self.store.model_spec)

    def embed_image_bytes(self, images: list[bytes]) -> np.ndarray:
        """Query image bytes -> (n, dim) vectors. Raises DecodeError for the first bad image."""
        return self.embedder().embed_pixels(np.stack([self.preprocess(d) for d in images]))

    def search_images(
        self, uris: list[str], k: int = 10, nprobe: int | None = None,
        query_expansion: QueryExpansion | None | bool = None,
    ) -> tuple[SearchResult, list[str | None]]:
        """Embed and search query images by path/URI. Returns the result and, per query, None or
        the reason it could not be used (its result row is then empty)."""
        xq, problems = embed_image_uris(uris, self.store.model_spec, self.embedder())
        result = self.search(xq, k, nprobe, query_expansion)
        bad = [i for i, p in enumerate(problems) if p is not None]
        result.ids[bad] = -1
        result.scores[bad] = np.nan
        result.shard[bad] = -1
        return result, problems


def lookup_ids(id_map: IdMap, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vector ids of one shard -> (image_ids, uris), object arrays shaped like `ids`; None for an
    id the shard does not hold (or -1)."""
    ids = np.asarray(ids, dtype=np.int64)
    image_ids = np.full(ids.shape, None, dtype=object)
    uris = np.full(ids.shape, None, dtype=object)
    pos = id_map.positions(ids.ravel())
    found = pos >= 0
    if found.any():
        image_ids.ravel()[found], uris.ravel()[found] = id_map.strings(pos[found])
    return image_ids, uris


def check_queries(xq: np.ndarray, dim: int) -> np.ndarray:
    xq = np.asarray(xq, dtype=np.float32)
    if xq.ndim == 1:
        xq = xq[None, :]
    if xq.ndim != 2 or xq.shape[1] != dim:
        raise ValueError(f"query vectors must have shape (n, {dim}), got {tuple(xq.shape)}")
    if not np.isfinite(xq).all():
        raise ValueError("query vectors hold NaN or inf")
    return np.ascontiguousarray(xq)


def check_k(k: int) -> None:
    if not 1 <= int(k) <= MAX_K:
        raise ValueError(f"k must be between 1 and {MAX_K}, got {k}")
