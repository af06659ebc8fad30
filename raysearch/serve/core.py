"""The service's logic without Ray or HTTP: search one shard for a batch of requests, merge the
shards' answers exactly, turn them into the JSON answer, and size the deployments.

The Serve deployments (`deployments.py`) are thin wrappers around these functions, so each piece is
testable on its own and behaves exactly like the in-process `raysearch.search.Searcher`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from raysearch.index.store import IdMap
from raysearch.index.fanout import ShardGroup, distances_to_scores, merge_topk
from raysearch.index.fields import Fields, empty_fields
from raysearch.index.tombstones import VectorFilter, search_filtered


@dataclass
class ShardQuery:
    """One request's queries for one shard: xq (n, d) float32, k results each, optional nprobe."""

    xq: np.ndarray
    k: int
    nprobe: int | None = None
    # The index version (manifest digest) the ingress serves: a searcher holding another one
    # reopens the index first (after add / remove / compact).
    version: str | None = None
    where: str | None = None     # a metadata filter (raysearch.index.fields), checked by the ingress


@dataclass
class ShardHits:
    """One shard's top-k for one request, each (n, k): scores float32 (NaN where no result), ids
    int64 vector ids (-1 where no result), image_ids and uris object arrays (None where none)."""

    scores: np.ndarray
    ids: np.ndarray
    image_ids: np.ndarray
    uris: np.ndarray


@dataclass
class MergedHits:
    """The global top-k of a request over the shards that answered, shaped like ShardHits, with
    each hit's shard (int32, -1 where none) and, after verification (raysearch.rerank), whether it
    was verified and its inlier count."""

    scores: np.ndarray
    ids: np.ndarray
    image_ids: np.ndarray
    uris: np.ndarray
    shards: np.ndarray | None = None
    verified: np.ndarray | None = None
    inliers: np.ndarray | None = None

    def row(self, q: int, order: np.ndarray | None = None) -> "MergedHits":
        """Query q's hits (one row), in `order` (positions) when given."""
        pick = (lambda a: None if a is None else (a[q] if order is None else a[q][order])[None, :])
        return MergedHits(*(pick(getattr(self, f)) for f in ("scores", "ids", "image_ids", "uris", "shards",
                                                              "verified", "inliers")))


class NoShardAnswered(RuntimeError):
    """Not one shard answered: the service cannot give even a partial result."""


@dataclass
class OpenShards:
    """Shards of an index opened for searching in one replica, with what searching them needs."""

    shards: list[tuple[faiss.Index, IdMap]]
    metric: str
    default_nprobe: int | None   # the tuned value from the manifest
    group: ShardGroup            # the same indexes, searched together
    id_filter: VectorFilter | None = None   # the index's removed vectors, skipped by every search
    version: str | None = None   # the manifest's version these shards were opened from
    names: list[str] | None = None   # the shards' labels (shard-00001 ...)
    fields: Fields | None = None     # the index's metadata, for `where` filters
    index_ntotal: int | None = None  # vectors of the whole index (these shards may be a part)
    filters: dict[str, VectorFilter] | None = None   # recent `where` filters, built once each

    def filter_for(self, where: str | None) -> VectorFilter | None:
        """The ids a search may return: live ones, and with `where` those it selects."""
        if where is None:
            return self.id_filter
        cache = self.filters if self.filters is not None else {}
        if where not in cache:
            if len(cache) >= 16:
                cache.pop(next(iter(cache)))
            removed = self.id_filter.removed if self.id_filter is not None else None
            cache[where] = VectorFilter(removed, (self.fields or empty_fields()).select(where))
            self.filters = cache
        return cache[where]


def manifest_version(index_dir: str) -> str:
    """A short digest of the index's manifest: it changes whenever `add`, `remove` or `compact`
    rewrites the manifest, so a replica can tell that it should reopen the index."""
    import hashlib

    from raysearch import storage
    from raysearch.index.store import MANIFEST

    return hashlib.sha256(storage.read_bytes(storage.join(index_dir, MANIFEST))).hexdigest()[:16]


