"""Shard builders (run in-process here, as Ray runs them) against one index built in one process."""

from __future__ import annotations

import os

import faiss
import numpy as np
import pyarrow as pa
import pytest

from raysearch.formats.embeddings import list_parts
from raysearch.formats.embeddings import part_sizes
from raysearch.index.merge import merge_into, to_searchable
from raysearch.index.fanout import merge_topk
from raysearch.index.shards import ShardBuilder, add_shard, pick_rows, plan_shards
from raysearch.formats.embeddings import write_embeddings
from raysearch.index.train import train_index
from raysearch.index.fanout import ShardGroup, search_shards

D = 24
N = 3000


@pytest.mark.parametrize("n_shards", range(1, 8))
def test_plan_shards_covers_every_row_once_in_balanced_contiguous_runs(n_shards):
    rng = np.random.default_rng(n_shards)
    for _ in range(30):
        sizes = [int(s) for s in rng.integers(0, 50, rng.integers(1, 12))]
        plan = plan_shards(sizes, n_shards)
        assert len(plan) == n_shards
        covered = [(p, r) for shard in plan for p, lo, hi in shard for r in range(lo, hi)]
        assert covered == [(p, r) for p, size in enumerate(sizes) for r in range(size)]
        counts = [sum(hi - lo for _, lo, hi in shard) for shard in plan]
        assert max(counts) - min(counts) <= 1
        assert all(lo < hi for shard in plan for _, lo, hi in shard)
    with pytest.raises(ValueError, match="--shards"):
        plan_shards([3], 0)


@pytest.fixture(scope="module")
def vectors(tmp_path_factory):
    """Seeded random vectors (no two distances tie) written as an embeddings folder."""
    rng = np.random.default_rng(42)
    x = rng.standard_normal((N + 40, D)).astype(np.float32)
    folder = str(tmp_path_factory.mktemp("emb"))
    write_embeddings(folder, x[:N], part_rows=350)
    return folder, x[:N], x[N:]


def _build_shards(folder, trained, n_shards, mergeable, out_dir):
    parts = list_parts(folder)
    plan = plan_shards(part_sizes(parts), n_shards)
    shards = []
    for i, shard_plan in enumerate(plan):
        slices = [(parts[p], lo, hi) for p, lo, hi in shard_plan]
        path = os.path.join(out_dir, f"s{i}.index")
        info = add_shard(faiss.serialize_index(trained).tobytes(), slices, D, path, path + ".ids.parquet", mergeable=mergeable)
        shards.append(faiss.read_index(path))
        assert info["ntotal"] == shards[-1].ntotal
    return shards


@pytest.mark.parametrize("factory", ["IVF16,Flat", "IVF16,PQ6"])
@pytest.mark.parametrize("n_shards", [1, 3, 4])
@pytest.mark.parametrize("merged", [False, True])
def test_sharded_build_returns_exactly_what_one_index_returns(vectors, tmp_path, factory, n_shards, merged):
    folder, xb, xq = vectors
    trained = faiss.index_factory(D, factory)
    train_index(trained, xb[:1500], seed=3, train_on="cpu")
    single = faiss.deserialize_index(faiss.serialize_index(trained))
    single.add_with_ids(xb, np.arange(N, dtype=np.int64))
    shards = _build_shards(folder, trained, n_shards, merged, str(tmp_path))
    if merged:
        for s in shards[1:]:
            merge_into(shards[0], s)
        shards = [shards[0]]
    assert sum(s.ntotal for s in shards) == N
    assert ShardGroup(shards).shared == (len(shards) > 1)  # one coarse quantisation for all shards
    for nprobe in (1, 4, 16):
        faiss.ParameterSpace().set_index_parameter(single, "nprobe", nprobe)
        D0, I0 = single.search(xq, 10)
        D1, I1, shard = search_shards(shards, xq, 10, nprobe, "l2")
        np.testing.assert_array_equal(I1, I0)
        np.testing.assert_array_equal(D1, D0)
        assert (shard >= 0).all()


