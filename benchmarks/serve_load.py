"""Query service under load: N concurrent HTTP clients for T seconds vs in-process FAISS search.

An index of seeded synthetic unit vectors (dimension of the default model, clustered like real
embeddings) is built with raysearch's own `build_index`, served with `raysearch.serve` on
127.0.0.1, and queried with JSON `vector` requests (one query per request). The same queries
then run through `raysearch.search.Searcher` in this process (same index files, same k, same
nprobe) as the baseline. Every phase stops after --seconds or --max-requests, whichever first.

Reported per phase: requests, errors (non-200, timeouts, partial answers), queries/s, p50 and p99
latency in ms, and how many top-1 results differ from the in-process answer. Phases:
  sequential   one client: latency, so p50(serve) - p50(in-process) is the service's overhead
  concurrent   --clients clients (threads in-process, asyncio HTTP clients for the service)

The load generator runs on the same machine as the service; its HTTP client (--client, aiohttp by
default, or httpx) takes CPU the service would otherwise have.

Goals (issue): no errors; concurrent serve queries/s >= 0.5 x in-process; p50 overhead < 5 ms.

With `--rerank local` the service runs the second stage (a LocalVerifier deployment verifying each
image query's top --rerank-k with stored SIFT features): the index is then one of real images, a
copy-detection set cut from the "judge" photographs of benchmarks/photos.py and built with
`--local sift`, and the requests are JSON base64 image queries (edited copies and non-copies). The
baselines in the same run are the same image queries in this process, global only and with
`Searcher.search_images(..., rerank=...)` (what `raysearch search --rerank local` does); "top1 diff"
counts served answers whose first hit differs from the in-process two-stage answer.

Usage:
  python benchmarks/serve_load.py --vectors 100000 --shards 3 --clients 16 --seconds 30
  python benchmarks/serve_load.py --vectors 100000 --shards 3 --shards-in-ingress --direct-ingress
  python benchmarks/serve_load.py --vectors 5000 --clients 4 --seconds 5      # quick check
  python benchmarks/serve_load.py --rerank local --references 300 --clients 4 --seconds 30
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass
class PhaseResult:
    name: str
    clients: int
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    mismatches: int = 0
    seconds: float = 0.0

    @property
    def requests(self) -> int:
        return len(self.latencies_ms) + self.errors

    @property
    def qps(self) -> float:
        return len(self.latencies_ms) / self.seconds if self.seconds > 0 else 0.0

    def pct(self, p: float) -> float:
        return float(np.percentile(self.latencies_ms, p)) if self.latencies_ms else float("nan")

    def row(self) -> str:
        return (f"{self.name:24s} {self.clients:>7d} {self.requests:>9d} {self.errors:>7d} {self.mismatches:>10d} "
                f"{self.qps:>10.1f} {self.pct(50):>8.2f} {self.pct(99):>8.2f}")


def synthetic_vectors(n: int, dim: int, seed: int, n_clusters: int = 1000) -> np.ndarray:
    """Unit vectors around random centres (real embeddings cluster; uniform noise does not)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((min(n_clusters, n), dim)).astype(np.float32)
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, 20000):
        stop = min(n, start + 20000)
        x = centres[rng.integers(0, len(centres), stop - start)] + 0.6 * rng.standard_normal((stop - start, dim)).astype(np.float32)
        out[start:stop] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def ensure_index(workdir: str, n: int, shards: int, factory: str, seed: int) -> str:
    """Build the synthetic index in workdir/index, or reuse it if one with these settings exists."""
    from raysearch.formats.embeddings import write_embeddings
    from raysearch.index.build import IndexConfig, build_index
    from raysearch.models.registry import ModelConfig, resolve_model

    index_dir = os.path.join(workdir, "index")
    manifest_path = os.path.join(index_dir, "manifest.json")
    settings = {"n": n, "shards": shards, "factory": factory, "seed": seed}
    settings_path = os.path.join(workdir, "settings.json")
    if os.path.exists(manifest_path) and os.path.exists(settings_path):
        if json.load(open(settings_path)) == settings:
            print(f"reusing the index in {index_dir}", flush=True)
            return index_dir
    spec = resolve_model(ModelConfig())
    start = time.perf_counter()
    xb = synthetic_vectors(n, spec.dim, seed)
    emb_dir = os.path.join(index_dir, "embeddings")
    if os.path.exists(index_dir):
        import shutil

        shutil.rmtree(index_dir)
    write_embeddings(emb_dir, xb, spec, part_rows=max(1, n // (4 * shards)))
    del xb
    manifest = build_index(emb_dir, index_dir, IndexConfig(factory=factory, shards=shards))
    json.dump(settings, open(settings_path, "w"))
    print(f"built {manifest['factory']} over {manifest['n_vectors']} vectors in {shards} shards "
          f"in {time.perf_counter() - start:.1f} s", flush=True)
    return index_dir


def query_vectors(index_dir: str, n_queries: int, seed: int) -> np.ndarray:
    """Perturbed copies of indexed vectors (each query has a true near neighbour)."""
    from raysearch.formats.embeddings import embeddings_matrix, list_parts, read_part

    part = read_part(sorted(list_parts(os.path.join(index_dir, "embeddings"), "parts"))[0])
    xb = embeddings_matrix(part)
    rng = np.random.default_rng(seed)
    xq = xb[rng.integers(0, len(xb), n_queries)] + 0.1 * rng.standard_normal((n_queries, xb.shape[1])).astype(np.float32)
    return (xq / np.linalg.norm(xq, axis=1, keepdims=True)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# In-process baseline
# ---------------------------------------------------------------------------------------------


def run_in_process(searcher, xq: np.ndarray, k: int, clients: int, seconds: float, max_requests: int,
                   name: str) -> tuple[PhaseResult, np.ndarray]:
    """`clients` threads, each searching one query at a time (FAISS releases the GIL)."""
    result = PhaseResult(name, clients)
    top1 = np.full(len(xq), -1, np.int64)
    counter = iter(range(max_requests))
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def worker():
        while time.perf_counter() < deadline:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            q = i % len(xq)
            t0 = time.perf_counter()
            res = searcher.search(xq[q : q + 1], k)
            ms = (time.perf_counter() - t0) * 1000
            with lock:
                result.latencies_ms.append(ms)
                top1[q] = res.ids[0, 0]

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result.seconds = time.perf_counter() - start
    return result, top1


# ---------------------------------------------------------------------------------------------
# The service over HTTP
# ---------------------------------------------------------------------------------------------


async def _post_httpx(url: str, clients: int):
    """A `post(body) -> (status, doc)` over httpx (the client `raysearch query` uses)."""
    import httpx

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    client = httpx.AsyncClient(base_url=url, timeout=30, limits=limits)

    async def post(body: bytes):
        r = await client.post("/search", content=body, headers={"content-type": "application/json"})
        return r.status_code, (r.json() if r.status_code == 200 else None)

    return post, client.aclose


async def _post_aiohttp(url: str, clients: int):
    """A `post(body) -> (status, doc)` over aiohttp: about a quarter of httpx's CPU per request
    on this machine, which matters when the load generator shares the service's cores."""
    import aiohttp

    session = aiohttp.ClientSession(url, connector=aiohttp.TCPConnector(limit=clients),
                                    timeout=aiohttp.ClientTimeout(total=30))

    async def post(body: bytes):
        async with session.post("/search", data=body, headers={"content-type": "application/json"}) as r:
            return r.status, (await r.json() if r.status == 200 else None)

    return post, session.close


CLIENTS = {"aiohttp": _post_aiohttp, "httpx": _post_httpx}


async def _serve_load(urls: list[str], bodies: list[bytes], clients: int, seconds: float, max_requests: int,
                      expected_top1: dict[int, str], name: str, client_lib: str) -> PhaseResult:
    """`clients` users, user j sending to urls[j % len(urls)] (one URL per Ingress replica with
    direct ingress, as a load balancer in front of them would spread its connections); request i
    sends bodies[i % len(bodies)]."""
    result = PhaseResult(name, clients)
    xq = bodies
    counter = iter(range(max_requests))
    deadline = time.perf_counter() + seconds
    urls = urls[:clients]
    opened = [await CLIENTS[client_lib](url, -(-clients // len(urls))) for url in urls]

    async def user(post):
        while time.perf_counter() < deadline:
            i = next(counter, None)
            if i is None:
                return
            q = i % len(xq)
            t0 = time.perf_counter()
            try:
                _, doc = await post(bodies[q])
            except Exception:  # noqa: BLE001 - every failure counts as an error
                doc = None
            ms = (time.perf_counter() - t0) * 1000
            if doc is None or doc.get("partial"):
                result.errors += 1
                continue
            result.latencies_ms.append(ms)
            hits = doc["results"]
            if q in expected_top1 and (not hits or hits[0]["id"] != expected_top1[q]):
                result.mismatches += 1

    try:
        start = time.perf_counter()
        await asyncio.gather(*(user(opened[j % len(opened)][0]) for j in range(clients)))
        result.seconds = time.perf_counter() - start
    finally:
        for _, close in opened:
            await close()
    return result


def vector_bodies(xq: np.ndarray, k: int) -> list[bytes]:
    return [json.dumps({"vector": q.tolist(), "k": k}).encode() for q in xq]


def run_serve(urls: list[str], xq, k, clients, seconds, max_requests, expected_top1, name, client_lib) -> PhaseResult:
    bodies = vector_bodies(xq, k) if isinstance(xq, np.ndarray) else xq
    return asyncio.run(_serve_load(urls, bodies, clients, seconds, max_requests, expected_top1, name, client_lib))


# ---------------------------------------------------------------------------------------------
# --rerank local: image queries through the second stage
# ---------------------------------------------------------------------------------------------


def ensure_image_index(workdir: str, n_references: int, n_queries: int, seed: int) -> tuple[str, list[str]]:
    """A copy-detection set of the judge photographs indexed with --local sift in workdir (reused
    when one with these settings exists); returns the index and the query image paths."""
    from photos import photographs

    from raysearch.builder import build
    from raysearch.datasets.copyset import CopySetConfig, write_copy_detection_set
    from raysearch.embed import EmbedConfig
    from raysearch.index.build import IndexConfig

    folder = os.path.join(workdir, f"rerank-r{n_references}-q{n_queries}-s{seed}")
    index_dir = os.path.join(folder, "index")
    queries = os.path.join(folder, "set", "queries")
    if not os.path.exists(os.path.join(index_dir, "manifest.json")):
        start = time.perf_counter()
        cs = write_copy_detection_set(os.path.join(folder, "set"), CopySetConfig(
            n_references=n_references, n_queries=n_queries, n_background=0, positive_share=0.5, seed=seed,
        ), photos=photographs("judge"))
        build(cs.references, index_dir, EmbedConfig(progress=False, local="sift"), IndexConfig(factory="Flat"),
              overwrite=True)
        print(f"built the image index ({n_references} references, --local sift) in "
              f"{time.perf_counter() - start:.1f} s", flush=True)
    else:
        print(f"reusing the image index in {index_dir}", flush=True)
    return index_dir, sorted(os.path.join(queries, f) for f in os.listdir(queries))


def run_in_process_images(searcher, uris: list[str], k: int, rerank, seconds: float, max_requests: int,
                          name: str) -> tuple[PhaseResult, dict[int, str]]:
    """One query image at a time through `Searcher.search_images` (embedding, search and, with
    `rerank`, verification): what `raysearch search [--rerank local]` does per query."""
    result = PhaseResult(name, 1)
    top1: dict[int, str] = {}
    deadline = time.perf_counter() + seconds
    start = time.perf_counter()
    for i in range(max_requests):
        if time.perf_counter() >= deadline:
            break
        q = i % len(uris)
        t0 = time.perf_counter()
        res, problems = searcher.search_images([uris[q]], k, rerank=rerank)
        result.latencies_ms.append((time.perf_counter() - t0) * 1000)
        if problems[0] is None:
            top1[q] = searcher.lookup(res)[0][0, 0]
    result.seconds = time.perf_counter() - start
    return result, top1


def main_rerank(args) -> None:
    import base64

    from ray import serve

    from raysearch.rerank import RerankConfig
    from raysearch.runtime import cluster_cpus, ensure_ray
    from raysearch.search import Searcher
    from raysearch.serve.app import service_url, start_service
    from raysearch.serve.config import ServeConfig

    workdir = args.workdir or tempfile.mkdtemp(prefix="raysearch-serve-load-")
    os.makedirs(workdir, exist_ok=True)
    ensure_ray()
    index_dir, uris = ensure_image_index(workdir, args.references, args.image_queries, args.seed)
    searcher = Searcher(index_dir)
    rerank = RerankConfig(k=args.rerank_k)
    print(f"index: {searcher.store.ntotal} images, --local sift; {len(uris)} query images; k={args.k}, "
          f"top {args.rerank_k} verified; verifier replicas {args.verifier_replicas}", flush=True)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; Ray CPUs {cluster_cpus():g}; "
          f"HTTP client {args.client}", flush=True)
    bodies = []
    for u in uris:
        with open(u, "rb") as f:
            bodies.append(json.dumps({"image_b64": base64.b64encode(f.read()).decode(), "k": args.k}).encode())

    config = ServeConfig(index_dir, host="127.0.0.1", port=_free_port(), app_name="serve-load-rerank",
                         replicas=args.replicas, access_log=False, shard_timeout_s=30.0,
                         max_ongoing_requests=max(64, 4 * args.clients), shards_in_ingress=args.shards_in_ingress,
                         rerank="local", rerank_k=args.rerank_k, verifier_replicas=args.verifier_replicas)
    start = time.perf_counter()
    start_service(config)
    url = service_url(config)
    print(f"service up at {url} in {time.perf_counter() - start:.1f} s", flush=True)
    results = []
    try:
        run_in_process_images(searcher, uris, args.k, rerank, 3.0, 10, "warm-up")
        run_serve([url], bodies, args.k, 2, 5.0, 20, {}, "warm-up", args.client)
        glob, _ = run_in_process_images(searcher, uris, args.k, None, args.seconds, args.max_requests,
                                        "in-process, global only")
        results.append(glob)
        two, top1 = run_in_process_images(searcher, uris, args.k, rerank, args.seconds, args.max_requests,
                                          "in-process, --rerank")
        results.append(two)
        results.append(run_serve([url], bodies, args.k, 1, args.seconds, args.max_requests, top1,
                                 "serve --rerank, 1 client", args.client))
        results.append(run_serve([url], bodies, args.k, args.clients, args.seconds, args.max_requests, top1,
                                 f"serve --rerank, {args.clients} clients", args.client))
    finally:
        serve.shutdown()
    print()
    print(f"{'phase':28s} {'clients':>7s} {'requests':>9s} {'errors':>7s} {'top1 diff':>10s} "
          f"{'queries/s':>10s} {'p50 ms':>8s} {'p99 ms':>8s}")
    for r in results:
        print(r.row().replace(f"{r.name:24s}", f"{r.name:28s}", 1))
    errors = results[2].errors + results[3].errors
    print()
    print(f"verification's cost in process (p50): {two.pct(50) - glob.pct(50):.1f} ms a query")
    print(f"goal: errors = 0 under load -> {errors} ({'ok' if errors == 0 else 'MISSED'})")
    if args.workdir is None:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vectors", type=int, default=100_000)
    parser.add_argument("--shards", type=int, default=3)
    parser.add_argument("--factory", default="auto", help="FAISS factory for the synthetic index (auto: raysearch's choice).")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=30.0, help="Length of each phase.")
    parser.add_argument("--max-requests", type=int, default=200_000, help="Cap on requests per phase.")
    parser.add_argument("--queries", type=int, default=1000, help="Distinct query vectors (cycled).")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--shard-replicas", type=int, default=1)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--search-batch-wait-ms", type=float, default=0.0)
    parser.add_argument("--search-batch-size", type=int, default=64, help="Most queries in one FAISS call (1: no batching).")
    parser.add_argument("--shards-in-ingress", action="store_true",
                        help="Serve with `raysearch serve --shards-in-ingress` (no ShardSearcher deployments).")
    parser.add_argument("--direct-ingress", action="store_true",
                        help="Serve with `raysearch serve --direct-ingress` and query the ingress replica's own port.")
    parser.add_argument("--client", choices=sorted(CLIENTS), default="aiohttp",
                        help="HTTP client library of the load generator (httpx: what `raysearch query` uses).")
    parser.add_argument("--workdir", default=None, help="Keep (and reuse) the synthetic index here.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rerank", choices=["local"], default=None,
                        help="Image queries through the second stage (see above) instead of vector queries.")
    parser.add_argument("--rerank-k", type=int, default=20)
    parser.add_argument("--verifier-replicas", type=int, default=1)
    parser.add_argument("--references", type=int, default=300, help="With --rerank: images in the index.")
    parser.add_argument("--image-queries", type=int, default=100, help="With --rerank: query images.")
    args = parser.parse_args()
    if args.rerank:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # benchmarks/photos.py
        return main_rerank(args)

    import faiss
    from ray import serve

    from raysearch.runtime import cluster_cpus, ensure_ray
    from raysearch.search import Searcher
    from raysearch.serve.app import direct_urls, enable_direct_ingress_env, service_url, start_service
    from raysearch.serve.config import ServeConfig

    workdir = args.workdir or tempfile.mkdtemp(prefix="raysearch-serve-load-")
    os.makedirs(workdir, exist_ok=True)
    if args.direct_ingress:
        enable_direct_ingress_env()  # read by Serve's processes when Ray starts, just below
    ensure_ray()
    index_dir = ensure_index(workdir, args.vectors, args.shards, args.factory, args.seed)
    xq = query_vectors(index_dir, args.queries, args.seed + 1)

    searcher = Searcher(index_dir)
    store = searcher.store
    print(f"index: {store.ntotal} vectors, dim {store.dim}, {store.manifest['factory']}, "
          f"{len(store.shards)} shards, nprobe {store.nprobe}; k={args.k}; queries {len(xq)}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; Ray CPUs {cluster_cpus():g}; "
          f"FAISS threads in-process {faiss.omp_get_max_threads()}; HTTP client {args.client}", flush=True)

    config = ServeConfig(index_dir, host="127.0.0.1", port=_free_port(), app_name="serve-load",
                         replicas=args.replicas, shard_replicas=args.shard_replicas, access_log=False,
                         search_batch_wait_s=args.search_batch_wait_ms / 1000.0,
                         search_batch_size=args.search_batch_size, shard_timeout_s=10.0,
                         max_ongoing_requests=max(256, 4 * args.clients), shards_in_ingress=args.shards_in_ingress)
    start = time.perf_counter()
    start_service(config, direct_ingress=args.direct_ingress)
    urls = direct_urls(config) if args.direct_ingress else [service_url(config)]
    if not urls:
        sys.exit("no direct-ingress URL: this Ray's Serve routes every request through its proxy")
    print(f"service up at {', '.join(urls)} in {time.perf_counter() - start:.1f} s", flush=True)

    results = []
    try:
        # Warm both paths (page cache, connection set-up, first-call costs) before measuring.
        run_in_process(searcher, xq, args.k, 1, 2.0, 50, "warm-up")
        run_serve(urls, xq, args.k, 2 * len(urls), 3.0, 50 * len(urls), {}, "warm-up", args.client)

        seq_local, top1 = run_in_process(searcher, xq, args.k, 1, args.seconds, args.max_requests, "in-process sequential")
        seen = np.flatnonzero(top1 >= 0)
        image_ids, _ = searcher.lookup(searcher.search(xq[seen], 1))
        expected_top1 = {int(q): image_ids[j, 0] for j, q in enumerate(seen)}
        results.append(seq_local)
        results.append(run_serve(urls, xq, args.k, 1, args.seconds, args.max_requests, expected_top1, "serve sequential",
                                 args.client))
        conc_local, _ = run_in_process(searcher, xq, args.k, args.clients, args.seconds, args.max_requests,
                                       "in-process concurrent")
        results.append(conc_local)
        results.append(run_serve(urls, xq, args.k, args.clients, args.seconds, args.max_requests, expected_top1,
                                 "serve concurrent", args.client))
        batch = serve.get_deployment_handle("Ingress" if args.shards_in_ingress else "ShardSearcher-00000",
                                            app_name=config.app_name).batch_stats.remote().result()
    finally:
        serve.shutdown()

    print()
    print(f"{'phase':24s} {'clients':>7s} {'requests':>9s} {'errors':>7s} {'top1 diff':>10s} "
          f"{'queries/s':>10s} {'p50 ms':>8s} {'p99 ms':>8s}")
    for r in results:
        print(r.row())
    seq_local, seq_serve, conc_local, conc_serve = results
    ratio = conc_serve.qps / conc_local.qps if conc_local.qps else float("nan")
    overhead = seq_serve.pct(50) - seq_local.pct(50)
    errors = seq_serve.errors + conc_serve.errors
    print()
    if batch is not None:
        print(f"{'ingress' if args.shards_in_ingress else 'shard 0'} batches: {batch['batches']} (mean {batch['mean_batch']:.2f} queries, max {batch['max_batch']})")
    print(f"goal: errors = 0 under load                  -> {errors} ({'ok' if errors == 0 else 'MISSED'})")
    print(f"goal: serve / in-process queries/s >= 0.5    -> {ratio:.2f} ({'ok' if ratio >= 0.5 else 'MISSED'})")
    print(f"goal: p50 overhead (sequential) < 5 ms       -> {overhead:.2f} ms ({'ok' if overhead < 5 else 'MISSED'})")
    if args.workdir is None:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
