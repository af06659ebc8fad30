"""`raysearch activate`: Ray Data over a collection's images, perturbing each so that the index's own
quantiser represents it better.

    SOURCE listing -> join with the index (image_id -> vector id -> stored embedding)
                   -> read + decode at full resolution (CPU tasks)
                   -> Activator actors (GPU when present; model + trained quantiser loaded once)
                   -> write activated images and report rows (CPU tasks)

Output folder:

    run.json                 index, source and options; a rerun must match them to resume
    listing/part-*.parquet   the SOURCE listing (row numbers are positions in it)
    images/<image_id>.png    activated images (PNG by default, so the perturbation survives)
    report/part-*.parquet    row, image_id, uri, output, psnr, ssim, linf, cos/dist to target before/after
    errors/part-*.parquet    row, image_id, uri, reason (not in the index, unreadable, ...)
    activate.json            written last: counts and averages

The target of each image comes from the index's own entry for its image_id: the stored embedding
(exactly what was added to the index), quantised by the trained index. With `--loss rank` each
image's competitors come from the index too: the reconstructions of the nearest other vectors to its
stored embedding (`find_competitors`).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raysearch import storage
from raysearch.activate import DEFAULT_BATCH_PIXELS
from raysearch.activate.optimize import (
    ActivateConfig,
    TorchTransform,
    activate_batch,
    check_quantising,
    quantised_targets,
)
from raysearch.errors import ActivationError
from raysearch.formats.embeddings import (
    ERROR_SCHEMA,
    content_name,
    embeddings_matrix,
    list_parts,
    read_errors,
    read_part,
    read_rows_column,
    write_error_part,
    write_table,
)
from raysearch.formats.runs import RunFolder, check_error_rate
from raysearch.images import DecodeError, decode_image, resize_image
from raysearch.index.store import IndexStore
from raysearch.index.transforms import split_pretransform
from raysearch.models.embedder import Embedder
from raysearch.models.names import DEFAULT_MODEL
from raysearch.runtime import cluster_cpus, cluster_gpus, configure_data_context, ensure_ray, model_actor_resources
from raysearch.progress import Progress
from raysearch.search import Searcher
from raysearch.sources.listing import Listing
from raysearch.version import __version__

if TYPE_CHECKING:
    from raysearch.models.spec import ModelSpec

log = logging.getLogger("raysearch")

DONE_FILE = "activate.json"
KINDS = ("report", "errors")   # the parts that mark a row as done
FORMATS = ("png", "jpg")
REPORT_SCHEMA = pa.schema(
    [
        ("row", pa.int64()),
        ("image_id", pa.string()),
        ("uri", pa.string()),
        ("output", pa.string()),
        ("psnr", pa.float64()),
        ("ssim", pa.float64()),
        ("linf", pa.int32()),
        ("cos_before", pa.float64()),
        ("cos_after", pa.float64()),
        ("dist_before", pa.float64()),
        ("dist_after", pa.float64()),
        ("scale", pa.float64()),
    ]
)


# With a model that is not trained to be invariant to edits (the built-in one, any ImageNet
# network), the published cosine loss lowered recall@1 of edited copies (0.92x of the originals') and
# the rank loss with these settings raised it (1.08x) in benchmarks/activate.py (RESULTS, "Active
# indexing"); a 40 dB floor keeps every image imperceptibly changed.
RANK_RECIPE = {"loss": "rank", "lr": 0.5, "augment": 3}
DEFAULT_PSNR = 40.0


def edit_invariant(spec: ModelSpec) -> bool:
    """Whether the index's model is trained to be invariant to edits (a copy-detection descriptor):
    a TorchScript model the user brings (e.g. SSCD) or one `raysearch train --objective copy` made."""
    from raysearch.models.names import TORCHSCRIPT_PREFIX
    from raysearch.models.trained import is_trained_spec, model_dir_of, read_model_json

    if spec.name.startswith(TORCHSCRIPT_PREFIX):
        return True
    if is_trained_spec(spec):
        try:
            return read_model_json(model_dir_of(spec.name)).get("objective") == "copy"
        except ValueError:   # the directory moved: judge by nothing rather than fail the activation
            return False
    return False


def recommended_activation(spec: ModelSpec, target: str = "pq") -> ActivateConfig:
    """The activation settings raysearch uses by default for an index of `spec`: the published
    cosine loss for edit-invariant models, the rank loss (RANK_RECIPE) for others (with --target
    pq, which it needs); a PSNR floor of DEFAULT_PSNR dB in both cases."""
    if edit_invariant(spec) or target != "pq":
        return ActivateConfig(target=target, psnr=DEFAULT_PSNR)
    return ActivateConfig(target=target, psnr=DEFAULT_PSNR, **RANK_RECIPE)


@dataclass(frozen=True)
class ActivatePipelineConfig:
    """How to run an activation. `activate`: the exact optimiser settings, or None for the ones
    recommended for the index's model (`recommended_activation`) with `options` (ActivateConfig
    field -> value, the ones a user set) applied over them."""

    activate: ActivateConfig | None = None
    options: tuple[tuple[str, Any], ...] = ()
    batch_size: int = 8
    # Pixels optimised at once: a batch of large photographs is split into groups of at most this
    # many (an image over it alone). Bounds the memory an activator needs (DEFAULT_BATCH_PIXELS).
    max_batch_pixels: int = DEFAULT_BATCH_PIXELS
    concurrency: int | None = None
    format: str = "png"
    quality: int = 95
    chunk_rows: int = 64
    max_error_rate: float = 0.05
    progress: bool = True

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"--format must be one of {FORMATS}, got {self.format!r}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"--quality must be between 1 and 100, got {self.quality}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.max_batch_pixels < 1:
            raise ValueError(f"--batch-megapixels must be > 0, got {self.max_batch_pixels / 1e6:g}")
        if not 0.0 <= self.max_error_rate <= 1.0:
            raise ValueError(f"--max-error-rate must be between 0 and 1, got {self.max_error_rate}")
        known = {f.name for f in dataclasses.fields(ActivateConfig)}
        unknown = sorted(k for k, _ in self.options if k not in known)
        if unknown:
            raise ValueError(f"unknown activation options {unknown}")

    def settings(self, spec: ModelSpec) -> ActivateConfig:
        """The optimiser settings for an index of `spec` (see the class docstring)."""
        if self.activate is not None:
            return self.activate
        options = dict(self.options)
        base = recommended_activation(spec, options.get("target", "pq"))
        # A loss asked for by name comes with its own step size and views unless those are set too.
        if options.get("loss") == "cosine":
            base = dataclasses.replace(base, loss="cosine", lr=ActivateConfig.lr, augment=ActivateConfig.augment)
        elif options.get("loss") == "rank":
            base = dataclasses.replace(base, **RANK_RECIPE)
        return dataclasses.replace(base, **options)


@dataclass(frozen=True)
class ActivateSummary:
    out_dir: str
    n_images: int
    n_activated: int
    n_errors: int
    n_skipped: int
    seconds: float
    mean_psnr: float
    min_psnr: float
    mean_ssim: float
    mean_cos_before: float
    mean_cos_after: float
    settings: dict = field(default_factory=dict)   # the optimiser settings used (ActivateConfig)

    @property
    def images_per_second(self) -> float:
        done = self.n_activated + self.n_errors - self.n_skipped
        return done / self.seconds if self.seconds > 0 else 0.0


# ---------------------------------------------------------------------------------------------
# Planning: which stored embedding belongs to which image of the source
# ---------------------------------------------------------------------------------------------


def _index_ids(store: IndexStore) -> dict[str, int]:
    """image_id -> vector id, over every shard."""
    out: dict[str, int] = {}
    for i in range(len(store.shards)):
        id_map = store.load_ids(i)
        out.update(zip(id_map.image_ids.to_pylist(), id_map.ids.tolist()))
    return out


def _embedding_parts(store: IndexStore) -> list[str]:
    """The Parquet parts of every embeddings folder the index was built or grown from."""
    return [uri for folder in store.embeddings_folders() for uri in list_parts(folder)]


def _embedding_locations(store: IndexStore) -> tuple[list[str], dict[int, tuple[int, int]]]:
    """Where each vector id's stored embedding is: (part uris, id -> (part index, position))."""
    parts = _embedding_parts(store)
    where: dict[int, tuple[int, int]] = {}
    for p, uri in enumerate(parts):
        for pos, row in enumerate(read_rows_column([uri]).tolist()):
            where[row] = (p, pos)
    return parts, where


