"""Choosing the FAISS index: the progression with size and budget, across embedding dimensions."""

from __future__ import annotations

import math

import faiss
import pytest

from raysearch.index import factory as fac


def test_parse_memory_units():
    assert fac.parse_memory("4G") == 4 << 30
    assert fac.parse_memory("512M") == 512 << 20
    assert fac.parse_memory("1.5GiB") == int(1.5 * (1 << 30))
    assert fac.parse_memory("1000000") == 1_000_000
    with pytest.raises(ValueError, match="--max-index-memory"):
        fac.parse_memory("lots")


def test_small_collections_are_searched_exactly():
    choice = fac.choose_factory(5_000, 1280, "4G")
    assert choice.factory == "Flat"
    assert choice.estimated_bytes == 5_000 * 1280 * 4


@pytest.mark.parametrize("n", [150_000, 500_000, 1_000_000])
def test_ivf_flat_with_nlist_near_4_sqrt_n(n):
    choice = fac.choose_factory(n, 256, "4G")
    nlist = fac.parse_nlist(choice.factory)
    assert choice.factory == f"IVF{nlist},Flat"
    assert nlist & (nlist - 1) == 0  # a power of two
    assert 4 * math.sqrt(n) / math.sqrt(2) <= nlist <= 4 * math.sqrt(n) * math.sqrt(2)
    assert "nlist" in choice.reason


def test_budget_moves_from_full_vectors_to_scalar_then_product_codes():
    n, d = 2_000_000, 1280
    flat = fac.choose_factory(n, d, "16G")
    sq8 = fac.choose_factory(n, d, "4G")
    pq = fac.choose_factory(n, d, "1G")
    assert flat.factory.endswith(",Flat")
    assert sq8.factory.endswith(",SQ8")
    assert ",PQ" in pq.factory and pq.factory.startswith("OPQ")
    for choice, budget in ((flat, "16G"), (sq8, "4G"), (pq, "1G")):
        assert choice.estimated_bytes <= fac.parse_memory(budget)
    # A smaller budget gives smaller codes.
    tight = fac.choose_factory(n, d, "300M")
    m_loose = fac.find_pq(faiss.index_factory(d, pq.factory)).M
    m_tight = fac.find_pq(faiss.index_factory(d, tight.factory)).M
    assert m_tight < m_loose


def test_fast_scan_codes_for_large_collections():
    small = fac.choose_factory(3_000_000, 256, "256M")
    large = fac.choose_factory(fac.FASTSCAN_MIN_VECTORS * 2, 256, "1G")
    assert "x4fs" not in small.factory
    assert "x4fsr" in large.factory
    index = faiss.index_factory(256, large.factory)
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    assert isinstance(ivf, faiss.IndexIVFPQFastScan)
    assert ivf.by_residual


@pytest.mark.parametrize("d", [256, 384, 512, 768, 1280, 2048])
@pytest.mark.parametrize("n,budget", [(50_000, "4G"), (800_000, "4G"), (3_000_000, "2G"), (20_000_000, "2G"), (200_000_000, "16G")])
def test_every_auto_choice_is_a_valid_index_within_budget(d, n, budget):
    choice = fac.choose_factory(n, d, budget)
    index = faiss.index_factory(d, choice.factory)
    assert index.d == d
    assert choice.estimated_bytes <= fac.parse_memory(budget)
    nlist = fac.parse_nlist(choice.factory)
    if nlist:
        # Every centroid gets enough points from the (bounded) training sample.
        assert nlist * fac.MIN_POINTS_PER_CENTROID <= min(n, fac.max_train_vectors(d))
        assert fac.training_size(index, n) >= fac.min_training_vectors(index)
    pre = fac.pretransform(index)
    if pre is not None:
        # OPQ keeps a multiple of the sub-quantisers and never more dims than the vectors have.
        d_out = pre.chain.at(0).d_out
        assert d_out <= d and d_out % fac.find_pq(index).M == 0


def test_budget_too_small_is_refused_with_the_numbers():
    with pytest.raises(ValueError, match="--max-index-memory"):
        fac.choose_factory(100_000_000, 256, "100M")


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError):
        fac.choose_factory(0, 256)


def test_nlist_is_bounded_by_the_training_sample():
    max_train = fac.max_train_vectors(2048)
    nlist = fac.nlist_for(500_000_000, max_train)
    assert nlist * fac.MIN_POINTS_PER_CENTROID <= max_train
    assert fac.nlist_for(10) == 1


def test_training_needs():
    index = faiss.index_factory(64, "IVF256,PQ8")
    assert fac.min_training_vectors(index) == 256
    assert fac.training_size(index, 10_000_000) == 256 * fac.TRAIN_POINTS_PER_CENTROID
    assert fac.training_size(index, 1000) == 1000
    fs = faiss.index_factory(64, "OPQ16_64,IVF64,PQ16x4fsr")
    assert fac.min_training_vectors(fs) == 64
    assert fac.find_pq(fs).nbits == 4
