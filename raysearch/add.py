"""Growing an index: `raysearch add INDEX_DIR SOURCE` embeds new images with the index's own model
and appends them without retraining.

    INDEX_DIR/additions/00001/
      request.json          the SOURCE this addition is for (a rerun of the same add resumes)
      source.parquet        the new images (path, id): SOURCE minus the image_ids already indexed
                            (with `replace`, all of SOURCE)
      skipped.parquet       image_id, uri of the SOURCE images that were already indexed (with
                            `replace`: replaced.parquet, the images embedded again)
      embeddings/           the embedding run (numbered from the manifest's next_row)
      errors.parquet        images of this addition that could not be used

The new vectors go into new shards (`shards`), or are appended to the last shard (`merge`), which is
then written under a new name. The manifest is rewritten last and atomically; until then the index
on disk is the one before the addition, and files it no longer lists are removed only afterwards.
Only one `add` may run on an index at a time.

An index holding removed images (tombstones, raysearch.index.tombstones) is compacted first. With
`replace`, images already indexed are embedded again: their old vectors are tombstoned in the
manifest that publishes the new ones, then compacted away.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from raysearch import storage
from raysearch.embed import EmbedConfig, EmbedSummary, embed_source
from raysearch.formats.embeddings import list_parts, part_dim, part_sizes, read_errors, write_table
from raysearch.index.build import task_cpus
from raysearch.index.grow import IndexedIds, append_to_shard
from raysearch.index.shards import add_shard, plan_shards
from raysearch.index.fields import fields_table, fields_update
from raysearch.index.tombstones import compact_index, find_vector_ids, next_shard_number, tombstone_update
from raysearch.index.store import (
    MANIFEST,
    IndexStore,
    describe_files,
    shard_ids_name,
    shard_name,
    write_manifest,
)
from raysearch.runtime import ensure_ray
from raysearch.sources import open_source

log = logging.getLogger("raysearch")
ADDITIONS_DIR = "additions"


@dataclass(frozen=True)
class AddConfig:
    """How to add images to an index."""

    embed: EmbedConfig = field(default_factory=EmbedConfig)
    shards: int = 1                  # new shards the added vectors are split over
    merge: bool = False              # append to the last shard instead of making new ones
    cpus_per_shard: int | None = None
    replace: bool = False            # embed images already indexed again (their old vectors are removed)

    def __post_init__(self) -> None:
        if self.shards < 1:
            raise ValueError(f"--shards must be >= 1, got {self.shards}")
        if self.merge and self.shards != 1:
            raise ValueError(f"--merge appends to the last shard; it cannot be combined with --shards {self.shards}")


@dataclass(frozen=True)
class AddResult:
    """What `add_images` did: image counts, up to five of the skipped image_ids
    (skipped_examples), the embedding run's summary (None when nothing was new) and the index's
    manifest afterwards."""

    index_dir: str
    addition: str | None             # additions/NNNNN, None when nothing was new
    n_source: int                    # images in SOURCE
    n_skipped: int                   # already in the index
    skipped_examples: list[str]
    embed: EmbedSummary | None
    n_added: int                     # vectors appended
    manifest: dict[str, Any]
    n_replaced: int = 0              # with replace: images already indexed, embedded again
    n_compacted: int = 0             # removed vectors dropped from the shards by this add


def split_source(source: str, indexed: IndexedIds, new_uri: str, skipped_uri: str,
                 replace: bool = False) -> tuple[int, int, list[str]]:
    """Write SOURCE's images that the index lacks as a list file (path, id) and the others as
    skipped (image_id, uri); with `replace`, every image goes into the list file and the ones
    already indexed are written to `skipped_uri` as the replaced ones. Returns (n in source, n
    skipped or replaced, a few of their ids)."""
    src = open_source(source)
    new_tables, skipped_tables = [], []
    n_source = 0
    for tbl in src.iter_batches():
        n_source += tbl.num_rows
        present = indexed.contains(tbl.column("image_id").combine_chunks())
        keep = pa.array(~present | replace)
        new_tables.append(tbl.filter(keep).select(["uri", "image_id"]).rename_columns(["path", "id"]))
        skipped_tables.append(tbl.filter(pa.array(present)))
    if n_source == 0:
        raise ValueError(f"source {source!r} holds no images")
    new = pa.concat_tables(new_tables)
    skipped = pa.concat_tables(skipped_tables) if skipped_tables else pa.table({"image_id": [], "uri": []})
    write_table(new_uri, new)
    write_table(skipped_uri, skipped)
    return n_source, skipped.num_rows, skipped.column("image_id").to_pylist()[:5]


def _read_ids(uri: str, first_row: int) -> pa.Table:
    """(id, image_id) of an id map's rows numbered from `first_row` on (this addition's)."""
    import pyarrow.parquet as pq

    fs, path = storage.get_fs(uri)
    with fs.open(path, "rb") as f:
        tbl = pq.read_table(f, columns=["id", "image_id"])
    return tbl.filter(pa.array(tbl.column("id").to_numpy() >= first_row))


def _next_addition(manifest: dict) -> str:
    return f"{ADDITIONS_DIR}/{len(manifest.get('additions', [])) + 1:05d}"


def _claim_addition(index_dir: str, addition: str, source: str) -> str:
    """Create (or reopen for the same SOURCE) the folder of a pending addition."""
    folder = storage.join(index_dir, addition)
    request_uri = storage.join(folder, "request.json")
    if storage.exists(request_uri):
        previous = storage.read_json(request_uri).get("source")
        if previous != source:
            raise ValueError(
                f"{folder} holds an unfinished add of {previous!r}; rerun that add to finish it, "
                f"or delete the folder to discard it, before adding {source!r}"
            )
    else:
        storage.makedirs(folder)
        storage.atomic_write_json(request_uri, {"source": source, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return folder


def add_images(index_dir: str, source: str, config: AddConfig = AddConfig()) -> AddResult:
    """Embed SOURCE's new images with the index's model and append them to the index."""
    import faiss
    import ray

    index_dir = storage.absolute(index_dir)   # Ray's workers do not share this working directory
    store = IndexStore(index_dir, verify=True)
    store.verify_files()   # a damaged index is refused before any work
    index_dir = store.index_dir
    storage.ensure_writable_dir(index_dir)
    n_compacted = 0
    if store.removed_ids().size:
        # Removed images leave the shards before new ones join them.
        n_compacted = compact_index(index_dir).n_dropped
        log.info("add: compacted %d removed vectors out of %s first", n_compacted, index_dir)
        store = IndexStore(index_dir, verify=False)
    manifest = dict(store.manifest)
    indexed = IndexedIds(store)
    addition = _next_addition(manifest)
    folder = _claim_addition(index_dir, addition, source)
    new_uri = storage.join(folder, "source.parquet")
    skipped_uri = storage.join(folder, "replaced.parquet" if config.replace else "skipped.parquet")
    n_source, n_skipped, examples = split_source(source, indexed, new_uri, skipped_uri, config.replace)
    n_replaced = n_skipped if config.replace else 0
    n_skipped -= n_replaced
    log.info("add: %d images in %s, %d already indexed%s", n_source, source, n_skipped + n_replaced,
             " (replaced)" if config.replace else "")
    if n_skipped == n_source:
        storage.remove(folder, recursive=True)
        return AddResult(index_dir, None, n_source, n_skipped, examples, None, 0, manifest, 0, n_compacted)

    emb_dir = storage.join(folder, "embeddings")
    summary = embed_source(new_uri, emb_dir, config.embed, spec=store.model_spec, first_row=int(manifest["next_row"]))
    parts = list_parts(emb_dir, "parts")
    for uri in parts:
        if part_dim(uri) != store.dim:
            raise ValueError(f"{uri} holds {part_dim(uri)}-d vectors, the index {index_dir} is {store.dim}-d")
    sizes = part_sizes(parts)
    n_new = sum(sizes)

    errors_name = f"{addition}/errors.parquet"
    errors = read_errors(emb_dir)
    write_table(storage.join(index_dir, errors_name), errors)
    # The old vectors of replaced images (found before any new vector is added); an image that
    # could not be embedded again keeps its old vector.
    superseded = np.empty(0, np.int64)
    if n_replaced:
        import pyarrow.parquet as pq

        fs, path = storage.get_fs(skipped_uri)
        with fs.open(path, "rb") as f:
            replaced_ids = pq.read_table(f, columns=["image_id"]).column("image_id").to_pylist()
        failed = set(errors.column("image_id").to_pylist()) if "image_id" in errors.column_names else set()
        superseded, _ = find_vector_ids(store, [i for i in replaced_ids if i not in failed], np.empty(0, np.int64))

    shards = [dict(s) for s in manifest["shards"]]
    removed: list[dict] = []
    tasks_info: list[dict] = []
    if n_new:
        ensure_ray()
        first = next_shard_number(manifest)
        if config.merge and shards:
            last = shards[-1]
            slices = [(parts[p], lo, hi) for p, lo, hi in plan_shards(sizes, 1)[0]]
            cpus = task_cpus(1, config.cpus_per_shard)
            info = ray.get(ray.remote(num_cpus=cpus)(append_to_shard).remote(
                storage.join(index_dir, last["name"]), storage.join(index_dir, last["ids_name"]), slices,
                store.dim, storage.join(index_dir, shard_name(first)), storage.join(index_dir, shard_ids_name(first)), cpus,
            ))
            removed.append(shards.pop())
            shards.append({"name": shard_name(first), "ids_name": shard_ids_name(first), "ntotal": info["ntotal"]})
            tasks_info.append({"shard": len(shards) - 1, **info})
        else:
            trained = faiss.serialize_index(store.load_trained()).tobytes()
            trained_ref = ray.put(trained)
            cpus = task_cpus(config.shards, config.cpus_per_shard)
            remote_add = ray.remote(num_cpus=cpus, scheduling_strategy="SPREAD")(add_shard)
            plan = [p for p in plan_shards(sizes, config.shards) if p]
            refs = [
                remote_add.remote(
                    trained_ref, [(parts[p], lo, hi) for p, lo, hi in shard_plan], store.dim,
                    storage.join(index_dir, shard_name(first + j)), storage.join(index_dir, shard_ids_name(first + j)),
                    False, cpus,
                )
                for j, shard_plan in enumerate(plan)
            ]
            for j, info in enumerate(ray.get(refs)):
                shards.append({"name": shard_name(first + j), "ids_name": shard_ids_name(first + j), "ntotal": info["ntotal"]})
                tasks_info.append({"shard": len(shards) - 1, **info})
        added = sum(s["ntotal"] for s in shards) - sum(s["ntotal"] for s in manifest["shards"])
        if added != n_new:
            raise RuntimeError(f"the index grew by {added} vectors, expected {n_new}")

    emb = storage.read_json(storage.join(emb_dir, "embeddings.json"))
    new_names = [errors_name] + [n for s in shards if s not in manifest["shards"] for n in (s["name"], s["ids_name"])]
    files = {k: v for k, v in manifest["files"].items() if k not in {n for r in removed for n in (r["name"], r["ids_name"])}}
    files.update(describe_files(index_dir, new_names))
    record = {
        "addition": addition,
        "source": source,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "n_source": n_source,
        "n_skipped": n_skipped,
        "n_replaced": n_replaced,
        "n_images": summary.n_images,
        "n_added": n_new,
        "n_errors": summary.n_errors,
        "first_row": int(emb["first_row"]),
        "end_row": int(emb["end_row"]),
        "shards": [s["name"] for s in shards if s not in manifest["shards"]],
        "shard_tasks": [
            {"shard": t["shard"], "node_id": t.get("node_id"), "ntotal": t["ntotal"], "seconds": round(t["seconds"], 3)}
            for t in tasks_info
        ],
    }
    manifest.pop("format", None)
    manifest.pop("raysearch_version", None)
    manifest.update(
        shards=shards,
        files=files,
        n_images=int(manifest["n_images"]) + summary.n_images,
        n_vectors=int(manifest["n_vectors"]) + n_new,
        n_errors=int(manifest["n_errors"]) + summary.n_errors,
        next_row=int(emb["end_row"]),
        embeddings=list(manifest.get("embeddings", [])) + [f"{addition}/embeddings"],
        errors_files=list(manifest.get("errors_files", ["errors.parquet"])) + [errors_name],
        additions=list(manifest.get("additions", [])) + [record],
        merged=bool(manifest.get("merged")) and len(shards) == 1,
    )
    if superseded.size:
        # Published with the new vectors: no search ever sees an image twice or not at all.
        manifest = tombstone_update(index_dir, manifest, superseded)
    old_fields = (manifest.get("fields") or {}).get("name")
    if n_new:
        # The metadata columns of a list SOURCE, for the rows this addition numbered.
        new_maps = [_read_ids(storage.join(index_dir, s["ids_name"]), int(emb["first_row"]))
                    for s in shards if s not in store.manifest["shards"]]
        manifest = fields_update(index_dir, manifest, fields_table(source, new_maps), store.load_fields())
    write_manifest(index_dir, manifest)
    new_fields = (manifest.get("fields") or {}).get("name")
    if old_fields and old_fields != new_fields:
        storage.remove(storage.join(index_dir, old_fields))
    for r in removed:  # no longer listed: safe to delete now
        storage.remove(storage.join(index_dir, r["name"]))
        storage.remove(storage.join(index_dir, r["ids_name"]))
    log.info("add: %d vectors appended; manifest %s rewritten", n_new, storage.join(index_dir, MANIFEST))
    if superseded.size:
        n_compacted += compact_index(index_dir).n_dropped
    return AddResult(index_dir, addition, n_source, n_skipped, examples, summary, n_new,
                     IndexStore(index_dir, verify=False).manifest, n_replaced, n_compacted)
