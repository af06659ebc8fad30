"""The index directory on disk (local or any fsspec URI) and loading it back.

    INDEX_DIR/
      manifest.json              written last, atomically: an index without it is incomplete
      trained.index              the trained, empty index (quantiser); `add` and `activate` use it
      shards/shard-00000.index   FAISS index holding a subset of the vectors, ids = listing rows
      shards/shard-00000.ids.parquet   id -> image_id, uri for that shard, sorted by id
      errors.parquet             images that could not be used: row, image_id, uri, reason
      embeddings/                the embedding run (listing, Parquet parts); see raysearch.embed
      tombstones-<key>.npy       vector ids removed but still in the shards (raysearch.index.tombstones)

Every file the index needs is listed in the manifest with its size and SHA-256, and loading checks
them, so a truncated, swapped or foreign file is refused by name instead of answering wrongly.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raysearch import storage
from raysearch.version import __version__
from raysearch.errors import IndexFormatError
from raysearch.models.spec import ModelSpec

MANIFEST = "manifest.json"
FORMAT = "raysearch-index/1"
TRAINED_INDEX = "trained.index"
SHARDS_DIR = "shards"
ERRORS_FILE = "errors.parquet"
IDMAP_SCHEMA = pa.schema([("id", pa.int64()), ("image_id", pa.string()), ("uri", pa.string())])


def shard_name(i: int) -> str:
    return f"{SHARDS_DIR}/shard-{i:05d}.index"


def shard_ids_name(i: int) -> str:
    return f"{SHARDS_DIR}/shard-{i:05d}.ids.parquet"


def describe_files(index_dir: str, names: list[str]) -> dict[str, dict[str, Any]]:
    """{relative name: {size, sha256}} for the manifest."""
    out = {}
    for name in names:
        n, digest = storage.file_digest(storage.join(index_dir, name))
        out[name] = {"size": n, "sha256": digest}
    return out


def write_manifest(index_dir: str, manifest: dict[str, Any]) -> None:
    """Write the manifest last and atomically: until then the directory is not an index."""
    manifest = {"format": FORMAT, "raysearch_version": __version__, **manifest}
    storage.atomic_write_json(storage.join(index_dir, MANIFEST), manifest)


def read_manifest(index_dir: str) -> dict[str, Any]:
    uri = storage.join(index_dir, MANIFEST)
    if not storage.exists(index_dir):
        raise FileNotFoundError(f"index directory not found: {index_dir}")
    if not storage.exists(uri):
        raise IndexFormatError(
            f"{index_dir} is not a complete raysearch index: {MANIFEST} is missing "
            "(the build may have been interrupted; rerun it)"
        )
    try:
        manifest = storage.read_json(uri)
    except ValueError as e:
        raise IndexFormatError(f"{uri} is not valid JSON: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise IndexFormatError(f"{uri} is not a raysearch index manifest (format {manifest.get('format')!r})")
    return manifest


def verify_file(index_dir: str, name: str, expected: dict[str, Any], checksum: bool = True) -> None:
    """Raise IndexFormatError naming the file if its size or checksum differ from the manifest."""
    uri = storage.join(index_dir, name)
    if not storage.exists(uri):
        raise IndexFormatError(f"index file missing: {uri}")
    actual_size = storage.size(uri)
    if actual_size != expected["size"]:
        raise IndexFormatError(
            f"index file {uri} has {actual_size} bytes, the manifest says {expected['size']} "
            "(truncated or replaced)"
        )
    if checksum:
        _, digest = storage.file_digest(uri)
        if digest != expected["sha256"]:
            raise IndexFormatError(f"index file {uri} does not match its checksum in the manifest (corrupt or replaced)")


def _cache_dir(index_dir: str) -> str:
    base = os.environ.get("RAYSEARCH_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "raysearch"))
    key = hashlib.sha256(index_dir.encode()).hexdigest()[:16]
    return os.path.join(base, key)


def local_file(index_dir: str, name: str, expected: dict[str, Any] | None = None) -> str:
    """A local path for an index file: the file itself on local disk; for remote indexes a copy
    in the cache (reused while its size and checksum still match)."""
    uri = storage.join(index_dir, name)
    if storage.is_local(uri):
        return storage.get_fs(uri)[1]
    target = os.path.join(_cache_dir(index_dir), name)
    if expected and os.path.exists(target) and os.path.getsize(target) == expected["size"]:
        _, digest = storage.file_digest(target)
        if digest == expected["sha256"]:
            return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    fs, path = storage.get_fs(uri)
    with tempfile.NamedTemporaryFile(dir=os.path.dirname(target), delete=False) as tmp:
        fs.get_file(path, tmp.name)
    os.replace(tmp.name, target)
    return target


# An index whose shards take more than this share of the memory still available is memory-mapped
# for search; smaller ones are read into memory, where FAISS scans inverted lists faster.
MMAP_FRACTION = 0.25


def wants_mmap(shard_bytes: int) -> bool:
    """Whether shards of `shard_bytes` in all should be memory-mapped rather than read in."""
    from raysearch.runtime import available_memory

    return shard_bytes > MMAP_FRACTION * available_memory()


def read_index_file(path: str, mmap: bool) -> faiss.Index:
    """Read a FAISS index. With mmap, inverted lists and codes stay on disk and pages load on
    demand, so a shard larger than RAM still serves (FAISS supports this for IVF and Flat codes)."""
    flags = (faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY) if mmap else 0
    try:
        return faiss.read_index(path, flags)
    except RuntimeError as e:
        if mmap:
            # Some index types (e.g. HNSW graphs) cannot be memory-mapped; read them whole.
            try:
                return faiss.read_index(path)
            except RuntimeError:
                pass
        raise IndexFormatError(f"{path} is not a readable FAISS index: {str(e).splitlines()[0]}") from e


@dataclass
class ShardInfo:
    name: str
    ids_name: str
    ntotal: int


class IndexStore:
    """An opened index directory: manifest, model spec and shard descriptions.

    Heavy objects (FAISS shards, id maps) are loaded on request, so one process can own one shard.
    """

    def __init__(self, index_dir: str, verify: bool = True):
        self.index_dir = index_dir.rstrip("/") if "://" in index_dir else os.path.abspath(index_dir)
        self.manifest = read_manifest(self.index_dir)
        self.verify = verify
        self.model_spec = ModelSpec.from_dict(self.manifest["model"])
        self.shards = [ShardInfo(s["name"], s["ids_name"], int(s["ntotal"])) for s in self.manifest["shards"]]
        files = self.manifest.get("files", {})
        for shard in self.shards:
            for name in (shard.name, shard.ids_name):
                if name not in files:
                    raise IndexFormatError(f"manifest of {self.index_dir} lists no checksum for {name}")
        self._files = files
        self._mmap: bool | None = None  # prefers_mmap(), once decided

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def metric(self) -> str:
        return str(self.manifest["metric"])

    @property
    def ntotal(self) -> int:
        return sum(s.ntotal for s in self.shards)

    @property
    def nprobe(self) -> int | None:
        value = self.manifest.get("search", {}).get("nprobe")
        return int(value) if value is not None else None

    def _checked_local(self, name: str) -> str:
        """A local path for an index file after checking it against the manifest: its size
        always (cheap, catches truncation), its checksum too unless verify=False."""
        if name not in self._files:
            raise IndexFormatError(f"manifest of {self.index_dir} lists no checksum for {name}")
        expected = self._files[name]
        verify_file(self.index_dir, name, expected, checksum=self.verify)
        return local_file(self.index_dir, name, expected)

    def local_path(self, name: str) -> str:
        """A local path for the index file `name` (a remote index's file is copied to the cache),
        checked against the manifest like every file the index loads."""
        return self._checked_local(name)

    def verify_files(self) -> None:
        """Check every file the manifest lists (size and checksum); IndexFormatError names the
        first one that does not match."""
        for name, expected in self._files.items():
            verify_file(self.index_dir, name, expected, checksum=True)

    def shard_bytes(self) -> int:
        """Total size of the shard files, from the manifest."""
        return sum(int(self._files.get(s.name, {}).get("size", 0)) for s in self.shards)

    def prefers_mmap(self) -> bool:
        """Memory-map the shards when all of them together would take more than MMAP_FRACTION of
        the memory available (so a shard bigger than RAM still serves); else read them in.
        Decided once per store, so every shard it loads is opened the same way."""
        if self._mmap is None:
            self._mmap = wants_mmap(self.shard_bytes())
        return self._mmap

    def load_shard(self, i: int, mmap: bool | None = None) -> faiss.Index:
        """Shard i, checked against the manifest. mmap None: `prefers_mmap()`."""
        shard = self.shards[i]
        index = read_index_file(self._checked_local(shard.name), mmap=self.prefers_mmap() if mmap is None else mmap)
        if index.d != self.dim:
            raise IndexFormatError(f"shard {shard.name} has dimension {index.d}, the manifest says {self.dim}")
        if index.ntotal != shard.ntotal:
            raise IndexFormatError(
                f"shard {shard.name} holds {index.ntotal} vectors, the manifest says {shard.ntotal}"
            )
        return index

    def load_ids(self, i: int) -> "IdMap":
        shard = self.shards[i]
        path = self._checked_local(shard.ids_name)
        tbl = pq.read_table(path)
        if tbl.num_rows != shard.ntotal:
            raise IndexFormatError(f"{shard.ids_name} maps {tbl.num_rows} ids, shard holds {shard.ntotal}")
        # Decided for the whole index, so that a process holding every shard stays within bounds.
        return IdMap(tbl, objects=sum(s.ntotal for s in self.shards) <= OBJECT_MAP_MAX_ROWS)

    def embeddings_folders(self) -> list[str]:
        """Every embeddings folder the index was built or grown from (the build's, then one per
        `raysearch add`), as URIs: relative entries of the manifest are relative to the index."""
        return [
            folder if ("://" in folder or os.path.isabs(folder)) else storage.join(self.index_dir, folder)
            for folder in self.manifest.get("embeddings", [])
        ]

    def removed_ids(self) -> np.ndarray:
        """The vector ids removed from the index but still held by its shards (its tombstones):
        sorted, unique (n,) int64; empty when nothing awaits compaction. The file is checked
        against the manifest like every other, so a half-written one is refused by name."""
        entry = self.manifest.get("tombstones")
        if not entry:
            return np.empty(0, np.int64)
        path = self._checked_local(entry["name"])
        try:
            ids = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise IndexFormatError(f"{entry['name']} of {self.index_dir} is not a tombstone list: {e}") from e
        if ids.ndim != 1 or ids.dtype != np.int64 or ids.size != int(entry.get("n", ids.size)):
            raise IndexFormatError(
                f"{entry['name']} of {self.index_dir} holds {ids.dtype} {ids.shape}, "
                f"expected {entry.get('n')} int64 vector ids"
            )
        return ids

    def load_fields(self) -> pa.Table | None:
        """The images' metadata (raysearch.index.fields): id (vector id) and one column per field,
        checked against the manifest; None for an index without any."""
        entry = self.manifest.get("fields")
        if not entry:
            return None
        return pq.read_table(self._checked_local(entry["name"]))

    def load_trained(self) -> faiss.Index:
        name = self.manifest.get("trained_index", TRAINED_INDEX)
        return read_index_file(self._checked_local(name), mmap=False)

    def errors(self) -> pa.Table:
        """Every image that could not be indexed (row, image_id, uri, reason), the build's and
        those of later `raysearch add` runs."""
        tables = []
        for name in self.manifest.get("errors_files", [ERRORS_FILE]):
            uri = storage.join(self.index_dir, name)
            if not storage.exists(uri):
                continue
            fs, path = storage.get_fs(uri)
            with fs.open(path, "rb") as f:
                tables.append(pq.read_table(f))
        if not tables:
            return pa.table({"row": pa.array([], pa.int64())})
        return pa.concat_tables(tables, promote_options="default")


def _one_chunk(col: pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """The column as one contiguous array when its offsets allow: `take` on the chunks a Parquet
    read gives is tens of times slower (benchmarks/id_lookup.py), and every query's hits are
    looked up this way."""
    try:
        return col.combine_chunks()
    except (pa.ArrowInvalid, pa.ArrowCapacityError):  # over 2 GiB of strings: keep the chunks
        return col


# The id maps of an index of up to this many vectors also keep their strings as Python objects
# (about 150-200 bytes a row, so at most ~80 MB for the whole index in one process): looking up a
# query's hits is then numpy indexing instead of two Arrow `take` calls and their conversion
# (benchmarks/id_lookup.py). The maps of bigger indexes stay in Arrow.
OBJECT_MAP_MAX_ROWS = 500_000


class IdMap:
    """Vector id -> (image_id, uri) for one shard; ids are sorted, lookups by binary search."""

    def __init__(self, tbl: pa.Table, objects: bool | None = None):
        """objects: also hold the strings as numpy object arrays (faster lookups, more memory);
        None: when the map has at most OBJECT_MAP_MAX_ROWS rows."""
        self.ids = tbl.column("id").to_numpy()
        if self.ids.size > 1 and not np.all(self.ids[1:] > self.ids[:-1]):
            order = np.argsort(self.ids, kind="stable")
            tbl = tbl.take(pa.array(order))
            self.ids = tbl.column("id").to_numpy()
        self.image_ids = _one_chunk(tbl.column("image_id"))
        self.uris = _one_chunk(tbl.column("uri"))
        small = self.ids.size <= OBJECT_MAP_MAX_ROWS if objects is None else objects
        self._objects: tuple[np.ndarray, np.ndarray] | None = (
            (np.asarray(self.image_ids.to_pylist(), dtype=object), np.asarray(self.uris.to_pylist(), dtype=object))
            if small else None
        )

    def strings(self, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(image_ids, uris) object arrays at map positions `pos` (every one valid)."""
        if self._objects is not None:
            return self._objects[0][pos], self._objects[1][pos]
        return (np.asarray(self.image_ids.take(pos).to_pylist(), dtype=object),
                np.asarray(self.uris.take(pos).to_pylist(), dtype=object))

    def lookup(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Vector ids (any shape) -> (image_ids, uris), object arrays shaped like `ids`; None for an
        id this shard does not hold (or -1)."""
        ids = np.asarray(ids, dtype=np.int64)
        image_ids = np.full(ids.shape, None, dtype=object)
        uris = np.full(ids.shape, None, dtype=object)
        pos = self.positions(ids.ravel())
        found = pos >= 0
        if found.any():
            image_ids.ravel()[found], uris.ravel()[found] = self.strings(pos[found])
        return image_ids, uris

    def positions(self, ids: np.ndarray) -> np.ndarray:
        """Positions of `ids` in the map; -1 for ids it does not hold."""
        ids = np.asarray(ids, dtype=np.int64)
        pos = np.searchsorted(self.ids, ids)
        pos = np.clip(pos, 0, max(0, self.ids.size - 1))
        found = (self.ids.size > 0) & (self.ids[pos] == ids) if self.ids.size else np.zeros(ids.shape, bool)
        return np.where(found, pos, -1)
