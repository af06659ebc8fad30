"""Removing images from an index: tombstones honoured by every search, and compaction.

    INDEX_DIR/tombstones-<key>.npy   sorted, unique int64 vector ids removed but still in the shards

`remove_images` records the vector ids of image_ids in a tombstone list; the file is written under
a new name, its size and SHA-256 go into the manifest, and the manifest is rewritten last and
atomically (the previous list is deleted only afterwards), as `raysearch add` does. Searches pass
the list to FAISS as an ID selector (`IDSelectorNot` over an `IDSelectorBatch`, in the search
parameters), so the removed vectors are skipped while the lists are scanned and a search still
returns k results when k live vectors exist. `compact_index` then drops the vectors from the shards
(`remove_ids`), writes the shards and id maps under new names and clears the list.

The same selectors carry metadata filters (`VectorFilter.allowed`): a bitmap of the ids a filtered
search may return.
"""

from __future__ import annotations

import io
import math
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raysearch import storage
from raysearch.index.fanout import ShardGroup, set_search_params
from raysearch.index.shards import write_index
from raysearch.index.store import IndexStore, describe_files, shard_ids_name, shard_name, write_manifest
from raysearch.index.transforms import ensure_ids, split_pretransform

TOMBSTONES_PREFIX = "tombstones-"


# ---------------------------------------------------------------------------------------------
# Which ids a search may return, as FAISS selectors
# ---------------------------------------------------------------------------------------------


class VectorFilter:
    """The vector ids a search may return: every id except `removed` (sorted int64), and, when
    `allowed` (sorted int64) is given, only those. Holds the FAISS selector built from them (and
    the arrays the selector points into, which must outlive it)."""

    def __init__(self, removed: np.ndarray | None = None, allowed: np.ndarray | None = None):
        self.removed = np.unique(np.asarray(removed if removed is not None else [], np.int64))
        self.allowed = None if allowed is None else np.setdiff1d(np.asarray(allowed, np.int64), self.removed)
        self._keep: list[Any] = []
        self._selector: faiss.IDSelector | None = None
        if self.allowed is not None:
            # A bitmap answers "is this id allowed" with one lookup; ids are listing rows, so it
            # takes next_row / 8 bytes (125 kB per million images).
            size = int(self.allowed[-1]) + 1 if self.allowed.size else 1
            bits = np.zeros(size, bool)
            bits[self.allowed] = True
            bitmap = np.packbits(bits, bitorder="little")
            self._keep.append(bitmap)
            self._selector = faiss.IDSelectorBitmap(bitmap.size, faiss.swig_ptr(bitmap))
        elif self.removed.size:
            # A hash set of the removed ids, negated: any id it does not hold passes.
            batch = faiss.IDSelectorBatch(self.removed.size, faiss.swig_ptr(self.removed))
            self._keep.append(batch)
            self._selector = faiss.IDSelectorNot(batch)

    @property
    def active(self) -> bool:
        """False when the filter lets every id through (no tombstones, no `where`)."""
        return self._selector is not None

    @property
    def selector(self) -> faiss.IDSelector | None:
        return self._selector

    def widening(self, ntotal: int) -> float:
        """How much more of an IVF index a search under this filter scans: 1 / the share of the
        `ntotal` vectors it allows. An IVF search scans nprobe lists and keeps what the filter
        lets through; scanning nprobe / share lists keeps the number of allowed candidates what
        an unfiltered search sees, so recall stays that of the unfiltered search instead of
        falling with the share (and a filter of few ids scans every list: exact for IVF-Flat).
        Tombstones alone remove a small share and widen nothing."""
        if self.allowed is None or ntotal <= 0:
            return 1.0
        return ntotal / max(1, min(int(self.allowed.size), ntotal))

    def accepts(self, ids: np.ndarray) -> np.ndarray:
        """Which of `ids` (any shape, int64; -1 = none) the filter lets through, as bool."""
        ids = np.asarray(ids, np.int64)
        ok = ids >= 0
        if self.allowed is not None:
            ok &= np.isin(ids, self.allowed)
        elif self.removed.size:
            ok &= ~np.isin(ids, self.removed)
        return ok


