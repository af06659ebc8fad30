"""`raysearch serve` as users run it: a separate process with its own local Ray, serving until
interrupted; the API key from $RAYSEARCH_API_KEY; Ctrl-C (SIGINT) shuts Serve down cleanly."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

from raysearch.formats.embeddings import write_embeddings
from raysearch.index.build import IndexConfig, build_index
from raysearch.models.registry import ModelConfig, resolve_model
from raysearch.search import Searcher

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KEY = "cli-key-93b1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def vector_index(tmp_path_factory, ray_local) -> str:
    """2 shards of 600 seeded unit vectors of the default model's dimension (no images needed)."""
    root = tmp_path_factory.mktemp("serve-cli")
    spec = resolve_model(ModelConfig())
    x = np.random.default_rng(11).standard_normal((600, spec.dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    write_embeddings(str(root / "index" / "embeddings"), x, spec, part_rows=250)
    build_index(str(root / "index" / "embeddings"), str(root / "index"), IndexConfig(factory="IVF8,Flat", shards=2))
    return str(root / "index")


def _wait_until_serving(log_path, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    """Until the command says it is serving (it prints that once every replica is up)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        output = open(log_path).read()
        assert proc.poll() is None, f"raysearch serve exited early:\n{output}"
        if "serving " in output:
            return
        time.sleep(0.5)
    raise AssertionError("raysearch serve did not start")


class _ServeCommand:
    """`raysearch serve ARGS` in a process of its own (with its own local Ray, the API key from
    $RAYSEARCH_API_KEY), once it says it is serving. Leaving the block sends Ctrl-C (SIGINT) and
    keeps the exit code (`rc`) and the whole output (`output`)."""

    def __init__(self, args: list[str], tmp_path):
        self.args = args
        self.log_path = tmp_path / "serve.log"

    def __enter__(self) -> "_ServeCommand":
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(PYTHONPATH=REPO, RAYSEARCH_API_KEY=KEY)
        self.log = open(self.log_path, "w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "raysearch", "serve", *self.args], cwd=REPO, env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT, text=True)
        try:
            _wait_until_serving(self.log_path, self.proc)
        except BaseException:
            self.__exit__()
            raise
        return self

    def printed(self) -> str:
        return open(self.log_path).read()

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.rc = self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        self.log.seek(0)
        self.output = self.log.read()
        self.log.close()


def test_serve_command_serves_until_interrupted(vector_index, tmp_path):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with _ServeCommand([vector_index, "--port", str(port), "--shard-timeout", "10"], tmp_path) as served:
        assert httpx.get(f"{url}/healthz", timeout=30).status_code == 200  # probes need no key
        xq = np.random.default_rng(12).standard_normal((3, 1280)).astype(np.float32)
        xq /= np.linalg.norm(xq, axis=1, keepdims=True)
        assert httpx.post(f"{url}/search", json={"vector": xq.tolist()}, timeout=30).status_code == 401
        r = httpx.post(f"{url}/search", json={"vector": xq.tolist(), "k": 6},
                       headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
        assert r.status_code == 200, r.text
        searcher = Searcher(vector_index)
        result = searcher.search(xq, 6)
        image_ids, _ = searcher.lookup(result)
        assert [[h["id"] for h in hits] for hits in r.json()["results"]] == image_ids.tolist()
        stats = httpx.get(f"{url}/stats", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).json()
        assert stats["count"] == 600 and len(stats["shards"]) == 2 and stats["factory"] == "IVF8,Flat"
    assert served.rc == 0, served.output
    assert f"serving {vector_index} at {url}" in served.output
    assert "stopped" in served.output
    with pytest.raises(httpx.ConnectError):  # the port is closed: Serve is gone, not just idle
        httpx.get(f"{url}/healthz", timeout=5)


def test_direct_ingress_answers_like_the_proxy_with_the_same_guards(vector_index, tmp_path):
    """--direct-ingress: the ingress replica's own port gives the proxy's answers, keeps the API
    key and the body limit, listens on loopback only, and the command still stops on Ctrl-C."""
    import ray

    port = _free_port()
    args = [vector_index, "--port", str(port), "--direct-ingress", "--max-body-mb", "0.2"]
    with _ServeCommand(args, tmp_path) as served:
        deadline = time.monotonic() + 30
        while "direct (no proxy hop): " not in served.printed() and time.monotonic() < deadline:
            time.sleep(0.2)
        direct = served.printed().split("direct (no proxy hop): ")[1].split()[0]
        proxy = f"http://127.0.0.1:{port}"
        direct_port = int(direct.rsplit(":", 1)[1])
        assert direct.startswith("http://127.0.0.1:") and direct_port != port
        xq = np.random.default_rng(13).standard_normal((2, 1280)).astype(np.float32)
        xq /= np.linalg.norm(xq, axis=1, keepdims=True)
        auth = {"Authorization": f"Bearer {KEY}"}
        answers = {}
        for url in (proxy, direct):
            assert httpx.post(f"{url}/search", json={"vector": xq.tolist()}, timeout=30).status_code == 401
            r = httpx.post(f"{url}/search", json={"vector": xq.tolist(), "k": 5}, headers=auth, timeout=60)
            assert r.status_code == 200, r.text
            answers[url] = r.json()["results"]
            big = httpx.post(f"{url}/search", content=b"x" * 300_000, headers=auth | {"content-type": "application/json"},
                             timeout=30)
            assert big.status_code == 413, big.text
        searcher = Searcher(vector_index)
        image_ids, _ = searcher.lookup(searcher.search(xq, 5))
        assert [[h["id"] for h in hits] for hits in answers[direct]] == image_ids.tolist()
        assert answers[direct] == answers[proxy]
        node_ip = ray.util.get_node_ip_address()
        if not node_ip.startswith("127."):  # the direct port is not reachable from the network
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"http://{node_ip}:{direct_port}/healthz", timeout=5)
    assert served.rc == 0, served.output
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{direct}/healthz", timeout=5)


def test_serve_command_refuses_a_missing_index_and_detach_without_cluster(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = REPO
    missing = subprocess.run([sys.executable, "-m", "raysearch", "serve", str(tmp_path / "nope")],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "index directory not found" in missing.stderr
    detach = subprocess.run([sys.executable, "-m", "raysearch", "serve", str(tmp_path), "--detach"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert detach.returncode == 2 and "--detach" in detach.stderr


def test_serve_detach_leaves_the_service_on_the_cluster(vector_index, ray_local):
    """--detach against a running cluster (here: the test session's) returns at once; the
    service keeps answering after the command exited."""
    from ray import serve

    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = REPO
    address = ray_local.get_runtime_context().gcs_address
    try:
        done = subprocess.run(
            [sys.executable, "-m", "raysearch", "serve", vector_index, "--port", str(port), "--detach",
             "--address", address],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "detached" in done.stdout
        r = httpx.post(f"http://127.0.0.1:{port}/search", json={"vector": [0.03] * 1280, "k": 2}, timeout=60)
        assert r.status_code == 200 and len(r.json()["results"]) == 2
        assert "raysearch" in serve.status().applications
    finally:
        serve.shutdown()