def open_shards(index_dir: str, which: list[int] | None, verify: bool, threads: int) -> OpenShards:
    """Open shards `which` (None: all) of an index as a searcher replica does: checked against the
    manifest, in memory or memory-mapped (`IndexStore.prefers_mmap`), FAISS on `threads` threads;
    with the index's tombstones, which every search through `search_shard_group` skips."""
    from raysearch.index.store import IndexStore

    faiss.omp_set_num_threads(threads)
    version = manifest_version(index_dir)
    store = IndexStore(index_dir, verify=verify)
    which = list(range(len(store.shards))) if which is None else which
    shards = [(store.load_shard(i), store.load_ids(i)) for i in which]
    table = store.load_fields()
    return OpenShards(shards, store.metric, store.nprobe, ShardGroup([index for index, _ in shards]),
                      VectorFilter(store.removed_ids()), version,
                      [shard_label(store.shards[i].name) for i in which],
                      Fields(table) if table is not None else empty_fields(), store.ntotal, {})


def search_shard(
    index: faiss.Index,
    id_map: IdMap,
    queries: list[ShardQuery],
    metric: str,
    default_nprobe: int | None,
    id_filter: VectorFilter | None = None,
) -> list[ShardHits]:
    """Answer a batch of requests on one shard (see `search_shard_group`)."""
    return search_shard_group(ShardGroup([index]), [id_map], queries, metric, default_nprobe, id_filter)[0]


def search_shard_group(
    group: ShardGroup,
    id_maps: list[IdMap],
    queries: list[ShardQuery],
    metric: str,
    default_nprobe: int | None,
    id_filter: VectorFilter | None = None,
    opened: OpenShards | None = None,
) -> list[list[ShardHits]]:
    """Answer a batch of requests on every shard of `group` with one search per distinct nprobe:
    per shard, one ShardHits per request. Ids `id_filter` refuses (removed images) are skipped
    while searching, so each request still gets k live results where the shard holds them;
    requests with a `where` filter are searched under `opened.filter_for(where)`.

    Requests that share an nprobe are stacked into one (sum n, d) matrix and searched with the
    largest k among them: FAISS parallelises over the rows of a batch, a request's top-k is the
    first k columns of a larger top-k, and shards that share their coarse quantiser assign the
    whole batch to lists once (`ShardGroup`).
    """
    out: list[list[ShardHits | None]] = [[None] * len(queries) for _ in id_maps]
    groups: dict[tuple[int | None, str | None], list[int]] = {}
    for i, q in enumerate(queries):
        groups.setdefault((q.nprobe or default_nprobe, q.where), []).append(i)
    for (nprobe, where), members in groups.items():
        xq = np.concatenate([queries[i].xq for i in members]).astype(np.float32, copy=False)
        k_max = max(queries[i].k for i in members)
        if where is not None and opened is None:
            raise ValueError("a query with a where filter needs the opened shards' metadata")
        chosen = opened.filter_for(where) if where is not None else id_filter
        total = opened.index_ntotal if opened is not None else None
        for shard, ((D, ids), id_map) in enumerate(zip(search_filtered(group, xq, k_max, nprobe, chosen, total), id_maps)):
            scores = distances_to_scores(D, metric)
            start = 0
            for i in members:
                n, k = queries[i].xq.shape[0], queries[i].k
                s, ids_i = scores[start : start + n, :k], ids[start : start + n, :k]
                start += n
                s = np.where(ids_i < 0, np.float32(np.nan), s).astype(np.float32)
                image_ids, uris = id_map.lookup(ids_i)
                out[shard][i] = ShardHits(s, ids_i.astype(np.int64), image_ids, uris)
    return out  # type: ignore[return-value]