def test_fast_scan_shards_merge_into_the_same_index(vectors, tmp_path):
    folder, xb, xq = vectors
    trained = faiss.index_factory(D, "OPQ12_24,IVF16,PQ12x4fsr")
    train_index(trained, xb[:1500], seed=3, train_on="cpu")
    single = faiss.deserialize_index(faiss.serialize_index(trained))
    single.add_with_ids(xb, np.arange(N, dtype=np.int64))
    faiss.ParameterSpace().set_index_parameter(single, "nprobe", 4)
    D0, I0 = single.search(xq, 10)
    shards = _build_shards(folder, trained, 3, True, str(tmp_path))
    for s in shards[1:]:
        merge_into(shards[0], s)
    merged = to_searchable(shards[0])
    assert isinstance(faiss.downcast_index(faiss.extract_index_ivf(merged)), faiss.IndexIVFPQFastScan)
    D1, I1, _ = search_shards([merged], xq, 10, 4, "l2")
    # Fast-scan sums quantised lookup tables with SIMD kernels that FAISS picks by list sizes and
    # batch shapes: distances agree to float rounding, and near-equal ones can swap places.
    np.testing.assert_allclose(D1, D0, rtol=1e-6)
    assert (np.sort(I1, axis=1) == np.sort(I0, axis=1)).mean() > 0.9
    # Unmerged fast-scan shards are searched as they are.
    unmerged = _build_shards(folder, trained, 3, False, str(tmp_path))
    assert all(isinstance(faiss.downcast_index(faiss.extract_index_ivf(s)), faiss.IndexIVFPQFastScan) for s in unmerged)
    D2, I2, _ = search_shards(unmerged, xq, 10, 4, "l2")
    np.testing.assert_allclose(D2, D0, rtol=1e-6)
    assert (np.sort(I2, axis=1) == np.sort(I0, axis=1)).mean() > 0.9


@pytest.mark.parametrize("factory", ["IVF16,SQ8", "IVF16,PQ12x4fs", "IVF16,Flat"])
def test_shards_sharing_one_quantiser_are_assigned_once_with_the_same_results(vectors, tmp_path, factory):
    """ShardGroup quantises a batch once for shards of one trained IVF index: every shard's own
    answer is unchanged, at any nprobe (its default, a given one, more than nlist)."""
    folder, xb, xq = vectors
    trained = faiss.index_factory(D, factory, faiss.METRIC_INNER_PRODUCT if factory.endswith("Flat") else faiss.METRIC_L2)
    train_index(trained, xb[:1500], seed=3, train_on="cpu")
    shards = _build_shards(folder, trained, 3, False, str(tmp_path))
    group = ShardGroup(shards)
    assert group.shared
    for nprobe in (None, 1, 3, 16, 40):
        got = group.search(xq, 7, nprobe)
        for index, (D1, I1) in zip(shards, got):
            alone = faiss.deserialize_index(faiss.serialize_index(index))
            alone.nprobe = min(nprobe or index.nprobe, 16)
            D0, I0 = alone.search(xq, 7)
            np.testing.assert_array_equal(I1, I0)
            np.testing.assert_array_equal(D1, D0)


