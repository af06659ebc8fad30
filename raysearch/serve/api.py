"""The HTTP API: a FastAPI app over a search backend (the Ingress deployment).

    POST /search    multipart upload (field `image`, or `images` repeated) or JSON with `image_b64`
                    or `vector` (one, or a list); `k` (1..1000) and optional `nprobe` in the same body
    GET  /healthz   200 when every shard and the embedder answer, else 503 naming what is missing
    GET  /stats     model, dim, count, shards, factory, nprobe, replicas
    GET  /          a search page: upload an image, see the top-k as thumbnails
    GET  /images/{image_id}   a JPEG thumbnail of an indexed image (only images the index holds)
    DELETE /images/{image_id} remove an image from the index (a tombstone; `raysearch compact` drops it)
    POST /reload    reopen the index if `raysearch add` / `remove` / `compact` changed it
    GET  /metrics   Prometheus text format: requests, latency per stage, partial answers, errors
    GET  /docs      the OpenAPI description in Swagger UI, served from the package (no CDN)

Every error is JSON `{"error": "..."}` with a 4xx/5xx status. Queries arrive as bytes or vectors
in the request body: the API never reads a path or fetches a URL that a request names; the only
files it reads are the indexed images' own uris, for their thumbnails.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from raysearch.images import DecodeError
from raysearch.search import MAX_K, check_k, check_queries
from raysearch.serve.config import MAX_NPROBE
from raysearch.serve.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from raysearch.serve.metrics import STATIC_DOCS, MetricsMiddleware, ServiceMetrics

if TYPE_CHECKING:
    from raysearch.serve.images import IndexedImages

log = logging.getLogger("raysearch.serve")

# Paths that answer without the API key: load balancers probe /healthz, and the OpenAPI
# description, the docs' own scripts and the search page (which sends the key itself) hold no data.
OPEN_PATHS = frozenset({"/", "/healthz", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc"})
OPEN_PREFIXES = (STATIC_DOCS + "/",)
THUMBNAIL_DEFAULT = 256
PAGE_THUMBNAIL = 160
SECURITY_SCHEME = "bearerAuth"


class ApiError(Exception):
    """A request the service refuses: HTTP status and a message for the client."""

    def __init__(self, status: int, message: str, extra: dict[str, Any] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.extra = extra or {}


@dataclass
class SearchAnswer:
    """results: one list of hit dicts per query; partial: some shard did not answer."""

    results: list[list[dict[str, Any]]]
    partial: bool
    missing_shards: list[str]


class SearchBackend(Protocol):
    """What the HTTP layer needs from the service (the Ingress deployment implements it)."""

    dim: int

    async def search_images(self, images: list[bytes], k: int, nprobe: int | None) -> SearchAnswer:
        """Image files (their bytes) -> the top `k` of each; nprobe None uses the index's own."""
        ...
    async def search_vectors(self, xq: np.ndarray, k: int, nprobe: int | None) -> SearchAnswer:
        """Query vectors xq (n, dim) float32 -> the top `k` of each; nprobe None uses the index's own."""
        ...
    async def health(self) -> tuple[bool, dict[str, Any]]:
        """(ready, details for GET /healthz): ready when every shard and the embedder answer."""
        ...
    def stats(self) -> dict[str, Any]:
        """What GET /stats reports about the served index."""
        ...
    async def remove_images(self, image_ids: list[str]) -> dict[str, Any]:
        """Remove images from the index and serve it without them; ApiError 404 for an unknown id."""
        ...
    async def reload(self) -> dict[str, Any]:
        """Reopen the index if its manifest changed: {"reloaded", "version", "count", "n_removed"}."""
        ...


@dataclass(frozen=True)
class ApiSettings:
    """Limits of the HTTP layer: body size in bytes, queries per request, and the API key's SHA-256
    hex digest (`hash_api_key`; None: no key is required)."""

    max_body_bytes: int
    max_queries: int
    api_key_sha256: str | None = None


