"""The embedding pipeline: SOURCE -> listing -> read + decode (CPU tasks) -> model actors -> Parquet.

It writes an embeddings folder (`raysearch.formats.embeddings`: by default INDEX_DIR/embeddings),
as a resumable run folder (`raysearch.formats.runs`). Each stage is a plain function or class usable
without Ray (`load_and_decode`, `EmbedStage`, `write_parts` and its actor class `PartWriter`);
`embed_source` wires them into a streaming Ray Data pipeline. Parts are written atomically and named
by their content, so a killed run leaves only whole parts, and a rerun with the same arguments
embeds only the rows no part holds yet.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from raysearch import storage
from raysearch.errors import EmbeddingError
from raysearch.formats.embeddings import (
    EMBEDDINGS_MANIFEST,
    ERRORS,
    PARTS,
    content_name,
    load_embeddings_manifest,
    write_embeddings_manifest,
    write_error_part,
    write_vectors_part,
)
from raysearch.formats.local import BATCH_PREFIX as LOCAL_BATCH_PREFIX
from raysearch.formats.local import LOCAL_PARTS, batch_columns, write_local_part
from raysearch.formats.runs import RunFolder, check_error_rate
from raysearch.images import DecodeError, decode_image, resize_image
from raysearch.models.embedder import CPU_FORWARD_BATCH, Embedder, fast_default
# The spec, not the registry: the registry imports torch, which decode and write tasks never need
# (importing it costs each of their worker processes ~1.7 s of CPU).
from raysearch.models.spec import ModelConfig, ModelSpec
from raysearch.progress import Progress
from raysearch.runtime import (
    ActorResources,
    cluster_cpus,
    cluster_gpus,
    configure_data_context,
    ensure_ray,
    model_actor_resources,
    node_id,
)
from raysearch.sources.listing import GROUP_ROWS, Listing, read_listing_groups
from raysearch.version import __version__

log = logging.getLogger("raysearch")
KINDS = (PARTS, ERRORS)   # the parts that mark a row as done

@dataclass(frozen=True)
class EmbedConfig:
    """How to run the embedding stage. None means "chosen from the cluster's resources"."""

    model: ModelConfig = field(default_factory=ModelConfig)
    batch_size: int | None = None   # images per forward pass (default: 4 on CPU, sized to the GPU)
    concurrency: int | None = None  # Embedder actors (default: one per GPU; on CPU, from measured costs)
    gpus_per_actor: float | None = None
    torch_threads: int | None = None
    chunk_rows: int | None = None   # images per decode task (default: from the image count)
    part_rows: int = 1024           # embeddings per Parquet part (also the resume granularity)
    max_error_rate: float = 0.05
    progress: bool = True
    # The fast inference settings and stage sizing (None: on unless RAYSEARCH_EMBED_FAST=0); False
    # gives the settings from before them, for benchmarks' before/after.
    fast: bool | None = None
    # Local features extracted in the same pass (`--local sift|aliked`, or {"name": ..., option:
    # value}), stored beside the vectors for verification (raysearch.rerank); None: none.
    local: str | dict | None = None

    def __post_init__(self) -> None:
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError(f"torch_threads must be >= 1, got {self.torch_threads}")
        if self.local is not None:
            from raysearch.models.local import extractor_settings

            extractor_settings(self.local)   # an unknown extractor or option fails here
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


def decode_rows(
    rows: pa.Table, input_size: int, resize: str, local: str | None = None
) -> dict[str, np.ndarray]:
    """Listing rows -> columns row, image_id, uri, pixels (n, S, S, 3) uint8, error ('' if fine);
    with `local` (an extractor's settings as JSON, `local_record`), also each image's local
    features as `raysearch.formats.local.batch_columns`."""
    n = rows.num_rows
    row_ids = rows.column("row").to_numpy()
    image_ids = rows.column("image_id").to_pylist()
    uris = rows.column("uri").to_pylist()
    dup_of = rows.column("duplicate_of").to_pylist() if "duplicate_of" in rows.column_names else [None] * n
    pixels = np.zeros((n, input_size, input_size, 3), dtype=np.uint8)
    errors = [""] * n
    extractor = _local_extractor(local) if local else None
    features: list = [None] * n
    to_read = [i for i in range(n) if not dup_of[i]]
    for i in range(n):
        if dup_of[i]:
            errors[i] = f"duplicate image_id: {dup_of[i]} has the same id"
    for i, data in zip(to_read, storage.read_many([uris[i] for i in to_read])):
        if isinstance(data, Exception):
            errors[i] = storage.read_failure_reason(data)
            continue
        try:
            arr = decode_image(data, draft_size=input_size)
            pixels[i] = resize_image(arr, input_size, resize)  # type: ignore[arg-type]
        except DecodeError as e:
            errors[i] = e.reason
            continue
        if extractor is not None:
            features[i] = _extract_local(extractor, data, uris[i])
    out = {
        "row": row_ids.astype(np.int64),
        "image_id": np.asarray(image_ids, dtype=object),
        "uri": np.asarray(uris, dtype=object),
        "pixels": pixels,
        "error": np.asarray(errors, dtype=object),
    }
    if extractor is not None:
        out.update(batch_columns(features, extractor.kind, extractor.dim))
    return out


@functools.lru_cache(maxsize=2)
def _local_extractor(settings_json: str):
    """The local-feature extractor of these settings, built once per process. In decode tasks:
    SIFT on one OpenCV thread (the task owns its CPU share), ALIKED on the CPU (a decode task
    reserves no GPU)."""
    from raysearch.models.local import make_extractor

    settings = json.loads(settings_json)
    name = settings.pop("name")
    return make_extractor(name, **settings, **({"threads": 1} if name == "sift" else {"device": "cpu"}))


def _extract_local(extractor, data: bytes, uri: str):
    """One image's local features, decoded as verification decodes a candidate's image
    (`raysearch.rerank`), so stored and extracted features are alike; None if extraction fails
    (the image is still embedded; verification then reads it again)."""
    try:
        return extractor.extract(decode_image(data, draft_size=getattr(extractor, "max_side", None)))
    except Exception as e:  # noqa: BLE001 - one bad image must not stop the run
        log.warning("no local features for %s: %s", uri, e)
        return None


def local_record(choice: str | dict | None) -> dict[str, Any] | None:
    """What an embeddings run (and then the index) records of `--local`: {"extractor": every
    setting, "kind", "dim"}; None without. Builds the extractor once, so a bad name or a missing
    optional package fails here, before any image is read (ValueError naming the fix)."""
    if choice is None:
        return None
    from raysearch.models.local import extractor_settings

    settings = extractor_settings(choice)
    try:
        extractor = _local_extractor(json.dumps(settings, sort_keys=True))
    except ImportError as e:
        raise ValueError(str(e)) from None
    return {"extractor": settings, "kind": extractor.kind, "dim": int(extractor.dim)}


def load_and_decode(
    batch: dict[str, np.ndarray], input_size: int, resize: str, local: str | None = None
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
        outs.append(decode_rows(rows, input_size, resize, local))
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

    def __init__(self, spec: dict, device: str | None = None, torch_threads: int | None = None,
                 fast: bool | None = None, forward_batch: int | None = None):
        self.embedder = Embedder(spec, device, torch_threads, fast=fast, forward_batch=forward_batch)

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
        out.update({k: v for k, v in batch.items() if k.startswith(LOCAL_BATCH_PREFIX)})
        return out


# ---------------------------------------------------------------------------------------------
# Stage 3: write Parquet parts
# ---------------------------------------------------------------------------------------------


def write_parts(batch: dict[str, np.ndarray], embeddings_dir: str, local_kind: str | None = None,
                local_dim: int = 0) -> dict[str, np.ndarray]:
    """Write the batch's embeddings and error rows as Parquet parts (and its local features, of
    `local_kind` and `local_dim`, when it carries them); return counts, one row per (decode node,
    embed node) pair of the batch: columns decode_node, embed_node, n_ok, n_errors.

    Part names derive from the rows they hold, so a retried task rewrites the same file rather
    than adding a second copy. The local-features part is written first: a row counts as done
    once its vectors part exists, and then its features exist too.
    """
    rows = np.asarray(batch["row"], dtype=np.int64)
    errors = np.asarray(batch["error"], dtype=object)
    ok = np.asarray([not e for e in errors], dtype=bool)
    if ok.any() and local_kind:
        write_local_part(storage.join(embeddings_dir, LOCAL_PARTS, content_name(rows[ok])), rows[ok],
                         {k: np.asarray(v)[ok] for k, v in batch.items() if k.startswith(LOCAL_BATCH_PREFIX)},
                         local_kind, local_dim)
    if ok.any():
        emb = np.asarray(batch["embedding"], dtype=np.float32)
        write_vectors_part(embeddings_dir, rows[ok], batch["image_id"][ok], batch["uri"][ok], emb[ok])
    if (~ok).any():
        write_error_part(embeddings_dir, rows[~ok], batch["image_id"][~ok], batch["uri"][~ok], errors[~ok])
    return node_counts(batch, ok)


class PartWriter:
    """Ray Data stage: `write_parts` as a callable class, run by a pool of one actor that starts
    with the pipeline and writes every part.

    As tasks, on 2 cores each part's write found no idle worker left (Ray ends idle workers it does
    not need within seconds) and started a fresh process: 2.5 CPU-seconds to import Ray, Ray Data
    and pyarrow anew, per part; a run of fewer than `part_rows` images started it only after its
    last image was embedded. The actor's own start costs about as much once per run (600-2000
    images measured alike within 5%), so longer runs save one process start per part."""

    def __init__(self, embeddings_dir: str, local_kind: str | None = None, local_dim: int = 0):
        self.embeddings_dir, self.local_kind, self.local_dim = embeddings_dir, local_kind, local_dim

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return write_parts(batch, self.embeddings_dir, self.local_kind, self.local_dim)


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


# ---------------------------------------------------------------------------------------------
# Sizing the stages: decode tasks and model actors share the CPUs in proportion to their costs
# ---------------------------------------------------------------------------------------------

# Images per forward pass on CPUs: the Embedder's measured best (`CPU_FORWARD_BATCH`); the
# settings from before (RAYSEARCH_EMBED_FAST=0) used 32.
CPU_BATCH_SIZE = CPU_FORWARD_BATCH
CPU_BATCH_SIZE_BEFORE = 32
# Images per GPU forward pass at 224 px (EfficientNet-Lite0 in bf16 holds well under 20 MB of
# activations per image), scaled by the input's area; benchmarks/device_check.sh measures 64-512.
GPU_BATCH_AT_224 = 256
PROBE_IMAGES = 8


@dataclass(frozen=True)
class StageCosts:
    """CPU seconds per image of each stage, measured on a sample: `decode_s` to read, decode and
    resize one image in one process, `model_s` to embed one with one torch thread."""

    decode_s: float
    model_s: float

    @property
    def model_share(self) -> float:
        """The share of the CPUs the model should get so that neither stage waits for the other."""
        return self.model_s / (self.decode_s + self.model_s)


@dataclass(frozen=True)
class StagePlan:
    """Resources of the two stages: the model actors, the CPUs each decode task reserves, the
    batch size, and the costs it was sized from (None: a GPU plan, or the fixed rule)."""

    actors: ActorResources
    decode_cpus: float
    batch_size: int
    costs: StageCosts | None = None


def gpu_batch_size(input_size: int) -> int:
    """Images per forward pass on a GPU: GPU_BATCH_AT_224 scaled by (224 / input_size)^2, a
    multiple of 8 between 16 and 1024."""
    n = GPU_BATCH_AT_224 * (224.0 / input_size) ** 2
    return int(np.clip(8 * round(n / 8), 16, 1024))


def plan_stages(gpus: float, cpus: float, config: EmbedConfig, input_size: int,
                costs: StageCosts | None = None) -> StagePlan:
    """Size the decode and model stages of a cluster with `gpus` GPUs and `cpus` CPUs.

    GPUs: one actor per GPU reserving one CPU, every other CPU decodes (a GPU embeds far faster
    than one CPU decodes). CPUs with measured `costs`: the model actors reserve the model's share
    of the CPUs (`runtime.model_actor_resources`) and the decode tasks split the rest, so that on 2
    cores small photographs leave nearly both cores to the model and 12 MP photographs, which cost
    more to decode than to embed, give decoding the larger part. Without costs (or with
    config.fast False): the fixed rule from before (one actor per 4 CPUs, decode tasks 1 CPU each).
    The batch: config.batch_size, else sized to the GPU, else CPU_BATCH_SIZE (CPU_BATCH_SIZE_BEFORE
    with config.fast False).
    """
    on_gpu = gpus >= 1 and config.gpus_per_actor != 0
    fast = fast_default() if config.fast is None else config.fast
    cpu_batch = CPU_BATCH_SIZE if fast else CPU_BATCH_SIZE_BEFORE
    batch = config.batch_size or (gpu_batch_size(input_size) if on_gpu else cpu_batch)
    share = None if on_gpu or costs is None else costs.model_share
    actors = model_actor_resources(gpus, cpus, config.concurrency, config.gpus_per_actor, config.torch_threads,
                                   model_share=share)
    if share is None:
        return StagePlan(actors, 1.0, batch, None)
    free = cpus - actors.concurrency * actors.num_cpus
    # As many decode processes as the decode share fills, each reserving an equal part of the rest.
    processes = max(1, math.ceil(cpus * (1.0 - share) - 1e-9))
    decode_cpus = float(np.clip(math.floor(100 * free / processes) / 100, 0.01, 1.0))
    return StagePlan(actors, decode_cpus, batch, costs)


def measure_stage_costs(listing: Listing, spec: ModelSpec, fast: bool | None = None,
                        n_images: int = PROBE_IMAGES) -> StageCosts:
    """Decode and model CPU seconds per image, from the first `n_images` of `listing` and a batch
    of `n_images` through the model on one thread (built once per process and model). CPU time,
    not wall time, so waiting on storage and other programs' load count less."""
    rows = read_listing_groups(listing.parts[0].uri, 0, 1)
    decode_rows(rows.slice(0, 1), spec.input_size, spec.resize)  # first call loads PIL's plugins
    sample = rows.slice(1, n_images) if rows.num_rows > 1 else rows
    start = time.process_time()
    decode_rows(sample, spec.input_size, spec.resize)
    decode_s = (time.process_time() - start) / max(1, sample.num_rows)
    model_s = _model_seconds(json.dumps(spec.to_dict(), sort_keys=True), n_images,
                             fast_default() if fast is None else fast)
    return StageCosts(decode_s=max(decode_s, 1e-5), model_s=max(model_s, 1e-5))


