"""Training: seeded FAISS training, the torch k-means path (run here on the CPU), the two-level
coarse k-means, input checks."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from raysearch.index.synthetic import ClusteredVectors
from raysearch.index.train import (
    check_kmeans,
    kmeans_torch,
    resolve_kmeans,
    resolve_train_on,
    train_index,
    two_level_centroids,
)


def _recall(index, xb, xq, nprobe, k=10):
    gt = faiss.knn(xq, xb, k)[1]
    faiss.ParameterSpace().set_index_parameter(index, "nprobe", nprobe)
    found = index.search(xq, k)[1]
    return np.mean([np.intersect1d(f, g).size / k for f, g in zip(found, gt)])


def test_kmeans_torch_fits_as_well_as_faiss_kmeans():
    x = ClusteredVectors(16, 100, seed=0).rows(0, 6000)

    def inertia(centroids):
        return float(faiss.knn(x, np.ascontiguousarray(centroids, dtype=np.float32), 1)[0].sum())

    ours = kmeans_torch(x, 64, niter=20, seed=3)
    reference = faiss.Kmeans(16, 64, niter=20, seed=3)
    reference.train(x)
    assert ours.shape == (64, 16)
    assert inertia(ours) <= 1.05 * inertia(reference.centroids)


def test_kmeans_torch_is_seeded_and_handles_groups():
    x = ClusteredVectors(8, 50, seed=1).rows(0, 3000)
    a = kmeans_torch(x, 32, niter=5, seed=7)
    b = kmeans_torch(x, 32, niter=5, seed=7)
    c = kmeans_torch(x, 32, niter=5, seed=8)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    grouped = kmeans_torch(np.stack([x[:, :4], x[:, 4:]]), 16, niter=5, seed=2)
    assert grouped.shape == (2, 16, 4)


def test_kmeans_torch_refills_empty_clusters():
    # 5 distinct points, 5 centroids but duplicated initial points make empty clusters likely.
    x = np.repeat(np.eye(5, dtype=np.float32), 20, axis=0)
    centroids = kmeans_torch(x, 5, niter=10, seed=0)
    assert np.isfinite(centroids).all()
    assert len({tuple(np.round(c, 3)) for c in centroids}) == 5


@pytest.mark.parametrize("factory", ["IVF32,Flat", "IVF32,PQ8", "IVF32,PQ16x4fsr"])
def test_torch_trained_index_works_like_a_faiss_trained_one(factory):
    gen = ClusteredVectors(32, 200, seed=4)
    xb, xq = gen.rows(0, 8000), gen.rows(8000, 8200)
    recalls = {}
    for train_on in ("cpu", "torch:cpu"):
        index = faiss.index_factory(32, factory)
        report = train_index(index, xb[:4000], seed=5, train_on=train_on)
        assert index.is_trained
        assert report.backend == ("torch" if train_on.startswith("torch") else "faiss-cpu")
        index.add(xb)
        recalls[train_on] = _recall(index, xb, xq, nprobe=8)
    assert recalls["torch:cpu"] >= recalls["cpu"] - 0.05, recalls


def test_torch_training_with_opq_pretransform():
    gen = ClusteredVectors(32, 100, seed=2)
    xb, xq = gen.rows(0, 6000), gen.rows(6000, 6100)
    index = faiss.index_factory(32, "OPQ8_16,IVF16,PQ8")
    opq = faiss.downcast_VectorTransform(faiss.downcast_index(index).chain.at(0))
    opq.niter = 10   # FAISS's 50 OPQ iterations are more than this check needs
    train_index(index, xb[:3000], seed=1, train_on="torch:cpu")
    index.add(xb)
    assert _recall(index, xb, xq, nprobe=16) > 0.3   # 8-byte codes: coarse, but clearly working


def test_same_seed_gives_the_same_quantiser():
    x = ClusteredVectors(16, 50, seed=0).rows(0, 2000)
    blobs = []
    for _ in range(2):
        index = faiss.index_factory(16, "IVF16,Flat")
        train_index(index, x, seed=11, train_on="cpu")
        blobs.append(faiss.serialize_index(index).tobytes())
    assert blobs[0] == blobs[1]


def test_train_on_choices():
    assert resolve_train_on("cpu") == ("faiss-cpu", "cpu")
    assert resolve_train_on("torch:cpu") == ("torch", "cpu")
    if faiss.get_num_gpus() == 0:
        with pytest.raises(ValueError, match="faiss-gpu"):
            resolve_train_on("faiss-gpu")
    with pytest.raises(ValueError, match="--train-on"):
        resolve_train_on("tpu")


def test_bad_training_input_is_refused_before_training():
    index = faiss.index_factory(16, "IVF64,Flat")
    with pytest.raises(ValueError, match="at least 64 training vectors"):
        train_index(index, np.zeros((10, 16), np.float32))
    x = ClusteredVectors(16, 10, seed=0).rows(0, 500)
    x[123, 4] = np.nan
    with pytest.raises(ValueError, match="training vector 123 holds NaN"):
        train_index(faiss.index_factory(16, "IVF8,Flat"), x)
    with pytest.raises(ValueError, match="16-d"):
        train_index(faiss.index_factory(16, "IVF8,Flat"), np.zeros((100, 8), np.float32))


def _inertia(x, centroids):
    return float(faiss.knn(x, np.ascontiguousarray(centroids, dtype=np.float32), 1)[0].sum())


def test_two_level_centroids_fit_nearly_as_well_as_flat_kmeans():
    x = ClusteredVectors(32, 300, seed=6).rows(0, 20_000)
    two_level = two_level_centroids(x, 256, seed=2)
    flat = faiss.Kmeans(32, 256, niter=10, seed=2)
    flat.train(x)
    assert two_level.shape == (256, 32) and np.isfinite(two_level).all()
    assert len(np.unique(two_level, axis=0)) == 256
    assert _inertia(x, two_level) <= 1.15 * _inertia(x, flat.centroids)


@pytest.mark.parametrize("factory", ["IVF64,Flat", "IVF64,PQ8", "IVF64,SQ8"])
@pytest.mark.parametrize("metric", [faiss.METRIC_L2, faiss.METRIC_INNER_PRODUCT])
def test_two_level_trained_index_is_seeded_and_searches_like_a_flat_trained_one(factory, metric):
    gen = ClusteredVectors(32, 200, seed=4)
    xb, xq = gen.rows(0, 10_000), gen.rows(10_000, 10_200)
    trained = {}
    for kmeans in ("flat", "two-level", "two-level"):
        index = faiss.index_factory(32, factory, metric)
        report = train_index(index, xb[:6000], seed=5, train_on="cpu", kmeans=kmeans)
        assert index.is_trained and report.kmeans == kmeans and report.backend == "faiss-cpu"
        trained.setdefault(kmeans, []).append(index)
    flat, (two_level, again) = trained["flat"][0], trained["two-level"]
    assert faiss.serialize_index(two_level).tobytes() == faiss.serialize_index(again).tobytes()
    # A quantiser of its own, not FAISS's flat k-means under another name.
    centroids = faiss.extract_index_ivf(two_level).quantizer.reconstruct_n(0, 64)
    assert not np.allclose(centroids, faiss.extract_index_ivf(flat).quantizer.reconstruct_n(0, 64))
    recalls = []
    for index in (flat, two_level):
        index.add(xb)
        recalls.append(_recall(index, xb, xq, nprobe=8))
    assert recalls[1] >= recalls[0] - 0.08, recalls


def test_two_level_training_behind_a_pretransform():
    gen = ClusteredVectors(32, 100, seed=2)
    xb, xq = gen.rows(0, 6000), gen.rows(6000, 6100)
    index = faiss.index_factory(32, "PCA16,IVF32,Flat")
    report = train_index(index, xb[:3000], seed=1, train_on="cpu", kmeans="two-level")
    assert report.kmeans == "two-level" and index.is_trained
    index.add(xb)
    assert _recall(index, xb, xq, nprobe=32) > 0.5   # 16 of 32 dimensions kept: exact within them


def test_kmeans_choice():
    assert resolve_kmeans("auto", "faiss-cpu", 8192) == "two-level"
    assert resolve_kmeans("auto", "faiss-cpu", 65536) == "two-level"
    assert resolve_kmeans("auto", "faiss-cpu", 4096) == "flat"
    assert resolve_kmeans("auto", "faiss-gpu", 65536) == "flat"
    assert resolve_kmeans("auto", "torch", 65536) == "flat"
    assert resolve_kmeans("flat", "faiss-cpu", 65536) == "flat"
    assert resolve_kmeans("two-level", "faiss-cpu", 16) == "two-level"
    with pytest.raises(ValueError, match="--kmeans must be one of"):
        check_kmeans("hierarchical")
    with pytest.raises(ValueError, match="trains on the CPU"):
        check_kmeans("two-level", "torch:cuda")
    # No inverted file, no coarse k-means to report.
    report = train_index(faiss.index_factory(16, "PQ4"), ClusteredVectors(16, 10, seed=0).rows(0, 2000), kmeans="auto")
    assert report.kmeans is None
