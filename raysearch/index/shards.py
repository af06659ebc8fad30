"""Adding vectors in shards: which rows each shard builder takes, and the builder itself.

Every builder starts from the same trained, empty index, so the shards differ only in which vectors
they hold, and searching all shards and merging the top-k gives what one index over every vector
gives. A builder holds its share of the collection at most (one Parquet part at a time when it
reads, or its kept share, released as it is added) plus its growing shard: never the whole set.

A `ShardBuilder` serves both passes of a build. The check pass, before training, reads every
vector once in the shard layout: it refuses NaN/inf and wrong dimensions (so no training is wasted
on data that cannot be indexed), picks out the seeded training sample and tuning queries and, when
the shares fit in memory, keeps the vectors so the add pass does not read them again. While adding,
each builder also finds the tuning queries' exact neighbours among its rows, so tuning costs no
extra pass over the data.
"""

from __future__ import annotations

import io
import os
import time
import uuid

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raysearch import storage
from raysearch.formats.embeddings import read_vectors
from raysearch.index.exact import exact_knn
from raysearch.index.merge import is_fastscan, to_mergeable, to_searchable
from raysearch.index.store import IDMAP_SCHEMA
from raysearch.index.transforms import ensure_ids, split_pretransform
from raysearch.runtime import node_id


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


def use_threads(threads: int | None) -> None:
    """Run FAISS on `threads` threads in this process (None: leave it). Ray starts workers with
    OMP_NUM_THREADS = the task's CPUs, but a reused worker keeps the thread count of its first task,
    so every builder task sets its own."""
    if threads:
        faiss.omp_set_num_threads(int(threads))


def add_shard(
    trained: bytes | np.ndarray,
    slices: list[tuple[str, int, int]],
    dim: int,
    index_uri: str,
    ids_uri: str,
    mergeable: bool = False,
    threads: int | None = None,
    xq: np.ndarray | None = None,
    k: int = 0,
    metric: str = "l2",
    exact_in_index_space: bool = False,
) -> dict:
    """Build one shard: add the slices' vectors (ids = listing rows) to a copy of the trained index
    and write the shard index and its id map atomically.

    `mergeable` writes the shard in the form whose inverted lists FAISS can merge (fast-scan
    indexes are kept as plain IVF-PQ until merged). With queries `xq`, also finds their exact top-k
    among the shard's vectors while they are in memory (for tuning). Returns {"ntotal", "seconds",
    "node_id"} and, with queries, "D" (nq, k) float32 (squared L2 or inner product) and "I" (nq, k)
    int64 listing rows (-1 = none).
    """
    use_threads(threads)
    chunks = (read_vectors(part, lo, hi, dim) for part, lo, hi in slices)
    return _build_shard(trained, chunks, dim, index_uri, ids_uri, mergeable, xq, k, metric, exact_in_index_space)


def _build_shard(
    trained: bytes | np.ndarray,
    chunks,
    dim: int,
    index_uri: str,
    ids_uri: str,
    mergeable: bool,
    xq: np.ndarray | None,
    k: int,
    metric: str,
    exact_in_index_space: bool,
) -> dict:
    """`add_shard` over `chunks`, an iterable of (vectors, (row, image_id, uri) table) pairs."""
    start = time.perf_counter()
    index = faiss.deserialize_index(np.frombuffer(trained, dtype=np.uint8))
    fastscan = is_fastscan(index)
    index = ensure_ids(to_mergeable(index))
    if index.d != dim:
        raise ValueError(f"the trained index is {index.d}-d, the vectors are {dim}-d")
    # The index whitens (a metric-changing transform): queries and vectors are compared as it does.
    to_space = split_pretransform(index).apply if exact_in_index_space else None
    id_tables = []

    def added():
        """Add each chunk to the index as it comes; yield it for the exact neighbours."""
        for x, meta in chunks:
            rows = meta.column("row").to_numpy().astype(np.int64)
            index.add_with_ids(x, rows)
            id_tables.append(meta)
            yield (to_space(x) if to_space is not None else x), rows

    exact = None
    if xq is not None and len(xq) and k:
        exact = exact_knn(to_space(xq) if to_space is not None else xq, added(), k, metric)
    else:
        for _ in added():
            pass
    if fastscan and not mergeable:
        index = to_searchable(index)
    write_index(index, index_uri)
    write_idmap(ids_uri, id_tables)
    out = {"ntotal": int(index.ntotal), "seconds": time.perf_counter() - start, "node_id": node_id()}
    if exact is not None:
        out.update(D=exact[0], I=exact[1])
    return out


