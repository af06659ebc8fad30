"""Training: seeded FAISS training, the torch k-means path (run here on the CPU), input checks."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from raysearch.index.synthetic import ClusteredVectors
from raysearch.index.train import kmeans_torch, resolve_train_on, train_index


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
