"""Building an index directory from an embeddings folder: choose, check, train once, add in shards,
merge, tune.

    Parquet footers: sizes, dimensions           (no vectors read)
    choose the factory; check it can be trained  (before anything is read)
    check   N shard builders (Ray actors or tasks spread over nodes; one shard on one machine:
            in this process, without Ray) read every vector once: NaN/inf and dimensions refused,
            the seeded training sample and tuning queries picked out, the vectors kept when the
            shares are large enough to be worth it and fit in memory
    train   once, on a GPU when there is one            -> trained.index
    add     the same builders add their rows (kept, or read again) to copies of the trained index
            and find the tuning queries' exact neighbours -> shards/shard-*.index + id maps
    merge   optionally, inverted lists appended into one index
    tune    smallest nprobe / efSearch reaching --target-recall on the held-out queries
    local   with local features in the embeddings folder (`raysearch build --local`), each
            shard's gathered into shards/shard-*.local.parquet (Ray tasks, one per shard)
    manifest.json, written last and atomically, with every file's size and checksum
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raysearch import storage
from raysearch.formats.embeddings import check_parts, read_errors
from raysearch.index import factory as fac
from raysearch.index.fanout import ShardGroup, merge_topk, search_shards
from raysearch.index.merge import is_fastscan, merge_into, to_searchable
from raysearch.index.shards import ShardBuilder, plan_shards, write_idmap, write_index
from raysearch.index.store import (
    ERRORS_FILE,
    TRAINED_INDEX,
    describe_files,
    read_index_file,
    shard_ids_name,
    shard_name,
    wants_mmap,
    write_manifest,
)
from raysearch.index.train import (
    check_kmeans,
    check_train_on,
    faiss_gpus,
    torch_cuda_available,
    train_index,
    train_serialized,
)
from raysearch.index.transforms import learn_whitening, wrap_index
from raysearch.index.tune import (
    COPY_COSINE,
    QUERY_KINDS,
    TUNE_MARGIN,
    TuneResult,
    drop_self,
    perturbed_queries,
    search_param,
    tune,
    tune_queries_count,
)
from raysearch.progress import Progress
from raysearch.runtime import Timer, available_memory, cluster_cpus, cluster_gpus, ensure_ray

log = logging.getLogger("raysearch")
METRICS = {"l2": faiss.METRIC_L2, "ip": faiss.METRIC_INNER_PRODUCT}
TUNE_K = 10


@dataclass(frozen=True)
class IndexConfig:
    """How to build the index. See `raysearch index --help` for the meaning of each option."""

    factory: str = "auto"
    metric: str = "l2"          # on L2-normalised vectors, L2 ranks exactly like inner product
    max_memory: str = "4G"
    shards: int = 1
    merge: bool = False
    train_size: int | None = None
    seed: int = 1234
    nprobe: int | None = None   # fix nprobe / efSearch instead of tuning it
    target_recall: float = 0.95
    tune: bool = True
    train_on: str = "auto"      # auto, cpu, faiss-gpu, torch or torch:DEVICE
    kmeans: str = "auto"        # coarse k-means: auto, flat or two-level (raysearch.index.train)
    tune_queries: int | None = None   # default: min(1000, N/10)
    tune_with: str = "perturbed"      # tuning queries: "perturbed" copies of indexed vectors, or "database" (raysearch.index.tune)
    cpus_per_shard: int | None = None  # default: the cluster's CPUs shared among the shards
    whitening: Any = None       # raysearch.index.transforms.WhiteningConfig: PCA-whitening in front of the index
    keep_vectors: bool | None = None  # builders keep their share between check and add; None: when it fits in memory
    progress: bool = False            # show the training and adding steps on stderr (raysearch.progress)

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"--metric must be one of {sorted(METRICS)}, got {self.metric!r}")
        if self.shards < 1:
            raise ValueError(f"--shards must be >= 1, got {self.shards}")
        fac.parse_memory(self.max_memory)
        if self.train_size is not None and self.train_size < 1:
            raise ValueError(f"--train-size must be >= 1, got {self.train_size}")
        if self.nprobe is not None and self.nprobe < 1:
            raise ValueError(f"--nprobe must be >= 1, got {self.nprobe}")
        if not 0.0 < self.target_recall <= 1.0:
            raise ValueError(f"--target-recall must be in (0, 1], got {self.target_recall}")
        check_train_on(self.train_on)
        check_kmeans(self.kmeans, self.train_on)
        if self.tune_with not in QUERY_KINDS:
            raise ValueError(f"tune_with must be one of {QUERY_KINDS}, got {self.tune_with!r}")
        if self.tune_queries is not None and self.tune_queries < 1:
            raise ValueError(f"--tune-queries must be >= 1, got {self.tune_queries}")
        if self.cpus_per_shard is not None and self.cpus_per_shard < 1:
            raise ValueError(f"--cpus-per-shard must be >= 1, got {self.cpus_per_shard}")


def choose_positions(n: int, n_train: int, n_queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random positions (0..n-1, sorted) of the training sample and the tuning queries,
    disjoint unless the collection is too small to hold both."""
    rng = np.random.default_rng(seed)
    n_train, n_queries = min(n_train, n), min(n_queries, n)
    if n_train + n_queries <= n:
        picked = rng.choice(n, size=n_train + n_queries, replace=False)
        return np.sort(picked[:n_train]), np.sort(picked[n_train:])
    train = rng.choice(n, size=n_train, replace=False)
    return np.sort(train), np.sort(rng.choice(n, size=n_queries, replace=False))


