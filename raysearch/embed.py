"""The embedding pipeline: SOURCE -> listing -> read + decode (CPU tasks) -> Embedder actors -> Parquet.

Layout of an embeddings folder (by default INDEX_DIR/embeddings):

    run.json            what was asked for (source, model); a rerun must match it to resume
    listing/part-*.parquet   row, image_id, uri, duplicate_of (row = the vector's id)
    parts/part-*.parquet     row, image_id, uri, embedding (fixed-size list of float32)
    errors/part-*.parquet    row, image_id, uri, reason
    embeddings.json     written last: counts and the list of parts; present = complete

Each stage is a plain function or class usable without Ray (`load_and_decode`, `Embedder`,
`write_parts`); `embed_source` wires them into a streaming Ray Data pipeline. Parts are written
atomically and named by their content, so a killed run leaves only whole parts, and a rerun with the
same arguments embeds only the rows no part holds yet.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raysearch import __version__, storage
from raysearch.errors import EmbeddingError
from raysearch.images import DecodeError, decode_image, resize_image
from raysearch.models.embedder import Embedder
from raysearch.models.registry import ModelConfig, ModelSpec, resolve_model
from raysearch.runtime import node_id
from raysearch.sources import open_source
from raysearch.sources.listing import GROUP_ROWS, Listing, read_listing_groups, write_listing

log = logging.getLogger("raysearch")

EMBEDDINGS_MANIFEST = "embeddings.json"
RUN_FILE = "run.json"
ERROR_SCHEMA = pa.schema(
    [("row", pa.int64()), ("image_id", pa.string()), ("uri", pa.string()), ("reason", pa.string())]
)


def embedding_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            ("row", pa.int64()),
            ("image_id", pa.string()),
            ("uri", pa.string()),
            ("embedding", pa.list_(pa.float32(), dim)),
        ]
    )


@dataclass(frozen=True)
class EmbedConfig:
    """How to run the embedding stage. None means "chosen from the cluster's resources"."""

    model: ModelConfig = field(default_factory=ModelConfig)
    batch_size: int = 32            # images per forward pass
    concurrency: int | None = None  # Embedder actors (default: one per GPU; on CPU, one per 4 CPUs)
    gpus_per_actor: float | None = None
    torch_threads: int | None = None
    chunk_rows: int | None = None   # images per decode task (default: from the image count)
    part_rows: int = 1024           # embeddings per Parquet part (also the resume granularity)
    max_error_rate: float = 0.05
    progress: bool = True

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"--concurrency must be >= 1, got {self.concurrency}")
        if not 0.0 <= self.max_error_rate <= 1.0:
            raise ValueError(f"--max-error-rate must be between 0 and 1, got {self.max_error_rate}")
        if self.part_rows < 1:
            raise ValueError(f"part_rows must be >= 1, got {self.part_rows}")


@dataclass(frozen=True)
class EmbedSummary:
    embeddings_dir: str
    n_images: int        # rows in the listing
    n_embedded: int
    n_errors: int
    n_skipped: int       # rows already done by an earlier, interrupted run
    seconds: float
    dim: int
    # Images decoded / embedded on each Ray node (node id -> count) by this run: where the work went.
    nodes: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        done = self.n_embedded + self.n_errors - self.n_skipped
        return done / self.seconds if self.seconds > 0 else 0.0

    @property
    def error_rate(self) -> float:
        return self.n_errors / self.n_images if self.n_images else 0.0


# ---------------------------------------------------------------------------------------------
# Stage 1: read + decode (CPU tasks)
# ---------------------------------------------------------------------------------------------


def read_many(uris: list[str]) -> list[bytes | Exception]:
    """Fetch files; remote ones concurrently (fsspec's async cat), errors returned, not raised."""
    if not uris:
        return []
    out: list[bytes | Exception] = []
    if all("://" not in u for u in uris):
        for u in uris:
            try:
                with open(u, "rb") as f:
                    out.append(f.read())
            except OSError as e:
                out.append(e)
        return out
    fs, _ = storage.get_fs(uris[0])
    paths = [storage.get_fs(u)[1] for u in uris]
    try:
        got = fs.cat(paths, on_error="return")
    except Exception as e:  # a filesystem that fails the whole call: fall back to one by one
        got = {}
        for p in paths:
            try:
                got[p] = fs.cat_file(p)
            except Exception as inner:  # noqa: BLE001 - every failure becomes an error row
                got[p] = inner
        log.debug("batched read failed (%s), read files one by one", e)
    for p in paths:
        value = got.get(p, FileNotFoundError(p)) if isinstance(got, dict) else got
        out.append(value)
    return out


def _read_failure_reason(e: Exception) -> str:
    if isinstance(e, FileNotFoundError):
        return "file not found"
    if isinstance(e, PermissionError):
        return "permission denied"
    if isinstance(e, IsADirectoryError):
        return "is a directory"
    return f"unreadable: {type(e).__name__}: {e}"


def decode_rows(
    rows: pa.Table, input_size: int, resize: str
) -> dict[str, np.ndarray]:
    """Listing rows -> columns row, image_id, uri, pixels (n, S, S, 3) uint8, error ('' if fine)."""
    n = rows.num_rows
    row_ids = rows.column("row").to_numpy()
    image_ids = rows.column("image_id").to_pylist()
    uris = rows.column("uri").to_pylist()
    dup_of = rows.column("duplicate_of").to_pylist() if "duplicate_of" in rows.column_names else [None] * n
    pixels = np.zeros((n, input_size, input_size, 3), dtype=np.uint8)
    errors = [""] * n
    to_read = [i for i in range(n) if not dup_of[i]]
    for i in range(n):
        if dup_of[i]:
            errors[i] = f"duplicate image_id: {dup_of[i]} has the same id"
    for i, data in zip(to_read, read_many([uris[i] for i in to_read])):
        if isinstance(data, Exception):
            errors[i] = _read_failure_reason(data)
            continue
        try:
            arr = decode_image(data, draft_size=input_size)
            pixels[i] = resize_image(arr, input_size, resize)  # type: ignore[arg-type]
        except DecodeError as e:
            errors[i] = e.reason
    return {
        "row": row_ids.astype(np.int64),
        "image_id": np.asarray(image_ids, dtype=object),
        "uri": np.asarray(uris, dtype=object),
        "pixels": pixels,
        "error": np.asarray(errors, dtype=object),
    }


def load_and_decode(
    batch: dict[str, np.ndarray], input_size: int, resize: str
) -> dict[str, np.ndarray]:
    """Ray Data task: each input row names a run of listing row groups (and rows already done)."""
    outs = []
    for part_uri, first_group, n_groups, done in zip(
        batch["part_uri"], batch["first_group"], batch["n_groups"], batch["done_rows"]
    ):
        rows = read_listing_groups(str(part_uri), int(first_group), int(n_groups))
        done_rows = np.frombuffer(done, dtype=np.int64)
        if done_rows.size:
            rows = rows.filter(pa.array(~np.isin(rows.column("row").to_numpy(), done_rows)))
        outs.append(decode_rows(rows, input_size, resize))
    out = outs[0] if len(outs) == 1 else {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
    out["decode_node"] = np.full(len(out["row"]), node_id() or "", dtype=object)
    return out


# ---------------------------------------------------------------------------------------------
# Stage 2: the model (actor pool; GPU when the cluster has them)
# ---------------------------------------------------------------------------------------------


class EmbedStage:
    """Ray Data stage: loads the model once (`Embedder`); `__call__` adds an `embedding` column
    (n, dim) float32 and the node that embedded each row. Rows whose `error` is set get a zero
    vector and are dropped by the writer."""

    def __init__(self, spec: dict, device: str | None = None, torch_threads: int | None = None):
        self.embedder = Embedder(spec, device, torch_threads)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        emb, errors = self.embedder.embed_rows(batch["pixels"], batch["error"])
        out = {
            "row": batch["row"],
            "image_id": batch["image_id"],
            "uri": batch["uri"],
            "error": errors,
            "embedding": emb,
            "embed_node": np.full(len(errors), node_id() or "", dtype=object),
        }
        if "decode_node" in batch:
            out["decode_node"] = batch["decode_node"]
        return out


# ---------------------------------------------------------------------------------------------
# Stage 3: write Parquet parts
# ---------------------------------------------------------------------------------------------


def content_name(rows: np.ndarray) -> str:
    digest = hashlib.blake2b(np.ascontiguousarray(rows, dtype=np.int64).tobytes(), digest_size=8).hexdigest()
    return f"part-{int(rows.min()):012d}-{digest}.parquet"


def write_parts(batch: dict[str, np.ndarray], embeddings_dir: str) -> dict[str, np.ndarray]:
    """Write the batch's embeddings and error rows as Parquet parts; return counts, one row per
    (decode node, embed node) pair of the batch: columns decode_node, embed_node, n_ok, n_errors.

    Part names derive from the rows they hold, so a retried task rewrites the same file rather
    than adding a second copy.
    """
    rows = np.asarray(batch["row"], dtype=np.int64)
    errors = np.asarray(batch["error"], dtype=object)
    ok = np.asarray([not e for e in errors], dtype=bool)
    emb = np.asarray(batch["embedding"], dtype=np.float32)
    n_ok, n_err = int(ok.sum()), int((~ok).sum())
    if n_ok:
        dim = emb.shape[1]
        vectors = pa.FixedSizeListArray.from_arrays(pa.array(emb[ok].reshape(-1)), dim)
        tbl = pa.table(
            {
                "row": pa.array(rows[ok]),
                "image_id": pa.array(list(batch["image_id"][ok]), pa.string()),
                "uri": pa.array(list(batch["uri"][ok]), pa.string()),
                "embedding": vectors,
            },
            schema=embedding_schema(dim),
        )
        write_table(storage.join(embeddings_dir, "parts", content_name(rows[ok])), tbl)
    if n_err:
        tbl = pa.table(
            {
                "row": pa.array(rows[~ok]),
                "image_id": pa.array(list(batch["image_id"][~ok]), pa.string()),
                "uri": pa.array(list(batch["uri"][~ok]), pa.string()),
                "reason": pa.array(list(errors[~ok]), pa.string()),
            },
            schema=ERROR_SCHEMA,
        )
        write_table(storage.join(embeddings_dir, "errors", content_name(rows[~ok])), tbl)
    return node_counts(batch, ok)


def node_counts(batch: dict[str, np.ndarray], ok: np.ndarray) -> dict[str, np.ndarray]:
    """Embedded and failed images per (decode node, embed node) pair of a batch."""
    n = len(ok)
    blank = np.full(n, "", dtype=object)
    decode = np.asarray(batch.get("decode_node", blank), dtype=object)
    embed = np.asarray(batch.get("embed_node", blank), dtype=object)
    pairs: dict[tuple[str, str], list[int]] = {}
    for d, e, good in zip(decode.tolist(), embed.tolist(), ok.tolist()):
        counts = pairs.setdefault((str(d), str(e)), [0, 0])
        counts[0 if good else 1] += 1
    if not pairs:
        pairs[("", "")] = [0, 0]
    keys = list(pairs)
    return {
        "decode_node": np.asarray([k[0] for k in keys], dtype=object),
        "embed_node": np.asarray([k[1] for k in keys], dtype=object),
        "n_ok": np.asarray([pairs[k][0] for k in keys], dtype=np.int64),
        "n_errors": np.asarray([pairs[k][1] for k in keys], dtype=np.int64),
    }


def add_node_counts(totals: dict[str, dict[str, int]], batch: dict[str, np.ndarray]) -> None:
    """Accumulate a `write_parts` result into {"decode": {node: images}, "embed": {node: images}}."""
    for d, e, n_ok, n_err in zip(batch["decode_node"], batch["embed_node"], batch["n_ok"], batch["n_errors"]):
        n = int(n_ok) + int(n_err)
        if d:
            totals.setdefault("decode", {})[str(d)] = totals.get("decode", {}).get(str(d), 0) + n
        if e and int(n_ok):
            totals.setdefault("embed", {})[str(e)] = totals.get("embed", {}).get(str(e), 0) + int(n_ok)


def write_table(uri: str, tbl: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(tbl, buf, compression="zstd")
    storage.atomic_write(uri, buf.getvalue())


# ---------------------------------------------------------------------------------------------
# Reading an embeddings folder
# ---------------------------------------------------------------------------------------------


def list_parts(embeddings_dir: str, kind: str = "parts") -> list[str]:
    folder = storage.join(embeddings_dir, kind)
    return [storage.join(folder, n) for n in storage.listdir(folder) if n.endswith(".parquet") and not n.startswith(".")]


def read_rows_column(part_uris: Iterable[str]) -> np.ndarray:
    """The `row` column of every part, concatenated (8 bytes per image)."""
    cols = []
    for uri in part_uris:
        fs, path = storage.get_fs(uri)
        with fs.open(path, "rb") as f:
            cols.append(pq.read_table(f, columns=["row"]).column("row").to_numpy())
    return np.concatenate(cols) if cols else np.empty(0, np.int64)


def read_part(uri: str, columns: list[str] | None = None) -> pa.Table:
    fs, path = storage.get_fs(uri)
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=columns)


def embeddings_matrix(tbl: pa.Table) -> np.ndarray:
    """The `embedding` column as a (n, dim) float32 array (zero-copy where possible)."""
    col = tbl.column("embedding").combine_chunks()
    dim = col.type.list_size
    return col.values.to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32, copy=False)


def write_embeddings(
    embeddings_dir: str,
    vectors: np.ndarray,
    spec: ModelSpec,
    image_ids: list[str] | None = None,
    uris: list[str] | None = None,
    part_rows: int = 4096,
) -> dict:
    """Write vectors computed elsewhere (or synthetic ones) as a complete embeddings folder that
    `build_index` accepts: parts with rows 0..n-1, no errors, `embeddings.json` last.

    vectors: (n, spec.dim) float32. image_ids default to "vec-00000000"-style names; uris default to
    the image_ids. Returns the embeddings manifest.
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[1] != spec.dim:
        raise ValueError(f"vectors must have shape (n, {spec.dim}) for model {spec.name}, got {vectors.shape}")
    n = vectors.shape[0]
    image_ids = image_ids if image_ids is not None else [f"vec-{i:08d}" for i in range(n)]
    uris = uris if uris is not None else list(image_ids)
    if len(image_ids) != n or len(uris) != n:
        raise ValueError(f"need one image_id and uri per vector ({n}), got {len(image_ids)} and {len(uris)}")
    storage.makedirs(storage.join(embeddings_dir, "parts"))
    rows = np.arange(n, dtype=np.int64)
    for start in range(0, n, part_rows):
        stop = min(n, start + part_rows)
        write_parts(
            {
                "row": rows[start:stop],
                "image_id": np.asarray(image_ids[start:stop], dtype=object),
                "uri": np.asarray(uris[start:stop], dtype=object),
                "error": np.full(stop - start, "", dtype=object),
                "embedding": vectors[start:stop],
            },
            embeddings_dir,
        )
    manifest = {
        "format": "raysearch-embeddings/1",
        "raysearch_version": __version__,
        "source": "(vectors written directly)",
        "model": spec.to_dict(),
        "dim": spec.dim,
        "n_images": n,
        "first_row": 0,
        "end_row": n,
        "n_embedded": n,
        "n_errors": 0,
        "parts": [os.path.basename(p) for p in list_parts(embeddings_dir, "parts")],
        "error_parts": [],
        "seconds": 0.0,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    storage.atomic_write_json(storage.join(embeddings_dir, EMBEDDINGS_MANIFEST), manifest)
    return manifest


def load_embeddings_manifest(embeddings_dir: str) -> dict:
    uri = storage.join(embeddings_dir, EMBEDDINGS_MANIFEST)
    if not storage.exists(uri):
        raise FileNotFoundError(
            f"{embeddings_dir} holds no complete embeddings ({EMBEDDINGS_MANIFEST} is missing; "
            "was the embedding run interrupted? rerun it to resume)"
        )
    return storage.read_json(uri)


# ---------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------


def _chunk_rows(n_rows: int, cpus: float, requested: int | None) -> int:
    """Images per decode task: a multiple of the listing's row-group size, small enough that every
    CPU gets several tasks, large enough that per-task overhead stays small."""
    if requested:
        return max(GROUP_ROWS, (requested // GROUP_ROWS) * GROUP_ROWS)
    target = n_rows / max(1.0, 4.0 * cpus)
    groups = int(np.clip(round(target / GROUP_ROWS), 1, 16))
    return groups * GROUP_ROWS


def _decode_task_memory(chunk_rows: int, input_size: int) -> int:
    # A worker process with numpy, pyarrow and PIL loaded holds ~400 MB before any pixels.
    return int(2 * chunk_rows * input_size * input_size * 3 + (512 << 20))


def plan_decode_tasks(listing: Listing, done: np.ndarray, chunk_rows: int) -> list[dict[str, Any]]:
    """Split the listing into runs of row groups, leaving out runs whose rows are all done.

    `done[i]` says whether listing row `listing.first_row + i` is done. Returns one dict per task.
    """
    groups_per_task = max(1, chunk_rows // GROUP_ROWS)
    tasks = []
    for part in listing.parts:
        n_groups = -(-part.n_rows // GROUP_ROWS)
        for g in range(0, n_groups, groups_per_task):
            first = part.first_row + g * GROUP_ROWS
            last = min(part.first_row + part.n_rows, first + groups_per_task * GROUP_ROWS)
            span = done[first - listing.first_row : last - listing.first_row]
            if span.all():
                continue
            # Rows an interrupted run already finished, as int64 bytes (Ray Data keeps bytes intact).
            done_rows = (np.flatnonzero(span) + first).astype(np.int64).tobytes()
            tasks.append(
                {
                    "part_uri": part.uri,
                    "first_group": g,
                    "n_groups": min(groups_per_task, n_groups - g),
                    "done_rows": done_rows,
                }
            )
    return tasks


def _run_record(source_spec: str, spec: ModelSpec) -> dict:
    return {"source": source_spec, "model": spec.to_dict(), "raysearch_version": __version__}


def _same_run(a: dict, b: dict) -> bool:
    # Compare as stored JSON (tuples in a fresh record are lists in a stored one).
    def norm(d: dict) -> str:
        return json.dumps({"source": d.get("source"), "model": d.get("model")}, sort_keys=True)

    return norm(a) == norm(b)


def prepare_embeddings_dir(
    embeddings_dir: str, source_spec: str, spec: ModelSpec, first_row: int = 0
) -> tuple[Listing, bool]:
    """Create or reopen an embeddings folder. Returns (listing, resumed).

    A folder from an earlier run with the same source and model is resumed (its listing reused);
    one made with other arguments is refused.
    """
    run_uri = storage.join(embeddings_dir, RUN_FILE)
    record = _run_record(source_spec, spec)
    if storage.exists(run_uri):
        previous = storage.read_json(run_uri)
        if not _same_run(previous, record):
            raise EmbeddingError(
                f"{embeddings_dir} holds embeddings of another run (source {previous.get('source')!r}, "
                f"model {previous.get('model', {}).get('name')!r}); use --overwrite to replace them"
            )
        if "listing" in previous:
            return Listing.from_dict(previous["listing"]), True
    source = open_source(source_spec)
    storage.makedirs(embeddings_dir)
    listing = write_listing(source, storage.join(embeddings_dir, "listing"), first_row=first_row)
    if listing.n_rows == 0:
        raise ValueError(f"source {source_spec!r} holds no images (looked for .jpg .jpeg .png .webp .bmp .tif .tiff .gif)")
    storage.atomic_write_json(run_uri, {**record, "listing": listing.to_dict()})
    return listing, False


def _done_mask(embeddings_dir: str, listing: Listing) -> np.ndarray:
    """done[i]: some part (or error part) holds listing row listing.first_row + i."""
    done = np.zeros(listing.n_rows, dtype=bool)
    for kind in ("parts", "errors"):
        rows = read_rows_column(list_parts(embeddings_dir, kind)) - listing.first_row
        done[rows[(rows >= 0) & (rows < listing.n_rows)]] = True
    return done


def _drop_repeated_rows(embeddings_dir: str, listing: Listing) -> int:
    """Guarantee each row is in exactly one part: a part holding rows that an earlier part already
    holds (possible only when a crashed task's output and its retry both landed) is rewritten without
    them. Returns the number of rows dropped."""
    seen = np.zeros(listing.n_rows, dtype=bool)
    dropped = 0
    for kind in ("parts", "errors"):
        for uri in list_parts(embeddings_dir, kind):
            tbl = read_part(uri)
            rows = tbl.column("row").to_numpy() - listing.first_row
            repeat = seen[rows]
            if repeat.any():
                dropped += int(repeat.sum())
                keep = tbl.filter(pa.array(~repeat))
                if keep.num_rows:
                    write_table(uri, keep)
                else:
                    storage.remove(uri)
                rows = rows[~repeat]
            seen[rows] = True
    return dropped


def _embedder_resources(config: EmbedConfig, gpus: float, cpus: float) -> dict[str, Any]:
    if gpus >= 1 and config.gpus_per_actor != 0:
        per = config.gpus_per_actor or 1.0
        concurrency = config.concurrency or max(1, int(gpus / per))
        return {"num_gpus": per, "num_cpus": 1, "concurrency": concurrency, "threads": config.torch_threads}
    concurrency = config.concurrency or max(1, int(cpus // 4))
    # Reserve one CPU per actor so decode tasks always get the rest, but let torch use the actor's
    # share of the machine: on 2 cores, one actor with 2 threads, decode tasks overlapping.
    threads = config.torch_threads or max(1, int(cpus // concurrency))
    return {"num_gpus": 0, "num_cpus": 1, "concurrency": concurrency, "threads": threads}


def embed_source(
    source_spec: str,
    embeddings_dir: str,
    config: EmbedConfig = EmbedConfig(),
    spec: ModelSpec | None = None,
    first_row: int = 0,
) -> EmbedSummary:
    """Embed every image of `source_spec` into `embeddings_dir` (resuming an interrupted run).

    Returns counts and timing. Raises EmbeddingError if the share of unusable images exceeds
    `config.max_error_rate` (the embeddings and the error table are kept, so a rerun with a higher
    limit finishes at once).
    """
    import ray

    from raysearch.runtime import cluster_cpus, cluster_gpus, configure_data_context, ensure_ray

    spec = spec or resolve_model(config.model)
    start = time.perf_counter()
    listing, resumed = prepare_embeddings_dir(embeddings_dir, source_spec, spec, first_row)
    manifest_uri = storage.join(embeddings_dir, EMBEDDINGS_MANIFEST)
    if resumed and storage.exists(manifest_uri):
        summary = _summary_from_manifest(storage.read_json(manifest_uri), embeddings_dir, listing.n_rows)
        _check_error_rate(summary, embeddings_dir, config.max_error_rate)
        return summary

    ensure_ray()
    configure_data_context(config.progress)
    done = _done_mask(embeddings_dir, listing) if resumed else np.zeros(listing.n_rows, bool)
    n_skipped = int(done.sum())
    gpus, cpus = cluster_gpus(), cluster_cpus()
    chunk = _chunk_rows(listing.n_rows - n_skipped, cpus, config.chunk_rows)
    tasks = plan_decode_tasks(listing, done, chunk)
    if resumed:
        log.info("resuming: %d of %d images already embedded", n_skipped, listing.n_rows)

    nodes: dict[str, dict[str, int]] = {}
    if tasks:
        res = _embedder_resources(config, gpus, cpus)
        ds = ray.data.from_items(tasks, override_num_blocks=len(tasks))
        ds = ds.map_batches(
            load_and_decode,
            batch_size=1,
            fn_kwargs={"input_size": spec.input_size, "resize": spec.resize},
            num_cpus=1,
            # What a decode task holds: its pixels and a copy in flight. Declaring it also keeps
            # Ray Data from fusing decoding into the Embedder actors, so the two overlap.
            memory=_decode_task_memory(chunk, spec.input_size),
        )
        ds = ds.map_batches(
            EmbedStage,
            batch_size=config.batch_size,
            fn_constructor_kwargs={"spec": spec.to_dict(), "torch_threads": res["threads"]},
            compute=ray.data.ActorPoolStrategy(size=res["concurrency"]),
            num_gpus=res["num_gpus"],
            num_cpus=res["num_cpus"],
        )
        ds = ds.map_batches(
            write_parts,
            batch_size=config.part_rows,
            fn_kwargs={"embeddings_dir": embeddings_dir},
            # Writing is light I/O: reserving no CPU lets parts land while decoding still holds every core.
            num_cpus=0,
        )
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            add_node_counts(nodes, batch)

    dropped = _drop_repeated_rows(embeddings_dir, listing)
    if dropped:
        log.warning("removed %d rows that were written twice by retried tasks", dropped)
    done = _done_mask(embeddings_dir, listing)
    if not done.all():
        missing = int((~done).sum())
        raise EmbeddingError(f"{missing} images of {listing.n_rows} were not embedded; rerun to resume")
    parts = list_parts(embeddings_dir, "parts")
    error_parts = list_parts(embeddings_dir, "errors")
    n_embedded = int(read_rows_column(parts).size)
    n_errors = int(read_rows_column(error_parts).size)
    elapsed = time.perf_counter() - start
    manifest = {
        "format": "raysearch-embeddings/1",
        "raysearch_version": __version__,
        "source": source_spec,
        "model": spec.to_dict(),
        "dim": spec.dim,
        "n_images": listing.n_rows,
        "first_row": listing.first_row,
        "end_row": listing.end_row,
        "n_embedded": n_embedded,
        "n_errors": n_errors,
        "parts": [os.path.basename(p) for p in parts],
        "error_parts": [os.path.basename(p) for p in error_parts],
        "seconds": round(elapsed, 3),
        "nodes": nodes,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    storage.atomic_write_json(manifest_uri, manifest)
    summary = EmbedSummary(
        embeddings_dir=embeddings_dir, n_images=listing.n_rows, n_embedded=n_embedded,
        n_errors=n_errors, n_skipped=n_skipped, seconds=elapsed, dim=spec.dim, nodes=nodes,
    )
    _check_error_rate(summary, embeddings_dir, config.max_error_rate)
    return summary


def _summary_from_manifest(manifest: dict, embeddings_dir: str, n_rows: int) -> EmbedSummary:
    return EmbedSummary(
        embeddings_dir=embeddings_dir, n_images=n_rows, n_embedded=int(manifest["n_embedded"]),
        n_errors=int(manifest["n_errors"]), n_skipped=n_rows, seconds=0.0, dim=int(manifest["dim"]),
        nodes=manifest.get("nodes", {}),
    )


def _check_error_rate(summary: EmbedSummary, embeddings_dir: str, max_error_rate: float) -> None:
    if summary.error_rate > max_error_rate:
        raise EmbeddingError(
            f"{summary.n_errors} of {summary.n_images} images could not be used "
            f"({summary.error_rate:.1%} > --max-error-rate {max_error_rate:.1%}); "
            f"see the error table in {storage.join(embeddings_dir, 'errors')}"
        )


def read_errors(embeddings_dir: str) -> pa.Table:
    """All error rows (row, image_id, uri, reason), sorted by row."""
    tables = [read_part(u) for u in list_parts(embeddings_dir, "errors")]
    if not tables:
        return ERROR_SCHEMA.empty_table()
    return pa.concat_tables(tables).sort_by("row")


__all__ = [
    "EmbedConfig",
    "EmbedSummary",
    "EmbedStage",
    "EmbeddingError",
    "decode_rows",
    "embed_source",
    "embeddings_matrix",
    "list_parts",
    "load_and_decode",
    "read_errors",
    "write_embeddings",
    "write_parts",
]
