"""`build_index` on a local Ray: sharded builds against single-process FAISS, tuning, storage on
S3, the `index` command, and bad input refused before any work is wasted."""

from __future__ import annotations

import json
import os

import faiss
import numpy as np
import pytest
from typer.testing import CliRunner

from raysearch.cli import app
from raysearch.formats.embeddings import list_parts
from raysearch.index.build import IndexConfig, build_index
from raysearch.formats.embeddings import write_embeddings
from raysearch.index.synthetic import ClusteredVectors
from raysearch.index.tune import recall_at_k
from raysearch.search import Searcher

pytestmark = pytest.mark.slow

D = 24
N = 3000


@pytest.fixture(scope="module")
def random_embeddings(tmp_path_factory):
    """Seeded random vectors (no two distances tie), in parts of 350 rows."""
    x = np.random.default_rng(7).standard_normal((N + 50, D)).astype(np.float32)
    folder = str(tmp_path_factory.mktemp("emb") / "embeddings")
    write_embeddings(folder, x[:N], part_rows=350)
    return folder, x[:N], x[N:]


@pytest.mark.parametrize("factory", ["IVF16,Flat", "IVF16,PQ6"])
@pytest.mark.parametrize("shards,merge", [(1, False), (3, False), (4, False), (3, True), (4, True)])
def test_sharded_build_equals_one_faiss_index_built_in_one_process(
    random_embeddings, tmp_path, ray_local, factory, shards, merge
):
    folder, xb, xq = random_embeddings
    out = str(tmp_path / "index")
    manifest = build_index(folder, out, IndexConfig(factory=factory, shards=shards, merge=merge, nprobe=4, train_on="cpu"))
    assert len(manifest["shards"]) == (1 if merge else shards)
    assert len(manifest["build"]["shard_tasks"]) == shards
    assert manifest["merged"] == (merge and shards > 1)
    # One index in this process, from the same trained index and the same vectors.
    single = faiss.read_index(os.path.join(out, "trained.index"))
    single.add_with_ids(xb, np.arange(N, dtype=np.int64))
    searcher = Searcher(out)
    for nprobe in (1, 4, 16):
        faiss.ParameterSpace().set_index_parameter(single, "nprobe", nprobe)
        D0, I0 = single.search(xq, 10)
        res = searcher.search(xq, 10, nprobe=nprobe)
        np.testing.assert_array_equal(res.ids, I0)
        np.testing.assert_array_equal(res.scores, (1.0 - D0 / 2.0).astype(np.float32))
    # nprobe given at build time is recorded as fixed, and used when the search names none.
    assert manifest["search"] == {"nprobe": 4, "param": "nprobe", "tuned": False, "fixed": True}
    np.testing.assert_array_equal(searcher.search(xq, 10).ids, searcher.search(xq, 10, nprobe=4).ids)


@pytest.fixture(scope="module")
def clustered_embeddings(tmp_path_factory):
    gen = ClusteredVectors(32, 400, seed=3)
    folder = str(tmp_path_factory.mktemp("clustered") / "embeddings")
    write_embeddings(folder, gen.batches(20_000, 5000), part_rows=2500)
    return folder, gen


@pytest.mark.parametrize("keep", [True, False, None])
def test_builders_keep_their_vectors_between_passes_or_read_them_again(random_embeddings, tmp_path, ray_local, keep):
    folder, xb, xq = random_embeddings
    out = str(tmp_path / "index")
    manifest = build_index(folder, out, IndexConfig(factory="IVF16,Flat", shards=3, keep_vectors=keep, train_on="cpu"))
    build = manifest["build"]
    assert build["in_process"] is False  # several shards: on Ray
    # Kept by actors when asked; by default 100 kB shares are cheaper to read again (Ray tasks).
    assert build["vectors_kept_between_passes"] is (keep is True)
    assert [t["reread"] for t in build["shard_tasks"]] == [keep is not True] * 3
    assert manifest["search"]["tuned"] and manifest["search"]["reached"]
    single = faiss.read_index(os.path.join(out, "trained.index"))
    single.add_with_ids(xb, np.arange(N, dtype=np.int64))
    faiss.extract_index_ivf(single).nprobe = 4
    np.testing.assert_array_equal(Searcher(out).search(xq, 10, nprobe=4).ids, single.search(xq, 10)[1])


def test_one_shard_on_one_machine_builds_in_process_without_ray(random_embeddings, tmp_path):
    import subprocess
    import sys

    folder, _, xq = random_embeddings
    out = str(tmp_path / "index")
    script = (
        "import json, sys, ray\n"
        "from raysearch.index.build import IndexConfig, build_index\n"
        "m = build_index(sys.argv[1], sys.argv[2], IndexConfig(factory='IVF16,Flat', train_on='cpu'))\n"
        "print(json.dumps({'ray': ray.is_initialized(), 'build': m['build'], 'search': m['search']}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", script, folder, out], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["ray"] is False and got["build"]["in_process"] is True
    assert got["build"]["vectors_kept_between_passes"] is True
    assert got["search"]["tuned"] and got["search"]["reached"]
    assert Searcher(out).search(xq, 5).ids.shape == (len(xq), 5)