def make_index(factory: str, dim: int, metric: str) -> faiss.Index:
    """faiss.index_factory(dim, factory, metric), or a ValueError naming the string (with a hint
    when only its case is wrong, e.g. 'hnsw32' for 'HNSW32')."""
    try:
        return faiss.index_factory(dim, factory, METRICS[metric])
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "invalid"
        hint = ""
        if factory.upper() != factory:
            try:
                faiss.index_factory(dim, factory.upper(), METRICS[metric])
                hint = f" (did you mean {factory.upper()!r}? factory strings are case-sensitive)"
            except RuntimeError:
                pass
        # FAISS's message names the C++ function and source line first; keep the reason after them.
        found = re.search(r" at \S+:\d+: (.*)$", first)
        reason = found.group(1) if found else first
        raise ValueError(f"--index {factory!r} is not a valid FAISS factory string for {dim}-d vectors{hint}: {reason}") from e


def check_index_request(config: IndexConfig, dim: int, n: int) -> tuple[faiss.Index, str, str, int | None]:
    """Check that `config` can index `n` vectors of dimension `dim` (after whitening, when it
    whitens): the factory string parses, PQ sub-quantisers divide the dimension, there are enough
    training vectors for its lists and codes. Cheap (no vector is read), so a build calls it
    before embedding anything. Returns (the untrained index, factory, why that factory, its
    estimated bytes or None). Raises ValueError naming the option."""
    index_dim = dim
    if config.whitening is not None:
        index_dim = min(config.whitening.dim or dim, dim, max(1, n - 1))
    estimated = None
    if config.factory == "auto":
        choice = fac.choose_factory(n, index_dim, config.max_memory)
        factory, reason, estimated = choice.factory, choice.reason, choice.estimated_bytes
    else:
        factory, reason = config.factory, "given with --index"
    index = make_index(factory, index_dim, config.metric)
    if config.merge and config.shards > 1 and "HNSW" in factory:
        raise ValueError("--merge is not possible for HNSW graphs; build with --shards 1 or keep the shards")
    n_train = 0 if index.is_trained else min(config.train_size or fac.training_size(index, n), n)
    need = fac.min_training_vectors(index)
    if not index.is_trained and n_train < need:
        raise ValueError(
            f"--index {factory!r} needs at least {need} training vectors, but only {n_train} are "
            f"available ({n} vectors{', --train-size ' + str(config.train_size) if config.train_size else ''}); "
            "use fewer lists/codes or --index auto"
        )
    return index, factory, reason, estimated


def default_nprobe(index: faiss.Index) -> int | None:
    """Untuned fallback: sqrt(nlist)."""
    try:
        nlist = faiss.extract_index_ivf(index).nlist
    except RuntimeError:
        return None
    return int(max(1, min(nlist, round(nlist ** 0.5))))


def is_exact(index: faiss.Index) -> bool:
    base = faiss.downcast_index(index)
    return isinstance(base, faiss.IndexFlat)


