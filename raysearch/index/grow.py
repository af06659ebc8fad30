"""Growing an index without retraining: appending vectors to a shard, and the ids an index holds.

`raysearch add` (raysearch.add) embeds the new images and uses these to place them.
"""

from __future__ import annotations

import tempfile
import time

import faiss
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from raysearch import storage
from raysearch.formats.embeddings import read_vectors
from raysearch.index.shards import use_threads, write_idmap, write_index
from raysearch.index.store import IndexStore
from raysearch.runtime import node_id

# Two independent 64-bit hashes: a false "already indexed" needs both to collide (~2^-128).
_HASH_KEYS = ("raysearch-ids-k1", "raysearch-ids-k2")


def hash_ids(image_ids: pa.Array | list[str]) -> np.ndarray:
    """image_ids -> (n, 2) uint64 hashes."""
    values = np.asarray(image_ids.to_pylist() if isinstance(image_ids, (pa.Array, pa.ChunkedArray)) else image_ids, dtype=object)
    return np.stack([pd.util.hash_array(values, hash_key=k, categorize=False) for k in _HASH_KEYS], axis=1)


class IndexedIds:
    """The image_ids an index holds, as 128-bit hashes (16 bytes per image, sorted)."""

    def __init__(self, store: IndexStore):
        keys = []
        for i in range(len(store.shards)):
            ids = store.load_ids(i).image_ids
            if len(ids):
                keys.append(hash_ids(ids))
        packed = np.concatenate(keys) if keys else np.empty((0, 2), np.uint64)
        self._sorted = np.unique(packed.view([("a", np.uint64), ("b", np.uint64)]).ravel())

    def __len__(self) -> int:
        return int(self._sorted.size)

    def contains(self, image_ids: pa.Array | list[str]) -> np.ndarray:
        """(n,) bool: which of `image_ids` the index holds."""
        if not len(image_ids) or not self._sorted.size:
            return np.zeros(len(image_ids), bool)
        keys = np.ascontiguousarray(hash_ids(image_ids)).view(self._sorted.dtype).ravel()
        pos = np.clip(np.searchsorted(self._sorted, keys), 0, self._sorted.size - 1)
        return self._sorted[pos] == keys


def append_to_shard(
    shard_uri: str, ids_uri: str, slices: list[tuple[str, int, int]], dim: int,
    out_index_uri: str, out_ids_uri: str, threads: int | None = None,
) -> dict:
    """Load a whole shard, add the slices' vectors to it and write it under a new name (the old
    files stay until the manifest stops listing them)."""
    start = time.perf_counter()
    use_threads(threads)
    with tempfile.TemporaryDirectory(prefix="raysearch-add-") as tmp:
        index = faiss.read_index(storage.local_copy(shard_uri, tmp))
        fs, path = storage.get_fs(ids_uri)
        with fs.open(path, "rb") as f:
            tables = [pq.read_table(f).rename_columns(["row", "image_id", "uri"])]
    for part, lo, hi in slices:
        x, meta = read_vectors(part, lo, hi, dim)
        index.add_with_ids(x, meta.column("row").to_numpy().astype(np.int64))
        tables.append(meta)
    write_index(index, out_index_uri)
    write_idmap(out_ids_uri, tables)
    return {"ntotal": int(index.ntotal), "seconds": time.perf_counter() - start, "node_id": node_id()}