def hash_api_key(key: str) -> str:
    """Replicas keep only the key's SHA-256, so the key itself never sits in Serve's state."""
    return hashlib.sha256(key.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Request and response models (they also make the OpenAPI schema)
# ---------------------------------------------------------------------------------------------


class SearchJSON(BaseModel):
    """JSON search request: exactly one of `image_b64` and `vector`."""

    model_config = ConfigDict(extra="forbid")

    image_b64: str | list[str] | None = Field(
        None, description="Base64 image file (JPEG, PNG, ...), or a list of them: one result list each."
    )
    vector: list[float] | list[list[float]] | None = Field(
        None, description="A query vector of the index's dimension, or a list of them."
    )
    k: int = Field(10, description=f"Results per query, 1..{MAX_K}.")
    nprobe: int | None = Field(None, description="Override the index's tuned nprobe / efSearch.")
    where: str | None = Field(None, description="Only images whose metadata satisfy this expression, "
                              "e.g. 'label == \"boots\"' (==, !=, <, <=, >, >=, in, and, or, not).")
    fields: list[str] | None = Field(None, description="Metadata columns to return with each hit.")


class Hit(BaseModel):
    """One result of a query; `rank` counts from 1, best first."""

    rank: int
    id: str = Field(description="image_id: the image's path relative to the indexed source, no extension.")
    uri: str
    score: float = Field(description="Higher is more similar (cosine similarity for unit vectors).")
    fields: dict[str, Any] | None = Field(None, description="The metadata asked for with `fields`.")


class SearchResponse(BaseModel):
    """The JSON answer of POST /search; `took_ms` is the time spent answering, in milliseconds."""

    results: list[Hit] | list[list[Hit]] = Field(
        description="The hits of the query; a list of lists when the queries were sent as a list "
        "(JSON arrays, or the multipart field `images`)."
    )
    partial: bool = Field(description="True when some shard did not answer in time: results miss its vectors.")
    missing_shards: list[str]
    took_ms: float


class ErrorResponse(BaseModel):
    """The JSON body of every error answer: `{"error": "..."}`."""

    error: str


_MULTIPART_SCHEMA = {
    "type": "object",
    "properties": {
        "image": {"type": "string", "format": "binary", "description": "One query image."},
        "images": {"type": "array", "items": {"type": "string", "format": "binary"},
                   "description": "Several query images: one result list each."},
        "k": {"type": "integer", "default": 10},
        "nprobe": {"type": "integer"},
        "where": {"type": "string", "description": "A metadata filter, e.g. label == \"boots\"."},
        "fields": {"type": "string", "description": "Metadata columns to return, comma-separated."},
    },
}
_SEARCH_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": _MULTIPART_SCHEMA},
            "application/json": {"schema": SearchJSON.model_json_schema()},
        },
    }
}
_ERRORS = {s: {"model": ErrorResponse} for s in (400, 401, 413, 415, 422, 503)}


# ---------------------------------------------------------------------------------------------
# Parsing requests
# ---------------------------------------------------------------------------------------------


@dataclass
class ParsedSearch:
    """A validated search request: either image files (bytes) or vectors (n, dim) float32, the other
    None; k, and nprobe (None: the index's own)."""

    images: list[bytes] | None
    vectors: np.ndarray | None
    k: int
    nprobe: int | None
    as_list: bool  # queries were sent as a list: answer with one list per query
    where: str | None = None          # a metadata filter (raysearch.index.fields)
    fields: list[str] | None = None   # metadata columns to return with each hit


def _check_k_nprobe(k: Any, nprobe: Any) -> tuple[int, int | None]:
    try:
        k = int(k)
    except (TypeError, ValueError):
        raise ApiError(422, f"k must be an integer, got {k!r}") from None
    try:
        check_k(k)
    except ValueError as e:
        raise ApiError(422, str(e)) from None
    if nprobe is not None:
        try:
            nprobe = int(nprobe)
        except (TypeError, ValueError):
            raise ApiError(422, f"nprobe must be an integer, got {nprobe!r}") from None
        if not 1 <= nprobe <= MAX_NPROBE:
            raise ApiError(422, f"nprobe must be between 1 and {MAX_NPROBE}, got {nprobe}")
    return k, nprobe


