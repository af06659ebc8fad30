"""Shard builders spread over the nodes of a multi-node Ray cluster (ray.cluster_utils.Cluster)."""

from __future__ import annotations

import os

import faiss
import numpy as np
import pytest

from raysearch.index.build import IndexConfig, build_index
from raysearch.formats.embeddings import write_embeddings
from raysearch.search import Searcher

pytestmark = pytest.mark.slow


@pytest.fixture()
def three_node_cluster():
    """A head and two workers, one CPU each; the session's Ray is restored afterwards."""
    import ray
    from ray.cluster_utils import Cluster

    from raysearch.runtime import ensure_ray

    had_session_ray = ray.is_initialized()
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    # Cluster records its address as "the current cluster" for every ray.init() on this machine;
    # drop that record so other Ray users (and test sessions) do not join this test's cluster.
    from ray._private.utils import get_ray_address_file

    address_file = get_ray_address_file(None)
    if os.path.exists(address_file) and open(address_file).read().strip() == cluster.address:
        os.remove(address_file)
    try:
        ensure_ray(cluster.address)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        if had_session_ray:
            ensure_ray(num_cpus=2)


@pytest.mark.parametrize("keep", [None, True])
def test_shards_are_built_on_more_than_one_node(three_node_cluster, tmp_path, keep):
    import ray

    x = np.random.default_rng(11).standard_normal((2450, 16)).astype(np.float32)
    xb, xq = x[:2400], x[2400:]
    folder = str(tmp_path / "emb")
    write_embeddings(folder, xb, part_rows=300)
    node_ids = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(node_ids) == 3

    out = str(tmp_path / "index")
    # Small shares are read twice by Ray tasks; keep_vectors=True makes the builders actors.
    manifest = build_index(folder, out, IndexConfig(factory="IVF8,Flat", shards=3, target_recall=0.9, keep_vectors=keep))
    assert manifest["build"]["vectors_kept_between_passes"] is (keep is True)
    tasks = manifest["build"]["shard_tasks"]
    used = {t["node_id"] for t in tasks}
    assert len(tasks) == 3 and all(t["ntotal"] == 800 for t in tasks)
    assert used <= node_ids
    assert len(used) > 1, f"all shards were built on one node: {tasks}"
    assert manifest["build"]["cpus_per_task"] == 1
    assert manifest["search"]["tuned"]

    single = faiss.read_index(os.path.join(out, "trained.index"))
    single.add_with_ids(xb, np.arange(len(xb), dtype=np.int64))
    single.nprobe = 3
    D0, I0 = single.search(xq, 10)
    res = Searcher(out).search(xq, 10, nprobe=3)
    np.testing.assert_array_equal(res.ids, I0)
    np.testing.assert_array_equal(res.scores, (1.0 - D0 / 2.0).astype(np.float32))