def search_parameters(index: faiss.Index, nprobe: int | None, selector: faiss.IDSelector | None,
                      widen: float = 1.0) -> faiss.SearchParameters:
    """Per-call search parameters for `index` carrying `selector`, with the nprobe (IVF) or
    efSearch (HNSW) that `set_search_params` would set (the index's own when nprobe is None);
    `widen` multiplies an IVF nprobe (up to nlist), see `VectorFilter.widening`.

    Per-call parameters replace the index's own settings, so they must carry nprobe / efSearch
    too. Wrappers pass them on: IndexPreTransform hands them to its inner index, IndexIDMap
    translates the selector to its inner positions."""
    ix = faiss.downcast_index(index)
    while isinstance(ix, (faiss.IndexPreTransform, faiss.IndexIDMap, faiss.IndexIDMap2)):
        ix = faiss.downcast_index(ix.index)
    try:
        ivf = faiss.extract_index_ivf(ix)
    except RuntimeError:
        ivf = None
    if ivf is not None:
        params = faiss.SearchParametersIVF()
        params.nprobe = min(int(math.ceil(int(nprobe or ivf.nprobe) * widen)), int(ivf.nlist))
    elif isinstance(ix, faiss.IndexHNSW):
        params = faiss.SearchParametersHNSW()
        params.efSearch = int(nprobe or ix.hnsw.efSearch)
    else:
        params = faiss.SearchParameters()
    if selector is not None:
        params.sel = selector
    return params


def accepts_selector(index: faiss.Index) -> bool:
    """Whether FAISS can apply an ID selector while searching `index` (Flat, IVF of any code,
    fast-scan and HNSW can; a plain PQ index cannot). Tried on one query, as FAISS only says so
    by raising."""
    everything = faiss.IDSelectorAll()
    try:
        index.search(np.zeros((1, index.d), np.float32), 1, params=search_parameters(index, None, everything))
    except RuntimeError:
        return False
    return True


