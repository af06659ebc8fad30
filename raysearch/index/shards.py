"""Adding vectors in shards: which rows each shard builder takes, and the builder itself.

Every builder starts from the same trained, empty index, so the shards differ only in which vectors
they hold, and searching all shards and merging the top-k gives what one index over every vector
gives. A builder holds one Parquet part at a time plus its growing shard: its memory is bounded by
its share of the collection, never the whole of it.
"""

from __future__ import annotations

import io
import os
import time
import uuid
from dataclasses import dataclass

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raysearch import storage
from raysearch.index.store import IDMAP_SCHEMA


@dataclass(frozen=True)
class Slice:
    """Rows [start, stop) of one Parquet part (positions within the part, not vector ids)."""

    part: str
    start: int
    stop: int

    @property
    def n(self) -> int:
        return self.stop - self.start


def plan_shards(part_sizes: list[int], n_shards: int) -> list[list[tuple[int, int, int]]]:
    """Split the concatenation of parts into `n_shards` contiguous runs of near-equal size.

    Returns, per shard, (part index, start, stop) slices. Shard sizes differ by at most one row;
    empty parts are skipped; with fewer rows than shards, the last shards are empty.
    """
    if n_shards < 1:
        raise ValueError(f"--shards must be >= 1, got {n_shards}")
    if any(s < 0 for s in part_sizes):
        raise ValueError("part sizes must be >= 0")
    total = sum(part_sizes)
    base, extra = divmod(total, n_shards)
    quotas = [base + (1 if i < extra else 0) for i in range(n_shards)]
    plan: list[list[tuple[int, int, int]]] = [[] for _ in range(n_shards)]
    shard, room = 0, quotas[0] if quotas else 0
    for p, size in enumerate(part_sizes):
        pos = 0
        while pos < size:
            while room == 0:
                shard += 1
                room = quotas[shard]
            take = min(room, size - pos)
            plan[shard].append((p, pos, pos + take))
            pos += take
            room -= take
    return plan


def ensure_ids(index: faiss.Index) -> faiss.Index:
    """Indexes that cannot store ids themselves (Flat, HNSW, PQ, ...) get an IDMap wrapper; IVF
    indexes (with or without a pre-transform) keep ids in their inverted lists."""
    try:
        faiss.extract_index_ivf(index)
        return index
    except RuntimeError:
        pass
    if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        return index
    if isinstance(index, faiss.IndexPreTransform) and isinstance(
        faiss.downcast_index(index.index), (faiss.IndexIDMap, faiss.IndexIDMap2)
    ):
        return index  # whitening in front of an IDMap: ids stay on the inner index
    return faiss.IndexIDMap(index)


def read_vectors(part: str, start: int, stop: int, dim: int) -> tuple[np.ndarray, pa.Table]:
    """Vectors (n, dim) float32 and the (row, image_id, uri) columns of rows [start, stop) of a part."""
    fs, path = storage.get_fs(part)
    with fs.open(path, "rb") as f:
        tbl = pq.read_table(f).slice(start, stop - start)
    col = tbl.column("embedding").combine_chunks()
    if col.type.list_size != dim:
        raise ValueError(f"{part} holds {col.type.list_size}-d vectors, the index is {dim}-d")
    x = col.values.to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        bad = int(np.flatnonzero(~np.isfinite(x).all(axis=1))[0])
        row = tbl.column("row")[bad].as_py()
        raise ValueError(f"{part}: vector for row {row} holds NaN or inf")
    return np.ascontiguousarray(x), tbl.select(["row", "image_id", "uri"])


def add_shard(
    trained: bytes | np.ndarray,
    slices: list[tuple[str, int, int]],
    dim: int,
    index_uri: str,
    ids_uri: str,
) -> dict:
    """Build one shard: add the slices' vectors (ids = listing rows) to a copy of the trained index
    and write the shard index and its id map atomically. Returns {"ntotal", "seconds"}."""
    start = time.perf_counter()
    index = ensure_ids(faiss.deserialize_index(np.frombuffer(trained, dtype=np.uint8)))
    id_tables = []
    for part, lo, hi in slices:
        x, meta = read_vectors(part, lo, hi, dim)
        index.add_with_ids(x, meta.column("row").to_numpy().astype(np.int64))
        id_tables.append(meta)
    write_index(index, index_uri)
    write_idmap(ids_uri, id_tables)
    return {"ntotal": int(index.ntotal), "seconds": time.perf_counter() - start}


def write_index(index: faiss.Index, uri: str) -> None:
    """Write a FAISS index atomically; on local disk straight from FAISS (no in-memory copy)."""
    if storage.is_local(uri):
        path = storage.get_fs(uri)[1]
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        try:
            faiss.write_index(index, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    else:
        storage.atomic_write(uri, faiss.serialize_index(index).tobytes())


def write_idmap(ids_uri: str, tables: list[pa.Table]) -> None:
    if tables:
        tbl = pa.concat_tables(tables).rename_columns(["id", "image_id", "uri"]).cast(IDMAP_SCHEMA)
        tbl = tbl.sort_by("id")
    else:
        tbl = IDMAP_SCHEMA.empty_table()
    buf = io.BytesIO()
    pq.write_table(tbl, buf, compression="zstd")
    storage.atomic_write(ids_uri, buf.getvalue())
