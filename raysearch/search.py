"""Searching an index directory in-process: fan out over shards, merge the top-k exactly
(`raysearch.index.fanout`), map vector ids back to image ids.

Scores are "higher is more similar" whatever the metric: for L2 indexes, score = 1 - d/2 where d is
the squared L2 distance, which equals the cosine similarity for unit vectors; for inner-product
indexes, score is the inner product.

Index space: an index built with whitening is a faiss.IndexPreTransform; its shards whiten whatever
raw query they get. The Searcher whitens each query batch once (`to_index_space`) and searches the
inner indexes, which also lets alpha query expansion build its expanded queries in the whitened
space, from database vectors reconstructed by the index itself (`VectorLookup`).
"""

from __future__ import annotations

import faiss
import numpy as np

from raysearch.index.expansion import QueryExpansion, alpha_query_expansion
from raysearch.index.fanout import SearchResult, ShardGroup, distances_to_scores, merge_topk
from raysearch.index.store import IdMap, IndexStore
from raysearch.index.fields import Fields, empty_fields
from raysearch.index.tombstones import VectorFilter, search_filtered
from raysearch.index.transforms import PreTransformParts, split_pretransform
from raysearch.models.embedder import embed_image_uris, preprocess_image
from raysearch.rerank import LocalReranker, RerankConfig, rerank_rows

