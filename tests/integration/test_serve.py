"""The Ray Serve query service on the session's local Ray: real HTTP on 127.0.0.1, real FAISS
shards, the index's own model; bad requests, the API key, batching, and killed shard replicas."""

from __future__ import annotations

import asyncio
import base64
import csv
import io
import json
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from raysearch.cli import app as cli_app
from raysearch.index.build import IndexConfig
from raysearch.index.store import IndexStore
from raysearch.search import Searcher
from raysearch.serve.config import ServeConfig
from raysearch.serve.core import ShardQuery

pytestmark = pytest.mark.slow

API_KEY = "test-key-5f2a"
APP = "raysearch-test"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_BODY = 2 * 1024 * 1024
SHARD_TIMEOUT_S = 2.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _images(folder: str) -> list[str]:
    return sorted(os.path.join(d, f) for d, _, files in os.walk(folder) for f in files if f.endswith(".jpg"))


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, build_photo_index) -> str:
    out = str(tmp_path_factory.mktemp("serve") / "index")
    build_photo_index(out, IndexConfig(shards=3))
    assert len(IndexStore(out).shards) == 3
    return out


@pytest.fixture(scope="module")
def service(index_dir, ray_local):
    """The service on a free loopback port; Serve is shut down when the module is done."""
    from ray import serve

    from raysearch.serve.app import service_url, start_service

    config = ServeConfig(
        index_dir, host="127.0.0.1", port=_free_port(), app_name=APP, api_key=API_KEY,
        # Small reservations: the session's Ray has two CPUs.
        ingress_cpus=0.1, embedder_cpus=0.4, embedder_gpus=0, shard_cpus=0.1,
        shard_timeout_s=SHARD_TIMEOUT_S, health_check_period_s=1.0, max_body_bytes=MAX_BODY,
        max_queries=16, max_image_pixels=4_000_000, access_log=False,
        # Long batch windows make batching of concurrent requests certain, not timing luck.
        embed_batch_wait_s=0.05, search_batch_wait_s=0.05,
    )
    start_service(config)
    try:
        yield service_url(config), config
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def http(service):
    url, _ = service
    with httpx.Client(base_url=url, headers=AUTH, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def searcher(index_dir) -> Searcher:
    return Searcher(index_dir)


def _unit_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _ids(hits: list[dict]) -> list[str]:
    return [h["id"] for h in hits]


def _expected(searcher: Searcher, xq: np.ndarray, k: int) -> list[list[tuple[str, str, float]]]:
    result = searcher.search(xq, k)
    image_ids, uris = searcher.lookup(result)
    return [[(image_ids[q, r], uris[q, r], float(result.scores[q, r])) for r in range(k) if result.ids[q, r] >= 0]
            for q in range(len(xq))]


def _assert_same(hits: list[dict], expected: list[tuple[str, str, float]], atol: float = 1e-6) -> None:
    assert [(h["id"], h["uri"]) for h in hits] == [(i, u) for i, u, _ in expected]
    np.testing.assert_allclose([h["score"] for h in hits], [s for _, _, s in expected], atol=atol)
    assert [h["rank"] for h in hits] == list(range(1, len(expected) + 1))


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


def test_image_queries_over_http_match_raysearch_search(http, searcher, photo_folder):
    queries = _images(photo_folder)[::7]
    files = [("images", (os.path.basename(p), open(p, "rb").read(), "image/jpeg")) for p in queries]
    r = http.post("/search", files=files, data={"k": "5"})
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["partial"] is False and doc["missing_shards"] == [] and doc["took_ms"] > 0
    result, problems = searcher.search_images(queries, k=5)
    image_ids, uris = searcher.lookup(result)
    assert problems == [None] * len(queries)
    assert len(doc["results"]) == len(queries)
    for q, hits in enumerate(doc["results"]):
        expected = [(image_ids[q, r], uris[q, r], float(result.scores[q, r])) for r in range(5)]
        # Same model and preprocessing; only the batch the forward pass ran in differs.
        _assert_same(hits, expected, atol=1e-4)
        assert hits[0]["uri"] == queries[q] and hits[0]["score"] > 0.999


def test_single_image_upload_and_base64_answer_one_list(http, photo_folder):
    path = _images(photo_folder)[4]
    data = open(path, "rb").read()
    one = http.post("/search", files={"image": ("q.jpg", data)}, data={"k": "3"}).json()
    assert [h["rank"] for h in one["results"]] == [1, 2, 3] and one["results"][0]["uri"] == path
    b64 = http.post("/search", json={"image_b64": base64.b64encode(data).decode(), "k": 3}).json()
    assert _ids(b64["results"]) == _ids(one["results"])
    listed = http.post("/search", json={"image_b64": [base64.b64encode(data).decode()] * 2, "k": 3}).json()
    assert [_ids(x) for x in listed["results"]] == [_ids(one["results"])] * 2


def test_vector_queries_match_in_process_search_exactly(http, searcher):
    xq = _unit_vectors(5, searcher.dim, seed=1)
    doc = http.post("/search", json={"vector": xq.tolist(), "k": 7}).json()
    for hits, expected in zip(doc["results"], _expected(searcher, xq, 7)):
        _assert_same(hits, expected)
    single = http.post("/search", json={"vector": xq[0].tolist(), "k": 7, "nprobe": 4}).json()
    _assert_same(single["results"], _expected(searcher, xq[:1], 7)[0])
    # k beyond the index size: every vector once, no empty or repeated hits.
    everything = http.post("/search", json={"vector": xq[0].tolist(), "k": 1000}).json()["results"]
    assert len(everything) == 40 and len(set(_ids(everything))) == 40


def test_handles_answer_like_http(service, searcher, index_dir):
    from ray import serve

    xq = _unit_vectors(2, searcher.dim, seed=2)
    ingress = serve.get_app_handle(APP)
    answer = ingress.search_vectors.remote(xq, 4, None).result()
    assert answer.partial is False
    for hits, expected in zip(answer.results, _expected(searcher, xq, 4)):
        _assert_same(hits, expected)
    # One shard on its own answers exactly what FAISS answers on that shard's file.
    shard = serve.get_deployment_handle("ShardSearcher-00002", app_name=APP)
    hits = shard.search.remote(ShardQuery(xq, 4)).result()
    store = IndexStore(index_dir)
    D, I = store.load_shard(2).search(xq, 4)
    np.testing.assert_array_equal(hits.ids, I)
    np.testing.assert_allclose(hits.scores, 1 - D / 2, atol=1e-6)


def test_concurrent_requests_are_batched(service, searcher, photo_folder):
    from ray import serve

    url, _ = service
    xq = _unit_vectors(12, searcher.dim, seed=3)
    expected = _expected(searcher, xq, 5)
    images = [open(p, "rb").read() for p in _images(photo_folder)[:6]]

    async def fire(requests: list[dict]) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=60) as client:
            return await asyncio.gather(*(client.post("/search", **req) for req in requests))

    responses = asyncio.run(fire([{"json": {"vector": v.tolist(), "k": 5}} for v in xq]))
    assert [r.status_code for r in responses] == [200] * len(xq)
    for r, exp in zip(responses, expected):
        _assert_same(r.json()["results"], exp)
    stats = serve.get_deployment_handle("ShardSearcher-00000", app_name=APP).batch_stats.remote().result()
    assert stats["max_batch"] > 1, stats  # several requests went through one FAISS call

    responses = asyncio.run(fire([{"files": {"image": ("q.jpg", data)}} for data in images]))
    assert [r.status_code for r in responses] == [200] * len(images)
    embed_stats = serve.get_deployment_handle("QueryEmbedder", app_name=APP).batch_stats.remote().result()
    assert embed_stats["max_batch"] > 1, embed_stats  # several images in one forward pass


