"""CPU cost of raysearch's HTTP layer for one JSON vector query, in process, without a network.

Both sides are driven as ASGI apps by the same loop, with the same request bytes, on one event loop:

  floor      a bare ASGI function that reads the body, parses it with raysearch's own parser
             (parse_json_search), asks the same backend and writes the answer with json.dumps:
             the least any ASGI service must do for this request
  raysearch  raysearch.serve.api.create_api: the FastAPI app the Ingress replicas serve (routing,
             API key and body size middlewares, request checks, the answer)

The backend answers at once with k fixed hits per query, so the figures are the HTTP layer's
own cost; uvicorn, Ray Serve and the search itself are not in them. The ratio is raysearch /
floor (1.0 = no overhead over the floor). Median of --repeats timings of --n requests each.

Usage: python benchmarks/serve_api.py [--dim 1280 --k 10 --n 2000 --repeats 5] [--api-key KEY]
"""

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class FixedBackend:
    """Answers every query with the same k hits (what a searcher returns, without searching)."""

    def __init__(self, dim: int, k: int):
        self.dim = dim
        self.hits = [{"rank": r + 1, "id": f"images/photo-{r:06d}", "uri": f"s3://bucket/images/photo-{r:06d}.jpg",
                      "score": 0.9 - 0.01 * r} for r in range(k)]

    async def search_vectors(self, xq, k, nprobe):
        from raysearch.serve.api import SearchAnswer

        return SearchAnswer([self.hits[:k] for _ in range(len(xq))], False, [])

    async def search_images(self, images, k, nprobe):
        raise NotImplementedError

    async def health(self):
        return True, {}

    def stats(self):
        return {}


def floor_app(backend: FixedBackend):
    from raysearch.serve.api import parse_json_search

    async def app(scope, receive, send):
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        parsed = parse_json_search(body, backend.dim, 64)
        answer = await backend.search_vectors(parsed.vectors, parsed.k, parsed.nprobe)
        out = json.dumps({"results": answer.results[0], "partial": answer.partial,
                          "missing_shards": answer.missing_shards, "took_ms": 0.0}).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(out)).encode())]})
        await send({"type": "http.response.body", "body": out})

    return app


async def one_request(app, scope: dict, body: bytes) -> tuple[int, bytes]:
    sent = False
    status, chunks = 0, []

    async def receive():
        nonlocal sent
        if sent:
            await asyncio.sleep(3600)  # a disconnect would come here; never reached
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(msg):
        nonlocal status
        if msg["type"] == "http.response.start":
            status = msg["status"]
        elif msg["type"] == "http.response.body":
            chunks.append(msg.get("body", b""))

    await app(dict(scope), receive, send)
    return status, b"".join(chunks)


async def per_request_us(app, scope: dict, body: bytes, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        await one_request(app, scope, body)
    return (time.perf_counter() - t) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--api-key", default=None)
    args = ap.parse_args()

    from raysearch.serve.api import ApiSettings, create_api, hash_api_key

    backend = FixedBackend(args.dim, args.k)
    settings = ApiSettings(max_body_bytes=64 << 20, max_queries=64,
                           api_key_sha256=hash_api_key(args.api_key) if args.api_key else None)
    api = create_api(backend, settings)
    floor = floor_app(backend)

    q = np.random.default_rng(0).standard_normal(args.dim).astype(np.float32)
    body = json.dumps({"vector": (q / np.linalg.norm(q)).tolist(), "k": args.k}).encode()
    headers = [(b"host", b"127.0.0.1:8000"), (b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode())]
    if args.api_key:
        headers.append((b"authorization", f"Bearer {args.api_key}".encode()))
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/search", "raw_path": b"/search", "root_path": "",
             "query_string": b"", "headers": headers, "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000)}

    async def run() -> tuple[list[float], list[float]]:
        # Same answer from both (apart from took_ms), or the comparison means nothing.
        (s1, b1), (s2, b2) = await one_request(api, scope, body), await one_request(floor, scope, body)
        d1, d2 = json.loads(b1), json.loads(b2)
        assert s1 == s2 == 200, (s1, b1[:200], s2)
        assert d1["results"] == d2["results"] and d1["partial"] == d2["partial"], "the two apps answer differently"
        ours, base = [], []
        for _ in range(args.repeats):  # interleaved
            base.append(await per_request_us(floor, scope, body, args.n))
            ours.append(await per_request_us(api, scope, body, args.n))
        return base, ours

    base, ours = asyncio.run(run())
    b, o = statistics.median(base), statistics.median(ours)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; python {platform.python_version()}; "
          f"body {len(body)} bytes ({args.dim} floats), k={args.k}, api key: {'yes' if args.api_key else 'no'}")
    print(f"floor (bare ASGI)      {b:8.1f} us/request   runs {', '.join(f'{x:.1f}' for x in base)}")
    print(f"raysearch (FastAPI)    {o:8.1f} us/request   runs {', '.join(f'{x:.1f}' for x in ours)}")
    print(f"ratio raysearch/floor  {o / b:.2f}x   overhead {o - b:.1f} us/request")


if __name__ == "__main__":
    main()
