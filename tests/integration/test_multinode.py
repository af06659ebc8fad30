"""Job entrypoints on a multi-node Ray cluster (`ray.cluster_utils.Cluster`: a head that takes no
work and two worker nodes): the work spreads over the nodes, and a build survives losing a worker
node with every image embedded exactly once."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

from raysearch.builder import build
from raysearch.embed import EmbedConfig
from raysearch.formats.embeddings import list_parts, read_rows_column
from raysearch.index.build import IndexConfig
from raysearch.models.spec import ModelConfig
from raysearch.search import Searcher
from raysearch.datasets.replicas import write_disc21_replica

pytestmark = pytest.mark.slow

WORKER_CPUS = 3   # an Embedder actor, its replacement after a node loss, and a decode task


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    from raysearch.runtime import ensure_ray

    ray.shutdown()    # the session's local Ray, if any: this module needs its own cluster
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 150 << 20})
    workers = [c.add_node(num_cpus=WORKER_CPUS, object_store_memory=150 << 20) for _ in range(2)]
    c.wait_for_nodes()
    ray.init(address=c.address, runtime_env={"env_vars": {k: v for k, v in os.environ.items() if k.startswith("AWS_")}})
    try:
        yield c, workers
    finally:
        ray.shutdown()
        c.shutdown()
        ensure_ray(num_cpus=2)    # later tests share a local Ray again


def test_disc21_job_from_s3_spreads_over_the_worker_nodes(cluster, tmp_path, s3_bucket, monkeypatch):
    import ray

    from jobs import disc21
    from tests.integration.test_layout_jobs import upload

    c, workers = cluster
    worker_ids = {w.node_id for w in workers}
    # More references than one decode task takes (64), so that there is work for both nodes.
    rep = write_disc21_replica(str(tmp_path / "disc21"), n_references=150, n_dev_queries=8, n_test_queries=2, n_train=2)
    n_refs = len(rep.reference_ids)
    assert n_refs > 128
    root = f"s3://{s3_bucket}/disc21"
    upload(rep.root, root)
    monkeypatch.setenv("RAYSEARCH_CACHE", str(tmp_path / "cache"))
    # Ray Data hands blocks to the first model actor that is ready, and one actor can embed all 150
    # small images before the other has started: both are up before the first block here.
    import ray.data

    monkeypatch.setattr(ray.data.DataContext.get_current(), "wait_for_min_actors_s", 120)
    out = f"s3://{s3_bucket}/runs/disc21"
    doc = disc21.main(["--root", root, "--out", out, "--input-size", "64", "--concurrency", "2", "--batch-size", "8",
                       "--no-activate"])
    assert doc["status"] == "done"
    assert doc["cluster"]["nodes"] == 3 and doc["cluster"]["cpus"] == 2 * WORKER_CPUS
    build_stage = doc["stages"]["build"]
    assert build_stage["n_embedded"] == n_refs
    nodes = build_stage["nodes"]
    # Both worker nodes decoded and embedded images; the head (no CPUs) did neither.
    assert set(nodes["decode"]) == worker_ids, nodes
    assert set(nodes["embed"]) == worker_ids, nodes
    assert sum(nodes["embed"].values()) == n_refs
    assert doc["stages"]["eval_dev"]["n_queries"] == 8
    assert ray.is_initialized()


def test_build_survives_losing_a_worker_node_and_embeds_every_image_once(cluster, tmp_path):
    from raysearch.samples import write_reference_set

    c, workers = cluster
    folder = str(tmp_path / "photos")
    n = 320
    write_reference_set(folder, n, seed=3)
    out = str(tmp_path / "index")
    parts_dir = os.path.join(out, "embeddings", "parts")
    config = EmbedConfig(model=ModelConfig(input_size=64), batch_size=8, concurrency=2, chunk_rows=64,
                         part_rows=8, progress=False)
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = build(folder, out, config, IndexConfig(factory="Flat"))
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            outcome["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.time() + 240
    # Wait for the first complete part (atomic writes leave hidden temporary files before it).
    while time.time() < deadline and not (os.path.isdir(parts_dir) and list_parts(os.path.join(out, "embeddings"))):
        time.sleep(0.05)
    done_before = len(read_rows_column(list_parts(os.path.join(out, "embeddings"))))
    victim = workers[1]
    c.remove_node(victim, allow_graceful=False)   # as a spot instance disappears
    thread.join(timeout=400)
    assert not thread.is_alive(), "the build did not finish after the node loss"
    assert "error" not in outcome, repr(outcome.get("error"))
    assert 0 < done_before < n, f"the node was removed after {done_before} of {n} images, not mid-build"

    result = outcome["result"]
    assert result.embed.n_embedded == n and result.embed.n_errors == 0
    rows = np.sort(read_rows_column(list_parts(os.path.join(out, "embeddings"))))
    assert rows.tolist() == list(range(n))            # every image exactly once
    assert result.manifest["n_vectors"] == n
    searcher = Searcher(out)
    assert searcher.store.ntotal == n
    # The surviving node did work; the lost one may have written parts before it went.
    assert workers[0].node_id in result.embed.nodes["embed"]
