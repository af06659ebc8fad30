"""The Ray Serve deployments: QueryEmbedder, one ShardSearcher per shard, and the FastAPI Ingress.

    HTTP -> Ingress (parse, decode) -> QueryEmbedder (@serve.batch: one forward pass for concurrent
         queries) -> every ShardSearcher at once (@serve.batch: one FAISS call per batch) -> merge
         the top-k exactly -> JSON

Resources and replica counts are set by `raysearch.serve.app.build_app` with `.options(...)`; the
decorators here only name the deployments. Defining these classes does nothing: Serve starts them
when an application built from them is run.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Any

import numpy as np
from ray import serve

from raysearch.serve.api import ApiError, ApiSettings, SearchAnswer, create_api
from raysearch.serve.core import (
    MergedHits,
    NoShardAnswered,
    OpenShards,
    ShardHits,
    ShardQuery,
    concat_hits,
    hits_to_json,
    merge_shard_hits,
    open_shards,
    search_shard,
    search_shard_group,
)
from raysearch.serve.images import IndexedImages
from raysearch.serve.metrics import EMBED, MERGE, RERANK, SEARCH, ServiceMetrics

log = logging.getLogger("raysearch.serve")


class _BatchLog:
    """Sizes of the last batches a replica ran (shows in tests and /stats that batching happens)."""

    def __init__(self, keep: int = 1000):
        self.sizes: collections.deque[int] = collections.deque(maxlen=keep)

    def add(self, n: int) -> None:
        self.sizes.append(n)

    def summary(self) -> dict[str, Any]:
        sizes = list(self.sizes)
        return {"batches": len(sizes), "max_batch": max(sizes, default=0),
                "mean_batch": float(np.mean(sizes)) if sizes else 0.0}


@serve.deployment(name="QueryEmbedder")
class QueryEmbedder:
    """The index's own model: (S, S, 3) uint8 pixels -> (dim,) float32 vector.

    Concurrent calls are batched into one forward pass (on the GPU when the replica has one).
    """

    def __init__(self, model_spec: dict, device: str, torch_threads: int | None,
                 max_batch_size: int, batch_wait_timeout_s: float):
        from raysearch.models.embedder import Embedder

        self.embedder = Embedder(model_spec, device=device, torch_threads=torch_threads)
        self.embed_batch.set_max_batch_size(max_batch_size)
        self.embed_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.batches = _BatchLog()

    async def embed(self, pixels: np.ndarray) -> np.ndarray:
        """One preprocessed image (S, S, 3) uint8 -> its (dim,) float32 vector, via `embed_batch`."""
        return await self.embed_batch(pixels)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def embed_batch(self, pixels: list[np.ndarray]) -> list[np.ndarray]:
        """@serve.batch: the images of concurrent `embed` calls -> one (dim,) vector each, in one
        forward pass."""
        self.batches.add(len(pixels))
        # The forward pass runs in a thread (torch releases the GIL), so the replica keeps
        # accepting requests and the next batch fills while this one computes.
        vectors = await asyncio.to_thread(self.embedder.embed_pixels, np.stack(pixels))
        return list(vectors)

    def ping(self) -> bool:
        """True: answers health checks (the Ingress's GET /healthz); not batched."""
        return True

    def batch_stats(self) -> dict[str, Any]:
        """Number, largest and mean size (images) of this replica's last embedding batches."""
        return self.batches.summary()


@serve.deployment(name="ShardSearcher")
class ShardSearcher:
    """One shard of the index (memory-mapped when the index is large: IndexStore.prefers_mmap);
    answers ShardQuery -> ShardHits.

    Concurrent requests are batched into one FAISS search (per distinct nprobe); vector ids are
    mapped to image_id and uri here, next to the shard's own id map.
    """

    def __init__(self, index_dir: str, shard: int, verify: bool, search_threads: int,
                 max_batch_size: int, batch_wait_timeout_s: float):
        opened = open_shards(index_dir, [shard], verify, search_threads)
        self.shard = shard
        (self.index, self.id_map), = opened.shards
        self.metric = opened.metric
        self.default_nprobe = opened.default_nprobe
        self.search_batch.set_max_batch_size(max_batch_size)
        self.search_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.batches = _BatchLog()

    async def search(self, query: ShardQuery) -> ShardHits:
        """One request's queries -> this shard's top-k of each, via `search_batch`."""
        return await self.search_batch(query)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.0)
    async def search_batch(self, queries: list[ShardQuery]) -> list[ShardHits]:
        """@serve.batch: the requests of concurrent `search` calls -> one ShardHits each, with one
        FAISS search per distinct nprobe."""
        self.batches.add(sum(q.xq.shape[0] for q in queries))
        # FAISS releases the GIL: searching in a thread keeps the event loop free to queue the
        # requests that form the next batch.
        return await asyncio.to_thread(
            search_shard, self.index, self.id_map, queries, self.metric, self.default_nprobe
        )

    def ping(self) -> bool:
        """True: answers health checks (the Ingress's GET /healthz); not batched."""
        return True

    def batch_stats(self) -> dict[str, Any]:
        """Number, largest and mean size (query vectors) of this replica's last search batches."""
        return self.batches.summary()


