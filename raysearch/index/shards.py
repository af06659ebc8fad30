"""Adding vectors in shards: which rows each shard builder takes, and the builder itself.

Every builder starts from the same trained, empty index, so the shards differ only in which vectors
they hold, and searching all shards and merging the top-k gives what one index over every vector
gives. A builder holds one Parquet part at a time plus its growing shard: its memory is bounded by
its share of the collection, never the whole of it.

Before training, `pick_rows` reads every vector once in the same parallel layout: it refuses NaN/inf
and wrong dimensions (so no training is wasted on data that cannot be indexed) and picks out the
seeded training sample and tuning queries. While adding, each builder also finds the tuning
queries' exact neighbours among its rows, so tuning costs no extra pass over the data.
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
from raysearch.index.merge import is_fastscan, to_mergeable, to_searchable
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
    """Vectors (n, dim) float32 and the (row, image_id, uri) columns of rows [start, stop) of a part.

    Raises ValueError naming the part (and the row) for a wrong dimension or a NaN/inf vector.
    """
    fs, path = storage.get_fs(part)
    try:
        with fs.open(path, "rb") as f:
            tbl = pq.read_table(f).slice(start, stop - start)
    except OSError as e:
        raise OSError(f"cannot read embeddings part {part}: {e}") from e
    col = tbl.column("embedding").combine_chunks()
    if col.type.list_size != dim:
        raise ValueError(f"{part} holds {col.type.list_size}-d vectors, the index is {dim}-d")
    x = col.values.to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        bad = int(np.flatnonzero(~np.isfinite(x).all(axis=1))[0])
        row = tbl.column("row")[bad].as_py()
        raise ValueError(f"{part}: vector for row {row} holds NaN or inf")
    return np.ascontiguousarray(x), tbl.select(["row", "image_id", "uri"])


def _use_threads(threads: int | None) -> None:
    # Ray starts workers with OMP_NUM_THREADS = the task's CPUs, but a reused worker keeps the
    # thread count of its first task: set it for this one.
    if threads:
        faiss.omp_set_num_threads(int(threads))


def _node_id() -> str | None:
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - outside a Ray worker there is no node to report
        pass
    return None


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
    start = time.perf_counter()
    _use_threads(threads)
    index = faiss.deserialize_index(np.frombuffer(trained, dtype=np.uint8))
    fastscan = is_fastscan(index)
    index = ensure_ids(to_mergeable(index))
    if index.d != dim:
        raise ValueError(f"the trained index is {index.d}-d, the vectors are {dim}-d")
    to_space = None
    if exact_in_index_space:
        # The index whitens (a metric-changing transform): queries and vectors are compared as it does.
        from raysearch.models.whitening import split_pretransform

        to_space = split_pretransform(index).apply
    if xq is not None and to_space is not None:
        xq = to_space(xq)
    exact = _ExactTopK(xq, k, metric) if xq is not None and len(xq) and k else None
    id_tables = []
    for part, lo, hi in slices:
        x, meta = read_vectors(part, lo, hi, dim)
        rows = meta.column("row").to_numpy().astype(np.int64)
        index.add_with_ids(x, rows)
        if exact is not None:
            exact.add(to_space(x) if to_space is not None else x, rows)
        id_tables.append(meta)
    if fastscan and not mergeable:
        index = to_searchable(index)
    write_index(index, index_uri)
    write_idmap(ids_uri, id_tables)
    out = {"ntotal": int(index.ntotal), "seconds": time.perf_counter() - start, "node_id": _node_id()}
    if exact is not None:
        out.update(D=exact.D, I=exact.I)
    return out


class _ExactTopK:
    """Running exact top-k of fixed queries over vectors seen chunk by chunk."""

    def __init__(self, xq: np.ndarray, k: int, metric: str):
        self.xq = np.ascontiguousarray(xq, dtype=np.float32)
        self.k = k
        self.largest_first = metric == "ip"
        self.metric = faiss.METRIC_INNER_PRODUCT if self.largest_first else faiss.METRIC_L2
        self.D = np.full((len(xq), k), -np.inf if self.largest_first else np.inf, dtype=np.float32)
        self.I = np.full((len(xq), k), -1, dtype=np.int64)

    def add(self, x: np.ndarray, rows: np.ndarray) -> None:
        if not x.shape[0]:
            return
        Dp, Ip = faiss.knn(self.xq, x, min(self.k, x.shape[0]), metric=self.metric)
        self.D, self.I = merge_knn([self.D, Dp], [self.I, rows[Ip]], self.k, self.largest_first)


def pick_rows(
    slices: list[tuple[str, int, int]],
    dim: int,
    positions: np.ndarray,
    span_start: int,
    threads: int | None = None,
) -> dict:
    """The check pass of one task: read every vector of `slices` (ValueError naming the part and
    row for NaN/inf or a wrong dimension) and return those at `positions`, global positions in the
    concatenation of all parts (sorted, within this task's rows, which start at `span_start`).

    Returns {"n": rows read, "x": (m, dim) float32, "rows": (m,) int64 listing rows}.
    """
    _use_threads(threads)
    xs, rows = [], []
    pos = span_start
    for part, lo, hi in slices:
        x, meta = read_vectors(part, lo, hi, dim)
        mine = positions[(positions >= pos) & (positions < pos + x.shape[0])] - pos
        if mine.size:
            xs.append(x[mine])
            rows.append(meta.column("row").to_numpy()[mine])
        pos += x.shape[0]
    return {
        "n": pos - span_start,
        "x": np.concatenate(xs) if xs else np.empty((0, dim), np.float32),
        "rows": np.concatenate(rows).astype(np.int64) if rows else np.empty(0, np.int64),
    }


def merge_knn(
    D_list: list[np.ndarray], I_list: list[np.ndarray], k: int, largest_first: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard (D, I) top-k lists into the global top-k, by distance; id -1 sorts last.

    Ties keep list order (stable sort), then rank order within a list.
    """
    D = np.concatenate(D_list, axis=1)
    I = np.concatenate(I_list, axis=1)
    worst = -np.inf if largest_first else np.inf
    D = np.where(I < 0, worst, D)
    key = -D if largest_first else D
    order = np.argsort(key, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(D, order, axis=1), np.take_along_axis(I, order, axis=1)


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
