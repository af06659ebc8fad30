"""Building an index directory from an embeddings folder: choose, train once, add in shards, merge.

    choose factory -> sample -> train (GPU when present) -> trained.index
                   -> N Ray tasks: add a slice of the parts each -> shards/shard-*.index + id maps
                   -> optionally merge the shards into one -> tune nprobe -> manifest.json (last)
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raysearch import storage
from raysearch.embed import list_parts, load_embeddings_manifest, read_errors
from raysearch.index import factory as fac
from raysearch.index.merge import merge_into
from raysearch.index.shards import add_shard, plan_shards, read_vectors, write_idmap, write_index
from raysearch.index.store import (
    ERRORS_FILE,
    TRAINED_INDEX,
    describe_files,
    shard_ids_name,
    shard_name,
    write_manifest,
)
from raysearch.runtime import Timer

log = logging.getLogger("raysearch")
METRICS = {"l2": faiss.METRIC_L2, "ip": faiss.METRIC_INNER_PRODUCT}


@dataclass(frozen=True)
class IndexConfig:
    """How to build the index. See `raysearch build --help` for the meaning of each option."""

    factory: str = "auto"
    metric: str = "l2"          # on L2-normalised vectors, L2 ranks exactly like inner product
    max_memory: str = "4G"
    shards: int = 1
    merge: bool = False
    train_size: int | None = None
    seed: int = 1234
    nprobe: int | None = None   # fix nprobe instead of tuning it
    target_recall: float = 0.95
    tune: bool = True
    whitening: Any = None       # raysearch.models.whitening.WhiteningConfig: PCA-whitening in front of the index

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"--metric must be one of {sorted(METRICS)}, got {self.metric!r}")
        if self.shards < 1:
            raise ValueError(f"--shards must be >= 1, got {self.shards}")
        fac.parse_memory(self.max_memory)
        if self.train_size is not None and self.train_size < 1:
            raise ValueError(f"--train-size must be >= 1, got {self.train_size}")
        if self.nprobe is not None and self.nprobe < 1:
            raise ValueError(f"--nprobe must be >= 1, got {self.nprobe}")
        if not 0.0 < self.target_recall <= 1.0:
            raise ValueError(f"--target-recall must be in (0, 1], got {self.target_recall}")


def part_sizes(parts: list[str]) -> list[int]:
    """Row counts from the Parquet footers (no data read)."""
    sizes = []
    for uri in parts:
        fs, path = storage.get_fs(uri)
        with fs.open(path, "rb") as f:
            sizes.append(pq.ParquetFile(f).metadata.num_rows)
    return sizes


def part_dim(uri: str) -> int:
    fs, path = storage.get_fs(uri)
    with fs.open(path, "rb") as f:
        field = pq.ParquetFile(f).schema_arrow.field("embedding")
    return int(field.type.list_size)


def sample_vectors(parts: list[str], sizes: list[int], n_sample: int, dim: int, seed: int) -> np.ndarray:
    """A uniform random sample of `n_sample` vectors, reading only the parts that hold sampled rows."""
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


def make_index(factory: str, dim: int, metric: str) -> faiss.Index:
    try:
        return faiss.index_factory(dim, factory, METRICS[metric])
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "invalid"
        raise ValueError(f"--index {factory!r} is not a valid FAISS factory string for dim {dim}: {first}") from e


def train_index(index: faiss.Index, xt: np.ndarray, seed: int) -> faiss.Index:
    """Train `index` on `xt` (CPU FAISS; seeded so a rebuild gives the same quantiser)."""
    if index.is_trained:
        return index
    need = fac.min_training_vectors(index)
    if xt.shape[0] < need:
        raise ValueError(
            f"the index needs at least {need} training vectors, only {xt.shape[0]} are available; "
            "choose a smaller nlist/PQ (or --index auto)"
        )
    fac.set_training_seed(index, seed)
    index.train(xt)
    return index


def default_nprobe(index: faiss.Index) -> int | None:
    try:
        nlist = faiss.extract_index_ivf(index).nlist
    except RuntimeError:
        return None
    return int(max(1, min(nlist, round(nlist ** 0.5))))


def build_index(
    embeddings_dir: str, index_dir: str, config: IndexConfig = IndexConfig(), extra_manifest: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Build an index directory from a complete embeddings folder; returns the manifest.

    `extra_manifest`: more entries for the manifest (e.g. how the embeddings were augmented).
    """
    import ray

    from raysearch.runtime import ensure_ray

    timer = Timer()
    emb = load_embeddings_manifest(embeddings_dir)
    parts = list_parts(embeddings_dir, "parts")
    sizes = part_sizes(parts)
    n = sum(sizes)
    dim = int(emb["dim"])
    if n == 0:
        raise ValueError(f"{embeddings_dir} holds no embeddings (every image failed; see its error table)")
    for uri in parts:
        if part_dim(uri) != dim:
            raise ValueError(f"{uri} holds {part_dim(uri)}-d vectors but the embeddings are {dim}-d")

    whitener, whitening_record, index_dim = None, None, dim
    if config.whitening is not None:
        from raysearch.models.whitening import learn_whitening, wrap_index

        storage.makedirs(index_dir)
        with timer("whiten"):
            whitener, whitening_record = learn_whitening(config.whitening, embeddings_dir, index_dir, config.seed)
        index_dim = whitener.d_out
    if config.factory == "auto":
        choice = fac.choose_factory(n, index_dim, config.max_memory)
        factory, reason = choice.factory, choice.reason
    else:
        factory, reason = config.factory, "given with --index"
    log.info("index: %s (%s)", factory, reason)
    index = make_index(factory, index_dim, config.metric)
    if whitener is not None:
        index = wrap_index(whitener, index)  # every shard then whitens its queries itself
    if config.merge and "HNSW" in factory:
        raise ValueError("--merge is not possible for HNSW graphs; build with --shards 1 or keep the shards")

    with timer("train"):
        n_train = config.train_size or fac.training_size(index, n)
        need = fac.min_training_vectors(index)
        if min(n_train, n) < need:
            raise ValueError(
                f"--index {factory!r} needs at least {need} training vectors, but only "
                f"{min(n_train, n)} are available; use fewer lists/codes or --index auto"
            )
        xt = sample_vectors(parts, sizes, n_train, dim, config.seed) if not index.is_trained else None
        if xt is not None:
            train_index(index, xt, config.seed)
    storage.makedirs(index_dir)
    trained_bytes = faiss.serialize_index(index).tobytes()
    write_index(index, storage.join(index_dir, TRAINED_INDEX))

    plan = plan_shards(sizes, config.shards)
    with timer("add"):
        ensure_ray()
        remote_add = ray.remote(num_cpus=1)(add_shard)
        trained_ref = ray.put(trained_bytes)
        refs = []
        for i, shard_plan in enumerate(plan):
            slices = [(parts[p], lo, hi) for p, lo, hi in shard_plan]
            refs.append(
                remote_add.remote(
                    trained_ref, slices, dim,
                    storage.join(index_dir, shard_name(i)), storage.join(index_dir, shard_ids_name(i)),
                )
            )
        results = ray.get(refs)
    shard_counts = [r["ntotal"] for r in results]
    if sum(shard_counts) != n:
        raise RuntimeError(f"shards hold {sum(shard_counts)} vectors, expected {n}")

    shard_entries = [
        {"name": shard_name(i), "ids_name": shard_ids_name(i), "ntotal": c} for i, c in enumerate(shard_counts)
    ]
    if config.merge and config.shards > 1:
        with timer("merge"):
            shard_entries = [merge_shards(index_dir, shard_entries)]

    nprobe = config.nprobe or default_nprobe(index)
    search_info: dict[str, Any] = {"nprobe": nprobe, "tuned": False}

    errors = read_errors(embeddings_dir)
    buf = pa.BufferOutputStream()
    pq.write_table(errors, buf)
    storage.atomic_write(storage.join(index_dir, ERRORS_FILE), buf.getvalue().to_pybytes())

    names = [TRAINED_INDEX, ERRORS_FILE] + [s["name"] for s in shard_entries] + [s["ids_name"] for s in shard_entries]
    manifest = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": emb["model"],
        "dim": dim,
        "metric": config.metric,
        "score": "1 - squared L2 distance / 2 (cosine for unit vectors)" if config.metric == "l2" else "inner product",
        "factory": factory,
        "factory_reason": reason,
        "trained_index": TRAINED_INDEX,
        "train_size": 0 if xt is None else int(xt.shape[0]),
        "seed": config.seed,
        "n_images": int(emb["n_images"]),
        "n_vectors": n,
        "n_errors": int(emb["n_errors"]),
        "next_row": int(emb.get("end_row", emb["n_images"])),
        "embeddings": [_relative_or_absolute(index_dir, embeddings_dir)],
        "shards": shard_entries,
        "merged": bool(config.merge and config.shards > 1),
        "search": search_info,
        "timings": {k: round(v, 3) for k, v in timer.seconds.items()},
        "files": describe_files(index_dir, names),
        **({"whitening": whitening_record} if whitening_record else {}),
        **(extra_manifest or {}),
    }
    write_manifest(index_dir, manifest)
    return manifest