@serve.deployment(name="LocalVerifier")
class LocalVerifier:
    """The second stage (raysearch.rerank): verifies a query's merged candidates with local
    features and geometry and re-orders them by fused score, exactly as `raysearch search --rerank
    local` does. Opens the index's stored local features once (or extracts the candidates' from
    their images when the index holds none)."""

    def __init__(self, index_dir: str, config: dict[str, Any], threads: int, batch_size: int = 8):
        import cv2

        from raysearch.index.store import IndexStore
        from raysearch.rerank import LocalReranker, RerankConfig

        # One replica owns its CPU share: OpenCV and BLAS threads beyond it only contend.
        cv2.setNumThreads(max(1, threads))
        self.reranker = LocalReranker(IndexStore(index_dir, verify=False), RerankConfig(**config))
        self.verify_batch.set_max_batch_size(batch_size)
        self.batches = _BatchLog()

    async def verify(self, image: bytes, hits: MergedHits) -> MergedHits:
        """One query: its image bytes and its merged candidates (one row) -> the row re-ordered
        by fused score, with verified and inliers set. Batched with concurrent queries."""
        return await self.verify_batch((image, hits))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)
    async def verify_batch(self, requests: list[tuple[bytes, MergedHits]]) -> list[MergedHits]:
        """The queries waiting together, verified one after another in a worker thread (OpenCV
        and BLAS release the GIL, so the event loop keeps taking requests)."""
        self.batches.add(len(requests))
        return await asyncio.to_thread(lambda: [self._verify_one(image, hits) for image, hits in requests])

    def _verify_one(self, image: bytes, hits: MergedHits) -> MergedHits:
        from raysearch.images import DecodeError

        n = hits.ids.shape[1]
        try:
            query, mirrored = self.reranker.query_features(image)
        except DecodeError:   # the ingress decoded it already: only an image it could not use lands here
            out = hits.row(0)
            out.verified, out.inliers = np.zeros((1, n), bool), np.zeros((1, n), np.int32)
            return out
        row = self.reranker.rerank(query, mirrored, hits.ids[0], hits.shards[0], hits.uris[0], hits.scores[0])
        out = hits.row(0, row.order)
        out.scores, out.verified, out.inliers = row.scores[None, :], row.verified[None, :], row.inliers[None, :]
        return out

    def ping(self) -> bool:
        """True: answers health checks (the Ingress's GET /healthz); not batched."""
        return True

    def batch_stats(self) -> dict[str, Any]:
        """Number, largest and mean size (queries) of this replica's last verification batches."""
        return self.batches.summary()