def stored_embeddings(store: IndexStore) -> tuple[np.ndarray, np.ndarray]:
    """Every vector the index was built from, as stored before quantisation: ((n, dim) float32,
    image_ids (n,) object), read from the index's embeddings folders (all of them in memory)."""
    vectors, image_ids = [], []
    for uri in _embedding_parts(store):
        tbl = read_part(uri, columns=["image_id", "embedding"])
        vectors.append(embeddings_matrix(tbl))
        image_ids.append(np.asarray(tbl.column("image_id").to_pylist(), dtype=object))
    if not vectors:
        return np.empty((0, store.dim), np.float32), np.empty(0, dtype=object)
    return np.concatenate(vectors), np.concatenate(image_ids)


def plan_activation(
    store: IndexStore, listing: Listing, done: np.ndarray, chunk_rows: int
) -> tuple[list[dict[str, Any]], pa.Table]:
    """Descriptors of the work (one per embeddings part and chunk) and the error rows of images
    that cannot be activated (not in the index, duplicate ids)."""
    ids = _index_ids(store)
    parts, where = _embedding_locations(store)
    jobs: dict[int, list[tuple[int, int, str, str]]] = {}
    err_rows, err_ids, err_uris, err_reasons = [], [], [], []
    for part in listing.parts:
        tbl = pq.read_table(part.uri)
        for row, image_id, uri, dup in zip(
            tbl.column("row").to_pylist(), tbl.column("image_id").to_pylist(),
            tbl.column("uri").to_pylist(), tbl.column("duplicate_of").to_pylist(),
        ):
            if done[row - listing.first_row]:
                continue
            vid = ids.get(image_id)
            reason = None
            if dup:
                reason = f"duplicate image_id: {dup} has the same id"
            elif vid is None:
                reason = "not in the index (no vector with this image_id)"
            elif vid not in where:
                reason = "the index's embeddings folder does not hold this image's vector"
            if reason:
                err_rows.append(row)
                err_ids.append(image_id)
                err_uris.append(uri)
                err_reasons.append(reason)
                continue
            p, pos = where[vid]
            jobs.setdefault(p, []).append((row, pos, image_id, uri))
    tasks = []
    for p in sorted(jobs):
        items = jobs[p]
        for i in range(0, len(items), chunk_rows):
            chunk = items[i : i + chunk_rows]
            tasks.append({
                "part_uri": parts[p],
                "rows": np.array([c[0] for c in chunk], dtype=np.int64).tobytes(),
                "positions": np.array([c[1] for c in chunk], dtype=np.int64).tobytes(),
                "image_ids": json.dumps([c[2] for c in chunk]),
                "uris": json.dumps([c[3] for c in chunk]),
            })
    errors = pa.table(
        {"row": pa.array(err_rows, pa.int64()), "image_id": pa.array(err_ids, pa.string()),
         "uri": pa.array(err_uris, pa.string()), "reason": pa.array(err_reasons, pa.string())},
        schema=ERROR_SCHEMA,
    )
    return tasks, errors