class ShardBuilder:
    """The builder of one shard across both passes of a build, in this process or as a Ray actor.

    `check` reads the shard's rows once (refusing NaN/inf and wrong dimensions) and returns the
    rows at the requested positions (training sample, tuning queries); with `keep`, it also keeps
    the vectors, so that `add`, after training, adds them from memory instead of reading every
    part a second time. Without them (`keep` off, or an actor restarted on another node) `add`
    reads its parts again. Kept vectors are released chunk by chunk as they are added, so the
    builder's peak stays near one copy of its share.
    """

    def __init__(self, slices: list[tuple[str, int, int]], dim: int, threads: int | None = None, keep: bool = False):
        self.slices = slices
        self.dim = dim
        self.threads = threads
        self.keep = keep
        self._kept: list[tuple[np.ndarray, pa.Table]] | None = None

    def check(self, positions: np.ndarray, span_start: int) -> dict:
        """The check pass over this shard's rows, which start at global position `span_start`.

        Returns {"n": rows read, "x": (m, dim) float32, "rows": (m,) int64 listing rows} for the
        sorted global `positions` that fall within this shard.
        """
        use_threads(self.threads)
        kept: list[tuple[np.ndarray, pa.Table]] = []
        xs, rows = [], []
        pos = span_start
        for part, lo, hi in self.slices:
            x, meta = read_vectors(part, lo, hi, self.dim)
            mine = positions[(positions >= pos) & (positions < pos + x.shape[0])] - pos
            if mine.size:
                xs.append(x[mine])
                rows.append(meta.column("row").to_numpy()[mine])
            pos += x.shape[0]
            if self.keep:
                kept.append((x, meta))
        self._kept = kept if self.keep else None
        return {
            "n": pos - span_start,
            "x": np.concatenate(xs) if xs else np.empty((0, self.dim), np.float32),
            "rows": np.concatenate(rows).astype(np.int64) if rows else np.empty(0, np.int64),
            "kept": self._kept is not None,
        }

    def add(
        self, trained: bytes | np.ndarray, index_uri: str, ids_uri: str, mergeable: bool = False,
        xq: np.ndarray | None = None, k: int = 0, metric: str = "l2", exact_in_index_space: bool = False,
    ) -> dict:
        """`add_shard` for this shard, from the kept vectors when there are any. Returns its dict
        plus "reread": whether the parts were read again."""
        use_threads(self.threads)
        reread = self._kept is None
        if reread:
            chunks = (read_vectors(part, lo, hi, self.dim) for part, lo, hi in self.slices)
        else:
            chunks = self._drain()
        out = _build_shard(trained, chunks, self.dim, index_uri, ids_uri, mergeable, xq, k, metric, exact_in_index_space)
        return {**out, "reread": reread}

    def _drain(self):
        kept, self._kept = self._kept or [], None
        kept.reverse()
        while kept:
            yield kept.pop()


def pick_rows(
    slices: list[tuple[str, int, int]],
    dim: int,
    positions: np.ndarray,
    span_start: int,
    threads: int | None = None,
) -> dict:
    """The check pass of one shard without keeping its vectors (`ShardBuilder.check`)."""
    out = ShardBuilder(slices, dim, threads).check(positions, span_start)
    out.pop("kept")
    return out


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
