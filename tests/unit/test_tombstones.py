"""Removing vectors: FAISS ID selectors over every kind of index, tombstone files, compaction."""

from __future__ import annotations

import json
import os

import faiss
import numpy as np
import pytest

from raysearch.errors import IndexFormatError
from raysearch.formats.embeddings import write_embeddings
from raysearch.index.build import IndexConfig, build_index
from raysearch.index.fanout import ShardGroup
from raysearch.index.merge import is_fastscan, to_mergeable, to_searchable
from raysearch.index.store import IndexStore
from raysearch.index.tombstones import (
    VectorFilter,
    accepts_selector,
    compact_index,
    drop_vectors,
    remove_images,
    search_filtered,
)
from raysearch.index.transforms import ensure_ids
from raysearch.search import Searcher

D = 16


def _vectors(n: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, D)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _exact(xb: np.ndarray, ids: np.ndarray, xq: np.ndarray, k: int) -> np.ndarray:
    flat = faiss.IndexFlatL2(D)
    flat.add(xb)
    _, pos = flat.search(xq, k)
    return np.where(pos >= 0, ids[np.clip(pos, 0, None)], -1)


@pytest.mark.parametrize("factory", ["Flat", "IVF8,Flat", "IVF8,SQ8", "IVF8,PQ4", "IVF8,PQ4x4fsr", "HNSW8",
                                     "PCA8,IVF8,Flat", "PQ4"])
def test_removed_ids_never_come_back_and_k_live_results_remain(factory):
    xb, xq = _vectors(1200), _vectors(20, seed=1)
    ids = np.arange(xb.shape[0], dtype=np.int64) * 2 + 5   # ids that are not positions
    index = faiss.index_factory(D, factory)
    index.train(xb)
    fastscan = is_fastscan(index)
    index = ensure_ids(to_mergeable(index))
    index.add_with_ids(xb, ids)
    if fastscan:
        index = to_searchable(index)
    # The 300 nearest neighbours of the first queries are removed: an unfiltered search of k=10
    # would return nothing but removed ids for them.
    removed = np.unique(_exact(xb, ids, xq[:3], 100).ravel())
    id_filter = VectorFilter(removed)
    D_, I = search_filtered(ShardGroup([index]), xq, 10, 8, id_filter)[0]
    assert not np.isin(I, removed).any()
    assert np.all(I >= 0), "every query still gets k results"
    # Exact indexes answer exactly the exact search over the live vectors.
    if factory == "Flat":
        live = ~np.isin(ids, removed)
        np.testing.assert_array_equal(I, _exact(xb[live], ids[live], xq, 10))
    assert accepts_selector(index) == (factory != "PQ4")


def test_allowed_ids_bitmap_equals_exact_search_over_the_subset():
    xb, xq = _vectors(1000), _vectors(10, seed=2)
    ids = np.arange(1000, dtype=np.int64)
    index = faiss.IndexIDMap(faiss.IndexFlatL2(D))
    index.add_with_ids(xb, ids)
    allowed = ids[np.random.default_rng(3).random(1000) < 0.1]
    removed = allowed[:5]
    id_filter = VectorFilter(removed, allowed)
    _, I = search_filtered(ShardGroup([index]), xq, 10, None, id_filter)[0]
    subset = np.setdiff1d(allowed, removed)
    np.testing.assert_array_equal(I, _exact(xb[subset], subset, xq, 10))


def test_shards_sharing_a_quantiser_are_filtered_in_the_shared_path():
    xb, xq = _vectors(2000), _vectors(15, seed=4)
    trained = faiss.index_factory(D, "IVF8,Flat")
    trained.train(xb)
    shards = []
    for lo, hi in ((0, 1000), (1000, 2000)):
        shard = faiss.clone_index(trained)
        shard.add_with_ids(xb[lo:hi], np.arange(lo, hi, dtype=np.int64))
        shards.append(shard)
    group = ShardGroup(shards)
    assert group.shared
    ids = np.arange(2000, dtype=np.int64)
    removed = np.unique(_exact(xb, ids, xq, 20).ravel())
    got = search_filtered(group, xq, 10, 8, VectorFilter(removed))
    one = ShardGroup([faiss.clone_index(s) for s in shards], share=False)
    want = search_filtered(one, xq, 10, 8, VectorFilter(removed))
    for (Dg, Ig), (Dw, Iw) in zip(got, want):
        np.testing.assert_array_equal(Ig, Iw)
        assert not np.isin(Ig, removed).any()


