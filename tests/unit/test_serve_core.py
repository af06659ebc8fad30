"""The query service's pure parts: batched shard search, exact merge, resource plan, config."""

from __future__ import annotations

import faiss
import numpy as np
import pyarrow as pa
import pytest

from raysearch.index.store import IdMap
from raysearch.index.fanout import distances_to_scores, set_search_params
from raysearch.serve.config import ServeConfig
from raysearch.serve.core import (
    NoShardAnswered,
    ShardQuery,
    hits_to_json,
    merge_shard_hits,
    plan_resources,
    search_shard,
    shard_label,
)

D = 16


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(7)
    xb = _unit(rng.standard_normal((600, D)))
    xq = _unit(rng.standard_normal((9, D)))
    return xb, xq


def _id_map(ids: np.ndarray) -> IdMap:
    return IdMap(pa.table({
        "id": pa.array(ids, pa.int64()),
        "image_id": pa.array([f"img/{i}" for i in ids]),
        "uri": pa.array([f"s3://b/img/{i}.jpg" for i in ids]),
    }))


def _flat_shard(xb: np.ndarray, ids: np.ndarray) -> faiss.Index:
    index = faiss.IndexIDMap(faiss.IndexFlatL2(D))
    index.add_with_ids(xb, ids)
    return index


def search_index(index, xq, k, nprobe, metric):
    """One shard searched directly with FAISS: (scores, ids)."""
    set_search_params(index, nprobe)
    D, I = index.search(np.ascontiguousarray(xq, dtype=np.float32), k)
    return distances_to_scores(D, metric), I


def test_batched_shard_search_equals_one_search_per_request(data):
    xb, xq = data
    quantizer = faiss.IndexFlatL2(D)
    index = faiss.IndexIVFFlat(quantizer, D, 8)
    index.train(xb)
    ids = np.arange(1000, 1000 + len(xb), dtype=np.int64)
    index.add_with_ids(xb, ids)
    id_map = _id_map(ids)
    queries = [ShardQuery(xq[0:2], 3), ShardQuery(xq[2:5], 7), ShardQuery(xq[5:6], 4, nprobe=8),
               ShardQuery(xq[6:9], 2, nprobe=1)]
    hits = search_shard(index, id_map, queries, "l2", default_nprobe=2)
    for q, h in zip(queries, hits):
        scores, expect = search_index(index, q.xq, q.k, q.nprobe or 2, "l2")
        assert h.ids.shape == (q.xq.shape[0], q.k)
        np.testing.assert_array_equal(h.ids, expect)
        np.testing.assert_allclose(h.scores, scores, rtol=1e-6)
        assert h.image_ids[0, 0] == f"img/{expect[0, 0]}"
        assert h.uris[0, 0] == f"s3://b/img/{expect[0, 0]}.jpg"
    # nprobe matters on this index: the request with nprobe=1 must not have been searched at 2.
    _, at_default = search_index(index, xq[6:9], 2, 2, "l2")
    _, at_one = search_index(index, xq[6:9], 2, 1, "l2")
    if not np.array_equal(at_default, at_one):
        assert np.array_equal(hits[3].ids, at_one)


def test_merge_of_shards_is_the_exact_top_k(data):
    xb, xq = data
    ids = np.arange(len(xb), dtype=np.int64) * 3 + 5  # ids are listing rows, not positions
    parts = np.array_split(np.arange(len(xb)), 3)
    shards = [(_flat_shard(xb[p], ids[p]), _id_map(ids[p])) for p in parts]
    k = 10
    hits = [search_shard(index, id_map, [ShardQuery(xq, k)], "l2", None)[0] for index, id_map in shards]
    merged = merge_shard_hits(hits, k)

    whole = faiss.IndexFlatL2(D)
    whole.add(xb)
    D_ref, I_ref = whole.search(xq, k)
    np.testing.assert_array_equal(merged.ids, ids[I_ref])
    np.testing.assert_allclose(merged.scores, 1 - D_ref / 2, rtol=1e-5, atol=1e-6)
    assert merged.image_ids[3, 0] == f"img/{ids[I_ref[3, 0]]}"
    assert merged.uris[3, 4] == f"s3://b/img/{ids[I_ref[3, 4]]}.jpg"

    # Shard 1 missing: the exact top-k over shards 0 and 2, never padded with shard 1's vectors.
    partial = merge_shard_hits([hits[0], None, hits[2]], k)
    rest = np.concatenate([parts[0], parts[2]])
    sub = faiss.IndexFlatL2(D)
    sub.add(xb[rest])
    _, I_sub = sub.search(xq, k)
    np.testing.assert_array_equal(partial.ids, ids[rest][I_sub])
    assert not np.isin(partial.ids, ids[parts[1]]).any()

    with pytest.raises(NoShardAnswered):
        merge_shard_hits([None, None, None], k)


def test_fewer_vectors_than_k_leaves_no_empty_hits(data):
    xb, xq = data
    ids = np.arange(4, dtype=np.int64)
    hits = [search_shard(_flat_shard(xb[:2], ids[:2]), _id_map(ids[:2]), [ShardQuery(xq[:1], 5)], "l2", None)[0],
            search_shard(_flat_shard(xb[2:4], ids[2:4]), _id_map(ids[2:4]), [ShardQuery(xq[:1], 5)], "l2", None)[0]]
    merged = merge_shard_hits(hits, 5)
    assert (merged.ids[0, :4] >= 0).all() and merged.ids[0, 4] == -1
    assert np.isnan(merged.scores[0, 4])
    rows = hits_to_json(merged)
    assert [h["rank"] for h in rows[0]] == [1, 2, 3, 4]
    assert sorted(h["id"] for h in rows[0]) == ["img/0", "img/1", "img/2", "img/3"]
    scores = [h["score"] for h in rows[0]]
    assert scores == sorted(scores, reverse=True)