def slot_shards(n_shards: int, slot: int, n_slots: int) -> list[int]:
    """The shard positions a searcher deployment serves: shard i goes to slot i % n_slots, so
    each of the deployments made for the shards a service started with keeps its own shard, and
    shards added later (`raysearch add`, picked up by a reload) are dealt out among them."""
    return [i for i in range(n_shards) if i % n_slots == slot]


def search_opened(opened: OpenShards, queries: list[ShardQuery]) -> list[ShardHits]:
    """Every shard of `opened` searched for a batch of requests, merged into one ShardHits per
    request (the top-k of those shards; vector ids are unique across shards)."""
    if not opened.shards:
        out = []
        for q in queries:
            n = q.xq.shape[0]
            none = np.full((n, q.k), None, dtype=object)
            out.append(ShardHits(np.full((n, q.k), np.nan, np.float32), np.full((n, q.k), -1, np.int64), none, none.copy()))
        return out
    per_shard = search_shard_group(opened.group, [ids for _, ids in opened.shards], queries, opened.metric,
                                   opened.default_nprobe, opened.id_filter, opened)
    if len(per_shard) == 1:
        return per_shard[0]
    merged = [merge_shard_hits([hits[i] for hits in per_shard], q.k) for i, q in enumerate(queries)]
    return [ShardHits(m.scores, m.ids, m.image_ids, m.uris) for m in merged]


def merge_shard_hits(hits: list[ShardHits | None], k: int) -> MergedHits:
    """Merge the shards' top-k lists into the global top-k, exactly as `Searcher.search` merges.

    `hits` holds one entry per shard, None for a shard that did not answer (its results are then
    simply absent; the caller reports the answer as partial). Raises NoShardAnswered if every
    entry is None.
    """
    present_at = [i for i, h in enumerate(hits) if h is not None]
    present = [hits[i] for i in present_at]
    if not present:
        raise NoShardAnswered("no shard answered")
    merged = merge_topk([h.scores for h in present], [h.ids for h in present], k, keep_max=True)
    shards = np.where(merged.source >= 0, np.asarray(present_at, np.int32)[np.clip(merged.source, 0, None)], -1)
    nq = merged.I.shape[0]
    found = merged.I >= 0
    image_ids = np.full((nq, k), None, dtype=object)
    uris = np.full((nq, k), None, dtype=object)
    # Each merged result points back at its shard's row: take its image_id and uri from there.
    for s, h in enumerate(present):
        mask = found & (merged.source == s)
        if mask.any():
            rows, cols = np.nonzero(mask)
            image_ids[rows, cols] = h.image_ids[rows, merged.rank[rows, cols]]
            uris[rows, cols] = h.uris[rows, merged.rank[rows, cols]]
    return MergedHits(merged.D, merged.I, image_ids, uris, shards.astype(np.int32))


def hits_to_json(merged: MergedHits, fields: Fields | None = None, columns: list[str] | None = None
                 ) -> list[list[dict[str, Any]]]:
    """One list per query of {"rank", "id", "uri", "score"} (and "verified", "inliers" after
    verification; "fields", the metadata `columns` from `fields`, when columns are asked for),
    best first; empty slots are dropped."""
    values = fields.values(merged.ids.ravel(), columns) if fields is not None and columns else None
    out = []
    for q in range(merged.ids.shape[0]):
        row = []
        for r in range(merged.ids.shape[1]):
            if merged.ids[q, r] < 0:
                break
            hit = {
                "rank": r + 1,
                "id": merged.image_ids[q, r],
                "uri": merged.uris[q, r],
                "score": float(merged.scores[q, r]),
            }
            if merged.verified is not None:
                hit.update(verified=bool(merged.verified[q, r]), inliers=int(merged.inliers[q, r]))
            if values is not None:
                hit["fields"] = values[q * merged.ids.shape[1] + r]
            row.append(hit)
        out.append(row)
    return out