def test_tuned_index_reaches_the_target_recall(clustered_embeddings, tmp_path, ray_local):
    folder, gen = clustered_embeddings
    out = str(tmp_path / "index")
    # A 1 MiB budget rules out full vectors: auto picks an inverted file with 8-bit scalar codes.
    manifest = build_index(folder, out, IndexConfig(factory="auto", max_memory="1M", shards=2, target_recall=0.9))
    assert manifest["factory"].startswith("IVF") and manifest["factory"].endswith(",SQ8")
    assert manifest["estimated_bytes"] <= 1 << 20
    search = manifest["search"]
    assert search["tuned"] and search["reached"] and search["param"] == "nprobe"
    assert search["recall_at_k"] >= 0.9 and search["n_queries"] == 1000
    curve = {p["value"]: p for p in search["curve"]}
    nprobe = search["nprobe"]
    assert curve[nprobe]["recall_at_k"] >= 0.9
    # The smallest nprobe reaching the target plus the tuning margin (raysearch.index.tune).
    assert search["tuned_to"] > 0.9 and all(p["recall_at_k"] < search["tuned_to"] for v, p in curve.items() if v < nprobe)
    assert all(p["ms_per_query"] > 0 for p in curve.values())
    assert {"check", "train", "add", "tune"} <= set(manifest["timings"])

    # Independent check with new vectors from the same distribution (not in the index).
    xb = gen.rows(0, 20_000)
    xq = gen.rows(20_000, 20_500)
    truth = faiss.knn(xq, xb, 10)[1]
    searcher = Searcher(out)
    tuned = searcher.search(xq, 10)          # the tuned nprobe is the default
    assert recall_at_k(tuned.ids, truth) >= 0.9 - 0.03
    np.testing.assert_array_equal(tuned.ids, searcher.search(xq, 10, nprobe=nprobe).ids)
    assert recall_at_k(searcher.search(xq, 10, nprobe=1).ids, truth) < recall_at_k(tuned.ids, truth)


def test_index_command_builds_from_embeddings_with_torch_training(clustered_embeddings, tmp_path, ray_local):
    folder, _ = clustered_embeddings
    out = str(tmp_path / "index")
    res = CliRunner().invoke(app, [
        "index", folder, "--out", out, "--index", "IVF32,PQ8", "--shards", "3", "--merge",
        "--train-on", "torch:cpu", "--target-recall", "0.8",
    ])
    assert res.exit_code == 0, res.output
    assert "index: IVF32,PQ8 (given with --index); 20000 vectors in 1 shard" in res.output
    assert "tuned: nprobe" in res.output
    assert "with torch (cpu, flat k-means)" in res.output
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["build"]["train"]["backend"] == "torch"
    assert manifest["merged"] and manifest["search"]["tuned"]


def test_index_command_with_two_level_kmeans_reaches_the_target_and_records_it(clustered_embeddings, tmp_path):
    folder, gen = clustered_embeddings
    out = str(tmp_path / "index")
    # One shard on one machine: built in this process.
    res = CliRunner().invoke(app, [
        "index", folder, "--out", out, "--index", "IVF128,Flat", "--kmeans", "two-level", "--train-on", "cpu",
        "--target-recall", "0.9",
    ])
    assert res.exit_code == 0, res.output
    assert "with faiss-cpu (cpu, two-level k-means)" in res.output
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["build"]["train"]["kmeans"] == "two-level"
    assert manifest["search"]["reached"] and manifest["search"]["recall_at_k"] >= 0.9
    xb, xq = gen.rows(0, 20_000), gen.rows(20_000, 20_300)
    assert recall_at_k(Searcher(out).search(xq, 10).ids, faiss.knn(xq, xb, 10)[1]) >= 0.9 - 0.03

    bad = CliRunner().invoke(app, ["index", folder, "--out", str(tmp_path / "x"), "--kmeans", "two-level",
                                   "--train-on", "faiss-gpu"])
    assert bad.exit_code != 0 and "trains on the CPU" in bad.output
    assert not os.path.exists(tmp_path / "x" / "manifest.json")


def test_fast_scan_index_built_in_shards_and_merged(clustered_embeddings, tmp_path, ray_local):
    folder, gen = clustered_embeddings
    out = str(tmp_path / "index")
    manifest = build_index(folder, out, IndexConfig(factory="IVF64,PQ16x4fsr", shards=2, merge=True, target_recall=0.6))
    searcher = Searcher(out)
    assert isinstance(faiss.downcast_index(searcher.shards[0]), faiss.IndexIVFPQFastScan)
    assert searcher.shards[0].ntotal == 20_000
    assert manifest["search"]["reached"] and manifest["search"]["recall_at_k"] >= 0.6