def test_threads_searching_shared_shards_at_different_nprobe_get_their_own_answers(vectors, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    folder, xb, xq = vectors
    trained = faiss.index_factory(D, "IVF16,Flat")
    train_index(trained, xb[:1500], seed=3, train_on="cpu")
    group = ShardGroup(_build_shards(folder, trained, 3, False, str(tmp_path)))
    expected = {p: group.search(xq, 5, p) for p in (1, 2, 16)}
    with ThreadPoolExecutor(6) as pool:
        runs = list(pool.map(lambda p: (p, group.search(xq, 5, p)), [1, 2, 16] * 40))
    for p, got in runs:
        for (D1, I1), (D0, I0) in zip(got, expected[p]):
            np.testing.assert_array_equal(I1, I0)
            np.testing.assert_array_equal(D1, D0)


def test_shards_that_do_not_share_a_plain_quantiser_are_searched_one_by_one(vectors, tmp_path):
    folder, xb, xq = vectors
    a, b = faiss.index_factory(D, "IVF16,Flat"), faiss.index_factory(D, "IVF16,Flat")
    train_index(a, xb[:1500], seed=3, train_on="cpu")
    train_index(b, xb[1500:], seed=4, train_on="cpu")  # other centroids
    a.add(xb[:100])
    b.add(xb[100:200])
    assert not ShardGroup([a, b]).shared
    opq = faiss.index_factory(D, "OPQ12_24,IVF16,PQ12x4fsr")  # a pre-transform in front of the lists
    train_index(opq, xb[:1500], seed=3, train_on="cpu")
    assert not ShardGroup([opq, faiss.deserialize_index(faiss.serialize_index(opq))]).shared
    hnsw = faiss.IndexHNSWFlat(D, 8)
    hnsw.add(xb[:50])
    assert not ShardGroup([hnsw, hnsw]).shared
    # ... and still answer exactly like their own searches.
    (D1, I1), (D2, I2) = ShardGroup([a, b]).search(xq, 5, 4)
    a.nprobe = b.nprobe = 4
    for index, (Dg, Ig) in ((a, (D1, I1)), (b, (D2, I2))):
        D0, I0 = index.search(xq, 5)
        np.testing.assert_array_equal(Ig, I0)
        np.testing.assert_array_equal(Dg, D0)


def test_flat_shards_equal_exact_search(vectors, tmp_path):
    folder, xb, xq = vectors
    trained = faiss.index_factory(D, "Flat", faiss.METRIC_INNER_PRODUCT)
    shards = _build_shards(folder, trained, 4, False, str(tmp_path))
    D1, I1, _ = search_shards(shards, xq, 10, None, "ip")
    D0, I0 = faiss.knn(xq, xb, 10, metric=faiss.METRIC_INNER_PRODUCT)
    np.testing.assert_array_equal(I1, I0)
    np.testing.assert_allclose(D1, D0, rtol=1e-6)


def test_builders_find_exact_neighbours_while_adding(vectors, tmp_path):
    folder, xb, xq = vectors
    trained = faiss.index_factory(D, "IVF16,Flat")
    train_index(trained, xb[:1500], seed=3, train_on="cpu")
    parts = list_parts(folder)
    results = []
    for i, shard_plan in enumerate(plan_shards(part_sizes(parts), 3)):
        slices = [(parts[p], lo, hi) for p, lo, hi in shard_plan]
        path = str(tmp_path / f"t{i}.index")
        results.append(add_shard(faiss.serialize_index(trained).tobytes(), slices, D, path, path + ".ids", xq=xq, k=10))
    merged = merge_topk([r["D"] for r in results], [r["I"] for r in results], 10, keep_max=False)
    Dm, Im = merged.D, merged.I
    D0, I0 = faiss.knn(xq, xb, 10)
    np.testing.assert_array_equal(Im, I0)
    np.testing.assert_allclose(Dm, D0, rtol=1e-5)


def test_pick_rows_returns_the_requested_positions(vectors):
    folder, xb, _ = vectors
    parts = list_parts(folder)
    plan = plan_shards(part_sizes(parts), 2)
    slices = [(parts[p], lo, hi) for p, lo, hi in plan[1]]
    start = N - sum(hi - lo for _, lo, hi in slices)
    positions = np.array([start, start + 5, N - 1])
    got = pick_rows(slices, D, positions, start)
    assert got["n"] == N - start
    np.testing.assert_array_equal(got["rows"], positions)
    np.testing.assert_array_equal(got["x"], xb[positions])


@pytest.mark.parametrize("keep", [True, False])
def test_builder_adds_its_kept_vectors_without_reading_the_parts_again(vectors, tmp_path, keep):
    import shutil

    folder, xb, xq = vectors
    copy = str(tmp_path / "emb")
    shutil.copytree(folder, copy)
    trained = faiss.index_factory(D, "IVF16,Flat")
    train_index(trained, xb[:1500], seed=3, train_on="cpu")
    blob = faiss.serialize_index(trained).tobytes()
    parts = list_parts(copy)
    slices = [(parts[p], lo, hi) for p, lo, hi in plan_shards(part_sizes(parts), 2)[0]]
    builder = ShardBuilder(slices, D, keep=keep)
    checked = builder.check(np.array([0, 7]), 0)
    assert checked["kept"] is keep
    np.testing.assert_array_equal(checked["x"], xb[[0, 7]])
    for p in parts:  # the parts are gone: only kept vectors can still be added
        os.remove(p)
    path = str(tmp_path / "kept.index")
    if not keep:
        with pytest.raises(OSError, match="cannot read embeddings part"):
            builder.add(blob, path, path + ".ids", xq=xq, k=10)
        return
    info = builder.add(blob, path, path + ".ids", xq=xq, k=10)
    assert info["reread"] is False and info["ntotal"] == sum(hi - lo for _, lo, hi in slices)
    ref = str(tmp_path / "ref.index")
    ref_slices = [(os.path.join(folder, "parts", os.path.basename(p)), lo, hi) for p, lo, hi in slices]
    expected = add_shard(blob, ref_slices, D, ref, ref + ".ids", xq=xq, k=10)
    np.testing.assert_array_equal(info["I"], expected["I"])
    a, b = faiss.read_index(path), faiss.read_index(ref)
    for index in (a, b):
        faiss.extract_index_ivf(index).nprobe = 16
    np.testing.assert_array_equal(a.search(xq, 10)[1], b.search(xq, 10)[1])


def test_bad_vectors_are_named(tmp_path):
    x = np.random.default_rng(0).standard_normal((100, 8)).astype(np.float32)
    x[57, 2] = np.inf
    folder = str(tmp_path / "emb")
    write_embeddings(folder, x, part_rows=40)
    parts = list_parts(folder)
    with pytest.raises(ValueError, match=r"part-.*row 57 holds NaN or inf"):
        pick_rows([(p, 0, s) for p, s in zip(parts, part_sizes(parts))], 8, np.array([0]), 0)
    with pytest.raises(ValueError, match="8-d vectors, the index is 16-d"):
        pick_rows([(parts[0], 0, 40)], 16, np.array([0]), 0)


def test_id_map_read_from_several_row_groups_looks_up_like_one_table(tmp_path):
    """An id map as Parquet hands it back (several chunks, ids out of order) answers lookups
    exactly as the same map built in one piece; ids it does not hold give None."""
    import pyarrow.parquet as pq

    from raysearch.index.store import IdMap

    rng = np.random.default_rng(4)
    ids = rng.permutation(np.arange(5000, 9000, dtype=np.int64))
    tbl = pa.table({"id": ids, "image_id": [f"img/{i}" for i in ids], "uri": [f"s3://b/img/{i}.jpg" for i in ids]})
    pq.write_table(tbl, tmp_path / "ids.parquet", row_group_size=700)
    read = pq.read_table(tmp_path / "ids.parquet")
    assert read.column("uri").num_chunks > 1
    # The Arrow lookup on the chunked map against the object-array lookup on the whole one.
    chunked, whole = IdMap(read, objects=False), IdMap(tbl.combine_chunks(), objects=True)
    query = np.array([[5000, 8999, 12, -1], [7001, 4999, 6500, 9000]], dtype=np.int64)
    got_ids, got_uris = chunked.lookup(query)
    want_ids, want_uris = whole.lookup(query)
    assert got_ids.tolist() == want_ids.tolist() and got_uris.tolist() == want_uris.tolist()
    assert got_ids.tolist() == [["img/5000", "img/8999", None, None], ["img/7001", None, "img/6500", None]]
    assert got_uris[0, 0] == "s3://b/img/5000.jpg"