def _count_check(n: int, max_queries: int) -> None:
    if n == 0:
        raise ApiError(422, "the request holds no query (an empty list)")
    if n > max_queries:
        raise ApiError(422, f"at most {max_queries} queries per request, got {n}")


def _validation_message(e: ValidationError | RequestValidationError) -> str:
    errors = e.errors()
    first = errors[0] if errors else {}
    loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    if first.get("type") == "extra_forbidden":
        return f"unknown field {loc!r}"
    return f"{loc}: {first.get('msg', 'invalid')}" if loc else str(first.get("msg", "invalid request"))


def parse_json_search(body: bytes, dim: int, max_queries: int) -> ParsedSearch:
    """A JSON body -> queries. Raises ApiError (400 bad JSON/base64, 422 bad fields or values)."""
    # Parsed and validated in one pass by pydantic-core: about 5x faster than json.loads and then
    # validating, which matters for 1000-float vectors on every request.
    try:
        req = SearchJSON.model_validate_json(body)
    except ValidationError as e:
        first = e.errors()[0] if e.error_count() else {}
        if first.get("type") == "json_invalid":
            raise ApiError(400, f"the body is not valid JSON: {first.get('msg', '')}") from None
        if first.get("type") == "model_type" and not first.get("loc"):
            raise ApiError(422, "the JSON body must be an object") from None
        raise ApiError(422, _validation_message(e)) from None
    k, nprobe = _check_k_nprobe(req.k, req.nprobe)
    if (req.image_b64 is None) == (req.vector is None):
        raise ApiError(422, "give exactly one of 'image_b64' and 'vector'")
    if req.image_b64 is not None:
        as_list = isinstance(req.image_b64, list)
        encoded = req.image_b64 if as_list else [req.image_b64]
        _count_check(len(encoded), max_queries)
        images = []
        for i, text in enumerate(encoded):
            try:
                images.append(base64.b64decode(text, validate=True))
            except (binascii.Error, ValueError):
                name = f"image_b64[{i}]" if as_list else "image_b64"
                raise ApiError(400, f"{name} is not valid base64") from None
        return ParsedSearch(images, None, k, nprobe, as_list, _check_where(req.where), req.fields)
    vector = req.vector
    if not vector:
        _count_check(0, max_queries)
    as_list = isinstance(vector[0], list)
    _count_check(len(vector) if as_list else 1, max_queries)
    if as_list and len({len(v) for v in vector}) > 1:  # type: ignore[arg-type]
        raise ApiError(422, f"every vector must have {dim} values; the rows differ in length")
    try:
        xq = check_queries(np.asarray(vector, dtype=np.float32), dim)
    except ValueError as e:
        raise ApiError(422, f"vector: {e}") from None
    return ParsedSearch(None, xq, k, nprobe, as_list, _check_where(req.where), req.fields)


def _check_where(where: str | None) -> str | None:
    """A where expression that parses (422 naming the problem otherwise); its columns are checked
    by the backend, which knows the index's."""
    if where is None:
        return None
    from raysearch.index.fields import Where

    try:
        return Where(where).expr
    except ValueError as e:
        raise ApiError(422, str(e).replace("--where", "where")) from None


async def parse_multipart_search(request: Request, max_queries: int) -> ParsedSearch:
    """A multipart form -> queries: file field `image` (one) or `images` (repeated), k, nprobe."""
    try:
        form = await request.form(max_files=max_queries + 1, max_fields=8)
    except StarletteHTTPException as e:
        raise ApiError(400, f"bad multipart body: {e.detail}") from None
    try:
        single, several, fields = [], [], {}
        for key, value in form.multi_items():
            if key in ("image", "images"):
                if not isinstance(value, UploadFile):
                    raise ApiError(422, f"field {key!r} must be a file upload")
                (single if key == "image" else several).append(value)
            elif key in ("k", "nprobe", "where", "fields"):
                if isinstance(value, UploadFile) or key in fields:
                    raise ApiError(422, f"field {key!r} must be given once, as a plain value")
                fields[key] = value
            else:
                raise ApiError(422, f"unknown field {key!r}")
        if single and several:
            raise ApiError(422, "use either field 'image' (one query) or 'images' (several), not both")
        if len(single) > 1:
            raise ApiError(422, "field 'image' holds one file; send several as 'images'")
        files = single or several
        if not files:
            raise ApiError(422, "no query: send an image file in field 'image' (or several in 'images')")
        _count_check(len(files), max_queries)
        k, nprobe = _check_k_nprobe(fields.get("k", 10), fields.get("nprobe"))
        images = [await f.read() for f in files]
    finally:
        await form.close()
    columns = [c.strip() for c in str(fields["fields"]).split(",") if c.strip()] if "fields" in fields else None
    return ParsedSearch(images, None, k, nprobe, bool(several), _check_where(fields.get("where")), columns)


