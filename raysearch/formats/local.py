"""The stored form of a shard's local features: one Parquet file beside the shard, one row per image.

    id           int64     the image's vector id
    height       int32     size of the image the keypoints are in (pixels)
    width        int32
    n            int32     number of keypoints
    keypoints    binary    n (x, y) pairs, float32 little-endian
    scales       binary    n float16
    angles       binary    n float16 (degrees)
    scores       binary    n float16
    descriptors  binary    n * d uint8 (quantised RootSIFT) or float16 (ALIKED)

Each array is one binary value per image, not a Parquet list: a list column stores repetition and
definition levels for every element, and decoding those for 256 images' 33,000 keypoints took
~0.25 s a row group; binary values are decoded per image, and a row group's data buffer is viewed
as a numpy array without copying. The schema's metadata (`raysearch.local_features`) records
the descriptor kind and dimension. The file is written in row groups of `row_group_size` images,
atomically (`raysearch.storage.atomic_write`): a reader sees the whole file or none.

Compression is LZ4 by default: RootSIFT bytes compress little, and of the codecs measured on 307
copy-set references at the SIFT defaults (at most 256 keypoints, ~195 on those pictures), zstd
kept 19.0 KB an image but took 30-80 ms to decode a row group of 256 images, LZ4 24.4 KB and
3 ms, none 25.0 KB and 1 ms. Dictionary encoding is off (every value is unique).

`LocalFeatureFile` reads the id column once (an int64 array sorted for `searchsorted`) and decodes
a row group only when one of its images is asked for, into flat numpy arrays plus offsets; a
`LocalFeatures` is then a set of slices of those arrays. Nothing is turned into a Python object
per keypoint or per image until asked for, and row groups stay cached (all of them unless
`max_cached_row_groups` bounds it).
"""

from __future__ import annotations

import io
import json
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raysearch import storage
from raysearch.models.local import DESCRIPTOR_KINDS, LocalFeatures

FORMAT = "raysearch-local-features/1"
METADATA_KEY = b"raysearch.local_features"
LOCAL_FEATURES_SUFFIX = ".local.parquet"
ROW_GROUP_SIZE = 256


def local_features_uri(shard_uri: str) -> str:
    """Where a shard's local features live: beside it, `<shard without extension>.local.parquet`."""
    shard_uri = str(shard_uri)
    head, sep, tail = shard_uri.rpartition("/")
    stem = tail.rsplit(".", 1)[0] if "." in tail else tail
    return f"{head}{sep}{stem}{LOCAL_FEATURES_SUFFIX}"


def local_features_schema(kind: str, dim: int) -> pa.Schema:
    """The Parquet schema for `kind` descriptors of `dim` components (see the module docstring)."""
    if kind not in DESCRIPTOR_KINDS:
        raise ValueError(f"kind must be one of {DESCRIPTOR_KINDS}, got {kind!r}")
    if dim < 1:
        raise ValueError(f"descriptor dim must be >= 1, got {dim}")
    meta = {METADATA_KEY: json.dumps({"format": FORMAT, "kind": kind, "dim": int(dim)}).encode()}
    return pa.schema([
        ("id", pa.int64()), ("height", pa.int32()), ("width", pa.int32()), ("n", pa.int32()),
        ("keypoints", pa.binary()), ("scales", pa.binary()), ("angles", pa.binary()),
        ("scores", pa.binary()), ("descriptors", pa.binary()),
    ], metadata=meta)


def _descriptor_dtype(kind: str) -> np.dtype:
    return np.dtype(np.uint8) if kind == "rootsift" else np.dtype("<f2")


def _blobs(arrays: Iterable[np.ndarray], dtype: str | np.dtype) -> pa.Array:
    return pa.array([np.ascontiguousarray(a, dtype=dtype).tobytes() for a in arrays], pa.binary())