def test_health_and_stats(http, service, index_dir):
    url, _ = service
    health = httpx.get(f"{url}/healthz", timeout=30)  # no API key needed for probes
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "shards": 3, "missing_shards": [], "embedder": True}
    stats = http.get("/stats").json()
    manifest = IndexStore(index_dir).manifest
    assert stats["model"] == "efficientnet_lite0_gem" and stats["dim"] == 1280
    assert stats["count"] == 40 and stats["factory"] == manifest["factory"]
    assert stats["nprobe"] == manifest["search"]["nprobe"]
    assert [s["name"] for s in stats["shards"]] == ["shard-00000", "shard-00001", "shard-00002"]
    assert sum(s["count"] for s in stats["shards"]) == 40
    assert stats["replicas"] == {"ingress": 1, "embedder": 1, "shard": 1}
    schema = httpx.get(f"{url}/openapi.json", timeout=30).json()
    body = schema["paths"]["/search"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(body)


def test_shards_searched_in_the_ingress_answer_like_the_fanned_out_service(service, http, searcher, photo_folder):
    """--shards-in-ingress: a second application on the same Serve, no ShardSearcher deployments."""
    from ray import serve

    from raysearch.serve.app import service_url, start_service

    _, config = service
    local = ServeConfig(
        config.index_dir, host="127.0.0.1", port=config.port, app_name=APP + "-local", route_prefix="/local",
        ingress_cpus=0.1, embedder_cpus=0.2, embedder_gpus=0, shard_cpus=0.1, access_log=False,
        shards_in_ingress=True,
    )
    start_service(local)
    try:
        status = serve.status().applications[local.app_name].deployments
        assert not [name for name in status if name.startswith("ShardSearcher")], list(status)
        with httpx.Client(base_url=service_url(local), timeout=60) as client:
            assert client.get("/healthz").json() == {"status": "ok", "shards": 3, "missing_shards": [], "embedder": True}
            stats = client.get("/stats").json()
            assert stats["shards_in_ingress"] is True and stats["replicas"]["shard"] == 0
            xq = _unit_vectors(4, searcher.dim, seed=5)
            doc = client.post("/search", json={"vector": xq.tolist(), "k": 6}).json()
            assert doc["partial"] is False
            for hits, expected in zip(doc["results"], _expected(searcher, xq, 6)):
                _assert_same(hits, expected)
            fanned = http.post("/search", json={"vector": xq.tolist(), "k": 6, "nprobe": 2}).json()
            assert client.post("/search", json={"vector": xq.tolist(), "k": 6, "nprobe": 2}).json()["results"] == fanned["results"]
            path = _images(photo_folder)[3]
            image = client.post("/search", files={"image": ("q.jpg", open(path, "rb").read())}, data={"k": "3"}).json()
            assert image["results"][0]["uri"] == path

        # Concurrent requests share FAISS calls here too (one per shard), each answer still its own.
        many = _unit_vectors(16, searcher.dim, seed=6)

        async def fire() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=service_url(local), timeout=60) as client:
                return await asyncio.gather(*(client.post("/search", json={"vector": v.tolist(), "k": 4}) for v in many))

        responses = asyncio.run(fire())
        assert [r.status_code for r in responses] == [200] * len(many)
        for r, exp in zip(responses, _expected(searcher, many, 4)):
            _assert_same(r.json()["results"], exp)
        stats = serve.get_deployment_handle("Ingress", app_name=local.app_name).batch_stats.remote().result()
        assert stats["max_batch"] > 1, stats
    finally:
        serve.delete(local.app_name)


