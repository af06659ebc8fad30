"""The embeddings folder: vectors of a collection as Parquet parts, readable by every later step.

    run.json                  what was asked for (source, model); see `raysearch.formats.runs`
    listing/part-*.parquet    row, image_id, uri, duplicate_of (row = the vector's id)
    parts/part-*.parquet      row, image_id, uri, embedding (fixed-size list of float32)
    errors/part-*.parquet     row, image_id, uri, reason
    embeddings.json           written last: counts and the list of parts; present = complete

Parts are written atomically and named by the rows they hold (`content_name`), so a retried task
rewrites the same file instead of adding a copy. The embedding pipeline (`raysearch.embed`) writes
folders; index builds, whitening, evaluation and activation read them through the functions here.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raysearch import storage
from raysearch.models.spec import ModelSpec, vectors_model_spec
from raysearch.sources.base import LAYOUT_PREFIXES
from raysearch.version import __version__

EMBEDDINGS_MANIFEST = "embeddings.json"
FORMAT = "raysearch-embeddings/1"
PARTS = "parts"
ERRORS = "errors"
ERROR_SCHEMA = pa.schema(
    [("row", pa.int64()), ("image_id", pa.string()), ("uri", pa.string()), ("reason", pa.string())]
)


def embedding_schema(dim: int) -> pa.Schema:
    """The schema of a vectors part: row int64, image_id, uri, embedding (dim float32)."""
    return pa.schema(
        [
            ("row", pa.int64()),
            ("image_id", pa.string()),
            ("uri", pa.string()),
            ("embedding", pa.list_(pa.float32(), dim)),
        ]
    )


# ---------------------------------------------------------------------------------------------
# Parts
# ---------------------------------------------------------------------------------------------


def content_name(rows: np.ndarray) -> str:
    """A part's file name from the rows it holds: the same rows always give the same name."""
    digest = hashlib.blake2b(np.ascontiguousarray(rows, dtype=np.int64).tobytes(), digest_size=8).hexdigest()
    return f"part-{int(rows.min()):012d}-{digest}.parquet"


def write_table(uri: str, tbl: pa.Table) -> None:
    """Write a Parquet table atomically (zstd)."""
    buf = io.BytesIO()
    pq.write_table(tbl, buf, compression="zstd")
    storage.atomic_write(uri, buf.getvalue())


def write_vectors_part(embeddings_dir: str, rows: np.ndarray, image_ids: Iterable[str], uris: Iterable[str],
                       vectors: np.ndarray) -> str:
    """Write one vectors part: rows (n,) int64, image_ids and uris (n,), vectors (n, dim) float32.
    Returns its URI."""
    rows = np.asarray(rows, dtype=np.int64)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    dim = vectors.shape[1]
    tbl = pa.table(
        {
            "row": pa.array(rows),
            "image_id": pa.array(list(image_ids), pa.string()),
            "uri": pa.array(list(uris), pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim),
        },
        schema=embedding_schema(dim),
    )
    uri = storage.join(embeddings_dir, PARTS, content_name(rows))
    write_table(uri, tbl)
    return uri


def write_error_part(folder: str, rows: np.ndarray, image_ids: Iterable[str], uris: Iterable[str],
                     reasons: Iterable[str]) -> str:
    """Write one error part (row, image_id, uri, reason) under `folder`/errors. Returns its URI."""
    rows = np.asarray(rows, dtype=np.int64)
    tbl = pa.table(
        {
            "row": pa.array(rows),
            "image_id": pa.array([str(x) for x in image_ids], pa.string()),
            "uri": pa.array([str(x) for x in uris], pa.string()),
            "reason": pa.array([str(x) for x in reasons], pa.string()),
        },
        schema=ERROR_SCHEMA,
    )
    uri = storage.join(folder, ERRORS, content_name(rows))
    write_table(uri, tbl)
    return uri


def list_parts(folder: str, kind: str = PARTS) -> list[str]:
    """URIs of the Parquet parts in `folder`/`kind` (parts, errors, report, ...), sorted by name."""
    sub = storage.join(folder, kind)
    return [storage.join(sub, n) for n in storage.listdir(sub) if n.endswith(".parquet") and not n.startswith(".")]


def read_part(uri: str, columns: list[str] | None = None) -> pa.Table:
    """One Parquet part (optionally only some columns)."""
    fs, path = storage.get_fs(uri)
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=columns)


def read_rows_column(part_uris: Iterable[str]) -> np.ndarray:
    """The `row` column of every part, concatenated (8 bytes per image)."""
    cols = [read_part(uri, ["row"]).column("row").to_numpy() for uri in part_uris]
    return np.concatenate(cols) if cols else np.empty(0, np.int64)


def embeddings_matrix(tbl: pa.Table) -> np.ndarray:
    """The `embedding` column as a (n, dim) float32 array (zero-copy where possible)."""
    col = tbl.column("embedding").combine_chunks()
    dim = col.type.list_size
    return col.values.to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32, copy=False)