# ---------------------------------------------------------------------------------------------
# Competitors of the rank loss
# ---------------------------------------------------------------------------------------------

# The competitors are searched with this many times the index's tuned nprobe (capped by the number
# of inverted lists): an edited copy drifts from the original feature and probes lists around it
# that the original's own search may not reach, and the neighbours there can outrank the image too.
# The extra cost is one wider search per image, small beside the optimisation's forward/backward passes.
COMPETITOR_NPROBE_FACTOR = 4


def competitor_nprobe(store: IndexStore, trained: Any) -> int | None:
    """nprobe (efSearch for HNSW) of the competitor search; None: the index's default."""
    import faiss

    tuned = store.nprobe
    if tuned is None:
        return None
    wider = COMPETITOR_NPROBE_FACTOR * int(tuned)
    try:
        return min(wider, int(faiss.extract_index_ivf(split_pretransform(trained).quantiser).nlist))
    except RuntimeError:  # not an IVF: efSearch, no upper bound
        return wider


def find_competitors(
    searcher: Searcher, vectors: np.ndarray, image_ids: list[str], m: int, nprobe: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """The reconstructions of each image's m nearest other indexed vectors, in the index's space.

    searcher: the index's Searcher; vectors: (n, dim) the images' stored embeddings; image_ids:
    theirs (their own entries are left out). Returns (competitors (n, m, d') float32, found (n,) int:
    how many distinct ones the search returned). Rows with 0 < found < m are padded with the farthest
    one found; rows with found == 0 (an index holding only the image) are zeros.
    """
    n = len(image_ids)
    result = searcher.search_many(vectors, m + 1, nprobe=nprobe, query_expansion=False)
    found_ids, _ = searcher.lookup(result)
    recon = searcher.vectors(result.ids, result.shard)  # (n, m + 1, d')
    competitors = np.zeros((n, m, recon.shape[-1]), np.float32)
    found = np.zeros(n, np.int64)
    for i in range(n):
        keep = [j for j in range(m + 1) if result.ids[i, j] >= 0 and found_ids[i, j] != image_ids[i]][:m]
        found[i] = len(keep)
        if keep:
            keep += [keep[-1]] * (m - len(keep))  # results are nearest first: pad with the farthest
            competitors[i] = recon[i, keep]
    return competitors, found


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------


def load_inputs(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Ray Data task: stored vectors from one embeddings part, image bytes decoded at full size."""
    rows_out, ids_out, uris_out, pixels_out, vec_out, err_out = [], [], [], [], [], []
    for part_uri, rows_b, pos_b, ids_j, uris_j in zip(
        batch["part_uri"], batch["rows"], batch["positions"], batch["image_ids"], batch["uris"]
    ):
        rows = np.frombuffer(rows_b, dtype=np.int64)
        positions = np.frombuffer(pos_b, dtype=np.int64)
        image_ids, uris = json.loads(ids_j), json.loads(uris_j)
        tbl = read_part(str(part_uri), columns=["embedding"]).take(pa.array(positions))
        col = tbl.column("embedding").combine_chunks()
        vectors = col.values.to_numpy(zero_copy_only=False).reshape(len(positions), col.type.list_size)
        for i, data in enumerate(storage.read_many(uris)):
            pixels, error = np.zeros((1, 1, 3), np.uint8), ""
            if isinstance(data, Exception):
                error = storage.read_failure_reason(data)
            else:
                try:
                    pixels = decode_image(data)
                except DecodeError as e:
                    error = e.reason
            rows_out.append(rows[i])
            ids_out.append(image_ids[i])
            uris_out.append(uris[i])
            pixels_out.append(pixels)
            vec_out.append(vectors[i])
            err_out.append(error)
    pixels_arr = np.empty(len(pixels_out), dtype=object)
    pixels_arr[:] = pixels_out
    return {
        "row": np.asarray(rows_out, dtype=np.int64),
        "image_id": np.asarray(ids_out, dtype=object),
        "uri": np.asarray(uris_out, dtype=object),
        "pixels": pixels_arr,
        "vector": np.asarray(vec_out, dtype=np.float32).reshape(len(vec_out), -1),
        "error": np.asarray(err_out, dtype=object),
    }


class Activator:
    """Loads the index's model and trained quantiser once; activates batches of images."""

    def __init__(self, index_dir: str, config: dict, torch_threads: int | None = None,
                 max_pixels: int | None = DEFAULT_BATCH_PIXELS):
        import torch

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        store = IndexStore(index_dir, verify=False)
        self.spec = store.model_spec
        self.config = ActivateConfig(**config)
        self.max_pixels = max_pixels
        self.trained = store.load_trained()
        check_quantising(self.trained, self.config.target)
        self.transform = TorchTransform(split_pretransform(self.trained).transforms).to(self.device)
        self.embedder = Embedder(self.spec.to_dict(), device=self.device)
        self.model = self.embedder.model
        self.searcher: Searcher | None = None
        self.nprobe: int | None = None
        if self.config.loss == "rank":
            self.searcher = Searcher(store, query_expansion=False)
            self.nprobe = competitor_nprobe(store, self.trained)

    def activate(self, images: list[np.ndarray], vectors: np.ndarray, image_ids: list[str]) -> tuple[list, np.ndarray]:
        """(ActivatedImage per image, targets) for images whose stored embeddings are `vectors`.

        With the rank loss, an image without any competitor (the index holds nothing else) is
        activated with the cosine loss instead.
        """
        targets = quantised_targets(self.trained, vectors, self.config.target)

        def run(idx: np.ndarray, config: ActivateConfig, competitors: np.ndarray | None) -> list:
            return activate_batch(
                [images[i] for i in idx], targets[idx], self.model, self.spec.input_size, self.spec.resize,
                config, transform=self.transform, device=self.device, competitors=competitors,
                max_pixels=self.max_pixels,
            )

        everything = np.arange(len(images))
        if self.searcher is None:
            return run(everything, self.config, None), targets
        competitors, found = find_competitors(self.searcher, vectors, image_ids, self.config.competitors, self.nprobe)
        ranked, alone = everything[found > 0], everything[found == 0]
        results: list = [None] * len(images)
        if ranked.size:
            for i, r in zip(ranked, run(ranked, self.config, competitors[ranked])):
                results[i] = r
        if alone.size:
            log.warning("%d images have no other vector in the index to rank against: cosine loss for them", alone.size)
            for i, r in zip(alone, run(alone, dataclasses.replace(self.config, loss="cosine"), None)):
                results[i] = r
        return results, targets

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch
        import torch.nn.functional as F

        n = len(batch["row"])
        errors = np.asarray(batch["error"], dtype=object).copy()
        ok = [i for i in range(n) if not errors[i]]
        out_pixels = np.empty(n, dtype=object)
        out_pixels[:] = [np.zeros((1, 1, 3), np.uint8)] * n
        stats = {k: np.full(n, np.nan) for k in ("psnr", "linf", "cos_before", "cos_after", "dist_before", "dist_after", "scale")}
        if ok:
            vectors = np.asarray(batch["vector"], dtype=np.float32)[ok]
            images = [np.asarray(batch["pixels"][i], dtype=np.uint8) for i in ok]
            results, targets = self.activate(images, vectors, [str(batch["image_id"][i]) for i in ok])
            # Distances measured as the index will see the images: the stored vector before, and
            # the activated image preprocessed exactly like a build after.
            after = self.embedder.embed_pixels(np.stack([
                resize_image(r.pixels, self.spec.input_size, self.spec.resize) for r in results  # type: ignore[arg-type]
            ]))
            with torch.no_grad():
                t = F.normalize(torch.from_numpy(targets), dim=-1)
                before_f = F.normalize(self.transform(torch.from_numpy(vectors).to(self.device)).cpu(), dim=-1)
                after_f = F.normalize(self.transform(torch.from_numpy(after).to(self.device)).cpu(), dim=-1)
                cos_b = (before_f * t).sum(-1).numpy()
                cos_a = (after_f * t).sum(-1).numpy()
            for j, i in enumerate(ok):
                r = results[j]
                out_pixels[i] = r.pixels
                stats["psnr"][i] = r.psnr
                stats["linf"][i] = r.linf
                stats["scale"][i] = r.scale
                stats["cos_before"][i] = cos_b[j]
                stats["cos_after"][i] = cos_a[j]
                stats["dist_before"][i] = float(np.sqrt(max(0.0, 2 - 2 * cos_b[j])))
                stats["dist_after"][i] = float(np.sqrt(max(0.0, 2 - 2 * cos_a[j])))
        originals = np.empty(n, dtype=object)
        originals[:] = list(batch["pixels"])
        return {
            "row": batch["row"], "image_id": batch["image_id"], "uri": batch["uri"], "error": errors,
            "pixels": out_pixels, "original": originals, **stats,
        }


def output_path(out_dir: str, image_id: str, fmt: str) -> str:
    return storage.join(out_dir, "images", f"{image_id}.{fmt}")


def write_outputs(batch: dict[str, np.ndarray], out_dir: str, fmt: str, quality: int) -> dict[str, np.ndarray]:
    """Encode and write activated images, then their report rows (atomically, after the images)."""
    from PIL import Image
    from skimage.metrics import structural_similarity

    rows = np.asarray(batch["row"], dtype=np.int64)
    errors = np.asarray(batch["error"], dtype=object)
    ok = np.asarray([not e for e in errors], dtype=bool)
    report: dict[str, list] = {name: [] for name in REPORT_SCHEMA.names}
    for i in np.flatnonzero(ok):
        pixels = np.asarray(batch["pixels"][i], dtype=np.uint8)
        original = np.asarray(batch["original"][i], dtype=np.uint8)
        buf = io.BytesIO()
        if fmt == "png":
            Image.fromarray(pixels).save(buf, format="PNG", compress_level=6)
        else:
            Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
        target = output_path(out_dir, str(batch["image_id"][i]), fmt)
        storage.makedirs(target.rsplit("/", 1)[0])
        storage.atomic_write(target, buf.getvalue())
        ssim = structural_similarity(original, pixels, channel_axis=2, data_range=255) if min(pixels.shape[:2]) >= 7 else float("nan")
        report["row"].append(int(rows[i]))
        report["image_id"].append(str(batch["image_id"][i]))
        report["uri"].append(str(batch["uri"][i]))
        report["output"].append(target)
        report["ssim"].append(float(ssim))
        for name in ("psnr", "cos_before", "cos_after", "dist_before", "dist_after", "scale"):
            report[name].append(float(batch[name][i]))
        report["linf"].append(int(batch["linf"][i]))
    if ok.any():
        write_table(storage.join(out_dir, "report", content_name(rows[ok])), pa.table(report, schema=REPORT_SCHEMA))
    if (~ok).any():
        write_error_part(out_dir, rows[~ok], batch["image_id"][~ok], batch["uri"][~ok], errors[~ok])
    return {"n_ok": np.array([int(ok.sum())]), "n_errors": np.array([int((~ok).sum())])}


# ---------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------


def _run_record(store: IndexStore, source_spec: str, config: ActivatePipelineConfig, settings: ActivateConfig) -> dict:
    manifest_digest = storage.file_digest(storage.join(store.index_dir, "manifest.json"))[1]
    return {
        "index": store.index_dir,
        "index_manifest_sha256": manifest_digest,
        "source": source_spec,
        "activate": dataclasses.asdict(settings),
        "format": config.format,
        "quality": config.quality,
        "raysearch_version": __version__,
    }


def activation_run(out_dir: str) -> RunFolder:
    """The run folder of an activation (complete once activate.json is written)."""
    return RunFolder(out_dir, DONE_FILE, _same, ActivationError)


def _same(a: dict, b: dict) -> bool:
    keys = ("index_manifest_sha256", "source", "activate", "format", "quality")
    defaults = dataclasses.asdict(ActivateConfig())

    def norm(r: dict) -> str:
        # Options added after a run was recorded take their default, which is how that run behaved.
        return json.dumps({**{k: r.get(k) for k in keys}, "activate": {**defaults, **(r.get("activate") or {})}}, sort_keys=True)

    return norm(a) == norm(b)


def read_report(out_dir: str) -> pa.Table:
    """Every report row of an activation folder, sorted by row."""
    tables = [read_part(u) for u in list_parts(out_dir, "report")]
    return pa.concat_tables(tables).sort_by("row") if tables else REPORT_SCHEMA.empty_table()


def loss_advice(model_spec: ModelSpec, config: ActivateConfig) -> str | None:
    """A warning when the chosen loss is known to lower recall with the index's model, else None.

    Measured (benchmarks/RESULTS.md, "Active indexing"): with the built-in EfficientNet-Lite0 + GeM,
    which is not trained to be invariant to edits, the published cosine loss lowered recall@1 of
    edited copies (0.92x passive) while the rank loss raised it (1.08x)."""
    if config.loss != "cosine" or model_spec.name != DEFAULT_MODEL or model_spec.weights:
        return None
    return (
        f"this index uses the built-in model ({DEFAULT_MODEL}), which is not trained to be invariant "
        "to edits: with it the cosine loss lowered recall@1 of edited copies in raysearch's benchmark "
        "(0.92x of the originals') and --loss rank --lr 0.5 --augment 3 raised it (1.08x). Check with "
        "`raysearch eval activation` before publishing."
    )


def activate_source(
    index_dir: str, source_spec: str, out_dir: str, config: ActivatePipelineConfig = ActivatePipelineConfig(),
    overwrite: bool = False,
) -> ActivateSummary:
    """Activate every image of `source_spec` that the index holds; write images and a report."""
    import ray

    start = time.perf_counter()
    store = IndexStore(index_dir)
    settings = config.settings(store.model_spec)
    check_quantising(store.load_trained(), settings.target)
    advice = loss_advice(store.model_spec, settings)
    if advice:
        log.warning(advice)
    run = activation_run(out_dir)
    listing, resumed = run.start(_run_record(store, source_spec, config, settings), source_spec, overwrite=overwrite,
                                 what="an activation", progress=config.progress)
    done = run.done_mask(listing, KINDS) if resumed else np.zeros(listing.n_rows, bool)
    n_skipped = int(done.sum())
    if not (resumed and run.is_complete()):
        tasks, plan_errors = plan_activation(store, listing, done, config.chunk_rows)
        if plan_errors.num_rows:
            write_table(storage.join(out_dir, "errors", content_name(plan_errors.column("row").to_numpy())), plan_errors)
        if tasks:
            ensure_ray()
            configure_data_context(config.progress)
            res = model_actor_resources(cluster_gpus(), cluster_cpus(), config.concurrency)
            ds = ray.data.from_items(tasks, override_num_blocks=len(tasks))
            ds = ds.map_batches(load_inputs, batch_size=1, num_cpus=1, memory=1 << 30)
            ds = ds.map_batches(
                Activator,
                batch_size=config.batch_size,
                fn_constructor_kwargs={"index_dir": store.index_dir, "config": dataclasses.asdict(settings),
                                       "torch_threads": res.threads, "max_pixels": config.max_batch_pixels},
                compute=ray.data.ActorPoolStrategy(size=res.concurrency),
                num_gpus=res.num_gpus,
                num_cpus=res.num_cpus,
            )
            ds = ds.map_batches(
                write_outputs, batch_size=config.batch_size, num_cpus=0,
                fn_kwargs={"out_dir": out_dir, "fmt": config.format, "quality": config.quality},
            )
            with Progress("activating", listing.n_rows - n_skipped, "images", enabled=config.progress) as shown:
                for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                    shown.update(int(batch["n_ok"].sum() + batch["n_errors"].sum()))
    run.drop_repeated_rows(listing, KINDS)
    done = run.done_mask(listing, KINDS)
    if not done.all():
        raise ActivationError(f"{int((~done).sum())} images were not processed; rerun to resume")
    report = read_report(out_dir)
    n_errors = read_errors(out_dir).num_rows
    elapsed = time.perf_counter() - start

    def finite(col: str) -> np.ndarray:
        values = report.column(col).to_numpy() if report.num_rows else np.array([np.nan])
        return values[np.isfinite(values)]

    def mean(col: str) -> float:
        values = finite(col)
        return float(values.mean()) if values.size else float("nan")

    def smallest(col: str) -> float:
        values = finite(col)
        return float(values.min()) if values.size else float("nan")

    summary = ActivateSummary(
        out_dir=out_dir, n_images=listing.n_rows, n_activated=report.num_rows, n_errors=n_errors,
        n_skipped=n_skipped, seconds=elapsed, mean_psnr=mean("psnr"), min_psnr=smallest("psnr"), mean_ssim=mean("ssim"),
        mean_cos_before=mean("cos_before"), mean_cos_after=mean("cos_after"),
        settings=dataclasses.asdict(settings),
    )
    run.finish({**dataclasses.asdict(summary), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    check_error_rate(n_errors, listing.n_rows, config.max_error_rate, out_dir, "activated", ActivationError)
    return summary
