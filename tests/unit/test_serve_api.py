"""The HTTP layer's pure parts: JSON request parsing, the API-key and body-size middlewares."""

from __future__ import annotations

import asyncio
import base64
import json

import httpx

import numpy as np
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from raysearch.serve.api import ApiError, BearerAuth, BodySizeLimit, hash_api_key, parse_json_search

DIM = 4


def _body(**doc) -> bytes:
    return json.dumps(doc).encode()


def test_json_single_and_listed_queries():
    one = parse_json_search(_body(vector=[1, 0, 0, 0], k=3), DIM, 8)
    assert one.vectors.shape == (1, DIM) and one.vectors.dtype == np.float32
    assert not one.as_list and one.k == 3 and one.nprobe is None
    many = parse_json_search(_body(vector=[[1, 0, 0, 0], [0, 1, 0, 0]], nprobe=4), DIM, 8)
    assert many.vectors.shape == (2, DIM) and many.as_list and many.k == 10 and many.nprobe == 4
    img = parse_json_search(_body(image_b64=base64.b64encode(b"\x89PNG...").decode()), DIM, 8)
    assert img.images == [b"\x89PNG..."] and not img.as_list
    imgs = parse_json_search(_body(image_b64=[base64.b64encode(b"a").decode()] * 2), DIM, 8)
    assert imgs.images == [b"a", b"a"] and imgs.as_list


@pytest.mark.parametrize(
    "body, status, message",
    [
        (b"{not json", 400, "not valid JSON"),
        (_body(vector=[1, 2, 3]), 422, "shape (n, 4)"),
        (_body(vector=[[1, 2, 3, 4], [1, 2]]), 422, "differ in length"),
        (b'{"vector": [NaN, 0, 0, 0]}', 422, "NaN or inf"),
        (_body(vector=[1, 0, 0, 0], k=0), 422, "k must be between 1 and 1000, got 0"),
        (_body(vector=[1, 0, 0, 0], k=1001), 422, "k must be between 1 and 1000, got 1001"),
        (_body(vector=[1, 0, 0, 0], nprobe=0), 422, "nprobe must be between"),
        (_body(vector=[1, 0, 0, 0], path="/etc/passwd"), 422, "unknown field 'path'"),
        (_body(vector=[1, 0, 0, 0], image_b64="aGk="), 422, "exactly one of"),
        (_body(k=3), 422, "exactly one of"),
        (_body(image_b64="%%%"), 400, "not valid base64"),
        (_body(vector=[]), 422, "no query"),
        (_body(vector=[[1, 0, 0, 0]] * 9), 422, "at most 8 queries"),
        (b"[1, 2]", 422, "must be an object"),
    ],
)
def test_json_bad_requests(body, status, message):
    with pytest.raises(ApiError) as e:
        parse_json_search(body, DIM, 8)
    assert e.value.status == status
    assert message in e.value.message


async def _echo(request: Request) -> JSONResponse:
    body = await request.body()
    return JSONResponse({"bytes": len(body)})


class _Client:
    """Requests straight into the ASGI app (no server, no network)."""

    def __init__(self, app):
        self.app = app

    def request(self, method: str, url: str, **kwargs) -> httpx.Response:
        async def go():
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                return await client.request(method, url, **kwargs)

        return asyncio.run(go())

    def post(self, url: str, **kwargs) -> httpx.Response:
        return self.request("POST", url, **kwargs)

    def get(self, url: str, **kwargs) -> httpx.Response:
        return self.request("GET", url, **kwargs)


def _client(key: str | None = None, max_bytes: int = 100) -> _Client:
    app = Starlette(routes=[Route("/search", _echo, methods=["POST"]), Route("/healthz", _echo, methods=["GET"])])
    app.add_middleware(BodySizeLimit, max_bytes=max_bytes)
    app.add_middleware(BearerAuth, key_sha256=hash_api_key(key) if key else None)
    return _Client(app)


def test_body_size_limit_by_header_and_while_streaming():
    client = _client()
    assert client.post("/search", content=b"x" * 100).json() == {"bytes": 100}
    r = client.post("/search", content=b"x" * 101)
    assert r.status_code == 413 and "limit of 100 bytes" in r.json()["error"]

    async def chunks():  # no Content-Length: the limit is enforced while the body streams in
        for _ in range(5):
            yield b"x" * 30

    r = client.post("/search", content=chunks())
    assert r.status_code == 413 and "limit" in r.json()["error"]