def merge_shards(index_dir: str, shard_entries: list[dict]) -> dict:
    """Merge every shard into shard 0 (in memory), write it, remove the others."""
    import tempfile

    first = shard_entries[0]
    id_tables = []
    with tempfile.TemporaryDirectory(prefix="raysearch-merge-") as tmp:
        merged = faiss.read_index(storage.local_copy(storage.join(index_dir, first["name"]), tmp))
        for entry in shard_entries:
            fs, path = storage.get_fs(storage.join(index_dir, entry["ids_name"]))
            with fs.open(path, "rb") as f:
                id_tables.append(pq.read_table(f).rename_columns(["row", "image_id", "uri"]))
            if entry is first:
                continue
            src_path = storage.local_copy(storage.join(index_dir, entry["name"]), tmp)
            merge_into(merged, faiss.read_index(src_path))
    write_index(merged, storage.join(index_dir, first["name"]))
    write_idmap(storage.join(index_dir, first["ids_name"]), id_tables)
    for entry in shard_entries[1:]:
        storage.remove(storage.join(index_dir, entry["name"]))
        storage.remove(storage.join(index_dir, entry["ids_name"]))
    return {"name": first["name"], "ids_name": first["ids_name"], "ntotal": int(merged.ntotal)}


def _relative_or_absolute(index_dir: str, path: str) -> str:
    if "://" in path or "://" in index_dir:
        return path
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(index_dir))
    return path if rel.startswith("..") else rel
