"""Prometheus metrics of the HTTP service, one registry per Ingress replica, served at GET /metrics.

    raysearch_requests_total{route, status}           HTTP requests answered
    raysearch_request_duration_seconds{route}         their latency (histogram)
    raysearch_stage_duration_seconds{stage}           time per stage of a search (histogram):
                                                      embed, search, merge; rerank for a second stage
    raysearch_errors_total{status}                    answers with status >= 400
    raysearch_partial_answers_total                   searches answered without some shard
    raysearch_missing_shards_total{shard}             shards left out of those answers
    raysearch_queries_total{kind}                     query images / vectors searched
    raysearch_index_vectors, raysearch_index_shards   size of the served index (gauges)

Each replica keeps its own registry (not prometheus_client's global one): several services, or
several test apps, in one process never share or collide on series, and a replica's numbers are
its own. A second stage times itself with the name reserved for it:

    with metrics.stage(RERANK):
        ...

or `metrics.observe_stage(RERANK, seconds)`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

EMBED, SEARCH, MERGE, RERANK = "embed", "search", "merge", "rerank"
STAGES = (EMBED, SEARCH, MERGE, RERANK)
# From half a millisecond (an in-memory IVF search) to half a minute (the embedder's timeout).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST

# The routes the service answers, as metric labels; anything else is "other" (unknown paths must
# not create a series each).
STATIC_DOCS = "/static-offline-docs"
IMAGES_ROUTE = "/images/{image_id}"
ROUTES = frozenset({"/", "/search", "/healthz", "/stats", "/metrics", "/docs", "/docs/oauth2-redirect",
                    "/openapi.json", "/redoc"})


def route_label(path: str) -> str:
    """A request path -> its route as a metric label: the path itself for the fixed routes,
    "/images/{image_id}" for thumbnails, "/static-offline-docs" for the docs' assets, else "other"."""
    if path in ROUTES:
        return path
    if path.startswith("/images/"):
        return IMAGES_ROUTE
    if path.startswith(STATIC_DOCS + "/"):
        return STATIC_DOCS
    return "other"


class ServiceMetrics:
    """The metrics of one Ingress replica (see the module docstring)."""

    def __init__(self, n_vectors: int = 0, n_shards: int = 0):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("raysearch_requests", "HTTP requests answered, by route and status.",
                                ["route", "status"], registry=r)
        self.request_seconds = Histogram("raysearch_request_duration_seconds", "Time to answer an HTTP request, by route.",
                                         ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.stage_seconds = Histogram(
            "raysearch_stage_duration_seconds",
            "Time spent per stage of a search request: embed (decode + model), search (all shards), "
            "merge (exact top-k), rerank (a second stage, where one runs).",
            ["stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.errors = Counter("raysearch_errors", "Error answers (status >= 400), by status.", ["status"], registry=r)
        self.partial = Counter("raysearch_partial_answers", "Search answers that left out a shard that did not answer in time.",
                               registry=r)
        self.missing_shards = Counter("raysearch_missing_shards", "Shards left out of partial answers, by shard.",
                                      ["shard"], registry=r)
        self.queries = Counter("raysearch_queries", "Queries searched, by kind (image or vector).", ["kind"], registry=r)
        self.index_vectors = Gauge("raysearch_index_vectors", "Vectors in the served index.", registry=r)
        self.index_shards = Gauge("raysearch_index_shards", "Shards of the served index.", registry=r)
        self.index_vectors.set(n_vectors)
        self.index_shards.set(n_shards)
        for stage in STAGES:   # every stage series exists from the start, so dashboards show 0, not "no data"
            self.stage_seconds.labels(stage=stage)

    def observe_stage(self, stage: str, seconds: float) -> None:
        """Record `seconds` spent in `stage` (one of STAGES) for one request."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; one of {STAGES}")
        self.stage_seconds.labels(stage=stage).observe(seconds)

    @contextmanager
    def stage(self, stage: str) -> Iterator[None]:
        """Time the block as one request's `stage` (recorded also when the block raises)."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; one of {STAGES}")
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stage_seconds.labels(stage=stage).observe(time.perf_counter() - start)

    def observe_request(self, path: str, status: int, seconds: float) -> None:
        """Record one answered HTTP request (its path is reduced to a route label)."""
        route = route_label(path)
        self.requests.labels(route=route, status=str(status)).inc()
        self.request_seconds.labels(route=route).observe(seconds)
        if status >= 400:
            self.errors.labels(status=str(status)).inc()

    def observe_answer(self, n_queries: int, kind: str, missing_shards: list[str]) -> None:
        """Record one search answer: its queries (kind "image" or "vector") and the shards it lacks."""
        self.queries.labels(kind=kind).inc(n_queries)
        if missing_shards:
            self.partial.inc()
            for shard in missing_shards:
                self.missing_shards.labels(shard=shard).inc()

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format (what GET /metrics answers)."""
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts and times every HTTP request, refused ones included (it runs before the API key and
    body size checks); a request that fails with an exception is counted as a 500."""

    def __init__(self, app, metrics: ServiceMetrics, path_of):
        self.app = app
        self.metrics = metrics
        self.path_of = path_of   # scope -> the path within the app (route prefix removed)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500

        async def recording_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            self.metrics.observe_request(self.path_of(scope), status, time.perf_counter() - start)