def search_filtered(group: ShardGroup, xq: np.ndarray, k: int, nprobe: int | None,
                    id_filter: VectorFilter | None, index_ntotal: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """`ShardGroup.search` skipping the ids `id_filter` refuses: (D, I) per shard, each (nq, k),
    with k results wherever a shard holds k ids the filter lets through.

    Shards sharing a coarse quantiser are still assigned once and scanned with the selector
    (`search_preassigned` honours it). A `where` filter widens IVF searches by the share of ids
    it allows (`VectorFilter.widening`). An index that takes no selector is searched deeper and
    its refused ids are dropped afterwards (as deep as it takes to keep k of them).
    index_ntotal: the vectors of the whole index when `group` holds only some of its shards (the
    filter's allowed ids span all of them); default: the group's."""
    if id_filter is None or not id_filter.active:
        return group.search(xq, k, nprobe)
    xq = np.ascontiguousarray(xq, dtype=np.float32)
    n = xq.shape[0]
    widen = id_filter.widening(index_ntotal or sum(int(index.ntotal) for index in group.indexes))
    if group.shared:
        first = group.ivfs[0]
        probe = min(int(math.ceil(int(nprobe or first.nprobe) * widen)), int(first.nlist))
        coarse_d, coarse_i = first.quantizer.search(xq, probe)
        out = []
        for ivf in group.ivfs:
            params = search_parameters(ivf, probe, id_filter.selector)
            D, I = np.empty((n, k), np.float32), np.empty((n, k), np.int64)
            ivf.search_preassigned_c(n, faiss.swig_ptr(xq), k, faiss.swig_ptr(coarse_i), faiss.swig_ptr(coarse_d),
                                     faiss.swig_ptr(D), faiss.swig_ptr(I), False, params)
            out.append((D, I))
        return out
    out = []
    for index in group.indexes:
        if index.ntotal == 0:
            out.append((np.full((n, k), np.inf, np.float32), np.full((n, k), -1, np.int64)))
        else:
            try:
                out.append(index.search(xq, k, params=search_parameters(index, nprobe, id_filter.selector, widen)))
            except RuntimeError:
                # FAISS refuses per-call parameters before doing any work; any other failure is
                # raised as it is.
                if accepts_selector(index):
                    raise
                out.append(_search_then_drop(index, xq, k, nprobe, id_filter))
    return out


def _search_then_drop(index: faiss.Index, xq: np.ndarray, k: int, nprobe: int | None,
                      id_filter: VectorFilter) -> tuple[np.ndarray, np.ndarray]:
    """An index that takes no selector: search k plus as many results as the filter can refuse,
    keep the first k accepted ones of each row."""
    deep = index.ntotal if id_filter.allowed is not None else k + id_filter.removed.size
    deep = int(min(index.ntotal, max(k, deep)))
    set_search_params(index, nprobe)   # such indexes take no per-call parameters at all
    D, I = index.search(xq, deep)
    ok = id_filter.accepts(I)
    D_out = np.full((xq.shape[0], k), np.inf, np.float32)
    I_out = np.full((xq.shape[0], k), -1, np.int64)
    for q in range(xq.shape[0]):
        keep = np.flatnonzero(ok[q])[:k]
        D_out[q, : keep.size], I_out[q, : keep.size] = D[q, keep], I[q, keep]
    return D_out, I_out


# ---------------------------------------------------------------------------------------------
# Recording removals
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RemoveResult:
    """What `remove_images` did: the vector ids it tombstoned (n,) int64, and the tombstones the
    index holds afterwards."""

    index_dir: str
    vector_ids: np.ndarray
    n_removed_total: int
    manifest: dict[str, Any]


def find_vector_ids(store: IndexStore, image_ids: list[str], removed: np.ndarray | None = None
                    ) -> tuple[np.ndarray, list[str]]:
    """The live vector ids of `image_ids` ((n,) int64, sorted) and the image_ids the index does
    not hold (or holds only as removed vectors), in the order given."""
    wanted = pa.array(list(dict.fromkeys(image_ids)), pa.string())
    removed = store.removed_ids() if removed is None else removed
    found_ids, found_names = [], []
    for i in range(len(store.shards)):
        id_map = store.load_ids(i)
        if not len(id_map.ids):
            continue
        mask = pc.is_in(id_map.image_ids, value_set=wanted).to_numpy(zero_copy_only=False)
        if not mask.any():
            continue
        ids = id_map.ids[mask]
        names = np.asarray(pc.filter(id_map.image_ids, pa.array(mask)).to_pylist(), dtype=object)
        live = ~np.isin(ids, removed)
        found_ids.append(ids[live])
        found_names.extend(names[live].tolist())
    present = set(found_names)
    unknown = [x for x in wanted.to_pylist() if x not in present]
    ids = np.unique(np.concatenate(found_ids)) if found_ids else np.empty(0, np.int64)
    return ids.astype(np.int64), unknown


def tombstone_update(index_dir: str, manifest: dict[str, Any], removed: np.ndarray) -> dict[str, Any]:
    """Write `removed` (the whole tombstone list) under a new name and return the manifest with it
    recorded (files, "tombstones", "n_removed"); the caller writes the manifest, then deletes the
    previous list (`previous_tombstones`). An empty list records none."""
    manifest = dict(manifest)
    files = dict(manifest["files"])
    old = (manifest.get("tombstones") or {}).get("name")
    if old:
        files.pop(old, None)
    removed = np.unique(np.asarray(removed, np.int64))
    if removed.size:
        # A new name per version: a reader holding the previous manifest still finds its own list.
        name = f"{TOMBSTONES_PREFIX}{uuid.uuid4().hex[:12]}.npy"
        buf = io.BytesIO()
        np.save(buf, removed, allow_pickle=False)
        storage.atomic_write(storage.join(index_dir, name), buf.getvalue())
        files.update(describe_files(index_dir, [name]))
        manifest["tombstones"] = {"name": name, "n": int(removed.size)}
    else:
        manifest["tombstones"] = None
    manifest["files"] = files
    manifest["n_removed"] = int(removed.size)
    return manifest


def previous_tombstones(old_manifest: dict[str, Any], new_manifest: dict[str, Any]) -> str | None:
    """The tombstone file `old_manifest` lists and `new_manifest` no longer does (to delete once
    the new manifest is written), or None."""
    old = (old_manifest.get("tombstones") or {}).get("name")
    new = (new_manifest.get("tombstones") or {}).get("name")
    return old if old and old != new else None


def _publish(index_dir: str, old_manifest: dict[str, Any], manifest: dict[str, Any], stale: list[str]) -> None:
    """Write the manifest (last, atomically), then delete the files it no longer lists."""
    manifest = {k: v for k, v in manifest.items() if k not in ("format", "raysearch_version")}
    write_manifest(index_dir, manifest)
    old_tomb = previous_tombstones(old_manifest, manifest)
    for name in stale + ([old_tomb] if old_tomb else []):
        storage.remove(storage.join(index_dir, name))


def remove_images(index_dir: str, image_ids: list[str], verify: bool = True) -> RemoveResult:
    """Tombstone the vectors of `image_ids`: searches stop returning them (every search path
    reads the list when it opens the index), the shards keep them until `compact_index`.
    verify: check the id maps' checksums (sizes are always checked).

    Raises ValueError naming the image_ids the index does not hold (already removed ones
    included), before anything is written."""
    image_ids = [str(x) for x in image_ids]
    if not image_ids:
        raise ValueError("no image_id to remove: give at least one")
    store = IndexStore(index_dir, verify=verify)
    storage.ensure_writable_dir(store.index_dir)
    removed = store.removed_ids()
    ids, unknown = find_vector_ids(store, image_ids, removed)
    if unknown:
        shown = ", ".join(repr(x) for x in unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise ValueError(f"not in the index {store.index_dir}: {shown}; nothing was removed")
    manifest = tombstone_update(store.index_dir, store.manifest, np.union1d(removed, ids))
    _publish(store.index_dir, store.manifest, manifest, [])
    return RemoveResult(store.index_dir, ids, int(manifest["n_removed"]), manifest)


# ---------------------------------------------------------------------------------------------
# Compaction
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CompactResult:
    """What `compact_index` did: vectors dropped from the shards, the shards rewritten (new
    names) and the manifest afterwards."""

    index_dir: str
    n_dropped: int
    rewritten: list[str]
    seconds: float
    manifest: dict[str, Any]


def next_shard_number(manifest: dict[str, Any]) -> int:
    """One more than the highest shard number the manifest lists (new files never reuse a name)."""
    numbers = [int(m.group(1)) for s in manifest["shards"] if (m := re.search(r"shard-(\d+)\.index$", s["name"]))]
    return max(numbers, default=-1) + 1


def drop_vectors(index: faiss.Index, drop: np.ndarray, trained: faiss.Index | None = None) -> faiss.Index:
    """`index` without the vectors of ids `drop` (int64). FAISS's `remove_ids` where the index
    supports it (Flat, every IVF); HNSW graphs cannot forget a node, so such a shard is rebuilt
    from its remaining vectors, added to a copy of the empty `trained` index."""
    before = int(index.ntotal)
    try:
        n = index.remove_ids(faiss.IDSelectorBatch(drop.size, faiss.swig_ptr(drop)))
    except RuntimeError:
        return _rebuild_without(index, drop, trained)
    if n != drop.size or index.ntotal != before - drop.size:
        raise RuntimeError(f"removing {drop.size} vectors removed {n} ({before} -> {index.ntotal})")
    return index


def _rebuild_without(index: faiss.Index, drop: np.ndarray, trained: faiss.Index | None) -> faiss.Index:
    if trained is None:
        raise ValueError(f"a {type(faiss.downcast_index(index)).__name__} shard cannot drop vectors in place "
                         "and no trained index was given to rebuild it")
    parts = split_pretransform(index)
    id_map = faiss.downcast_index(parts.inner)
    if not isinstance(id_map, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        raise ValueError(f"cannot compact a {type(id_map).__name__} shard: rebuild it with `raysearch index`")
    ids = faiss.vector_to_array(id_map.id_map).astype(np.int64)
    base = faiss.downcast_index(id_map.index)
    if isinstance(base, faiss.IndexPreTransform):
        raise ValueError("cannot compact a shard whose ids sit outside its transform: rebuild it with `raysearch index`")
    keep = np.flatnonzero(~np.isin(ids, drop))
    # The stored vectors (HNSW keeps them flat) in the inner index's space, added again to a fresh
    # copy of the trained index at the same level (after its transforms).
    x = base.reconstruct_batch(keep.astype(np.int64)) if keep.size else np.zeros((0, base.d), np.float32)
    fresh = ensure_ids(faiss.clone_index(trained))
    fresh_inner = split_pretransform(fresh).inner
    if fresh_inner.d != x.shape[1]:
        raise ValueError("the trained index does not match the shard's layout: rebuild it with `raysearch index`")
    if keep.size:
        fresh_inner.add_with_ids(np.ascontiguousarray(x), ids[keep])
    return fresh


def compact_index(index_dir: str) -> CompactResult:
    """Drop the tombstoned vectors from the shards: every shard holding one is rewritten under a
    new name with its id map, the manifest is rewritten last and atomically with the list cleared,
    and the files it no longer lists are deleted afterwards. Nothing to do: returns at once."""
    start = time.perf_counter()
    store = IndexStore(index_dir, verify=True)
    removed = store.removed_ids()
    manifest = dict(store.manifest)
    if not removed.size:
        return CompactResult(store.index_dir, 0, [], 0.0, manifest)
    storage.ensure_writable_dir(store.index_dir)
    trained = None
    shards = [dict(s) for s in manifest["shards"]]
    files = dict(manifest["files"])
    local = dict(manifest.get("local") or {})
    local_files = dict(local.get("files") or {})
    number = next_shard_number(manifest)
    stale, rewritten, new_names, dropped = [], [], [], 0
    for i, entry in enumerate(shards):
        id_map = store.load_ids(i)
        drop = id_map.ids[np.isin(id_map.ids, removed)]
        if not drop.size:
            continue
        index = store.load_shard(i, mmap=False)
        if trained is None:
            trained = store.load_trained()
        index = drop_vectors(index, np.ascontiguousarray(drop, np.int64), trained)
        path = store.local_path(entry["ids_name"])
        table = pq.read_table(path)
        table = table.filter(pa.array(~np.isin(table.column("id").to_numpy(), drop)))
        name, ids_name = shard_name(number), shard_ids_name(number)
        number += 1
        write_index(index, storage.join(store.index_dir, name))
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        storage.atomic_write(storage.join(store.index_dir, ids_name), buf.getvalue())
        if int(index.ntotal) != table.num_rows:
            raise RuntimeError(f"compacted shard {name} holds {index.ntotal} vectors, its id map {table.num_rows}")
        stale += [entry["name"], entry["ids_name"]]
        for old in (entry["name"], entry["ids_name"]):
            files.pop(old, None)
        if entry["name"] in local_files:   # stored local features stay valid for the ids that remain
            local_files[name] = local_files.pop(entry["name"])
        rewritten.append(name)
        new_names += [name, ids_name]
        dropped += int(drop.size)
        shards[i] = {**entry, "name": name, "ids_name": ids_name, "ntotal": int(index.ntotal)}
    files.update(describe_files(store.index_dir, new_names))
    manifest.update(shards=shards, files=files, n_vectors=int(manifest["n_vectors"]) - dropped)
    if local:
        manifest["local"] = {**local, "files": local_files}
    manifest["compactions"] = list(manifest.get("compactions", [])) + [{
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "n_dropped": dropped, "shards": rewritten,
    }]
    manifest = tombstone_update(store.index_dir, manifest, np.empty(0, np.int64))
    _publish(store.index_dir, store.manifest, manifest, stale)
    return CompactResult(store.index_dir, dropped, rewritten, time.perf_counter() - start, manifest)


def removed_image_ids(store: IndexStore, removed: np.ndarray | None = None) -> set[str]:
    """The image_ids whose every vector is tombstoned (an image re-added with `add --replace`
    keeps its id through its new vector)."""
    removed = store.removed_ids() if removed is None else removed
    if not removed.size:
        return set()
    names: set[str] = set()
    maps = [store.load_ids(i) for i in range(len(store.shards))]
    for id_map in maps:
        mask = np.isin(id_map.ids, removed)
        if mask.any():
            names.update(pc.filter(id_map.image_ids, pa.array(mask)).to_pylist())
    if not names:
        return names
    value_set = pa.array(sorted(names), pa.string())
    for id_map in maps:
        live = ~np.isin(id_map.ids, removed)
        hit = pc.is_in(id_map.image_ids, value_set=value_set).to_numpy(zero_copy_only=False) & live
        if hit.any():
            names.difference_update(pc.filter(id_map.image_ids, pa.array(hit)).to_pylist())
    return names