def concat_hits(rows: list[MergedHits]) -> MergedHits:
    """Rows (one query each) stacked back into one MergedHits."""
    def cat(name: str):
        parts = [getattr(r, name) for r in rows]
        return None if any(p is None for p in parts) else np.concatenate(parts)

    return MergedHits(*(cat(f) for f in ("scores", "ids", "image_ids", "uris", "shards", "verified", "inliers")))


@dataclass(frozen=True)
class ResourcePlan:
    """Logical resources and threads per replica of each deployment."""

    ingress_cpus: float
    embedder_cpus: float
    embedder_gpus: float
    shard_cpus: float
    embed_threads: int
    search_threads: int
    verifier_cpus: float = 0.0   # per LocalVerifier replica (a second stage; 0 without one)


# What each replica would like when the cluster has room: the ingress only parses and merges.
WANTED_INGRESS_CPUS = 0.5
WANTED_EMBEDDER_CPUS = 1.0
WANTED_SHARD_CPUS = 1.0
WANTED_VERIFIER_CPUS = 1.0   # local-feature matching and RANSAC run on one OpenCV thread


def plan_resources(
    n_shards: int,
    replicas: int,
    shard_replicas: int,
    cluster_cpus: float,
    cluster_gpus: float,
    ingress_cpus: float | None = None,
    embedder_cpus: float | None = None,
    embedder_gpus: float | None = None,
    shard_cpus: float | None = None,
    embed_threads: int | None = None,
    search_threads: int | None = None,
    verifiers: int = 0,
    verifier_cpus: float | None = None,
) -> ResourcePlan:
    """Reserve resources so that every replica can start on the cluster as it is now.

    Values given explicitly are kept. The CPU shares left to choose start from what each replica
    would like and shrink together until the whole application fits the cluster's CPUs (on a
    laptop, three shards and an embedder share two cores); `verifiers` LocalVerifier replicas (a
    second stage) are counted with them. The embedder gets one GPU per replica
    when the cluster has enough, a share of one when it has fewer GPUs than replicas, none without.
    """
    if embedder_gpus is None:
        embedder_gpus = 0.0 if cluster_gpus <= 0 else min(1.0, cluster_gpus / replicas)
    wanted = {
        "ingress": (ingress_cpus, WANTED_INGRESS_CPUS, replicas),
        "embedder": (embedder_cpus, WANTED_EMBEDDER_CPUS, replicas),
        "shard": (shard_cpus, WANTED_SHARD_CPUS, n_shards * shard_replicas),
        "verifier": (verifier_cpus, WANTED_VERIFIER_CPUS, verifiers),
    }
    fixed = sum(v * n for v, _, n in wanted.values() if v is not None)
    flexible = sum(w * n for v, w, n in wanted.values() if v is None)
    room = max(0.0, cluster_cpus - fixed)
    scale = 1.0 if flexible <= room or flexible == 0 else room / flexible
    chosen = {}
    for name, (value, want, _) in wanted.items():
        # Round down so that rounding never asks for more than the cluster has; keep a floor so
        # that every replica reserves something (Ray then still spreads them over nodes).
        chosen[name] = value if value is not None else max(0.01, math.floor(want * scale * 100) / 100)
    return ResourcePlan(
        ingress_cpus=chosen["ingress"],
        embedder_cpus=chosen["embedder"],
        embedder_gpus=float(embedder_gpus),
        shard_cpus=chosen["shard"],
        embed_threads=embed_threads or max(1, round(chosen["embedder"])),
        search_threads=search_threads or max(1, round(chosen["shard"])),
        verifier_cpus=chosen["verifier"] if verifiers else 0.0,
    )


def shard_label(name: str) -> str:
    """'shards/shard-00001.index' -> 'shard-00001', the name answers use for a shard."""
    base = name.rsplit("/", 1)[-1]
    return base[: -len(".index")] if base.endswith(".index") else base