@functools.lru_cache(maxsize=8)
def _model_seconds(spec_json: str, n_images: int, fast: bool) -> float:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        spec = json.loads(spec_json)
        embedder = Embedder(spec, "cpu", fast=fast)
        size = int(spec["input_size"])
        pixels = np.random.default_rng(0).integers(0, 256, (n_images, size, size, 3), dtype=np.uint8)
        embedder.embed_pixels(pixels[:2])  # oneDNN prepares its kernels on the first call
        start = time.process_time()
        embedder.embed_pixels(pixels)
        return (time.process_time() - start) / n_images
    finally:
        torch.set_num_threads(threads)


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


def embeddings_run(embeddings_dir: str) -> RunFolder:
    """The run folder of an embedding run (complete once embeddings.json is written)."""
    return RunFolder(embeddings_dir, EMBEDDINGS_MANIFEST, _same_run, EmbeddingError)


def _same_run(a: dict, b: dict) -> bool:
    # Compare as stored JSON (tuples in a fresh record are lists in a stored one).
    def norm(d: dict) -> str:
        return json.dumps({"source": d.get("source"), "model": d.get("model"), "local": d.get("local")},
                          sort_keys=True)

    return norm(a) == norm(b)


def embed_source(
    source_spec: str,
    embeddings_dir: str,
    config: EmbedConfig = EmbedConfig(),
    spec: ModelSpec | None = None,
    first_row: int = 0,
    before_embedding: Callable[[Listing], None] | None = None,
) -> EmbedSummary:
    """Embed every image of `source_spec` into `embeddings_dir` (resuming an interrupted run).

    Returns counts and timing. Raises EmbeddingError if the share of unusable images exceeds
    `config.max_error_rate` (the embeddings and the error table are kept, so a rerun with a higher
    limit finishes at once). `before_embedding(listing)` runs once the SOURCE is listed and before
    any image is read (a build checks its index options there).
    """
    import ray

    from raysearch.models.registry import resolve_model

    spec = spec or resolve_model(config.model)
    start = time.perf_counter()
    embeddings_dir = storage.absolute(embeddings_dir)   # read and written by Ray's workers
    run = embeddings_run(embeddings_dir)
    local = local_record(config.local)
    record = {"source": source_spec, "model": spec.to_dict(), "local": local, "raysearch_version": __version__}
    listing, resumed = run.start(record, source_spec, first_row, what="embeddings", progress=config.progress)
    if before_embedding is not None:
        before_embedding(listing)
    if resumed and run.is_complete():
        summary = _summary_from_manifest(load_embeddings_manifest(embeddings_dir), embeddings_dir, listing.n_rows)
        _check_error_rate(summary, embeddings_dir, config.max_error_rate)
        return summary

    ensure_ray()
    configure_data_context(config.progress)
    done = run.done_mask(listing, KINDS) if resumed else np.zeros(listing.n_rows, bool)
    n_skipped = int(done.sum())
    gpus, cpus = cluster_gpus(), cluster_cpus()
    chunk = _chunk_rows(listing.n_rows - n_skipped, cpus, config.chunk_rows)
    tasks = plan_decode_tasks(listing, done, chunk)
    if resumed:
        log.info("resuming: %d of %d images already embedded", n_skipped, listing.n_rows)

    nodes: dict[str, dict[str, int]] = {}
    if tasks:
        fast = fast_default() if config.fast is None else config.fast
        on_gpu = gpus >= 1 and config.gpus_per_actor != 0
        costs = None if on_gpu or not fast else measure_stage_costs(listing, spec, fast)
        plan = plan_stages(gpus, cpus, config, spec.input_size, costs)
        res = plan.actors
        log.info(
            "stages: %s%d model actors (%g GPU, %g CPU, %s threads each), decode tasks %g CPU each, batch %d",
            "" if costs is None else f"decode {1e3 * costs.decode_s:.1f} ms, model {1e3 * costs.model_s:.1f} ms "
            "of CPU per image: ", res.concurrency, res.num_gpus, res.num_cpus, res.threads, plan.decode_cpus,
            plan.batch_size,
        )
        ds = ray.data.from_items(tasks, override_num_blocks=len(tasks))
        ds = ds.map_batches(
            load_and_decode,
            batch_size=1,
            fn_kwargs={"input_size": spec.input_size, "resize": spec.resize,
                       "local": json.dumps(local["extractor"], sort_keys=True) if local else None},
            num_cpus=plan.decode_cpus,
            # What a decode task holds: its pixels and a copy in flight. Declaring it also keeps
            # Ray Data from fusing decoding into the model actors, so the two overlap. (Fused, each
            # actor decoding its own images, measured no less CPU on 2 cores for small photographs
            # and more for 12 MP ones, which then need two model actors starting instead of one.)
            memory=_decode_task_memory(chunk, spec.input_size),
        )
        ds = ds.map_batches(
            EmbedStage,
            batch_size=plan.batch_size,
            fn_constructor_kwargs={"spec": spec.to_dict(), "torch_threads": res.threads, "fast": fast,
                                   "forward_batch": plan.batch_size},
            compute=ray.data.ActorPoolStrategy(size=res.concurrency),
            num_gpus=res.num_gpus,
            num_cpus=res.num_cpus,
        )
        ds = ds.map_batches(
            PartWriter,
            batch_size=config.part_rows,
            fn_constructor_kwargs={"embeddings_dir": embeddings_dir, "local_kind": local["kind"] if local else None,
                                   "local_dim": local["dim"] if local else 0},
            compute=ray.data.ActorPoolStrategy(size=1),
            # Writing is light I/O: reserving no CPU lets parts land while decoding still holds every core.
            num_cpus=0,
        )
        with Progress("embedding", listing.n_rows - n_skipped, "images", enabled=config.progress) as progress:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                add_node_counts(nodes, batch)
                progress.update(int(batch["n_ok"].sum() + batch["n_errors"].sum()))

    run.drop_repeated_rows(listing, KINDS)
    done = run.done_mask(listing, KINDS)
    if not done.all():
        missing = int((~done).sum())
        raise EmbeddingError(f"{missing} images of {listing.n_rows} were not embedded; rerun to resume")
    elapsed = time.perf_counter() - start
    manifest = write_embeddings_manifest(
        embeddings_dir, source_spec, spec, listing.n_rows, listing.first_row, listing.end_row, elapsed, nodes=nodes,
        **({"local": local} if local else {}),
    )
    summary = EmbedSummary(
        embeddings_dir=embeddings_dir, n_images=listing.n_rows, n_embedded=manifest["n_embedded"],
        n_errors=manifest["n_errors"], n_skipped=n_skipped, seconds=elapsed, dim=spec.dim, nodes=nodes,
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
    check_error_rate(summary.n_errors, summary.n_images, max_error_rate, embeddings_dir, "used", EmbeddingError)


__all__ = [
    "EmbedConfig",
    "EmbedStage",
    "PartWriter",
    "EmbedSummary",
    "StageCosts",
    "StagePlan",
    "decode_rows",
    "embed_source",
    "embeddings_run",
    "load_and_decode",
    "local_record",
    "measure_stage_costs",
    "plan_stages",
    "write_parts",
]