def test_direct_ingress_on_a_cluster_without_it_is_refused_and_removed(service):
    """The session's Ray was started without RAY_SERVE_ENABLE_DIRECT_INGRESS: asking for direct
    ingress there says how to get it and leaves no half-working application behind."""
    from ray import serve

    from raysearch.serve.app import start_service

    _, config = service
    direct = ServeConfig(
        config.index_dir, host="127.0.0.1", port=config.port, app_name=APP + "-direct", route_prefix="/direct",
        ingress_cpus=0.1, embedder_cpus=0.2, embedder_gpus=0, shard_cpus=0.1, access_log=False,
        shards_in_ingress=True,
    )
    with pytest.raises(ValueError, match="RAY_SERVE_ENABLE_DIRECT_INGRESS=1"):
        start_service(direct, direct_ingress=True)
    assert direct.app_name not in serve.status().applications


# ---------------------------------------------------------------------------------------------
# Bad requests and the API key
# ---------------------------------------------------------------------------------------------


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (40, 90, 160)).save(buf, format="PNG")
    return buf.getvalue()


def _truncated_jpeg(photo_folder: str) -> bytes:
    data = open(_images(photo_folder)[0], "rb").read()
    return data[: len(data) // 3]


def _chunks(n: int):
    for _ in range(n):
        yield b"0" * 65536


BAD_REQUESTS = {
    "not an image": (lambda pf: {"files": {"image": ("notes.jpg", b"these are words, not pixels")}},
                     400, "not an image"),
    "corrupt image": (lambda pf: {"files": {"image": ("cut.jpg", _truncated_jpeg(pf))}}, 400, "truncated image"),
    "empty file": (lambda pf: {"files": {"image": ("empty.jpg", b"")}}, 400, "empty file"),
    "too many pixels": (lambda pf: {"files": {"image": ("big.png", _png(2500, 2000))}}, 400, "image too large"),
    "wrong vector length": (lambda pf: {"json": {"vector": [0.1, 0.2, 0.3]}}, 422, "(n, 1280)"),
    "k zero": (lambda pf: {"json": {"vector": [0.03] * 1280, "k": 0}}, 422, "k must be between 1 and 1000, got 0"),
    "k too large": (lambda pf: {"files": {"image": ("q.jpg", open(_images(pf)[0], "rb").read())},
                                "data": {"k": "1001"}}, 422, "k must be between 1 and 1000, got 1001"),
    "body over the limit": (lambda pf: {"files": {"image": ("big.jpg", b"\xff" * (MAX_BODY + 1))}},
                            413, "larger than the limit"),
    "chunked body over the limit": (lambda pf: {"content": _chunks(MAX_BODY // 65536 + 2),
                                                "headers": {"content-type": "application/json"}},
                                    413, "larger than the limit"),
    "unknown JSON field": (lambda pf: {"json": {"vector": [0.03] * 1280, "uri": "/etc/passwd"}}, 422, "unknown field 'uri'"),
    "unknown form field": (lambda pf: {"files": {"image": ("q.jpg", open(_images(pf)[0], "rb").read())},
                                       "data": {"path": "/etc/passwd"}}, 422, "unknown field 'path'"),
    "unknown query parameter": (lambda pf: {"json": {"vector": [0.03] * 1280}, "params": {"url": "http://x"}},
                                422, "unknown query parameter"),
    "invalid JSON": (lambda pf: {"content": b"{\"vector\": [1,", "headers": {"content-type": "application/json"}},
                     400, "not valid JSON"),
    "wrong content type": (lambda pf: {"content": b"hello", "headers": {"content-type": "text/plain"}},
                           415, "unsupported Content-Type"),
    "too many queries": (lambda pf: {"json": {"vector": [[0.03] * 1280] * 17}}, 422, "at most 16 queries"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_gets_its_status_and_message_and_service_keeps_serving(case, http, photo_folder, searcher):
    make, status, message = BAD_REQUESTS[case]
    r = http.post("/search", **make(photo_folder))
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert message in r.json()["error"]
    xq = _unit_vectors(1, searcher.dim, seed=4)
    ok = http.post("/search", json={"vector": xq[0].tolist(), "k": 3})
    assert ok.status_code == 200
    _assert_same(ok.json()["results"], _expected(searcher, xq, 3)[0])


def test_api_key_is_enforced(service):
    url, _ = service
    body = {"vector": [0.03] * 1280, "k": 1}
    missing = httpx.post(f"{url}/search", json=body, timeout=30)
    assert missing.status_code == 401 and "missing API key" in missing.json()["error"]
    assert missing.headers["www-authenticate"] == "Bearer"
    wrong = httpx.post(f"{url}/search", json=body, headers={"Authorization": "Bearer not-it"}, timeout=30)
    assert wrong.status_code == 401 and wrong.json()["error"] == "invalid API key"
    assert httpx.get(f"{url}/stats", timeout=30).status_code == 401
    assert httpx.post(f"{url}/search", json=body, headers=AUTH, timeout=30).status_code == 200


# ---------------------------------------------------------------------------------------------
# The command-line client against the running service
# ---------------------------------------------------------------------------------------------


def _csv(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text)))


def test_cli_query_prints_what_cli_search_prints(service, index_dir, photo_folder, tmp_path):
    url, _ = service
    queries = _images(photo_folder)[1:4]
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a picture")
    runner = CliRunner()
    local = runner.invoke(cli_app, ["search", index_dir, *queries, "-k", "4", "--format", "csv"])
    remote = runner.invoke(cli_app, ["query", url, *queries, str(bad), "-k", "4", "--format", "csv",
                                     "--api-key", API_KEY])
    assert local.exit_code == 0, local.output
    assert remote.exit_code == 1, remote.output  # one query failed: the rows print, the exit says so
    local_rows, remote_rows = _csv(local.stdout), _csv(remote.stdout)
    assert remote_rows[0] == ["query", "rank", "id", "uri", "score"] == local_rows[0]
    assert [r[:4] for r in remote_rows[1:13]] == [r[:4] for r in local_rows[1:]]
    np.testing.assert_allclose([float(r[4]) for r in remote_rows[1:13]], [float(r[4]) for r in local_rows[1:]],
                               atol=1e-4)
    assert len(remote_rows) == 13                       # the failed query has no row: stderr names it
    assert str(bad) in remote.stderr and "not an image" in remote.stderr

    as_json = runner.invoke(cli_app, ["query", url, queries[0], str(bad), "-k", "2", "--format", "json"],
                            env={"RAYSEARCH_API_KEY": API_KEY})
    doc = json.loads(as_json.stdout)
    assert doc[0]["query"] == queries[0] and len(doc[0]["results"]) == 2
    assert doc[1]["query"] == str(bad) and "not an image" in doc[1]["error"]

    no_key = runner.invoke(cli_app, ["query", url, queries[0]], env={"RAYSEARCH_API_KEY": ""})
    assert no_key.exit_code == 2 and "401" in no_key.output


def test_serve_config_file_builds_the_app(index_dir):
    """cluster/serve_config.yaml is a valid Serve config whose args build this application."""
    from ray.serve import Application
    from ray.serve.schema import ServeDeploySchema

    from raysearch.serve.app import app_builder

    path = os.path.join(os.path.dirname(__file__), "..", "..", "cluster", "serve_config.yaml")
    doc = yaml.safe_load(open(path))
    schema = ServeDeploySchema.model_validate(doc)
    app_schema = schema.applications[0]
    assert app_schema.import_path == "raysearch.serve.app:app_builder"
    args = dict(app_schema.args, index_dir=index_dir)
    assert isinstance(app_builder(args), Application)
    with pytest.raises(ValueError, match="unknown raysearch serve settings"):
        app_builder({**args, "shards_replicas": 2})


# ---------------------------------------------------------------------------------------------
# Faults: a killed ShardSearcher replica (these run last: they disturb the service)
# ---------------------------------------------------------------------------------------------


def _replica_names(deployment: str) -> list[str]:
    import ray

    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["namespace"] == "serve" and a["name"].startswith("SERVE_REPLICA::")
                  and f"#{deployment}#" in a["name"])


def _kill_replicas(deployments: list[str]) -> list[str]:
    """Kill every replica of these deployments and wait until Ray reports them gone."""
    import ray

    names = [n for d in deployments for n in _replica_names(d)]
    assert len(names) == len(deployments)
    for name in names:
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    deadline = time.monotonic() + 30
    while set(names) & {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}:
        assert time.monotonic() < deadline, "killed replicas still listed"
        time.sleep(0.05)
    return names


def _wait_until_healthy(url: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if httpx.get(f"{url}/healthz", timeout=30).status_code == 200:
            return
        time.sleep(0.5)
    raise AssertionError(f"service not healthy again after {timeout_s} s")


def test_killed_shard_replica_gives_partial_answers_then_is_restarted(service, http, index_dir):
    url, _ = service
    xq = _unit_vectors(2, 1280, seed=5)
    body = {"vector": xq.tolist(), "k": 40}
    before = http.post("/search", json=body).json()
    assert before["partial"] is False and all(len(hits) == 40 for hits in before["results"])
    shard1_ids = set(IndexStore(index_dir).load_ids(1).image_ids.to_pylist())

    old = _kill_replicas(["ShardSearcher-00001"])
    # The replacement needs a new process, imports and the shard load (seconds), longer than the
    # shard timeout: these answers are given while shard 1 is gone.
    with ThreadPoolExecutor(2) as pool:
        during_f = pool.submit(http.post, "/search", json=body)
        health_f = pool.submit(httpx.get, f"{url}/healthz", timeout=30)
        during, health = during_f.result(), health_f.result()
    assert during.status_code == 200
    doc = during.json()
    assert doc["partial"] is True and doc["missing_shards"] == ["shard-00001"]
    for hits, full in zip(doc["results"], before["results"]):
        # Exactly the other shards' vectors, in the order of the full answer: never padded, never
        # passed off as complete.
        assert _ids(hits) == [i for i in _ids(full) if i not in shard1_ids]
    assert health.status_code == 503
    assert health.json()["missing_shards"] == ["shard-00001"]

    _wait_until_healthy(url)
    new = _replica_names("ShardSearcher-00001")
    assert len(new) == 1 and new != old  # Serve started a new replica
    after = http.post("/search", json=body).json()
    assert after["partial"] is False and after["missing_shards"] == []
    assert after["results"] == before["results"]


def test_no_shard_answering_gives_503_then_recovers(service, http):
    url, _ = service
    body = {"vector": _unit_vectors(1, 1280, seed=6)[0].tolist(), "k": 5}
    before = http.post("/search", json=body).json()
    _kill_replicas([f"ShardSearcher-{i:05d}" for i in range(3)])
    r = http.post("/search", json=body)
    assert r.status_code == 503
    doc = r.json()
    assert "no shard answered" in doc["error"]
    assert doc["missing_shards"] == ["shard-00000", "shard-00001", "shard-00002"]
    _wait_until_healthy(url)
    after = http.post("/search", json=body).json()
    assert after["partial"] is False and after["results"] == before["results"]