def part_sizes(parts: list[str]) -> list[int]:
    """Row counts from the Parquet footers (no data read)."""
    sizes = []
    for uri in parts:
        fs, path = storage.get_fs(uri)
        with fs.open(path, "rb") as f:
            sizes.append(pq.ParquetFile(f).metadata.num_rows)
    return sizes


def part_dim(uri: str) -> int:
    """The vector dimension of a part, from its schema (no data read)."""
    fs, path = storage.get_fs(uri)
    with fs.open(path, "rb") as f:
        field = pq.ParquetFile(f).schema_arrow.field("embedding")
    return int(field.type.list_size)


def read_vectors(part: str, start: int, stop: int, dim: int) -> tuple[np.ndarray, pa.Table]:
    """Vectors (n, dim) float32 and the (row, image_id, uri) columns of rows [start, stop) of a part.

    Raises ValueError naming the part (and the row) for a wrong dimension or a NaN/inf vector.
    """
    try:
        tbl = read_part(part).slice(start, stop - start)
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


def iter_vector_parts(embeddings_dir: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(vectors (n, dim) float32, rows (n,) int64) of each part in turn: one part in memory at a time."""
    for uri in list_parts(embeddings_dir):
        tbl = read_part(uri, ["row", "embedding"])
        yield embeddings_matrix(tbl), tbl.column("row").to_numpy()


def sample_vectors(parts: list[str], sizes: list[int], n_sample: int, dim: int, seed: int) -> np.ndarray:
    """A uniform random sample (seeded, without replacement) of `n_sample` vectors of the parts,
    read in this process: every part that holds a sampled row is read once. (n_sample, dim) float32."""
    total = sum(sizes)
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(total, size=min(n_sample, total), replace=False))
    starts = np.concatenate([[0], np.cumsum(sizes)])
    out = []
    for p, uri in enumerate(parts):
        lo, hi = starts[p], starts[p + 1]
        mine = chosen[(chosen >= lo) & (chosen < hi)] - lo
        if mine.size == 0:
            continue
        x, _ = read_vectors(uri, 0, sizes[p], dim)
        out.append(x[mine])
    return np.ascontiguousarray(np.concatenate(out)) if out else np.empty((0, dim), np.float32)


def sample_embeddings(embeddings_dirs: str | list[str], n_max: int, seed: int) -> np.ndarray:
    """Up to n_max vectors (a seeded uniform sample without replacement) of one or several complete
    embeddings folders (e.g. an index's build and its additions), taken together."""
    folders = [embeddings_dirs] if isinstance(embeddings_dirs, str) else list(embeddings_dirs)
    dim = int(load_embeddings_manifest(folders[0])["dim"])
    parts = [uri for folder in folders for uri in list_parts(folder)]
    sizes = part_sizes(parts)
    return sample_vectors(parts, sizes, min(n_max, sum(sizes)), dim, seed)


def read_errors(folder: str) -> pa.Table:
    """All error rows (row, image_id, uri, reason) of a folder's errors/ parts, sorted by row."""
    tables = [read_part(u) for u in list_parts(folder, ERRORS)]
    if not tables:
        return ERROR_SCHEMA.empty_table()
    return pa.concat_tables(tables).sort_by("row")


# ---------------------------------------------------------------------------------------------
# The folder's manifest
# ---------------------------------------------------------------------------------------------


def load_embeddings_manifest(embeddings_dir: str) -> dict:
    """embeddings.json of a complete folder. Raises FileNotFoundError for an unfinished one."""
    uri = storage.join(embeddings_dir, EMBEDDINGS_MANIFEST)
    if not storage.exists(uri):
        raise FileNotFoundError(
            f"{embeddings_dir} holds no complete embeddings ({EMBEDDINGS_MANIFEST} is missing; "
            "was the embedding run interrupted? rerun it to resume)"
        )
    return storage.read_json(uri)


def write_embeddings_manifest(embeddings_dir: str, source: str, spec: ModelSpec, n_images: int,
                              first_row: int, end_row: int, seconds: float, **extra: Any) -> dict:
    """Count the folder's parts and write embeddings.json, last and atomically. Returns it."""
    parts = list_parts(embeddings_dir)
    error_parts = list_parts(embeddings_dir, ERRORS)
    manifest = {
        "format": FORMAT,
        "raysearch_version": __version__,
        "source": source,
        "model": spec.to_dict(),
        "dim": spec.dim,
        "n_images": int(n_images),
        "first_row": int(first_row),
        "end_row": int(end_row),
        "n_embedded": int(read_rows_column(parts).size),
        "n_errors": int(read_rows_column(error_parts).size),
        "parts": [os.path.basename(p) for p in parts],
        "error_parts": [os.path.basename(p) for p in error_parts],
        "seconds": round(float(seconds), 3),
        **extra,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    storage.atomic_write_json(storage.join(embeddings_dir, EMBEDDINGS_MANIFEST), manifest)
    return manifest


def write_embeddings(
    embeddings_dir: str,
    batches: Iterable[np.ndarray] | np.ndarray,
    spec: ModelSpec | None = None,
    first_row: int = 0,
    part_rows: int = 4096,
    image_ids: list[str] | None = None,
    uris: list[str] | None = None,
) -> dict:
    """Write vectors computed elsewhere (or synthetic ones) as a complete embeddings folder that
    index builds accept (parts, no errors, `embeddings.json` last); returns its manifest.

    batches: (n, dim) float32 arrays in row order (or one array). Rows are numbered from
    `first_row`; image_ids default to "vec-ROW" and uris to "vector:ROW"; `spec` defaults to a
    spec for vectors no registered model made (`vectors_model_spec`).
    """
    if isinstance(batches, np.ndarray):
        batches = [batches]
    start = time.perf_counter()
    row, dim = first_row, None
    for x in batches:
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2:
            raise ValueError(f"vectors must be (n, dim), got shape {x.shape}")
        if dim is None:
            dim = x.shape[1]
        elif x.shape[1] != dim:
            raise ValueError(f"vectors change dimension from {dim} to {x.shape[1]}")
        for lo in range(0, x.shape[0], part_rows):
            chunk = x[lo:lo + part_rows]
            rows = np.arange(row, row + chunk.shape[0], dtype=np.int64)
            at = slice(row - first_row, row - first_row + chunk.shape[0])
            ids = image_ids[at] if image_ids is not None else [f"vec-{r}" for r in rows]
            locations = uris[at] if uris is not None else [f"vector:{r}" for r in rows]
            if len(ids) != len(rows) or len(locations) != len(rows):
                raise ValueError(f"need one image_id and uri per vector, got {len(image_ids or [])} and {len(uris or [])}")
            write_vectors_part(embeddings_dir, rows, ids, locations, chunk)
            row += chunk.shape[0]
    if dim is None:
        raise ValueError("no vectors to write")
    spec = spec or vectors_model_spec(dim)
    if spec.dim != dim:
        raise ValueError(f"the model spec says {spec.dim}-d, the vectors are {dim}-d")
    return write_embeddings_manifest(embeddings_dir, "vectors", spec, row - first_row, first_row, row,
                                     time.perf_counter() - start)


def check_parts(embeddings_dir: str) -> tuple[dict, list[str], list[int], int]:
    """(embeddings manifest, parts, their sizes, dim) from the footers; refuses empty sets and
    parts whose dimension or count disagree with the embeddings manifest."""
    emb = load_embeddings_manifest(embeddings_dir)
    parts = list_parts(embeddings_dir)
    sizes = part_sizes(parts)
    n = sum(sizes)
    dim = int(emb["dim"])
    if n == 0:
        raise ValueError(f"{embeddings_dir} holds no embeddings (every image failed; see its error table)")
    for uri in parts:
        d = part_dim(uri)
        if d != dim:
            raise ValueError(f"{uri} holds {d}-d vectors but {embeddings_dir} declares {dim}-d embeddings")
    if "n_embedded" in emb and int(emb["n_embedded"]) != n:
        raise ValueError(
            f"{embeddings_dir}: the parts hold {n} vectors, its manifest says {emb['n_embedded']} "
            "(parts added or removed after the run)"
        )
    return emb, parts, sizes, dim


# ---------------------------------------------------------------------------------------------
# Finding embeddings made earlier
# ---------------------------------------------------------------------------------------------


def resolve_embeddings_folder(source: str) -> str | None:
    """An embeddings folder named by `source` itself or inside an index directory, else None
    (`source` is then an image SOURCE to embed)."""
    if source.startswith(LAYOUT_PREFIXES) or (
        "://" not in source and ":" in source.split("/")[0] and not source.startswith("/")
    ):
        return None  # a layout spec such as disc21:ROOT or disc21:s3://bucket/disc21
    if storage.exists(storage.join(source, EMBEDDINGS_MANIFEST)):
        return source
    manifest_uri = storage.join(source, "manifest.json")
    if storage.exists(manifest_uri):
        manifest = storage.read_json(manifest_uri)
        emb = (manifest.get("embeddings") or [None])[0]
        if emb:
            path = emb if ("://" in emb or emb.startswith("/")) else storage.join(source, emb)
            if storage.exists(storage.join(path, EMBEDDINGS_MANIFEST)):
                return path
    return None


def same_model(a: dict, b: dict) -> bool:
    """Whether two model spec dicts describe exactly the same model (as stored JSON)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def check_embeddings_model(folder: str, model: dict, source: str) -> None:
    """Raise ValueError unless the embeddings folder was made with exactly `model` (a spec dict)."""
    emb = load_embeddings_manifest(folder)
    if not same_model(emb["model"], model):
        raise ValueError(
            f"{source} holds embeddings of model {emb['model'].get('name')!r} with other settings than "
            f"the index's ({model.get('name')!r}); they cannot be compared"
        )
