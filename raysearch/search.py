"""Searching an index directory in-process: fan out over shards, merge the top-k exactly.

Scores are "higher is more similar" whatever the metric: for L2 indexes, score = 1 - d/2 where d is
the squared L2 distance, which equals the cosine similarity for unit vectors; for inner-product
indexes, score is the inner product.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

from raysearch import storage
from raysearch.images import DecodeError, decode_image, resize_image
from raysearch.index.store import IdMap, IndexStore

MAX_K = 1000


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


def search_shards(
    shards: list[faiss.Index], xq: np.ndarray, k: int, nprobe: int | None, metric: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Search every shard and merge the top-k exactly, in the distance domain: (D, I, shard), each
    (nq, k); D float32 (squared L2 or inner product, NaN where no result), I int64 (-1 where no
    result), shard int32 (-1 where no result).

    Every shard holds vectors quantised by the same trained index, so the shards' top-k lists
    merged by distance are exactly the top-k of one index holding all of them.
    """
    largest_first = metric != "l2"
    D_list, I_list, S_list = [], [], []
    for s, index in enumerate(shards):
        set_search_params(index, nprobe)
        D, I = index.search(np.ascontiguousarray(xq, dtype=np.float32), k)
        D_list.append(D)
        I_list.append(I)
        S_list.append(np.full(I.shape, s, dtype=np.int32))
    if not shards:
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


class Searcher:
    """All shards of an index in one process (memory-mapped where FAISS allows)."""

    def __init__(self, index_dir: str | IndexStore, mmap: bool = True, verify: bool = True):
        self.store = index_dir if isinstance(index_dir, IndexStore) else IndexStore(index_dir, verify=verify)
        self.shards = [self.store.load_shard(i, mmap=mmap) for i in range(len(self.store.shards))]
        self.id_maps: list[IdMap] = [self.store.load_ids(i) for i in range(len(self.store.shards))]
        self._embedder = None

    @property
    def dim(self) -> int:
        return self.store.dim

    def search(self, xq: np.ndarray, k: int = 10, nprobe: int | None = None) -> SearchResult:
        """Top-k over every shard; `nprobe` (nprobe or efSearch) overrides the index's tuned value."""
        xq = check_queries(xq, self.dim)
        check_k(k)
        if nprobe is not None and nprobe < 1:
            raise ValueError(f"--nprobe must be >= 1, got {nprobe}")
        nprobe = nprobe or self.store.nprobe
        D, I, shard = search_shards(self.shards, xq, k, nprobe, self.store.metric)
        return SearchResult(distances_to_scores(D, self.store.metric), I, shard)

    def lookup(self, result: SearchResult) -> tuple[np.ndarray, np.ndarray]:
        """image_ids and uris (object arrays shaped like result.ids; None where no result)."""
        image_ids = np.full(result.ids.shape, None, dtype=object)
        uris = np.full(result.ids.shape, None, dtype=object)
        for s, id_map in enumerate(self.id_maps):
            mask = (result.shard == s) & (result.ids >= 0)
            if not mask.any():
                continue
            pos = id_map.positions(result.ids[mask])
            found = pos >= 0
            sel_ids = np.asarray(id_map.image_ids.take(pos[found]).to_pylist(), dtype=object)
            sel_uris = np.asarray(id_map.uris.take(pos[found]).to_pylist(), dtype=object)
            target = np.flatnonzero(mask.ravel())[found]
            image_ids.ravel()[target] = sel_ids
            uris.ravel()[target] = sel_uris
        return image_ids, uris

    def embedder(self):
        """The index's own model, loaded once, for embedding query images in this process."""
        if self._embedder is None:
            from raysearch.embed import Embedder

            self._embedder = Embedder(self.store.model_spec.to_dict(), device=None)
        return self._embedder

    def preprocess(self, data: bytes) -> np.ndarray:
        """Image bytes -> (S, S, 3) uint8, exactly as the build preprocessed (raises DecodeError)."""
        spec = self.store.model_spec
        return resize_image(decode_image(data, draft_size=spec.input_size), spec.input_size, spec.resize)  # type: ignore[arg-type]

    def embed_image_bytes(self, images: list[bytes]) -> np.ndarray:
        """Query image bytes -> (n, dim) vectors. Raises DecodeError for the first bad image."""
        return self.embedder().embed_pixels(np.stack([self.preprocess(d) for d in images]))

    def search_images(
        self, uris: list[str], k: int = 10, nprobe: int | None = None
    ) -> tuple[SearchResult, list[str | None]]:
        """Embed and search query images by path/URI. Returns the result and, per query, None or
        the reason it could not be used (its result row is then empty)."""
        size = self.store.model_spec.input_size
        pixels = np.zeros((len(uris), size, size, 3), np.uint8)
        problems: list[str | None] = []
        for i, uri in enumerate(uris):
            try:
                pixels[i] = self.preprocess(storage.read_bytes(uri))
                problems.append(None)
            except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
                problems.append(str(e))
            except DecodeError as e:
                problems.append(e.reason)
        ok = [i for i, p in enumerate(problems) if p is None]
        xq = np.zeros((len(uris), self.dim), np.float32)
        if ok:
            xq[ok] = self.embedder().embed_pixels(pixels[ok])
        result = self.search(xq, k, nprobe)
        bad = [i for i, p in enumerate(problems) if p is not None]
        result.ids[bad] = -1
        result.scores[bad] = np.nan
        result.shard[bad] = -1
        return result, problems


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