def features_table(ids: Sequence[int], features: Sequence[LocalFeatures], kind: str, dim: int) -> pa.Table:
    """A table of the local-features schema for images `ids` (int64) and their features."""
    if len(ids) != len(features):
        raise ValueError(f"{len(ids)} ids for {len(features)} feature sets")
    for f in features:
        if f.kind != kind or f.dim != dim:
            raise ValueError(f"all features must be {kind} of dim {dim}, got {f.kind} of dim {f.dim}")
        # The float16 columns must give back exactly what was extracted (extractors round to it).
        for name in ("scales", "angles", "scores"):
            arr = getattr(f, name)
            if not np.array_equal(arr.astype(np.float16).astype(np.float32), arr, equal_nan=True):
                raise ValueError(f"{name} must be float16-exact (as extractors give them) to be stored")
    columns = [
        pa.array(np.asarray(ids, np.int64)),
        pa.array(np.array([f.image_size[0] for f in features], np.int32)),
        pa.array(np.array([f.image_size[1] for f in features], np.int32)),
        pa.array(np.array([len(f) for f in features], np.int32)),
        _blobs((f.keypoints for f in features), "<f4"),
        _blobs((f.scales for f in features), "<f2"),
        _blobs((f.angles for f in features), "<f2"),
        _blobs((f.scores for f in features), "<f2"),
        _blobs((f.descriptors for f in features), _descriptor_dtype(kind)),
    ]
    return pa.Table.from_arrays(columns, schema=local_features_schema(kind, dim))


class LocalFeatureWriter:
    """Collects images' local features and writes them as one Parquet file, atomically, on
    `close()` (or at the end of a `with` block that raised nothing).

    Row groups are encoded and compressed as they fill, so memory holds about the compressed
    file, not every image's arrays. Ids must be unique; they may come in any order.
    """

    def __init__(self, uri: str, kind: str, dim: int, row_group_size: int = ROW_GROUP_SIZE,
                 compression: str = "lz4"):
        if row_group_size < 1:
            raise ValueError(f"row_group_size must be >= 1, got {row_group_size}")
        self.uri, self.kind, self.dim = str(uri), kind, int(dim)
        self.schema = local_features_schema(kind, dim)
        self.row_group_size = int(row_group_size)
        self._buf = io.BytesIO()
        self._writer = pq.ParquetWriter(self._buf, self.schema, compression=compression, use_dictionary=False)
        self._ids: list[int] = []
        self._features: list[LocalFeatures] = []
        self._seen: set[int] = set()
        self.n_images = 0
        self._closed = False

    def add(self, image_id: int, features: LocalFeatures) -> None:
        """Queue one image's features under its vector id."""
        if self._closed:
            raise ValueError("the local-features writer is closed")
        image_id = int(image_id)
        if image_id in self._seen:
            raise ValueError(f"id {image_id} is written twice to {self.uri}")
        self._seen.add(image_id)
        self._ids.append(image_id)
        self._features.append(features)
        if len(self._ids) >= self.row_group_size:
            self._flush()

    def add_many(self, ids: Iterable[int], features: Iterable[LocalFeatures]) -> None:
        for i, f in zip(ids, features, strict=True):
            self.add(i, f)

    def _flush(self) -> None:
        if self._ids:
            self._writer.write_table(features_table(self._ids, self._features, self.kind, self.dim),
                                     row_group_size=self.row_group_size)
            self.n_images += len(self._ids)
            self._ids, self._features = [], []

    def close(self) -> int:
        """Write the file; returns its size in bytes."""
        if self._closed:
            raise ValueError("the local-features writer is closed")
        self._flush()
        self._writer.close()
        self._closed = True
        data = self._buf.getvalue()
        storage.atomic_write(self.uri, data)
        return len(data)

    def __enter__(self) -> "LocalFeatureWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and not self._closed:
            self.close()


def write_local_features(uri: str, ids: Sequence[int], features: Sequence[LocalFeatures],
                         row_group_size: int = ROW_GROUP_SIZE) -> int:
    """Write the features of images `ids` to `uri` (see the module docstring). At least one image
    is needed, for its kind and dimension. Returns the file's size in bytes."""
    if not features:
        raise ValueError(f"no local features to write to {uri}")
    writer = LocalFeatureWriter(uri, features[0].kind, features[0].dim, row_group_size)
    writer.add_many(ids, features)
    return writer.close()


@dataclass
class _Block:
    """One decoded row group: flat arrays and per-image offsets into them."""

    height: np.ndarray
    width: np.ndarray
    offsets: np.ndarray        # (rows + 1,) keypoint offsets
    keypoints: np.ndarray      # (total, 2) float32
    scales: np.ndarray         # (total,) float32
    angles: np.ndarray
    scores: np.ndarray
    descriptors: np.ndarray    # (total, dim) uint8 or float16
    nbytes: int