def test_api_key_is_required_except_for_health():
    client = _client(key="s3cret")
    r = client.post("/search", content=b"{}")
    assert r.status_code == 401 and "missing API key" in r.json()["error"]
    assert r.headers["www-authenticate"] == "Bearer"
    r = client.post("/search", content=b"{}", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"] == "invalid API key"
    r = client.post("/search", content=b"{}", headers={"Authorization": "Basic czNjcmV0"})
    assert r.status_code == 401
    assert client.post("/search", content=b"{}", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert client.get("/healthz").status_code == 200
    # Without a configured key, nothing is asked.
    assert _client().post("/search", content=b"{}").status_code == 200


def test_direct_ingress_environment_turns_on_throughput_mode_but_keeps_the_users_choices(monkeypatch):
    import os

    from raysearch.serve import app

    for name in (app.DIRECT_INGRESS_ENV, app.DIRECT_DRAIN_ENV, app.THROUGHPUT_ENV, app.ROUTER_LOOP_ENV):
        # Set, then removed: monkeypatch then restores each variable as it was (absent included)
        # after the test, so nothing leaks into the Rays that later tests start.
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setenv(app.THROUGHPUT_ENV, "0")  # the user's own setting wins
    app.enable_direct_ingress_env()

    assert os.environ[app.DIRECT_INGRESS_ENV] == "1"
    assert os.environ[app.THROUGHPUT_ENV] == "0"
    assert os.environ[app.ROUTER_LOOP_ENV] == "1" and os.environ[app.DIRECT_DRAIN_ENV] == app.DIRECT_DRAIN_S
    monkeypatch.delenv(app.THROUGHPUT_ENV)
    app.enable_direct_ingress_env()
    assert os.environ[app.THROUGHPUT_ENV] == "1"


class _Backend:
    """A search backend that answers at once: hit i of query q has id f"q{q}-{i}"."""

    dim = DIM

    def __init__(self, fail: bool = False):
        self.fail = fail
        self.calls: list[tuple[int, int, int | None]] = []

    async def search_vectors(self, xq, k, nprobe):
        from raysearch.serve.api import SearchAnswer

        if self.fail:
            raise RuntimeError("the searcher broke")
        self.calls.append((len(xq), k, nprobe))
        hits = [[{"rank": i + 1, "id": f"q{q}-{i}", "uri": f"/data/q{q}-{i}.jpg", "score": 1.0 - i / 10}
                 for i in range(k)] for q in range(len(xq))]
        return SearchAnswer(hits, False, [])

    async def search_images(self, images, k, nprobe):
        return await self.search_vectors(np.zeros((len(images), DIM), np.float32), k, nprobe)

    async def health(self):
        return True, {}

    def stats(self):
        return {"dim": DIM}


def _service(backend: _Backend, key: str | None = None, max_bytes: int = 1000) -> _Client:
    from raysearch.serve.api import ApiSettings, create_api

    settings = ApiSettings(max_body_bytes=max_bytes, max_queries=8, api_key_sha256=hash_api_key(key) if key else None)
    return _Client(create_api(backend, settings))


def test_search_endpoint_answers_json_and_multipart_queries_with_the_documented_shape():
    backend = _Backend()
    client = _service(backend)
    r = client.post("/search", json={"vector": [1, 0, 0, 0], "k": 3, "nprobe": 2})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    doc = r.json()
    assert [h["id"] for h in doc["results"]] == ["q0-0", "q0-1", "q0-2"]
    assert doc["partial"] is False and doc["missing_shards"] == [] and doc["took_ms"] >= 0
    assert backend.calls == [(1, 3, 2)]
    listed = client.post("/search", json={"vector": [[1, 0, 0, 0], [0, 1, 0, 0]], "k": 2}).json()
    assert [[h["id"] for h in row] for row in listed["results"]] == [["q0-0", "q0-1"], ["q1-0", "q1-1"]]
    r = client.post("/search", files=[("images", ("a.jpg", b"a")), ("images", ("b.jpg", b"b"))], data={"k": "1"})
    assert r.status_code == 200 and [[h["id"] for h in row] for row in r.json()["results"]] == [["q0-0"], ["q1-0"]]
    # The OpenAPI schema still documents the endpoint and its answer.
    schema = client.get("/openapi.json").json()
    answer = schema["paths"]["/search"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert answer["$ref"].endswith("/SearchResponse")


def test_search_endpoint_refusals_keep_their_status_and_json_message():
    backend = _Backend()
    client = _service(backend, key="s3cret", max_bytes=200)
    auth = {"Authorization": "Bearer s3cret"}
    assert client.post("/search", json={"vector": [1, 0, 0, 0]}).status_code == 401
    cases = [
        (dict(json={"vector": [1, 0, 0]}), 422, "shape (n, 4)"),
        (dict(content=b"{oops", headers={"content-type": "application/json"}), 400, "not valid JSON"),
        (dict(content=b"hello", headers={"content-type": "text/plain"}), 415, "unsupported Content-Type"),
        (dict(json={"vector": [1, 0, 0, 0]}, params={"k": "3"}), 422, "unknown query parameter"),
        (dict(json={"vector": [0.5] * 4 * 20}), 413, "limit of 200 bytes"),
    ]
    for kwargs, status, message in cases:
        headers = {**auth, **kwargs.pop("headers", {})}
        r = client.post("/search", headers=headers, **kwargs)
        assert r.status_code == status and message in r.json()["error"], (status, r.status_code, r.text)

    async def chunks():  # no Content-Length: refused while the body streams in
        for _ in range(10):
            yield b"[" * 30

    r = client.post("/search", content=chunks(), headers={**auth, "content-type": "application/json"})
    assert r.status_code == 413 and "limit" in r.json()["error"]
    assert client.get("/search", headers=auth).status_code == 405
    assert backend.calls == []  # nothing refused reached the backend
    # The service goes on answering after every refusal.
    assert client.post("/search", json={"vector": [1, 0, 0, 0], "k": 1}, headers=auth).status_code == 200


def test_a_failing_backend_gives_a_json_500():
    import raysearch.serve.api as api

    app = api.create_api(_Backend(fail=True), api.ApiSettings(max_body_bytes=1000, max_queries=8))

    async def go():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post("/search", json={"vector": [1, 0, 0, 0]})

    r = asyncio.run(go())
    assert r.status_code == 500 and r.json() == {"error": "internal error: RuntimeError"}