@serve.deployment(name="Ingress")
@serve.ingress()
class Ingress:
    """Validates requests, embeds images, fans out to every shard, merges; serves the FastAPI app."""

    def __init__(self, embedder, shards: list, index_info: dict[str, Any], settings: dict[str, Any],
                 verifier=None):
        from raysearch.images import MAX_PIXELS
        from raysearch.models.spec import ModelSpec

        self.embedder = embedder
        self.shards = shards
        self.verifier = verifier                       # the LocalVerifier deployment, or None
        self.rerank_k = int(settings.get("rerank_k") or 0)
        self.info = index_info
        self.dim = int(index_info["dim"])
        self.shard_names: list[str] = list(index_info["shard_names"])
        self.model_spec = index_info["model"]
        self.spec = ModelSpec.from_dict(self.model_spec)
        self.shard_timeout_s = float(settings["shard_timeout_s"])
        self.embed_timeout_s = float(settings["embed_timeout_s"])
        self.max_image_pixels = int(settings.get("max_image_pixels", MAX_PIXELS))
        # --shards-in-ingress: every shard opened in this replica, as the ShardSearchers would.
        local = settings.get("local_shards")
        self.local: OpenShards | None = (
            open_shards(local["index_dir"], None, local["verify"], local["threads"]) if local else None
        )
        if local:
            self.search_local_batch.set_max_batch_size(int(local["batch_size"]))
            self.search_local_batch.set_batch_wait_timeout_s(float(local["batch_wait_s"]))
        self.batches = _BatchLog()
        self.api_settings = ApiSettings(
            max_body_bytes=int(settings["max_body_bytes"]),
            max_queries=int(settings["max_queries"]),
            api_key_sha256=settings.get("api_key_sha256"),
        )
        # This replica's Prometheus registry (GET /metrics) and the indexed images (GET /images/...).
        self.metrics = ServiceMetrics(n_vectors=int(index_info["count"]), n_shards=len(self.shard_names))
        self.images = IndexedImages(index_info["index_dir"], max_pixels=self.max_image_pixels)

    def __serve_build_asgi_app__(self):
        # Built per replica, after __init__: the routes close over this replica's handles.
        return create_api(self, self.api_settings, self.metrics, self.images)

    # -- the SearchBackend protocol -------------------------------------------------------

    async def search_images(self, images: list[bytes], k: int, nprobe: int | None) -> SearchAnswer:
        """Image files (their bytes) -> the top `k` of each: decoded here, embedded by the
        QueryEmbedder, then searched as `search_vectors`. Not batched here (the embedder is).

        Raises ApiError: 400 for an image that does not decode, 503 when the embedder fails or
        does not answer within embed_timeout_s, 422 for a non-finite embedding.
        """
        started = time.perf_counter()
        pixels = await asyncio.gather(*(asyncio.to_thread(self._preprocess, i, data, len(images) > 1)
                                        for i, data in enumerate(images)))
        calls = [self.embedder.embed.remote(p) for p in pixels]
        try:
            vectors = await asyncio.wait_for(asyncio.gather(*calls), self.embed_timeout_s)
        except asyncio.TimeoutError:
            for call in calls:
                call.cancel()
            raise ApiError(503, f"the query embedder did not answer within {self.embed_timeout_s:g} s") from None
        except Exception as e:  # noqa: BLE001 - a dead or failing embedder replica: retryable
            log.warning("query embedder failed: %s", e)
            raise ApiError(503, f"the query embedder failed ({type(e).__name__}); retry shortly") from None
        xq = np.stack(vectors).astype(np.float32)
        self.metrics.observe_stage(EMBED, time.perf_counter() - started)
        if not np.isfinite(xq).all():
            raise ApiError(422, "the model produced a non-finite embedding for this image")
        if self.verifier is None:
            return await self.search_vectors(xq, k, nprobe)
        merged, missing = await self._search_merged(xq, max(k, self.rerank_k), nprobe)
        started = time.perf_counter()
        try:
            rows = await asyncio.gather(*(self.verifier.verify.remote(image, merged.row(q))
                                          for q, image in enumerate(images)))
        except Exception as e:  # noqa: BLE001 - a dead or failing verifier replica: retryable
            log.warning("local verifier failed: %s", e)
            raise ApiError(503, f"the local verifier failed ({type(e).__name__}); retry shortly") from None
        self.metrics.observe_stage(RERANK, time.perf_counter() - started)
        verified = concat_hits(rows)
        verified = MergedHits(*(None if a is None else a[:, :k] for a in (
            verified.scores, verified.ids, verified.image_ids, verified.uris, verified.shards,
            verified.verified, verified.inliers)))
        return SearchAnswer(hits_to_json(verified), partial=bool(missing), missing_shards=missing)

    async def search_vectors(self, xq: np.ndarray, k: int, nprobe: int | None) -> SearchAnswer:
        """Query vectors xq (n, dim) float32 -> the exact top `k` of each over the shards that
        answered within shard_timeout_s (partial when some did not). Not batched here (the shard
        searches are).

        Raises ApiError 503 when no shard answered.
        """
        merged, missing = await self._search_merged(xq, k, nprobe)
        # Vector queries carry no image to verify: their hits are the first stage's.
        return SearchAnswer(hits_to_json(merged), partial=bool(missing), missing_shards=missing)

    async def _search_merged(self, xq: np.ndarray, k: int, nprobe: int | None) -> tuple[MergedHits, list[str]]:
        """The exact top `k` over the shards that answered, and the names of those that did not."""
        started = time.perf_counter()
        hits = await self._ask_shards(ShardQuery(xq, k, nprobe))
        self.metrics.observe_stage(SEARCH, time.perf_counter() - started)
        missing = [name for name, h in zip(self.shard_names, hits) if h is None]
        started = time.perf_counter()
        try:
            merged = merge_shard_hits(hits, k)
        except NoShardAnswered:
            raise ApiError(503, f"no shard answered within {self.shard_timeout_s:g} s",
                           {"partial": True, "missing_shards": missing}) from None
        self.metrics.observe_stage(MERGE, time.perf_counter() - started)
        return merged, missing

    async def health(self) -> tuple[bool, dict[str, Any]]:
        """Ping the embedder and every ShardSearcher (up to min(shard_timeout_s, 5) s each) ->
        (ready, {"shards", "missing_shards", "embedder"}); not batched."""
        timeout = min(self.shard_timeout_s, 5.0)
        extra = [self._ping(self.verifier, timeout)] if self.verifier is not None else []
        embedder_ok, *rest = await asyncio.gather(
            self._ping(self.embedder, timeout), *(self._ping(h, timeout) for h in self.shards), *extra
        )
        shards_ok = rest[: len(self.shards)]
        verifier_ok = rest[len(self.shards)] if extra else True
        missing = [name for name, ok in zip(self.shard_names, shards_ok) if not ok]
        n_shards = len(self.local.shards) if self.local is not None else len(self.shards)
        info = {"shards": n_shards, "missing_shards": missing, "embedder": embedder_ok}
        if extra:
            info["verifier"] = verifier_ok
        return embedder_ok and verifier_ok and not missing, info

    def stats(self) -> dict[str, Any]:
        """What GET /stats answers: `index_info` with the model's name instead of its spec, and
        without the list of shard names; not batched."""
        hidden = ("model", "shard_names")
        return {k: v for k, v in self.info.items() if k not in hidden} | {"model": self.model_spec["name"]}

    # -- helpers --------------------------------------------------------------------------

    def _preprocess(self, i: int, data: bytes, several: bool) -> np.ndarray:
        from raysearch.images import DecodeError
        from raysearch.models.embedder import preprocess_image

        try:
            return preprocess_image(data, self.spec, max_pixels=self.max_image_pixels)
        except DecodeError as e:
            raise ApiError(400, f"{f'image {i}: ' if several else ''}{e.reason}") from None

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.0)
    async def search_local_batch(self, queries: list[ShardQuery]) -> list[list[ShardHits | None]]:
        """--shards-in-ingress: the requests waiting together, one FAISS call per shard (per nprobe)."""
        self.batches.add(sum(q.xq.shape[0] for q in queries))
        # FAISS releases the GIL: the event loop keeps accepting the requests of the next batch.
        per_shard = await asyncio.to_thread(self._search_local, queries)
        return [list(hits) for hits in zip(*per_shard)]

    def _search_local(self, queries: list[ShardQuery]) -> list[list[ShardHits]]:
        assert self.local is not None
        return search_shard_group(self.local.group, [ids for _, ids in self.local.shards], queries,
                                  self.local.metric, self.local.default_nprobe)

    def batch_stats(self) -> dict[str, Any]:
        """Number, largest and mean size (query vectors) of the last `search_local_batch` batches
        (--shards-in-ingress; none otherwise)."""
        return self.batches.summary()

    async def _ask_shards(self, query: ShardQuery) -> list[ShardHits | None]:
        """Ask every shard at once; a shard that fails or has not answered by the deadline is None."""
        if self.local is not None:
            return await self.search_local_batch(query)
        calls = [h.search.remote(query) for h in self.shards]
        tasks = [asyncio.ensure_future(_result(call)) for call in calls]
        done, pending = await asyncio.wait(tasks, timeout=self.shard_timeout_s)
        for call, task in zip(calls, tasks):
            if task in pending:
                # Cancel the request itself too, so a late shard does not compute for nobody.
                call.cancel()
                task.cancel()
                task.add_done_callback(_retrieve)
        out: list[ShardHits | None] = []
        for name, task in zip(self.shard_names, tasks):
            if task in done and task.exception() is None:
                out.append(task.result())
            else:
                if task in done:
                    log.warning("shard %s failed: %s", name, task.exception())
                out.append(None)
        return out

    @staticmethod
    async def _ping(handle, timeout: float) -> bool:
        call = handle.ping.remote()
        try:
            return bool(await asyncio.wait_for(_result(call), timeout))
        except Exception:  # noqa: BLE001 - any failure means "not answering"
            call.cancel()
            return False


async def _result(call):
    """A DeploymentResponse as a coroutine (for asyncio.wait / wait_for)."""
    return await call


def _retrieve(task: asyncio.Task) -> None:
    """Consume the outcome of an abandoned task (asyncio would log it as never retrieved)."""
    if not task.cancelled():
        task.exception()