def _flat(column: pa.ChunkedArray, dtype: str) -> np.ndarray:
    """All values of a binary column, concatenated and viewed as `dtype` (no copy for a single
    chunk). Every value's length is a multiple of the item size, so the views line up."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if len(arr) == 0:
        return np.zeros(0, dtype)
    _, offsets_buf, data_buf = arr.buffers()
    offsets = np.frombuffer(offsets_buf, np.int32, count=len(arr) + 1, offset=4 * arr.offset)
    data = np.frombuffer(data_buf, np.uint8)[offsets[0]: offsets[-1]]
    return data.view(dtype)


class LocalFeatureFile:
    """Random access, by vector id, to a local-features file written by `LocalFeatureWriter`."""

    def __init__(self, uri: str, max_cached_row_groups: int | None = None):
        if max_cached_row_groups is not None and max_cached_row_groups < 1:
            raise ValueError(f"max_cached_row_groups must be >= 1 or None, got {max_cached_row_groups}")
        self.uri = str(uri)
        fs, path = storage.get_fs(self.uri)
        try:
            # Local files are memory-mapped; others are read through the fsspec handle on demand.
            self._pf = pq.ParquetFile(path if storage.is_local(self.uri) else fs.open(path, "rb"), memory_map=True)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"no local-features file at {self.uri}") from e
        meta = (self._pf.schema_arrow.metadata or {}).get(METADATA_KEY)
        if meta is None:
            raise ValueError(f"{self.uri} is not a raysearch local-features file (no {METADATA_KEY.decode()} metadata)")
        info = json.loads(meta)
        if info.get("format") != FORMAT:
            raise ValueError(f"{self.uri}: unsupported local-features format {info.get('format')!r}, expected {FORMAT}")
        self.kind, self.dim = str(info["kind"]), int(info["dim"])
        self._desc_dtype = _descriptor_dtype(self.kind)
        ids = self._pf.read(columns=["id"]).column("id").to_numpy()
        self._order = np.argsort(ids, kind="stable")
        self.ids = ids[self._order]            # sorted, for searchsorted
        sizes = [self._pf.metadata.row_group(i).num_rows for i in range(self._pf.num_row_groups)]
        self._group_starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._cache: OrderedDict[int, _Block] = OrderedDict()
        self._max_cached = max_cached_row_groups

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, image_id: int) -> bool:
        return self._row(int(image_id)) is not None

    def _row(self, image_id: int) -> int | None:
        i = int(np.searchsorted(self.ids, image_id))
        if i < len(self.ids) and self.ids[i] == image_id:
            return int(self._order[i])
        return None

    def _block(self, group: int) -> _Block:
        block = self._cache.get(group)
        if block is not None:
            self._cache.move_to_end(group)
            return block
        tbl = self._pf.read_row_group(group, columns=["height", "width", "n", "keypoints", "scales", "angles",
                                                      "scores", "descriptors"])
        n = tbl.column("n").to_numpy().astype(np.int64)
        offsets = np.zeros(len(n) + 1, np.int64)
        np.cumsum(n, out=offsets[1:])
        kp = _flat(tbl.column("keypoints"), "<f4").reshape(-1, 2)
        sc, an, so = (_flat(tbl.column(c), "<f2").astype(np.float32) for c in ("scales", "angles", "scores"))
        de = _flat(tbl.column("descriptors"), self._desc_dtype).reshape(-1, self.dim)
        if not (len(kp) == len(sc) == len(an) == len(so) == len(de) == offsets[-1]):
            raise ValueError(f"{self.uri}: row group {group} is inconsistent (keypoint counts and arrays differ)")
        block = _Block(
            height=tbl.column("height").to_numpy(), width=tbl.column("width").to_numpy(),
            offsets=offsets, keypoints=kp, scales=sc, angles=an, scores=so,
            descriptors=de,
            nbytes=kp.nbytes + 3 * sc.nbytes + de.nbytes,
        )
        for arr in (block.height, block.width, block.offsets, block.keypoints, block.scales, block.angles,
                    block.scores, block.descriptors):
            arr.flags.writeable = False     # views handed out share these buffers
        self._cache[group] = block
        if self._max_cached is not None and len(self._cache) > self._max_cached:
            self._cache.popitem(last=False)
        return block

    def get(self, image_id: int) -> LocalFeatures:
        """The features of image `image_id`; KeyError if the file does not hold it. The arrays are
        read-only views into the decoded row group."""
        row = self._row(int(image_id))
        if row is None:
            raise KeyError(f"id {image_id} has no local features in {self.uri}")
        group = int(np.searchsorted(self._group_starts, row, side="right")) - 1
        b = self._block(group)
        r = row - int(self._group_starts[group])
        lo, hi = int(b.offsets[r]), int(b.offsets[r + 1])
        return LocalFeatures(b.keypoints[lo:hi], b.scales[lo:hi], b.angles[lo:hi], b.scores[lo:hi],
                             b.descriptors[lo:hi], (int(b.height[r]), int(b.width[r])), self.kind)

    def get_many(self, ids: Iterable[int]) -> list[LocalFeatures | None]:
        """Features per id, None where the file does not hold one (e.g. an image added later)."""
        out: list[LocalFeatures | None] = []
        for image_id in ids:
            try:
                out.append(self.get(int(image_id)))
            except KeyError:
                out.append(None)
        return out

    @property
    def cached_bytes(self) -> int:
        """Bytes of decoded arrays held in the row-group cache."""
        return sum(b.nbytes for b in self._cache.values())


# ---------------------------------------------------------------------------------------------
# Build time: one local-features part per embeddings part, gathered into one file per shard
# ---------------------------------------------------------------------------------------------

# Beside an embeddings folder's vectors parts (`parts/`): the same rows' local features, one part
# each, named like the vectors part of the same rows (`formats.embeddings.content_name`).
LOCAL_PARTS = "local-features"


# How a batch of the embedding pipeline carries its images' features from the decode tasks to the
# writer: one column per stored column, prefixed (binary values as Python bytes).
BATCH_PREFIX = "lf_"
STORED_COLUMNS = ("height", "width", "n", "keypoints", "scales", "angles", "scores", "descriptors")


def batch_columns(features: Sequence[LocalFeatures | None], kind: str, dim: int) -> dict[str, np.ndarray]:
    """Features of a batch's rows (None: the row failed) as `BATCH_PREFIX` columns, each (n,)."""
    from raysearch.models.local import empty_features

    filled = [f if f is not None else empty_features((1, 1), kind, dim) for f in features]   # never written
    table = features_table(np.zeros(len(filled), np.int64), filled, kind, dim)
    out = {}
    for name in STORED_COLUMNS:
        column = table.column(name)
        out[BATCH_PREFIX + name] = (column.to_numpy() if name in ("height", "width", "n")
                                    else np.asarray(column.to_pylist(), dtype=object))
    return out