def task_cpus(n_tasks: int, requested: int | None = None) -> int:
    """CPUs each of `n_tasks` builder tasks reserves: the cluster's CPUs shared among them, no more
    than the largest node has (a task runs on one node)."""
    if requested:
        return requested
    import ray

    node_cpus = [float(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
    if not node_cpus or max(node_cpus) < 1:
        return 1
    return int(max(1, min(sum(node_cpus) // max(1, n_tasks), max(node_cpus))))


def _slices_with_offsets(parts: list[str], plan: list[list[tuple[int, int, int]]], sizes: list[int]):
    """Per task: [(part uri, start, stop)] and the global positions [lo, hi) its rows cover."""
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    out = []
    for shard_plan in plan:
        slices = [(parts[p], lo, hi) for p, lo, hi in shard_plan]
        if shard_plan:
            p0, lo0, _ = shard_plan[0]
            p1, _, hi1 = shard_plan[-1]
            span = (int(starts[p0] + lo0), int(starts[p1] + hi1))
        else:
            span = (0, 0)
        out.append((slices, span))
    return out


KEEP_FRACTION = 0.3       # builders keep their shares when a node's shares take at most this much of its memory
# Below this share size, reading a share again costs less than starting a process for each builder
# (Ray tasks reuse worker processes; actors start their own): Ray builders keep nothing.
KEEP_MIN_SHARE_BYTES = 256 << 20
ROW_OVERHEAD = 128         # bytes per row besides the vector: id, image_id, uri (an estimate)


def runs_in_process(config: IndexConfig) -> bool:
    """One shard on one machine needs no Ray: its builder runs in this process, which spares
    Ray's start (several seconds) and a worker process. A Ray cluster of several nodes (joined
    already or named by RAY_ADDRESS) keeps the builder on Ray."""
    if config.shards != 1:
        return False
    import ray

    if ray.is_initialized():
        return sum(1 for node in ray.nodes() if node.get("Alive")) == 1
    return not os.environ.get("RAY_ADDRESS")


def shares_fit_in_memory(n: int, dim: int, n_tasks: int, in_process: bool, per_node: int = 1) -> bool:
    """Whether builders may keep their shares between the check and add passes: the shares one
    node holds take at most KEEP_FRACTION of its memory (the smallest node's Ray memory resource
    on a cluster, this machine's available memory in process)."""
    share = -(-n // max(1, n_tasks)) * (4 * dim + ROW_OVERHEAD)
    if in_process:
        return n_tasks * share <= KEEP_FRACTION * available_memory()
    import ray

    nodes = [nd for nd in ray.nodes() if nd.get("Alive") and nd["Resources"].get("CPU", 0) > 0]
    smallest = min((float(nd["Resources"].get("memory", 0)) for nd in nodes), default=0.0)
    return per_node * share <= KEEP_FRACTION * smallest


def actor_slots(cpus: float) -> tuple[int, int]:
    """(builders of `cpus` CPUs each the cluster holds at once, the most one node holds)."""
    import ray

    per_node = [
        int(float(nd["Resources"].get("CPU", 0)) / cpus + 1e-9) for nd in ray.nodes() if nd.get("Alive")
    ]
    return sum(per_node), max(per_node, default=0)


class _Builders:
    """The shard builders of one build, in one of three forms:

    - in process: one `ShardBuilder` here (one shard on one machine, no Ray);
    - Ray actors, one per shard, all alive at once, spread over the nodes, each with its share
      of the cluster's CPUs (a fraction of one when shards outnumber CPUs): they keep their
      vectors from the check pass to the add pass. Used when every actor fits at once and the
      shares are worth keeping (at least KEEP_MIN_SHARE_BYTES each) and fit in memory. An actor
      lost with its node is restarted once and reads its parts again;
    - Ray tasks, queued by Ray: each pass reads its parts (bounded memory, any shard count).
    """

    def __init__(self, builders: list, mode: str, cpus: float | None, keep: bool, tasks: list, dim: int):
        self.builders, self.mode, self.cpus, self.keep = builders, mode, cpus, keep
        self.tasks, self.dim = tasks, dim

    @classmethod
    def start(cls, tasks: list, dim: int, n: int, config: IndexConfig, in_process: bool) -> _Builders:
        if in_process:
            keep = config.keep_vectors if config.keep_vectors is not None else shares_fit_in_memory(n, dim, 1, True)
            return cls([ShardBuilder(slices, dim, None, keep) for slices, _ in tasks], "process", None, keep, tasks, dim)
        import ray

        n_tasks = len(tasks)
        cpus = float(config.cpus_per_shard or max(0.01, cluster_cpus() / n_tasks))
        cpus = int(cpus) if cpus >= 1 else math.floor(cpus * 100) / 100
        held, most_per_node = actor_slots(cpus)
        keep = config.keep_vectors is not False and held >= n_tasks
        if keep and config.keep_vectors is None:
            share = -(-n // n_tasks) * (4 * dim + ROW_OVERHEAD)
            keep = share >= KEEP_MIN_SHARE_BYTES and shares_fit_in_memory(
                n, dim, n_tasks, False, per_node=min(n_tasks, most_per_node))
        if keep:
            actor = ray.remote(
                num_cpus=cpus, scheduling_strategy="SPREAD", max_restarts=1, max_task_retries=1
            )(ShardBuilder)
            threads = max(1, int(cpus))
            return cls([actor.remote(slices, dim, threads, True) for slices, _ in tasks], "actors", cpus, True, tasks, dim)
        cpus = task_cpus(n_tasks, config.cpus_per_shard)
        return cls([], "tasks", cpus, False, tasks, dim)

    def share(self, value: Any) -> Any:
        """`value` as every builder receives it (one copy in Ray's object store)."""
        if self.mode == "process":
            return value
        import ray

        return ray.put(value)

    def call(self, method: str, args: list[tuple], done: Callable[[Any], None] | None = None) -> list:
        """builder[i].method(*args[i]) for every shard, in parallel on Ray; their results, in
        shard order. `done(result)` is called as each one finishes (for progress)."""
        done = done or (lambda result: None)
        if self.mode == "process":
            results = []
            for b, a in zip(self.builders, args):
                results.append(getattr(b, method)(*a))
                done(results[-1])
            return results
        import ray

        if self.mode == "actors":
            refs = [getattr(b, method).remote(*a) for b, a in zip(self.builders, args)]
        else:
            remote = ray.remote(num_cpus=self.cpus, scheduling_strategy="SPREAD")(_run_builder)
            refs = [remote.remote(slices, self.dim, self.cpus, method, *a) for (slices, _), a in zip(self.tasks, args)]
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            done(ray.get(ready[0]))
        return ray.get(refs)

    def close(self) -> None:
        if self.mode == "actors":
            import ray

            for b in self.builders:
                ray.kill(b)
        self.builders = []


def _run_builder(slices: list, dim: int, threads: int, method: str, *args: Any) -> Any:
    """One pass of a shard builder that keeps nothing, as a Ray task."""
    return getattr(ShardBuilder(slices, dim, threads, keep=False), method)(*args)


def build_index(
    embeddings_dir: str, index_dir: str, config: IndexConfig = IndexConfig(), extra_manifest: dict[str, Any] | None = None,
    build_record: dict[str, Any] | None = None, local_features: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build an index directory from a complete embeddings folder; returns the manifest.

    `extra_manifest`: more entries for the manifest (e.g. how the embeddings were augmented);
    `build_record`: more entries for its "build" record (e.g. the request that made it);
    `local_features`: the images' local features to store beside the shards: the embeddings
    run's "local" record plus "parts", the folder of its local-features parts.
    """
    timer = Timer()
    emb, parts, sizes, dim = check_parts(embeddings_dir)
    n = sum(sizes)

    check_index_request(config, dim, n)   # before learning anything
    whitener, whitening_record = None, None
    if config.whitening is not None:
        storage.makedirs(index_dir)
        with timer("whiten"):
            whitener, whitening_record = learn_whitening(config.whitening, embeddings_dir, config.seed)
    index_config = config if whitener is None else dataclasses.replace(config, whitening=None)
    index, factory, reason, estimated = check_index_request(index_config, whitener.d_out if whitener else dim, n)
    log.info("index: %s (%s)", factory, reason)
    if whitener is not None:
        index = wrap_index(whitener, index)  # every shard then whitens its queries itself
    n_train = 0 if index.is_trained else min(config.train_size or fac.training_size(index, n), n)
    tuning = config.tune and config.nprobe is None and not is_exact(index) and n > TUNE_K + 1
    n_queries = (config.tune_queries or tune_queries_count(n)) if tuning else 0
    train_pos, query_pos = choose_positions(n, n_train, n_queries, config.seed)
    wanted = np.union1d(train_pos, query_pos)

    in_process = runs_in_process(config)
    if not in_process:
        ensure_ray()
    plan = plan_shards(sizes, config.shards)
    tasks = _slices_with_offsets(parts, plan, sizes)
    builders = _Builders.start(tasks, dim, n, config, in_process)
    cpus = builders.cpus

    with timer("check"):
        picked = builders.call("check", [(wanted[(wanted >= a) & (wanted < b)], a) for _, (a, b) in tasks])
    if sum(p["n"] for p in picked) != n:
        raise RuntimeError(f"the check pass read {sum(p['n'] for p in picked)} vectors, expected {n}")
    kept = builders.keep
    x_wanted = np.concatenate([p["x"] for p in picked]) if picked else np.empty((0, dim), np.float32)
    rows_wanted = np.concatenate([p["rows"] for p in picked]) if picked else np.empty(0, np.int64)
    del picked
    xt = np.ascontiguousarray(x_wanted[np.isin(wanted, train_pos)])
    in_queries = np.isin(wanted, query_pos)
    xq, q_rows = np.ascontiguousarray(x_wanted[in_queries]), rows_wanted[in_queries]
    if config.tune_with == "perturbed":
        # Copies of the held-out vectors, as an edited copy of an image would be: nothing to leave out.
        xq, q_rows = perturbed_queries(xq, x_wanted, seed=config.seed), np.full(len(q_rows), -1, np.int64)
    del x_wanted

    with timer("train"), Progress("training the quantiser", len(xt), "vectors", enabled=config.progress,
                                         blocking=True) as shown:
        train_report = _train(index, xt, config)
        index = train_report.pop("index")
        shown.update(len(xt))
    del xt
    storage.makedirs(index_dir)
    trained_bytes = faiss.serialize_index(index).tobytes()
    write_index(index, storage.join(index_dir, TRAINED_INDEX))

    merging = config.merge and config.shards > 1
    with timer("add"):
        # Exact neighbours for tuning are found in the space the index compares (whitened if it whitens).
        trained_arg, xq_arg = builders.share(trained_bytes), (builders.share(xq) if len(xq) else None)
        shown = Progress("adding", n, "vectors", enabled=config.progress)
        results = builders.call("add", [
            (trained_arg, storage.join(index_dir, shard_name(i)), storage.join(index_dir, shard_ids_name(i)),
             merging, xq_arg, TUNE_K + 1, config.metric, whitener is not None)
            for i in range(len(tasks))
        ], done=lambda result: shown.update(result["ntotal"]))
        shown.close()
    builders.close()
    shard_counts = [r["ntotal"] for r in results]
    if sum(shard_counts) != n:
        raise RuntimeError(f"shards hold {sum(shard_counts)} vectors, expected {n}")
    shard_entries = [
        {"name": shard_name(i), "ids_name": shard_ids_name(i), "ntotal": c} for i, c in enumerate(shard_counts)
    ]
    if merging:
        with timer("merge"):
            shard_entries = [merge_shards(index_dir, shard_entries, to_fastscan=is_fastscan(index))]

    with timer("tune"):
        search_info = _search_settings(index_dir, shard_entries, index, config, xq, q_rows, results)

    local_record = None
    if local_features is not None:
        with timer("local"):
            local_record = gather_shard_local_features(index_dir, shard_entries, local_features, in_process,
                                                       progress=config.progress)

    errors = read_errors(embeddings_dir)
    buf = pa.BufferOutputStream()
    pq.write_table(errors, buf)
    storage.atomic_write(storage.join(index_dir, ERRORS_FILE), buf.getvalue().to_pybytes())

    names = [TRAINED_INDEX, ERRORS_FILE] + [s["name"] for s in shard_entries] + [s["ids_name"] for s in shard_entries]
    if local_record is not None:
        names += list(local_record["files"].values())
    manifest = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": emb["model"],
        "dim": dim,
        "metric": config.metric,
        "score": "1 - squared L2 distance / 2 (cosine for unit vectors)" if config.metric == "l2" else "inner product",
        "factory": factory,
        "factory_reason": reason,
        "estimated_bytes": estimated,
        "trained_index": TRAINED_INDEX,
        "train_size": int(train_report["n_train"]),
        "seed": config.seed,
        "n_images": int(emb["n_images"]),
        "n_vectors": n,
        "n_errors": int(emb["n_errors"]),
        "next_row": int(emb.get("end_row", emb["n_images"])),
        "embeddings": [_relative_or_absolute(index_dir, embeddings_dir)],
        "errors_files": [ERRORS_FILE],
        "shards": shard_entries,
        "merged": merging,
        "search": search_info,
        "build": {
            **(build_record or {}),
            "train": train_report,
            "in_process": in_process,
            "cpus_per_task": cpus,
            "vectors_kept_between_passes": kept,
            "shard_tasks": [
                {"shard": i, "node_id": r.get("node_id"), "ntotal": r["ntotal"], "seconds": round(r["seconds"], 3),
                 "reread": r["reread"]}
                for i, r in enumerate(results)
            ],
        },
        "timings": {k: round(v, 3) for k, v in timer.seconds.items()},
        "files": describe_files(index_dir, names),
        **({"whitening": whitening_record} if whitening_record else {}),
        **({"local": local_record} if local_record else {}),
        **(extra_manifest or {}),
    }
    write_manifest(index_dir, manifest)
    return manifest


def gather_shard_local_features(index_dir: str, shard_entries: list[dict], local: dict[str, Any],
                                in_process: bool, progress: bool = False) -> dict[str, Any]:
    """Write each shard's local features (those of the ids in its id map) beside it, from the
    local-features parts in local["parts"]: one Ray task per shard (in this process for a
    one-shard build without Ray). Returns the manifest's "local" record: the extractor, the
    descriptor kind and dimension, {shard name: file name} and the images stored."""
    from raysearch.formats.embeddings import list_parts
    from raysearch.formats.local import LOCAL_PARTS, local_features_uri

    parts = list_parts(local["parts"], LOCAL_PARTS)
    files = {e["name"]: local_features_uri(e["name"]) for e in shard_entries}
    args = [(parts, storage.join(index_dir, e["ids_name"]), storage.join(index_dir, files[e["name"]]),
             local["kind"], int(local["dim"])) for e in shard_entries]
    with Progress("storing local features", len(args), "shards", enabled=progress) as shown:
        if in_process:
            counts = []
            for a in args:
                counts.append(_gather_shard(*a))
                shown.update(1)
        else:
            import ray

            remote = ray.remote(num_cpus=1, scheduling_strategy="SPREAD")(_gather_shard)
            refs = [remote.remote(*a) for a in args]
            pending = list(refs)
            while pending:
                _, pending = ray.wait(pending, num_returns=1)
                shown.update(1)
            counts = ray.get(refs)
    n_vectors = sum(int(e["ntotal"]) for e in shard_entries)
    if sum(counts) < n_vectors:
        log.warning("local features stored for %d of %d vectors; verification reads the others' images",
                    sum(counts), n_vectors)
    return {"extractor": local["extractor"], "kind": local["kind"], "dim": int(local["dim"]),
            "files": files, "n_images": int(sum(counts))}


def _gather_shard(parts: list[str], ids_uri: str, out_uri: str, kind: str, dim: int) -> int:
    from raysearch.formats.local import gather_local_features

    fs, path = storage.get_fs(ids_uri)
    with fs.open(path, "rb") as f:
        ids = pq.read_table(f, columns=["id"]).column("id").to_numpy()
    return gather_local_features(parts, ids, out_uri, kind, dim)


def _train(index: faiss.Index, xt: np.ndarray, config: IndexConfig) -> dict:
    """Train here, or in a Ray task on a GPU node when this process sees no GPU but the cluster
    has one and --train-on allows a GPU. Returns the train report with the trained "index"."""
    if index.is_trained:
        return {"backend": "none", "device": "cpu", "n_train": 0, "seconds": 0.0, "index": index}
    wants_gpu = (config.train_on in ("auto", "faiss-gpu", "torch") or config.train_on.startswith("torch:cuda")) \
        and config.kmeans != "two-level"   # two-level k-means runs on the CPU
    import ray

    if wants_gpu and ray.is_initialized() and not _local_gpu():
        if cluster_gpus() >= 1:
            import ray

            remote = ray.remote(num_gpus=1, num_cpus=1)(train_serialized)
            trained, report = ray.get(
                remote.remote(faiss.serialize_index(index).tobytes(), xt, config.seed, config.train_on, config.kmeans)
            )
            report["where"] = "ray task on a GPU node"
            return {**report, "index": faiss.deserialize_index(np.frombuffer(trained, dtype=np.uint8))}
    report = train_index(index, xt, config.seed, config.train_on, config.kmeans).to_dict()
    return {**report, "where": "driver", "index": index}


def _local_gpu() -> bool:
    if faiss_gpus() > 0:
        return True
    return torch_cuda_available()


def open_shard_files(index_dir: str, entries: list[dict], tmp: str) -> list[faiss.Index]:
    """The shards just written (copied to `tmp` when remote), in memory or memory-mapped by the
    rule searchers follow (`store.wants_mmap`)."""
    paths = [storage.local_copy(storage.join(index_dir, e["name"]), tmp) for e in entries]
    # Opened as searchers will open them, so the recorded latencies are theirs.
    mmap = wants_mmap(sum(os.path.getsize(p) for p in paths))
    return [read_index_file(p, mmap=mmap) for p in paths]


def _search_settings(
    index_dir: str, entries: list[dict], trained: faiss.Index, config: IndexConfig,
    xq: np.ndarray, q_rows: np.ndarray, results: list[dict],
) -> dict[str, Any]:
    """manifest["search"]: the tuned nprobe/efSearch and its recall curve, or the fixed value."""
    if config.nprobe is not None:
        return {"nprobe": config.nprobe, "param": search_param(trained)[0], "tuned": False, "fixed": True}
    if is_exact(trained):
        return {"nprobe": None, "param": None, "tuned": False, "exact": True}
    if not len(xq):
        return {"nprobe": default_nprobe(trained), "param": search_param(trained)[0], "tuned": False}
    merged = merge_topk([r["D"] for r in results], [r["I"] for r in results], TUNE_K + 1, keep_max=config.metric != "l2")
    truth = drop_self(merged.I, q_rows, TUNE_K)
    param, values = search_param(trained)
    with tempfile.TemporaryDirectory(prefix="raysearch-tune-") as tmp:
        shards = ShardGroup(open_shard_files(index_dir, entries, tmp))  # searched as a Searcher would
        result: TuneResult = tune(
            lambda q, k, v: search_shards(shards, q, k, v, config.metric)[1],
            xq, q_rows, truth, param, values, min(1.0, config.target_recall + TUNE_MARGIN), TUNE_K,
        )
        del shards  # release the memory maps before the folder goes
    if result.recall < config.target_recall:
        log.warning(
            "recall@%d %.3f: the target %.3f is out of reach for %s (codes too coarse); using %s=%s",
            TUNE_K, result.recall, config.target_recall, type(trained).__name__, result.param, result.value,
        )
    queries = (f"indexed vectors sampled at random, each moved to cosine {COPY_COSINE} along the "
               "collection's covariance (like an edited copy)" if config.tune_with == "perturbed"
               else "indexed vectors sampled at random, their own id left out")
    return result.to_manifest(queries, target=config.target_recall)


def merge_shards(index_dir: str, shard_entries: list[dict], to_fastscan: bool = False) -> dict:
    """Merge every shard into shard 0 (in memory), write it, remove the others.

    Shards built for merging hold plain inverted lists; fast-scan indexes are packed after the merge.
    """
    first = shard_entries[0]
    id_tables = []
    with tempfile.TemporaryDirectory(prefix="raysearch-merge-") as tmp:
        merged = faiss.read_index(storage.local_copy(storage.join(index_dir, first["name"]), tmp))
        for entry in shard_entries:
            fs, path = storage.get_fs(storage.join(index_dir, entry["ids_name"]))
            with fs.open(path, "rb") as f:
                id_tables.append(pq.read_table(f).rename_columns(["row", "image_id", "uri"]))
            if entry is first:
                continue
            src_path = storage.local_copy(storage.join(index_dir, entry["name"]), tmp)
            merge_into(merged, faiss.read_index(src_path))
            if src_path.startswith(tmp):
                os.unlink(src_path)
    if to_fastscan:
        merged = to_searchable(merged)
    write_index(merged, storage.join(index_dir, first["name"]))
    write_idmap(storage.join(index_dir, first["ids_name"]), id_tables)
    for entry in shard_entries[1:]:
        storage.remove(storage.join(index_dir, entry["name"]))
        storage.remove(storage.join(index_dir, entry["ids_name"]))
    return {"name": first["name"], "ids_name": first["ids_name"], "ntotal": int(merged.ntotal)}


def _relative_or_absolute(index_dir: str, path: str) -> str:
    """How the manifest names a folder: relative to the index when it is inside it (the index can
    then be moved), else absolute (a path relative to the working directory would break as soon
    as the index is used from elsewhere)."""
    if "://" in path or "://" in index_dir:
        return path
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(index_dir))
    return os.path.abspath(path) if rel.startswith("..") else rel
