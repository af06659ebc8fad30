"""Training data: the SOURCE listing (with labels when the objective has them) as a Ray Data dataset
whose rows are decoded, shrunk images.

The listing is read on the driver from `raysearch.sources.open_source(spec).iter_batches()`,
shuffled once with the seed, and cut into blocks; decoding runs as Ray Data tasks. A file that
cannot be read or decoded stays in the dataset as a row with an `error` (and a 1x1 placeholder
image): every worker then still gets the same number of rows, hence of steps (DDP needs that), and
the training loop skips and counts the row.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from PIL import Image

from raysearch import storage
from raysearch.images import DecodeError, decode_image
from raysearch.sources import open_source

LABEL_HEADER = ("image_id", "label")


def read_labels(uri: str) -> dict[str, str]:
    """image_id -> label from a CSV `image_id,label` (a header row of those names is optional)."""
    try:
        text = storage.read_bytes(uri).decode("utf-8-sig")
    except FileNotFoundError as e:
        raise FileNotFoundError(f"--labels: no such file {uri}") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"--labels {uri} is not UTF-8 text: {e}") from e
    labels: dict[str, str] = {}
    for line_no, fields in enumerate(csv.reader(io.StringIO(text)), start=1):
        fields = [f.strip() for f in fields]
        if not fields or all(not f for f in fields):
            continue
        if not labels and tuple(f.lower() for f in fields[:2]) == LABEL_HEADER:
            continue
        if len(fields) != 2 or not fields[0] or not fields[1]:
            raise ValueError(f"--labels {uri}, line {line_no}: expected image_id,label, got {fields}")
        if fields[0] in labels and labels[fields[0]] != fields[1]:
            raise ValueError(f"--labels {uri}, line {line_no}: image {fields[0]!r} has two labels")
        labels[fields[0]] = fields[1]
    if not labels:
        raise ValueError(f"--labels {uri} lists no image")
    return labels


@dataclass(frozen=True)
class Listing:
    """The images a run trains on. table: image_id (string), uri (string), label (int64: the
    label's index in `label_names`, or the row's own index when the objective has no labels)."""

    table: pa.Table
    source: str
    n_listed: int
    n_unlabelled: int
    label_names: tuple[str, ...]


def read_listing(source: str, labels_uri: str | None, seed: int) -> Listing:
    """List SOURCE (and join the labels); rows in a seeded random order."""
    src = open_source(source)
    ids: list[str] = []
    uris: list[str] = []
    for batch in src.iter_batches():
        ids.extend(batch.column("image_id").to_pylist())
        uris.extend(batch.column("uri").to_pylist())
    n_listed = len(ids)
    n_unlabelled = 0
    label_names: tuple[str, ...] = ()
    if labels_uri:
        labels = read_labels(labels_uri)
        keep = [i for i, image_id in enumerate(ids) if image_id in labels]
        n_unlabelled = n_listed - len(keep)
        ids = [ids[i] for i in keep]
        uris = [uris[i] for i in keep]
        label_names = tuple(sorted({labels[i] for i in ids}))
        code = {name: k for k, name in enumerate(label_names)}
        label = np.asarray([code[labels[i]] for i in ids], dtype=np.int64)
    else:
        label = np.arange(len(ids), dtype=np.int64)
    if len(ids) < 2:
        what = f" with a label in {labels_uri}" if labels_uri else ""
        raise ValueError(f"SOURCE {source!r} has {len(ids)} image(s){what}; training needs at least 2")
    order = np.random.default_rng(seed).permutation(len(ids))
    table = pa.table({
        "image_id": pa.array([ids[i] for i in order], pa.string()),
        "uri": pa.array([uris[i] for i in order], pa.string()),
        "label": pa.array(label[order], pa.int64()),
    })
    return Listing(table, source, n_listed, n_unlabelled, label_names)


def shrink(arr: np.ndarray, load_size: int) -> np.ndarray:
    """Scale an (H, W, 3) image down so that its shorter side is at most `load_size`."""
    h, w = arr.shape[:2]
    scale = load_size / min(h, w)
    if scale >= 1.0:
        return arr
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(arr).resize(size, Image.BILINEAR, reducing_gap=2.0), dtype=np.uint8)


def decode_batch(batch: dict[str, np.ndarray], load_size: int) -> dict[str, np.ndarray]:
    """Ray Data map_batches function: adds `pixels` ((h, w, 3) uint8 per row, shorter side at most
    `load_size`) and `error` ('' or why the image cannot be used) and drops `uri`."""
    pixels: list[np.ndarray] = []
    errors: list[str] = []
    for uri in batch["uri"]:
        try:
            arr = shrink(decode_image(storage.read_bytes(str(uri)), draft_size=load_size), load_size)
            errors.append("")
        except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
            arr, reason = np.zeros((1, 1, 3), np.uint8), str(e) or type(e).__name__
            errors.append(reason)
        except DecodeError as e:
            arr = np.zeros((1, 1, 3), np.uint8)
            errors.append(e.reason)
        pixels.append(arr)
    column = np.empty(len(pixels), dtype=object)
    column[:] = pixels  # ragged: one (h, w, 3) array per row
    return {
        "image_id": np.asarray(batch["image_id"], dtype=object),
        "label": np.asarray(batch["label"], dtype=np.int64),
        "pixels": column,
        "error": np.asarray(errors, dtype=object),
    }


def block_rows_for(n_rows: int, workers: int, max_rows: int = 64) -> int:
    """Rows per listing block: at most `max_rows`, and small enough for 8 blocks per worker, so that
    decoding runs as parallel tasks and each epoch deals workers a different mix of blocks."""
    return max(1, min(max_rows, n_rows // (8 * workers)))


def training_dataset(listing: Listing, load_size: int, workers: int):
    """The Ray Data dataset of decoded images that `TorchTrainer(datasets={"train": ...})` shards.

    Blocks are put in a new random order on each execution (each epoch): without it every worker
    would read the same blocks every epoch, and its in-batch negatives would always come from the
    same part of the data. That order is not seeded (Ray Data shuffles it per execution); the
    views of an image are (see views.view_seed)."""
    return _decoded(listing.table, block_rows_for(listing.table.num_rows, workers), load_size, shuffle_blocks=True)


def sample_dataset(listing: Listing, load_size: int, n_images: int):
    """The first `n_images` rows of the (seeded, shuffled) listing, decoded like the training
    dataset but in a fixed order: what a whitened projection is fitted on."""
    table = listing.table.slice(0, n_images)
    return _decoded(table, block_rows_for(table.num_rows, 1), load_size, shuffle_blocks=False)


def _decoded(table: pa.Table, rows_per_block: int, load_size: int, shuffle_blocks: bool):
    """Listing rows cut into blocks of `rows_per_block`, decoded by Ray Data tasks (`decode_batch`)."""
    import ray.data

    blocks = [table.slice(start, rows_per_block) for start in range(0, table.num_rows, rows_per_block)]
    ds = ray.data.from_arrow(blocks)
    if shuffle_blocks:
        ds = ds.randomize_block_order()
    return ds.map_batches(decode_batch, fn_kwargs={"load_size": load_size}, batch_size=16, batch_format="numpy")


def rows_per_worker(n_rows: int, workers: int) -> int:
    """Rows each of `workers` shards gets: Ray Train splits datasets with equal=True, dropping the
    remainder."""
    return n_rows // workers
