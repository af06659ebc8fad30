"""A small synchronous client for the raysearch HTTP API (httpx).

    with SearchClient("http://127.0.0.1:8000", api_key=...) as client:
        answer = client.search_images([open("q.jpg", "rb").read()], k=10)
        answer.results[0]   # [{"rank": 1, "id": ..., "uri": ..., "score": ...}, ...]
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np

# The service's limit on k (raysearch.search.MAX_K, which imports torch; the client must stay light).
MAX_K = 1000


class ServiceError(RuntimeError):
    """The service refused or failed a request: HTTP status and its JSON error message."""

    def __init__(self, status: int, message: str, body: dict[str, Any] | None = None):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message
        self.body = body or {}


@dataclass
class QueryAnswer:
    """results: one list of {"rank", "id", "uri", "score"} per query; partial: some shard (named in
    missing_shards) did not answer, so results lack its vectors."""

    results: list[list[dict[str, Any]]]
    partial: bool
    missing_shards: list[str]
    took_ms: float


def base_url(url: str) -> str:
    """Accept the service root or its /search endpoint, with or without a scheme
    ('127.0.0.1:8000' means http://127.0.0.1:8000)."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    return url[: -len("/search")] if url.endswith("/search") else url


class SearchClient:
    """Client of one raysearch service at `url` (its root or its /search endpoint); `api_key` is
    sent as a Bearer token, `timeout` is in seconds per request."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 60.0,
                 transport: httpx.BaseTransport | None = None):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = base_url(url)
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, transport=transport)

    def close(self) -> None:
        """Close the client's HTTP connections."""
        self._http.close()

    def __enter__(self) -> "SearchClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def search_images(self, images: list[bytes], k: int = 10, nprobe: int | None = None,
                      names: list[str] | None = None) -> QueryAnswer:
        """Upload image files (their bytes) in one multipart request; one result list each."""
        names = names or [f"query-{i}" for i in range(len(images))]
        files = [("images", (os.path.basename(n), data, "application/octet-stream")) for n, data in zip(names, images)]
        form = {"k": str(k), **({"nprobe": str(nprobe)} if nprobe is not None else {})}
        return self._answer(self._http.post("/search", files=files, data=form), several=True)

    def search_vectors(self, xq: np.ndarray, k: int = 10, nprobe: int | None = None) -> QueryAnswer:
        """xq: (n, dim) float32 query vectors; one result list each."""
        xq = np.atleast_2d(np.asarray(xq, dtype=np.float32))
        body = {"vector": xq.tolist(), "k": k, **({"nprobe": nprobe} if nprobe is not None else {})}
        return self._answer(self._http.post("/search", json=body), several=True)

    def health(self) -> tuple[bool, dict[str, Any]]:
        """GET /healthz -> (ready: status 200, its JSON body or {}); not ready is returned, not raised."""
        r = self._http.get("/healthz")
        return r.status_code == 200, _json(r)

    def stats(self) -> dict[str, Any]:
        """GET /stats -> its JSON body. Raises ServiceError on an error answer."""
        r = self._http.get("/stats")
        _raise_for_error(r)
        return r.json()

    @staticmethod
    def _answer(r: httpx.Response, several: bool) -> QueryAnswer:
        _raise_for_error(r)
        doc = r.json()
        results = doc["results"] if several else [doc["results"]]
        return QueryAnswer(results, bool(doc["partial"]), list(doc["missing_shards"]), float(doc["took_ms"]))


def _json(r: httpx.Response) -> dict[str, Any]:
    try:
        doc = r.json()
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _raise_for_error(r: httpx.Response) -> None:
    if r.status_code == 200:
        return
    doc = _json(r)
    raise ServiceError(r.status_code, str(doc.get("error") or r.text[:200] or r.reason_phrase), doc)