def write_local_part(uri: str, rows: np.ndarray, columns: dict[str, np.ndarray], kind: str, dim: int) -> int:
    """Write listing rows `rows`' features (`batch_columns` of them, already selected) as one part.
    An embeddings run writes it before the vectors part of the same rows, so a part counted as
    done has its features. Returns its size in bytes."""
    schema = local_features_schema(kind, dim)
    arrays = [pa.array(np.asarray(rows, np.int64))] + [
        pa.array(columns[BATCH_PREFIX + name], schema.field(name).type) for name in STORED_COLUMNS
    ]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_arrays(arrays, schema=schema), buf, compression="lz4", use_dictionary=False,
                   row_group_size=ROW_GROUP_SIZE)
    storage.atomic_write(uri, buf.getvalue())
    return buf.tell()


def gather_local_features(part_uris: Sequence[str], ids: np.ndarray, out_uri: str, kind: str, dim: int,
                          row_group_size: int = ROW_GROUP_SIZE) -> int:
    """Write the features of vector ids `ids` (a shard's), found in the local-features parts
    `part_uris`, as one file at `out_uri`. Streams part by part through a local file (a shard's
    features need not fit in memory); the file appears whole or not at all. Returns the number of
    images written (ids without features in any part are left out: verification then reads their
    image)."""
    wanted = np.unique(np.asarray(ids, np.int64))
    schema = local_features_schema(kind, dim)
    n = 0
    with storage.atomic_local_file(out_uri) as tmp:
        with pq.ParquetWriter(tmp, schema, compression="lz4", use_dictionary=False) as writer:
            for uri in part_uris:
                fs, path = storage.get_fs(uri)
                with fs.open(path, "rb") as f:
                    pf = pq.ParquetFile(f)
                    part_ids = pf.read(columns=["id"]).column("id").to_numpy()
                    mask = np.isin(part_ids, wanted)
                    if not mask.any():
                        continue
                    tbl = pf.read().filter(pa.array(mask))
                writer.write_table(tbl.cast(schema), row_group_size=row_group_size)
                n += tbl.num_rows
    return n