MAX_K = 1000


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
        # Removed images (tombstones) are skipped by every search until the index is compacted.
        self.removed_ids: np.ndarray = self.store.removed_ids()
        self.id_filter = VectorFilter(self.removed_ids)
        self._fields: Fields | None = None
        self._filters: dict[str, VectorFilter] = {}
        self._lookups: dict[int, VectorLookup] = {}
        self._reranker: LocalReranker | None = None
        if query_expansion is None:
            query_expansion = QueryExpansion.from_dict(self.store.manifest.get("query_expansion"))
        self.query_expansion: QueryExpansion | None = query_expansion or None

    @property
    def dim(self) -> int:
        return self.store.dim

    @property
    def inner_index(self) -> faiss.Index | None:
        """The first shard's index behind its transforms (None for an index without shards): what
        kind of index the queries reach (IVF, HNSW, Flat ...) after whitening."""
        return self._parts[0].inner if self._parts else None

    def to_index_space(self, xq: np.ndarray) -> np.ndarray:
        """Raw query vectors (n, dim) -> the vectors the inner indexes compare (whitened if the
        index whitens; unchanged otherwise)."""
        xq = check_queries(xq, self.dim)
        return self._parts[0].apply(xq) if self._parts else xq

    @property
    def fields(self) -> Fields:
        """The images' metadata (raysearch.index.fields), read on first use; empty without any."""
        if self._fields is None:
            table = self.store.load_fields()
            self._fields = Fields(table) if table is not None else empty_fields()
        return self._fields

    def filter_for(self, where: str | None) -> VectorFilter:
        """The ids a search may return: every live one, or with `where` (an expression over the
        metadata columns, raysearch.index.fields) only the live ones that satisfy it."""
        if where is None:
            return self.id_filter
        if not self.fields.columns:
            raise ValueError(f"--where needs metadata columns; {self.store.index_dir} has none "
                             "(build or add from a .csv / .parquet list with extra columns)")
        key = where.strip()
        if key not in self._filters:
            if len(self._filters) >= 16:   # the bitmaps of a few recent filters
                self._filters.pop(next(iter(self._filters)))
            self._filters[key] = VectorFilter(self.removed_ids, self.fields.select(where))
        return self._filters[key]

    def fields_of(self, result: SearchResult, columns: list[str] | None = None) -> list[list[dict]]:
        """The metadata of every hit of `result` (one list per query, {} where a hit has none;
        cut at the first empty slot); `columns` None: all of them."""
        values = self.fields.values(result.ids.ravel(), columns) if self.fields.columns else [{}] * result.ids.size
        k = result.ids.shape[1] if result.ids.ndim == 2 else 0
        return [[values[q * k + r] for r in range(k) if result.ids[q, r] >= 0] for q in range(result.ids.shape[0])]

    def search(self, xq: np.ndarray, k: int = 10, nprobe: int | None = None,
               query_expansion: QueryExpansion | None | bool = None, where: str | None = None) -> SearchResult:
        """Top-k for raw query vectors (nq, dim). `query_expansion`: None = the Searcher's default,
        False = none, or a QueryExpansion for this call. `where`: only images whose metadata
        satisfy it (raysearch.index.fields), still k of them where k exist."""
        check_k(k)
        return self.search_many(xq, k, nprobe, query_expansion, where=where)

    def search_many(self, xq: np.ndarray, k: int, nprobe: int | None = None,
                    query_expansion: QueryExpansion | None | bool = None, batch_size: int = 4096,
                    where: str | None = None) -> SearchResult:
        """Like `search`, in query batches and without the k <= 1000 limit (evaluation ranks
        whole collections)."""
        xq = check_queries(xq, self.dim)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if nprobe is not None and nprobe < 1:
            raise ValueError(f"--nprobe must be >= 1, got {nprobe}")
        qe = self.query_expansion if query_expansion is None else (query_expansion or None)
        nprobe = nprobe or self.store.nprobe
        id_filter = self.filter_for(where)
        if xq.shape[0] == 0:
            return SearchResult.empty(k)
        results = [self._search_batch(xq[i:i + batch_size], k, nprobe, qe, id_filter)
                   for i in range(0, max(1, len(xq)), batch_size)]
        if len(results) == 1:
            return results[0]
        return SearchResult(*(np.concatenate([getattr(r, f) for r in results]) for f in ("scores", "ids", "shard")))

    def _search_batch(self, xq: np.ndarray, k: int, nprobe: int | None, qe: QueryExpansion | None,
                      id_filter: VectorFilter | None = None) -> SearchResult:
        xs = self.to_index_space(xq)
        if qe is None:
            return self.search_index_space(xs, k, nprobe, id_filter)
        first = self.search_index_space(xs, qe.k, nprobe, id_filter)
        valid = first.ids >= 0
        top = self.vectors(first.ids, first.shard)
        return self.search_index_space(alpha_query_expansion(xs, top, first.scores, qe.alpha, valid), k, nprobe, id_filter)

    def search_index_space(self, xs: np.ndarray, k: int, nprobe: int | None = None,
                           id_filter: VectorFilter | None = None) -> SearchResult:
        """Search vectors that are already in the index's space (see `to_index_space`); removed
        vectors (and with `id_filter`, every id it refuses) are skipped by FAISS ID selectors, so
        each row still holds k results when the index has k it may return."""
        per_shard = search_filtered(self._group, xs, k, nprobe, id_filter or self.id_filter)
        metric = self.store.metric
        merged = merge_topk([D for D, _ in per_shard], [I for _, I in per_shard], k, keep_max=metric != "l2")
        return SearchResult(distances_to_scores(merged.D, metric), merged.I, merged.source)

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
            image_ids[mask], uris[mask] = id_map.lookup(result.ids[mask])
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
        query_expansion: QueryExpansion | None | bool = None, rerank: RerankConfig | None = None,
        where: str | None = None,
    ) -> tuple[SearchResult, list[str | None]]:
        """Embed and search query images by path/URI. Returns the result and, per query, None or
        the reason it could not be used (its result row is then empty).

        rerank: verify each query's first `rerank.k` candidates with local features and geometry
        and re-order them by fused score (raysearch.rerank); the result then says which hits were
        verified and with how many inliers."""
        xq, problems = embed_image_uris(uris, self.store.model_spec, self.embedder())
        depth = max(k, rerank.k) if rerank is not None else k
        result = self.search_many(xq, depth, nprobe, query_expansion, where=where)
        bad = [i for i, p in enumerate(problems) if p is not None]
        result.ids[bad] = -1
        result.scores[bad] = np.nan
        result.shard[bad] = -1
        if rerank is not None:
            result = self.rerank_images(uris, result, rerank, skip=set(bad))
        if result.ids.shape[1] > k:
            result = SearchResult(result.scores[:, :k], result.ids[:, :k], result.shard[:, :k],
                                  None if result.verified is None else result.verified[:, :k],
                                  None if result.inliers is None else result.inliers[:, :k])
        return result, problems

    def reranker(self, config: RerankConfig) -> LocalReranker:
        """The index's second stage with `config`, built once per configuration."""
        if self._reranker is None or self._reranker.config != config:
            self._reranker = LocalReranker(self.store, config)
        return self._reranker

    def rerank_images(self, uris: list[str], result: SearchResult, config: RerankConfig,
                      skip: set[int] | None = None) -> SearchResult:
        """Verify the first-stage `result` of query images `uris` (one row each) and re-order every
        row by fused score. Rows in `skip` (queries that could not be read) stay empty."""
        _, hit_uris = self.lookup(result)
        ids, shard, scores, verified, inliers = rerank_rows(
            self.reranker(config), list(uris), result.ids, result.shard, hit_uris, result.scores, skip)
        return SearchResult(scores, ids, shard, verified, inliers)


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