def test_resources_fit_a_two_core_laptop():
    plan = plan_resources(n_shards=3, replicas=1, shard_replicas=1, cluster_cpus=2, cluster_gpus=0)
    total = plan.ingress_cpus + plan.embedder_cpus + 3 * plan.shard_cpus
    assert total <= 2.0
    assert plan.embedder_gpus == 0 and plan.shard_cpus > 0 and plan.ingress_cpus > 0
    assert plan.embed_threads >= 1 and plan.search_threads >= 1


def test_local_verifiers_are_sized_with_the_rest_of_the_service():
    """--rerank local on two cores: the LocalVerifier replicas must fit beside the ingress, the
    embedder and the shards (reserving a whole CPU each would leave a replica unplaceable)."""
    plan = plan_resources(n_shards=1, replicas=1, shard_replicas=1, cluster_cpus=2, cluster_gpus=0, verifiers=2)
    total = plan.ingress_cpus + plan.embedder_cpus + plan.shard_cpus + 2 * plan.verifier_cpus
    assert total <= 2.0 and plan.verifier_cpus > 0
    roomy = plan_resources(n_shards=1, replicas=1, shard_replicas=1, cluster_cpus=16, cluster_gpus=0, verifiers=2)
    assert roomy.verifier_cpus == 1.0
    assert plan_resources(n_shards=1, replicas=1, shard_replicas=1, cluster_cpus=2, cluster_gpus=0).verifier_cpus == 0.0


def test_resources_on_a_large_cluster_and_explicit_values():
    plan = plan_resources(n_shards=4, replicas=2, shard_replicas=2, cluster_cpus=64, cluster_gpus=4)
    assert (plan.ingress_cpus, plan.embedder_cpus, plan.shard_cpus, plan.embedder_gpus) == (0.5, 1.0, 1.0, 1.0)
    shared = plan_resources(n_shards=1, replicas=2, shard_replicas=1, cluster_cpus=64, cluster_gpus=1)
    assert shared.embedder_gpus == 0.5  # two replicas share the one GPU
    fixed = plan_resources(n_shards=3, replicas=1, shard_replicas=1, cluster_cpus=2, cluster_gpus=0,
                           shard_cpus=0.2, search_threads=3)
    assert fixed.shard_cpus == 0.2 and fixed.search_threads == 3
    assert fixed.ingress_cpus + fixed.embedder_cpus <= 2 - 0.6 + 1e-9


def test_ingress_replicas_that_search_the_shards_each_reserve_a_search_share():
    """--shards-in-ingress --replicas 2 on two cores: every Ingress replica opens the shards and
    reserves a searcher's share, so all of them (and the embedders) must fit together; counting
    that share once left the second replica waiting for CPUs forever."""
    from raysearch.serve.app import plan_for

    for replicas in (1, 2, 3):
        config = ServeConfig("idx", shards_in_ingress=True, replicas=replicas)
        plan = plan_for(config, n_shards=3, cluster_cpus=2, cluster_gpus=0)
        per_ingress = plan.ingress_cpus + plan.shard_cpus
        assert replicas * (per_ingress + plan.embedder_cpus) <= 2.0 + 1e-9, (replicas, plan)
        assert plan.shard_cpus > 0 and plan.ingress_cpus > 0
    fanned = plan_for(ServeConfig("idx", replicas=2, shard_replicas=2), n_shards=3, cluster_cpus=2, cluster_gpus=0)
    assert 2 * (fanned.ingress_cpus + fanned.embedder_cpus) + 3 * 2 * fanned.shard_cpus <= 2.0 + 1e-9


def test_serve_config_checks_and_args(monkeypatch):
    with pytest.raises(ValueError, match="--port"):
        ServeConfig("idx", port=0)
    with pytest.raises(ValueError, match="--shard-replicas"):
        ServeConfig("idx", shard_replicas=0)
    with pytest.raises(ValueError, match="unknown raysearch serve settings"):
        ServeConfig.from_args({"index_dir": "idx", "prot": 1})
    monkeypatch.setenv("RAYSEARCH_API_KEY", "from-env")
    cfg = ServeConfig.from_args({"index_dir": "idx", "shard_replicas": 2})
    assert cfg.api_key == "from-env" and cfg.shard_replicas == 2
    assert "from-env" not in repr(cfg)  # the key never shows in logs of the config


def test_serve_config_rerank_mirror_is_a_checked_choice():
    assert ServeConfig("idx", rerank="local").rerank_mirror == "fallback"
    assert ServeConfig("idx", rerank="local", rerank_mirror="always").rerank_mirror == "always"
    # A config file's `rerank_mirror: off` reaches us as False (YAML), the former switch as a bool.
    assert ServeConfig.from_args({"index_dir": "idx", "rerank_mirror": False}).rerank_mirror == "off"
    assert ServeConfig.from_args({"index_dir": "idx", "rerank_mirror": True}).rerank_mirror == "always"
    with pytest.raises(ValueError, match="--rerank-mirror must be one of 'off', 'fallback', 'always', got 'both'"):
        ServeConfig("idx", rerank="local", rerank_mirror="both")


def test_shard_label():
    assert shard_label("shards/shard-00001.index") == "shard-00001"


def test_client_knows_the_service_limit_on_k():
    from raysearch.search import MAX_K
    from raysearch.serve.client import MAX_K as CLIENT_MAX_K

    assert CLIENT_MAX_K == MAX_K
