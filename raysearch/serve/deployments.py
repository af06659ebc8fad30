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
    manifest_version,
    merge_shard_hits,
    open_shards,
    search_opened,
    search_shard_group,
    shard_label,
    slot_shards,
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
                 max_batch_size: int, batch_wait_timeout_s: float, n_slots: int = 1):
        self.index_dir = index_dir
        self.shard = shard                 # this deployment's slot: shards i with i % n_slots == shard
        self.n_slots = max(1, n_slots)
        self.verify = verify
        self.search_threads = search_threads
        self.opened = self._open()
        self._reloading = asyncio.Lock()
        self.search_batch.set_max_batch_size(max_batch_size)
        self.search_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.batches = _BatchLog()

    def _open(self) -> OpenShards:
        from raysearch.index.store import IndexStore

        n = len(IndexStore(self.index_dir, verify=False).shards)
        return open_shards(self.index_dir, slot_shards(n, self.shard, self.n_slots), self.verify, self.search_threads)

    async def reload(self, version: str | None = None) -> str | None:
        """Reopen the index when its manifest is not at `version` (None: whatever it is now) and
        differs from the one this replica holds; returns the version it holds afterwards."""
        async with self._reloading:
            current = version or await asyncio.to_thread(manifest_version, self.index_dir)
            if current != self.opened.version:
                # Opened in a thread beside the old shards, which keep answering until the swap.
                self.opened = await asyncio.to_thread(self._open)
                log.info("shard searcher %d reopened %s at version %s", self.shard, self.index_dir, self.opened.version)
            return self.opened.version

    async def search(self, query: ShardQuery) -> ShardHits:
        """One request's queries -> this shard's top-k of each, via `search_batch`."""
        return await self.search_batch(query)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.0)
    async def search_batch(self, queries: list[ShardQuery]) -> list[ShardHits]:
        """@serve.batch: the requests of concurrent `search` calls -> one ShardHits each, with one
        FAISS search per distinct nprobe (after reopening the index when the ingress serves a
        newer version of it)."""
        self.batches.add(sum(q.xq.shape[0] for q in queries))
        versions = {q.version for q in queries if q.version is not None}
        if versions and versions != {self.opened.version}:
            await self.reload()
        opened = self.opened
        # FAISS releases the GIL: searching in a thread keeps the event loop free to queue the
        # requests that form the next batch.
        return await asyncio.to_thread(search_opened, opened, queries)

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
    local` does (`config`: RerankConfig's k and mirror choice; the exclusive rule as there). Opens
    the index's stored local features once (or extracts the candidates' from their images when the
    index holds none)."""

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
        self.index_dir = str(index_info["index_dir"])
        self.verify = bool(settings.get("verify", True))
        # The manifest version served: sent with every shard query, so that searchers reopen the
        # index after add / remove / compact; checked on disk every reload_check_s (0: only on
        # POST /reload and DELETE), so every replica notices changes made by others.
        self.reload_check_s = float(settings.get("reload_check_s", 2.0))
        self.version = manifest_version(self.index_dir)
        self._checked_at = time.monotonic()
        self._writing = asyncio.Lock()
        self.local_threads = int(local["threads"]) if local else 1
        self.images = LiveImages(IndexedImages(self.index_dir, max_pixels=self.max_image_pixels), set())
        self._refresh_index_state()

    def _refresh_index_state(self) -> None:
        """Counts and removed image_ids of the index as it is now (stats, metrics, thumbnails)."""
        from raysearch.index.store import IndexStore
        from raysearch.index.tombstones import removed_image_ids

        from raysearch.index.fields import Fields, empty_fields

        store = IndexStore(self.index_dir, verify=False)
        removed = store.removed_ids()
        table = store.load_fields()
        self.fields = Fields(table) if table is not None else empty_fields()
        self.info = {**self.info, "count": store.ntotal - int(removed.size), "n_removed": int(removed.size),
                     "shards": [{"name": shard_label(s.name), "count": s.ntotal} for s in store.shards],
                     "version": self.version, "fields": self.fields.columns}
        self.metrics.index_vectors.set(self.info["count"])
        self.metrics.index_shards.set(len(store.shards))
        # Updated in place: the API's routes hold this object.
        self.images.update(IndexedImages(self.index_dir, max_pixels=self.max_image_pixels),
                           removed_image_ids(store, removed))

    async def reload(self) -> dict[str, Any]:
        """Reopen the index if its manifest changed since this replica opened it (`raysearch add`,
        `remove`, `compact`): the ingress's own shards with --shards-in-ingress, else every shard
        searcher is told the new version (one replica each now; the others when their next query
        carries it). Returns {"reloaded", "version", "count", "n_removed"}."""
        version = await asyncio.to_thread(manifest_version, self.index_dir)
        self._checked_at = time.monotonic()
        changed = version != self.version
        if changed:
            if self.local is not None:
                self.local = await asyncio.to_thread(open_shards, self.index_dir, None, self.verify,
                                                     self.local_threads)
            else:
                calls = [h.reload.remote(version) for h in self.shards]
                await asyncio.wait([asyncio.ensure_future(_result(c)) for c in calls],
                                   timeout=max(self.shard_timeout_s, 30.0))
            self.version = version
            await asyncio.to_thread(self._refresh_index_state)
        return {"reloaded": changed, "version": self.version, "count": self.info["count"],
                "n_removed": self.info["n_removed"]}

    async def remove_images(self, image_ids: list[str]) -> dict[str, Any]:
        """Tombstone `image_ids` in the index directory and serve the index without them
        (raysearch.index.tombstones.remove_images). Raises ApiError 404 for an id the index does
        not hold (nothing is removed then)."""
        from raysearch.index.tombstones import remove_images

        async with self._writing:   # one writer per replica; run one writer per index in all
            try:
                result = await asyncio.to_thread(remove_images, self.index_dir, image_ids, self.verify)
            except ValueError as e:
                raise ApiError(404, str(e)) from None
            state = await self.reload()
        return {"removed": list(image_ids), "vectors": result.vector_ids.tolist(), **state}

    async def _watch(self) -> None:
        if self.reload_check_s > 0 and time.monotonic() - self._checked_at >= self.reload_check_s:
            self._checked_at = time.monotonic()
            try:
                await self.reload()
            except Exception as e:  # noqa: BLE001 - a failed check leaves the service as it was
                log.warning("could not check %s for changes: %s", self.index_dir, e)

    def __serve_build_asgi_app__(self):
        # Built per replica, after __init__: the routes close over this replica's handles.
        return create_api(self, self.api_settings, self.metrics, self.images)

    # -- the SearchBackend protocol -------------------------------------------------------

    def _check_query_fields(self, where: str | None, fields: list[str] | None) -> None:
        """422 for a where filter that does not parse or names an unknown column, or an unknown
        field, before anything is embedded or searched."""
        try:
            if where is not None:
                from raysearch.index.fields import Where

                Where(where).mask(self.fields.table.slice(0, 0))
            if fields:
                self.fields.values([], fields)
        except ValueError as e:
            raise ApiError(422, str(e).replace("--where", "where").replace("--fields", "fields")) from None

    async def search_images(self, images: list[bytes], k: int, nprobe: int | None, where: str | None = None,
                            fields: list[str] | None = None) -> SearchAnswer:
        """Image files (their bytes) -> the top `k` of each: decoded here, embedded by the
        QueryEmbedder, then searched as `search_vectors`. Not batched here (the embedder is).

        Raises ApiError: 400 for an image that does not decode, 503 when the embedder fails or
        does not answer within embed_timeout_s, 422 for a non-finite embedding.
        """
        self._check_query_fields(where, fields)
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
            return await self.search_vectors(xq, k, nprobe, where, fields)
        merged, missing = await self._search_merged(xq, max(k, self.rerank_k), nprobe, where)
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
        return SearchAnswer(hits_to_json(verified, self.fields, fields), partial=bool(missing), missing_shards=missing)

    async def search_vectors(self, xq: np.ndarray, k: int, nprobe: int | None, where: str | None = None,
                             fields: list[str] | None = None) -> SearchAnswer:
        """Query vectors xq (n, dim) float32 -> the exact top `k` of each over the shards that
        answered within shard_timeout_s (partial when some did not). Not batched here (the shard
        searches are).

        Raises ApiError 503 when no shard answered.
        """
        self._check_query_fields(where, fields)
        merged, missing = await self._search_merged(xq, k, nprobe, where)
        # Vector queries carry no image to verify: their hits are the first stage's.
        return SearchAnswer(hits_to_json(merged, self.fields, fields), partial=bool(missing), missing_shards=missing)

    async def _search_merged(self, xq: np.ndarray, k: int, nprobe: int | None,
                             where: str | None = None) -> tuple[MergedHits, list[str]]:
        """The exact top `k` over the shards that answered, and the names of those that did not."""
        await self._watch()
        started = time.perf_counter()
        hits = await self._ask_shards(ShardQuery(xq, k, nprobe, version=self.version, where=where))
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
        local = self.local   # one opened version for the whole batch, even if a reload swaps it
        return search_shard_group(local.group, [ids for _, ids in local.shards], queries,
                                  local.metric, local.default_nprobe, local.id_filter, local)

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


class LiveImages:
    """The indexed images for GET /images/{image_id}, without those removed from the index."""

    def __init__(self, images: IndexedImages, removed: set[str]):
        self.images = images
        self.removed = removed

    def update(self, images: IndexedImages, removed: set[str]) -> None:
        """Serve the index as it is after a reload: its images as they are now, less `removed`."""
        self.images, self.removed = images, removed

    def remember(self, hits) -> None:
        self.images.remember(hits)

    def thumbnail(self, image_id: str, size: int) -> bytes | None:
        """A JPEG thumbnail of `image_id`, or None when the index does not hold it (any more)."""
        if image_id in self.removed:
            return None
        return self.images.thumbnail(image_id, size)


async def _result(call):
    """A DeploymentResponse as a coroutine (for asyncio.wait / wait_for)."""
    return await call


def _retrieve(task: asyncio.Task) -> None:
    """Consume the outcome of an abandoned task (asyncio would log it as never retrieved)."""
    if not task.cancelled():
        task.exception()