def test_drop_vectors_rebuilds_an_hnsw_shard_from_its_remaining_vectors():
    xb = _vectors(500)
    trained = faiss.IndexIDMap(faiss.index_factory(D, "HNSW8"))
    index = faiss.clone_index(trained)
    index.add_with_ids(xb, np.arange(500, dtype=np.int64) + 100)
    out = drop_vectors(index, np.arange(100, 150, dtype=np.int64), trained)
    assert out.ntotal == 450
    kept = faiss.vector_to_array(faiss.downcast_index(out).id_map)
    assert set(kept.tolist()) == set(range(150, 600))
    _, I = out.search(xb[60:61], 1)     # a kept vector still finds itself
    assert I[0, 0] == 160


@pytest.fixture()
def small_index(tmp_path):
    """A one-shard IVF index (built in this process) over 600 vectors named vec-ROW."""
    xb = _vectors(600, seed=5)
    folder = str(tmp_path / "emb")
    write_embeddings(folder, xb, part_rows=200)
    out = str(tmp_path / "index")
    build_index(folder, out, IndexConfig(factory="IVF4,Flat", nprobe=4, train_on="cpu"))
    return out, xb


def test_remove_then_search_skips_the_ids_and_compact_gives_the_same_results(small_index):
    out, xb = small_index
    xq = xb[:40] + 0.01
    before = Searcher(out).search(xq, 10)
    gone = [f"vec-{i}" for i in range(0, 40, 2)]
    result = remove_images(out, gone)
    assert sorted(result.vector_ids.tolist()) == list(range(0, 40, 2))
    store = IndexStore(out)
    assert store.manifest["n_removed"] == 20
    assert store.manifest["tombstones"]["name"] in store.manifest["files"]
    searcher = Searcher(out)
    res = searcher.search(xq, 10)
    image_ids, _ = searcher.lookup(res)
    assert not set(image_ids.ravel()) & set(gone)
    assert np.all(res.ids >= 0)
    # The queries of kept vectors still find themselves first; removed ones find their next best.
    assert [image_ids[q, 0] for q in range(1, 40, 2)] == [f"vec-{q}" for q in range(1, 40, 2)]
    np.testing.assert_array_equal(res.ids[1::2, 0], before.ids[1::2, 0])

    compacted = compact_index(out)
    assert compacted.n_dropped == 20 and compacted.rewritten
    store = IndexStore(out)
    assert store.manifest["n_vectors"] == 580 and store.manifest["n_removed"] == 0
    assert store.ntotal == 580 and not store.removed_ids().size
    assert not [f for f in os.listdir(out) if f.startswith("tombstones-")]
    assert not os.path.exists(os.path.join(out, "shards", "shard-00000.index"))   # replaced
    after = Searcher(out).search(xq, 10)
    np.testing.assert_array_equal(after.ids, res.ids)
    np.testing.assert_allclose(after.scores, res.scores, rtol=0, atol=1e-6)
    assert compact_index(out).n_dropped == 0   # nothing left to do


def test_unknown_ids_are_refused_by_name_and_nothing_is_written(small_index):
    out, _ = small_index
    manifest = open(os.path.join(out, "manifest.json")).read()
    with pytest.raises(ValueError, match="'nope'.*nothing was removed"):
        remove_images(out, ["vec-1", "nope"])
    assert open(os.path.join(out, "manifest.json")).read() == manifest
    remove_images(out, ["vec-1"])
    with pytest.raises(ValueError, match="'vec-1'"):   # already removed
        remove_images(out, ["vec-1"])


def test_a_half_written_tombstone_file_is_refused(small_index):
    out, _ = small_index
    remove_images(out, ["vec-3", "vec-4"])
    name = IndexStore(out).manifest["tombstones"]["name"]
    path = os.path.join(out, name)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) - 8])
    with pytest.raises(IndexFormatError, match=name):
        Searcher(out)
    # Same size, other content: caught by the checksum.
    open(path, "wb").write(data[:-8] + np.array([5], np.int64).tobytes())
    with pytest.raises(IndexFormatError, match="checksum"):
        Searcher(out)