# ---------------------------------------------------------------------------------------------
# Middleware: API key and body size, before any body is read
# ---------------------------------------------------------------------------------------------


async def _send_json(send, status: int, doc: dict, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps(doc).encode()
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        + (headers or []),
    })
    await send({"type": "http.response.body", "body": body})


def _route_path(scope: dict) -> str:
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] or "/" if root and path.startswith(root) else path


class BearerAuth:
    """401 unless `Authorization: Bearer <key>` matches (compared in constant time)."""

    def __init__(self, app, key_sha256: str | None):
        self.app = app
        self.key_sha256 = key_sha256

    async def __call__(self, scope, receive, send):
        path = _route_path(scope) if scope["type"] == "http" else ""
        if scope["type"] != "http" or self.key_sha256 is None or path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
            return await self.app(scope, receive, send)
        header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        given = hash_api_key(token.strip()) if scheme.lower() == "bearer" and token.strip() else ""
        if not hmac.compare_digest(given, self.key_sha256):
            message = "missing API key: send 'Authorization: Bearer <key>'" if not header else "invalid API key"
            return await _send_json(send, 401, {"error": message}, [(b"www-authenticate", b"Bearer")])
        return await self.app(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


class BodySizeLimit:
    """413 for a body over `max_bytes`: refused from Content-Length at once, and counted while
    streaming for chunked uploads (the body is never held whole beyond the limit)."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = {"error": f"request body larger than the limit of {self.max_bytes} bytes"}
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            try:
                too_large = int(length) > self.max_bytes
            except ValueError:
                return await _send_json(send, 400, {"error": "invalid Content-Length header"})
            if too_large:
                return await _send_json(send, 413, message)
        received = 0
        started = False

        async def counting_receive():
            nonlocal received
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge()
            return msg

        async def tracking_send(msg):
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await _send_json(send, 413, message)


# ---------------------------------------------------------------------------------------------
# POST /search
# ---------------------------------------------------------------------------------------------


async def answer_search(request: Request, backend: SearchBackend, settings: ApiSettings,
                        metrics: ServiceMetrics | None = None, images: "IndexedImages | None" = None) -> Response:
    """One search request -> its JSON answer (counted in `metrics`; its hits remembered by `images`
    for their thumbnails). Raises ApiError for a request it refuses."""
    start = time.perf_counter()
    if request.query_params:
        raise ApiError(422, f"unknown query parameter(s) {sorted(request.query_params)}; "
                            "send k and nprobe in the body")
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json":
        parsed = parse_json_search(await request.body(), backend.dim, settings.max_queries)
    elif content_type == "multipart/form-data":
        parsed = await parse_multipart_search(request, settings.max_queries)
    else:
        raise ApiError(415, f"unsupported Content-Type {content_type or '(none)'!r}: "
                            "send multipart/form-data or application/json")
    # Filters and fields go to the backend only when asked for (a backend may not know them).
    extra = {name: value for name, value in (("where", parsed.where), ("fields", parsed.fields)) if value}
    if parsed.images is not None:
        answer = await backend.search_images(parsed.images, parsed.k, parsed.nprobe, **extra)
    else:
        answer = await backend.search_vectors(parsed.vectors, parsed.k, parsed.nprobe, **extra)  # type: ignore[arg-type]
    if metrics is not None:
        n = len(parsed.images) if parsed.images is not None else len(parsed.vectors)  # type: ignore[arg-type]
        metrics.observe_answer(n, "image" if parsed.images is not None else "vector", answer.missing_shards)
    if images is not None:
        images.remember(h for hits in answer.results for h in hits)
    # Serialised here: the hits are plain dicts already, and FastAPI's response_model check of
    # every hit would only repeat what the service built.
    body = json.dumps({
        "results": answer.results if parsed.as_list else answer.results[0],
        "partial": answer.partial,
        "missing_shards": answer.missing_shards,
        "took_ms": round((time.perf_counter() - start) * 1000.0, 3),
    }).encode()
    return Response(body, media_type="application/json")


def error_response(e: ApiError) -> JSONResponse:
    """An ApiError -> its JSON answer `{"error": message, **extra}` with the error's status."""
    return JSONResponse({"error": e.message, **e.extra}, status_code=e.status)


class SearchRoute:
    """Answers POST /search itself, ahead of FastAPI's router; everything else goes on to it.

    FastAPI's routing, dependency solving and exception middleware cost about 110 us per request
    on top of the ~130 us the request's own work takes (benchmarks/serve_api.py, RESULTS.md): the
    one endpoint that answers every query skips them. It sits inside BearerAuth and BodySizeLimit,
    so the API key and size checks still come first; an ApiError becomes its JSON error here, and
    any other exception goes up to the app's 500 handler as before.
    """

    def __init__(self, app, backend: SearchBackend, settings: ApiSettings, metrics: ServiceMetrics | None = None,
                 images: "IndexedImages | None" = None):
        self.app = app
        self.backend = backend
        self.settings = settings
        self.metrics = metrics
        self.images = images

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or _route_path(scope) != "/search":
            return await self.app(scope, receive, send)
        request = Request(scope, receive)
        try:
            response = await answer_search(request, self.backend, self.settings, self.metrics, self.images)
        except ApiError as e:
            response = error_response(e)
        await response(scope, receive, send)


# ---------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------


def create_api(backend: SearchBackend, settings: ApiSettings, metrics: ServiceMetrics | None = None,
               images: "IndexedImages | None" = None) -> FastAPI:
    """The FastAPI app serving `backend`; built per Ingress replica. `metrics`: this replica's
    registry (a new one when None), served at /metrics; `images`: the index's images for
    /images/{image_id} (without it that route answers 404 for every id)."""
    from fastapi_offline import FastAPIOffline

    from raysearch.pages.render import render
    from raysearch.version import __version__

    metrics = metrics if metrics is not None else ServiceMetrics()
    # FastAPIOffline serves Swagger UI's and ReDoc's scripts from the package (STATIC_DOCS):
    # /docs works without internet access.
    api = FastAPIOffline(
        title="raysearch",
        version=__version__,
        description="Image similarity search over a raysearch index. Send images or vectors to "
        "POST /search; errors are JSON {\"error\": ...}."
        + (" Every data route needs `Authorization: Bearer <key>`: press Authorize and paste the key."
           if settings.api_key_sha256 else ""),
        static_url=STATIC_DOCS,
        swagger_ui_parameters={"persistAuthorization": True},
    )
    # Declares the bearer scheme in the OpenAPI description (so Swagger's "Try it out" sends the
    # key); the check itself is BearerAuth's, before any route runs.
    bearer = HTTPBearer(auto_error=False, scheme_name=SECURITY_SCHEME,
                        description="The service's API key (raysearch serve --api-key, or $RAYSEARCH_API_KEY).")
    keyed = [Depends(bearer)] if settings.api_key_sha256 else []

    @api.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError) -> JSONResponse:
        return error_response(e)

    @api.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": _validation_message(e)}, status_code=422)

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(e.detail)}, status_code=e.status_code, headers=e.headers)

    @api.exception_handler(Exception)
    async def _internal_error(_: Request, e: Exception) -> JSONResponse:
        log.exception("internal error while answering a request")
        return JSONResponse({"error": f"internal error: {type(e).__name__}"}, status_code=500)

    # The route declares POST /search for the OpenAPI schema (and answers if the app is mounted
    # without SearchRoute); in the service, SearchRoute answers it before FastAPI's router.
    @api.post(
        "/search",
        response_model=SearchResponse,
        responses=_ERRORS,
        openapi_extra=_SEARCH_OPENAPI,
        summary="Search the index with images or vectors",
        dependencies=keyed,
    )
    async def search(request: Request) -> Response:
        return await answer_search(request, backend, settings, metrics, images)

    @api.get("/healthz", summary="Ready when every shard and the embedder answer")
    async def healthz() -> JSONResponse:
        ok, info = await backend.health()
        return JSONResponse({"status": "ok" if ok else "unavailable", **info}, status_code=200 if ok else 503)

    @api.get("/stats", summary="What is served: model, dim, count, shards, factory, nprobe, replicas", dependencies=keyed)
    async def stats() -> dict[str, Any]:
        return backend.stats()

    @api.get(
        "/images/{image_id:path}",
        summary="A JPEG thumbnail of an indexed image",
        response_class=Response,
        responses={200: {"content": {"image/jpeg": {}}, "description": "The thumbnail."},
                   **{s: {"model": ErrorResponse} for s in (401, 404, 422)}},
        dependencies=keyed,
    )
    async def image(image_id: str, size: int = Query(THUMBNAIL_DEFAULT, ge=16, le=1024,
                                                   description="Longest side in pixels.")) -> Response:
        """Only images the index holds: `image_id` is looked up in the shards' id maps, and the
        file read is the uri recorded there."""
        if images is None:
            raise ApiError(404, f"image {image_id!r} is not in the index")
        try:
            jpeg = await asyncio.to_thread(images.thumbnail, image_id, size)
        except DecodeError as e:
            raise ApiError(422, f"image {image_id!r} is indexed but is not a usable image any more: {e.reason}") from None
        except OSError as e:
            raise ApiError(404, f"image {image_id!r} is indexed but its file cannot be read: {e}") from None
        if jpeg is None:
            raise ApiError(404, f"image {image_id!r} is not in the index")
        # private: thumbnails may sit behind an API key, so shared caches must not keep them.
        return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    @api.delete(
        "/images/{image_id:path}",
        summary="Remove an image from the index",
        responses={s: {"model": ErrorResponse} for s in (401, 404)},
        dependencies=keyed,
    )
    async def remove_image(image_id: str) -> dict[str, Any]:
        """Searches stop returning `image_id` at once (its vector is tombstoned in the index
        directory; `raysearch compact` or the next `raysearch add` drops it from the shards).
        404 when the index does not hold it."""
        return await backend.remove_images([image_id])

    @api.post("/reload", summary="Reopen the index if add / remove / compact changed it", dependencies=keyed,
              responses={s: {"model": ErrorResponse} for s in (401,)})
    async def reload() -> dict[str, Any]:
        return await backend.reload()

    @api.get("/metrics", summary="Prometheus metrics of this replica (text format)", response_class=Response,
             responses={200: {"content": {METRICS_CONTENT_TYPE: {}}}}, dependencies=keyed)
    async def prometheus_metrics() -> Response:
        return Response(metrics.exposition(), media_type=METRICS_CONTENT_TYPE)

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(request: Request) -> HTMLResponse:
        info = backend.stats()
        return HTMLResponse(render(
            "service.html.j2", title="raysearch", subtitle=str(info.get("index_dir", "")), version=__version__,
            base=(request.scope.get("root_path") or "").rstrip("/"), needs_key=settings.api_key_sha256 is not None,
            k=10, max_k=MAX_K, thumb_size=PAGE_THUMBNAIL, count=info.get("count", 0),
            shards=len(info.get("shards", []) or []),
        ))

    api.add_middleware(SearchRoute, backend=backend, settings=settings, metrics=metrics, images=images)  # innermost
    api.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    api.add_middleware(BearerAuth, key_sha256=settings.api_key_sha256)
    api.add_middleware(MetricsMiddleware, metrics=metrics, path_of=_route_path)  # outermost: counts refusals too
    return api