def test_index_on_s3_merged_and_tuned(random_embeddings, s3_bucket, tmp_path, monkeypatch, ray_local):
    folder, xb, xq = random_embeddings
    uri = f"s3://{s3_bucket}/idx"
    manifest = build_index(folder, uri, IndexConfig(factory="IVF16,Flat", shards=3, merge=True, target_recall=0.9))
    assert manifest["search"]["tuned"]
    monkeypatch.setenv("RAYSEARCH_CACHE", str(tmp_path / "cache"))
    local = str(tmp_path / "local")
    build_index(folder, local, IndexConfig(factory="IVF16,Flat", shards=1, target_recall=0.9))
    remote_res = Searcher(uri).search(xq, 10, nprobe=4)
    local_res = Searcher(local).search(xq, 10, nprobe=4)
    np.testing.assert_array_equal(remote_res.ids, local_res.ids)


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error before any work is wasted
# ---------------------------------------------------------------------------------------------


def test_nan_vector_is_refused_before_training(tmp_path, ray_local):
    x = ClusteredVectors(16, 20, seed=0).rows(0, 4000)
    x[3210, 5] = np.nan
    folder = str(tmp_path / "emb")
    write_embeddings(folder, x, part_rows=500)
    out = tmp_path / "index"
    # A training sample of 256 vectors that (almost surely) misses row 3210: the check pass finds it.
    with pytest.raises(ValueError, match=r"part-.*: vector for row 3210 holds NaN or inf"):
        build_index(folder, str(out), IndexConfig(factory="IVF4,Flat", train_size=256, shards=2))
    assert not (out / "trained.index").exists()
    assert not (out / "manifest.json").exists()


def test_dimension_mismatch_is_refused_before_reading_vectors(tmp_path, ray_local):
    folder = str(tmp_path / "emb")
    write_embeddings(folder, np.ones((100, 16), np.float32))
    other = str(tmp_path / "other")
    write_embeddings(other, np.ones((10, 8), np.float32), first_row=100)
    os.rename(list_parts(other)[0], os.path.join(folder, "parts", os.path.basename(list_parts(other)[0])))
    with pytest.raises(ValueError, match=r"holds 8-d vectors but .* declares 16-d"):
        build_index(folder, str(tmp_path / "index"), IndexConfig(factory="Flat"))
    assert not (tmp_path / "index").exists()


def test_too_few_training_vectors_is_refused_before_reading_vectors(tmp_path, ray_local):
    folder = str(tmp_path / "emb")
    write_embeddings(folder, ClusteredVectors(16, 10, seed=0).rows(0, 500))
    with pytest.raises(ValueError, match=r"needs at least 1024 training vectors, but only 500"):
        build_index(folder, str(tmp_path / "index"), IndexConfig(factory="IVF1024,Flat"))
    with pytest.raises(ValueError, match="not a valid FAISS factory string"):
        build_index(folder, str(tmp_path / "index"), IndexConfig(factory="IVF16,Bogus"))
    assert not (tmp_path / "index").exists()


def test_cli_reports_bad_input_in_one_line(tmp_path, ray_local):
    folder = str(tmp_path / "emb")
    write_embeddings(folder, ClusteredVectors(16, 10, seed=0).rows(0, 200))
    res = CliRunner().invoke(app, ["index", folder, "--out", str(tmp_path / "i"), "--index", "IVF512,Flat"])
    assert res.exit_code == 2
    assert "needs at least 512 training vectors" in res.output
    res = CliRunner().invoke(app, ["index", folder, "--out", str(tmp_path / "i"), "--train-on", "tpu"])
    assert res.exit_code == 2 and "--train-on" in res.output


def test_searcher_reads_small_indexes_into_memory_and_maps_large_ones(random_embeddings, tmp_path, ray_local, monkeypatch):
    from raysearch.index import store as store_module

    folder, _, xq = random_embeddings
    out = str(tmp_path / "index")
    build_index(folder, out, IndexConfig(factory="IVF16,Flat", shards=2, nprobe=4, train_on="cpu", keep_vectors=False))

    def lists(searcher):
        return {type(faiss.downcast_InvertedLists(faiss.extract_index_ivf(s).invlists)).__name__ for s in searcher.shards}

    in_memory = Searcher(out)
    assert not in_memory.store.prefers_mmap() and lists(in_memory) == {"ArrayInvertedLists"}
    monkeypatch.setattr(store_module, "MMAP_FRACTION", 0.0)  # as if the shards were larger than RAM allows
    mapped = Searcher(out)
    assert mapped.store.prefers_mmap() and lists(mapped) == {"OnDiskInvertedLists"}
    a, b = in_memory.search(xq, 10), mapped.search(xq, 10)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.scores, b.scores)