def test_second_removal_keeps_the_first_and_replaces_the_file(small_index):
    out, _ = small_index
    remove_images(out, ["vec-10"])
    first = IndexStore(out).manifest["tombstones"]["name"]
    remove_images(out, ["vec-11", "vec-12"])
    m = json.load(open(os.path.join(out, "manifest.json")))
    assert m["tombstones"]["n"] == 3 and m["tombstones"]["name"] != first
    assert not os.path.exists(os.path.join(out, first))
    assert IndexStore(out).removed_ids().tolist() == [10, 11, 12]


# ---------------------------------------------------------------------------------------------
# Metadata fields and where filters
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("expr, rows", [
    ('label == "boots"', [0, 2]),
    ('label != "boots"', [1, 3]),          # row 4 has no label: it matches neither
    ("price < 5", [1, 2]),
    ("5 <= price", [0, 3]),
    ('label in ["boots", "hats"] and price > 5', [0, 3]),
    ('not (label == "boots") or price >= 11', [1, 3]),
    ("1 < price < 10", [1, 2]),
    ("label == None", [4]),
    ('label not in ["boots"]', [1, 3]),
])
def test_where_selects_the_rows_it_says(expr, rows):
    import pyarrow as pa

    from raysearch.index.fields import Where

    table = pa.table({"id": [0, 1, 2, 3, 4], "label": ["boots", "shoes", "boots", "hats", None],
                      "price": [10.0, 2.5, 3.0, 11.0, None]})
    assert np.flatnonzero(Where(expr).mask(table)).tolist() == rows


@pytest.mark.parametrize("expr, message", [
    ("__import__('os').system('x')", "not allowed"),
    ("label == boots", "compare a column with a literal"),
    ("price + 1 > 2", "compare a column with a literal"),
    ("label in 'boots'", "list of literals"),
    ("label ==", "not a valid expression"),
    ("colour == 'red'", "no metadata column 'colour'"),
])
def test_where_refuses_anything_else_naming_it(expr, message):
    import pyarrow as pa

    from raysearch.index.fields import Where

    table = pa.table({"id": [0], "label": ["boots"], "price": [1.0]})
    with pytest.raises(ValueError, match=message):
        Where(expr).mask(table)


def test_filtered_search_equals_an_exact_search_over_the_subset(small_index, tmp_path):
    import pyarrow as pa
    import pyarrow.csv as pacsv

    from raysearch.index.fields import attach_fields

    out, xb = small_index
    n = xb.shape[0]
    rng = np.random.default_rng(9)
    labels = rng.choice(["boots", "shoes", "hats"], n, p=[0.05, 0.45, 0.5])
    prices = rng.integers(1, 100, n)
    listing = tmp_path / "list.csv"
    pacsv.write_csv(pa.table({"path": [f"img/{i}.jpg" for i in range(n)], "id": [f"vec-{i}" for i in range(n)],
                              "label": labels, "price": prices}), str(listing))
    entry = attach_fields(out, str(listing))
    assert entry["columns"] == ["label", "price"] and entry["n"] == n
    remove_images(out, ["vec-3"])
    searcher = Searcher(out)
    xq = _vectors(12, seed=11)
    for where in ('label == "boots"', "price < 30 and label != 'hats'"):
        res = searcher.search(xq, 10, nprobe=4, where=where)
        ok = {"label == \"boots\"": labels == "boots", "price < 30 and label != 'hats'": (prices < 30) & (labels != "hats")}[where]
        ok[3] = False   # removed
        subset = np.flatnonzero(ok).astype(np.int64)
        assert subset.size >= 10
        # nprobe 4 of 4 lists: the IVF search is exhaustive, so it equals the exact search.
        np.testing.assert_array_equal(res.ids, _exact(xb[subset], subset, xq, 10))
        values = searcher.fields_of(res, ["label"])
        assert all(v["label"] == labels[i] for row, ids in zip(values, res.ids) for v, i in zip(row, ids))
    with pytest.raises(ValueError, match="no metadata column 'colour'"):
        searcher.search(xq, 10, where="colour == 'red'")
