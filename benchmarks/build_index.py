"""Index building at scale: raysearch's sharded build vs one FAISS process vs autofaiss.

Data: N x D float32 unit vectors from a seeded mixture of Gaussian clusters (raysearch's
ClusteredVectors: decaying variance over the dimensions, random rotation), written once as an
embeddings folder (Parquet parts, what `raysearch index` reads) and as .npy files (what autofaiss
reads). 1000 further vectors of the same distribution are the queries; their exact top-10 over the
collection is computed once, chunk by chunk.

Builds, each in its own subprocess, its peak memory sampled as the PSS of the whole process tree
(Ray's own processes included, shared pages counted once; Linux /proc):

  raysearch xS    build_index with S shards, same factory; its time includes starting Ray (one
                  shard on one machine builds in process, without Ray). --kmeans K1,K2 builds each
                  shard count once per coarse k-means (raysearch's --kmeans: auto, flat, two-level)
  faiss-1proc     one Python process: read the same Parquet parts, train on the same seeded sample
                  with FAISS's own index.train (the same quantiser as raysearch --kmeans flat), add
                  everything, write the index
  faiss+tuning    the same process going on to find the nprobe reaching --target-recall as raysearch
                  does (exact top-10 of the same held-out vectors, same search over nprobe)
  autofaiss       autofaiss.build_index on the .npy files with the same --max-index-memory, run with
                  the Python of its own virtualenv (it pins numpy < 2 and fails beside pyarrow >= 16)

Reported per build: factory, build seconds, peak memory, then recall@10 against the exact neighbours
and queries/s (1000 queries per search call, best of 3) at the nprobe each uses:
  raysearch       the nprobe it tuned itself (leave-one-out on indexed vectors, --target-recall)
  faiss-1proc     the nprobe faiss+tuning found on this index (a FAISS user who does not tune
                  would have to guess one)
  autofaiss       the search parameters autofaiss chose itself, and, on a second row, the smallest
                  nprobe reaching --target-recall on the queries (raysearch's tuner run on its index)

Setup of the autofaiss baseline (once, from the repository root; .venv-autofaiss is git-ignored):
  python -m venv .venv-autofaiss
  .venv-autofaiss/bin/pip install autofaiss 'pyarrow<16'

Usage:
  python benchmarks/build_index.py --n 1000000 --d 256 --shards 1,2,4 --max-index-memory 4G
  python benchmarks/build_index.py --n 50000 --d 256            # a quick check of the script
Options: --kmeans auto|flat|two-level[,...] (raysearch's coarse k-means; default auto), --repeats R (each raysearch and FAISS build R times, interleaved; medians), --index FACTORY (default auto: raysearch's choice), --cpus (default all), --workdir DIR
(keeps the generated data between runs), --no-autofaiss, --target-recall 0.95.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
AUTOFAISS_PYTHON = os.path.join(REPO, ".venv-autofaiss", "bin", "python")
N_QUERIES = 1000
K = 10


# ---------------------------------------------------------------------------------------------
# Peak memory of a process tree (Linux)
# ---------------------------------------------------------------------------------------------


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def tree_pss_bytes(root: int) -> int:
    kids = _children_map()
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo.extend(kids.get(pid, []))
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            pass
    return total


def run_measured(cmd: list[str], env: dict | None = None) -> tuple[dict, int]:
    """Run a subprocess that prints one JSON line last; return (that JSON, peak tree PSS bytes)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], tree_pss_bytes(proc.pid))
            done.wait(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode != 0:
        sys.stderr.write(err[-4000:])
        raise RuntimeError(f"{cmd[:4]} failed with exit code {proc.returncode}")
    return json.loads(out.strip().splitlines()[-1]), peak[0]


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def make_data(work: str, n: int, d: int, n_clusters: int, seed: int) -> dict:
    """Embeddings folder + .npy files + queries + exact top-K (cached in `work`)."""
    from raysearch.formats.embeddings import write_embeddings
    from raysearch.index.exact import exact_knn
    from raysearch.index.synthetic import ClusteredVectors

    meta_path = os.path.join(work, "data.json")
    meta = {"n": n, "d": d, "n_clusters": n_clusters, "seed": seed}
    if os.path.exists(meta_path) and json.load(open(meta_path)) == meta:
        return meta
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(os.path.join(work, "npy"))
    gen = ClusteredVectors(d, n_clusters, seed=seed)
    xq = gen.rows(n, n + N_QUERIES)
    start = time.perf_counter()
    blocks = []

    def batches():
        for i, lo in enumerate(range(0, n, 100_000)):
            x = gen.rows(lo, min(n, lo + 100_000))
            np.save(os.path.join(work, "npy", f"part-{i:05d}.npy"), x)
            blocks.append(os.path.join(work, "npy", f"part-{i:05d}.npy"))
            yield x

    write_embeddings(os.path.join(work, "embeddings"), batches(), part_rows=4096)
    starts = np.arange(0, n, 100_000)
    _, I = exact_knn(xq, ((np.load(path), np.arange(lo, min(n, lo + 100_000))) for path, lo in zip(blocks, starts)), K)
    np.save(os.path.join(work, "queries.npy"), xq)
    np.save(os.path.join(work, "truth.npy"), I)
    print(f"data: {n} x {d} written in {time.perf_counter() - start:.0f} s")
    json.dump(meta, open(meta_path, "w"))
    return meta


# ---------------------------------------------------------------------------------------------
# Workers (run in subprocesses)
# ---------------------------------------------------------------------------------------------


def worker_raysearch(args) -> dict:
    from raysearch.index.build import IndexConfig, build_index, runs_in_process
    from raysearch.runtime import ensure_ray

    config = IndexConfig(factory=args.index, max_memory=args.max_index_memory, shards=int(args.shards),
                         target_recall=args.target_recall, train_on="cpu", kmeans=args.kmeans)
    t0 = time.perf_counter()
    # What `raysearch index` does: Ray is started (here limited to --cpus) unless one shard on one
    # machine builds in process. Its start is part of the build's time.
    if not runs_in_process(config):
        ensure_ray(num_cpus=args.cpus)
    ray_start = time.perf_counter() - t0
    manifest = build_index(os.path.join(args.workdir, "embeddings"), args.out, config)
    return {
        "seconds": time.perf_counter() - t0, "ray_start": ray_start, "timings": manifest["timings"],
        "factory": manifest["factory"], "nprobe": manifest["search"].get("nprobe"),
        "train_size": manifest["train_size"], "kmeans": manifest["build"]["train"].get("kmeans"), "builders": manifest["build"].get("in_process") and "in process"
        or ("actors, vectors kept" if manifest["build"].get("vectors_kept_between_passes") else "tasks, read twice"),
    }


def worker_faiss(args) -> dict:
    import faiss

    from raysearch.formats.embeddings import list_parts
    from raysearch.index import factory as fac
    from raysearch.formats.embeddings import part_sizes
    from raysearch.index.build import choose_positions, make_index
    from raysearch.formats.embeddings import read_vectors
    from raysearch.index.train import train_index
    from raysearch.index.tune import drop_self, search_param, tune, tune_queries_count

    faiss.omp_set_num_threads(args.cpus)
    timings = {}
    t0 = time.perf_counter()
    parts = list_parts(os.path.join(args.workdir, "embeddings"))
    sizes = part_sizes(parts)
    n, d = sum(sizes), args.d
    xb = np.empty((n, d), np.float32)
    pos = 0
    for part, size in zip(parts, sizes):
        xb[pos:pos + size] = read_vectors(part, 0, size, d)[0]
        pos += size
    timings["read"] = time.perf_counter() - t0
    index = make_index(args.index, d, "l2")
    # The training sample and tuning queries raysearch draws (same seed, same positions): the
    # same quantiser.
    train_pos, query_pos = choose_positions(n, fac.training_size(index, n), tune_queries_count(n), 1234)
    t = time.perf_counter()
    train_index(index, xb[train_pos], seed=1234, train_on="cpu", kmeans="flat")
    timings["train"] = time.perf_counter() - t
    t = time.perf_counter()
    index.add_with_ids(xb, np.arange(n, dtype=np.int64)) if fac.find_ivf(index) is not None else index.add(xb)
    timings["add"] = time.perf_counter() - t
    t = time.perf_counter()
    faiss.write_index(index, args.out)
    timings["write"] = time.perf_counter() - t
    seconds = time.perf_counter() - t0
    # What a FAISS user does to learn the nprobe that reaches the target recall, the way raysearch
    # tunes: exact top-11 of the same held-out indexed vectors, then the same search over nprobe.
    t = time.perf_counter()
    xq = xb[query_pos]
    _, exact = faiss.knn(xq, xb, K + 1)
    param, values = search_param(index)

    def search_at(q, k, value):
        if value is not None:
            faiss.ParameterSpace().set_index_parameter(index, param, int(value))
        return index.search(q, k)[1]

    tuned = tune(search_at, xq, query_pos, drop_self(exact, query_pos, K), param, values, args.target_recall, K)
    timings["tune"] = time.perf_counter() - t
    return {"seconds": seconds, "seconds_tuned": time.perf_counter() - t0, "tuned_nprobe": tuned.value,
            "timings": timings, "factory": args.index}


_AUTOFAISS = """
import json, sys, time
from autofaiss import build_index
npy, out, infos, budget, cores = sys.argv[1:6]
t = time.perf_counter()
build_index(embeddings=npy, index_path=out, index_infos_path=infos, max_index_memory_usage=budget,
            current_memory_available="16G", metric_type="l2", nb_cores=int(cores), save_on_disk=True, verbose=40)
seconds = time.perf_counter() - t
print(json.dumps({"seconds": seconds, "infos": json.load(open(infos))}))
"""


# ---------------------------------------------------------------------------------------------
# Evaluation (in this process)
# ---------------------------------------------------------------------------------------------


def evaluate(search, xq: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(recall@10, queries/s best of 3) for search(xq) -> ids."""
    from raysearch.index.tune import recall_at_k

    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        ids = search(xq)
        best = min(best, time.perf_counter() - t)
    return recall_at_k(ids[:, :K], truth), len(xq) / best


def faiss_search(index, nprobe):
    import faiss

    def run(xq):
        if nprobe is not None:
            faiss.ParameterSpace().set_index_parameter(index, "nprobe", int(nprobe))
        return index.search(xq, K)[1]
    return run


def gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shards", default="1,2,4")
    ap.add_argument("--index", default="auto")
    ap.add_argument("--max-index-memory", default="4G")
    ap.add_argument("--target-recall", type=float, default=0.95)
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--no-autofaiss", action="store_true")
    ap.add_argument("--kmeans", default="auto", help="raysearch's coarse k-means, comma-separated to compare")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each raysearch and FAISS build (median reported)")
    ap.add_argument("--worker", choices=["raysearch", "faiss"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        result = worker_raysearch(args) if args.worker == "raysearch" else worker_faiss(args)
        print(json.dumps(result))
        return

    from raysearch.index import factory as fac

    keep = args.workdir is not None
    work = args.workdir or tempfile.mkdtemp(prefix="rs-bench-index-")
    data = os.path.join(work, f"data-{args.n}x{args.d}-s{args.seed}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, using {args.cpus}; python {platform.python_version()}")
    make_data(data, args.n, args.d, args.clusters, args.seed)
    xq, truth = np.load(os.path.join(data, "queries.npy")), np.load(os.path.join(data, "truth.npy"))
    factory = args.index
    if factory == "auto":
        choice = fac.choose_factory(args.n, args.d, args.max_index_memory)
        factory = choice.factory
        print(f"auto choice for {args.n} x {args.d} within {args.max_index_memory}: {factory} ({choice.reason})")
    common = [sys.executable, os.path.abspath(__file__), "--workdir", data, "--d", str(args.d), "--index", factory,
              "--max-index-memory", args.max_index_memory, "--target-recall", str(args.target_recall), "--cpus", str(args.cpus)]
    rows = []

    import faiss

    from raysearch.search import Searcher

    # Each build --repeats times, the builds interleaved (so slow phases of the machine hit all of
    # them alike); seconds are medians, peak memory the largest, quality from the last run.
    runs: dict[str, list] = {}
    shard_counts = [int(x) for x in args.shards.split(",")]
    kmeans_choices = args.kmeans.split(",")
    builds = [(s, km) for s in shard_counts for km in kmeans_choices]

    def build_name(s: int, km: str) -> str:
        return f"raysearch x{s}" + (f" {km}" if len(kmeans_choices) > 1 or km != "auto" else "")

    def build_out(s: int, km: str) -> str:
        return os.path.join(work, f"raysearch-x{s}-{km}")

    for rep in range(args.repeats):
        for s, km in builds:
            out, name = build_out(s, km), build_name(s, km)
            shutil.rmtree(out, ignore_errors=True)
            res, peak = run_measured(common + ["--worker", "raysearch", "--shards", str(s), "--kmeans", km, "--out", out])
            print(f"run {rep + 1}/{args.repeats} {name}: {res['seconds']:.1f} s ({res['builders']}; k-means {res['kmeans']}; "
                  + ", ".join(f"{k} {v:.1f}" for k, v in res["timings"].items()) + ")", flush=True)
            runs.setdefault(name, []).append((res, peak))
            if rep < args.repeats - 1:
                shutil.rmtree(out, ignore_errors=True)
        out = os.path.join(work, "faiss-1proc.index")
        res, peak = run_measured(common + ["--worker", "faiss", "--shards", "1", "--out", out])
        print(f"run {rep + 1}/{args.repeats} faiss-1proc: {res['seconds']:.1f} s, with tuning {res['seconds_tuned']:.1f} s", flush=True)
        runs.setdefault("faiss-1proc", []).append((res, peak))

    def median(name: str, key: str = "seconds") -> float:
        return float(np.median([r[key] for r, _ in runs[name]]))

    def peak_of(name: str) -> int:
        return max(p for _, p in runs[name])

    for s, km in builds:
        name, out = build_name(s, km), build_out(s, km)
        res = runs[name][-1][0]
        searcher = Searcher(out)
        recall, qps = evaluate(lambda q: searcher.search(q, K).ids, xq, truth)
        times = "/".join(f"{r['seconds']:.1f}" for r, _ in runs[name])
        rows.append((name, res["factory"], median(name), peak_of(name), res["nprobe"], recall, qps,
                     f"{res['builders']}; k-means {res['kmeans']}; runs {times} s; last: ray start {res['ray_start']:.1f} s, "
                     + ", ".join(f"{k} {v:.1f}" for k, v in res["timings"].items())))
        print(rows[-1])
        searcher = None  # unmap the shards before removing them
        shutil.rmtree(out, ignore_errors=True)

    res = runs["faiss-1proc"][-1][0]
    index = faiss.read_index(out := os.path.join(work, "faiss-1proc.index"))
    recall, qps = evaluate(faiss_search(index, res["tuned_nprobe"]), xq, truth)
    times = "/".join(f"{r['seconds']:.1f}" for r, _ in runs["faiss-1proc"])
    rows.append(("faiss-1proc", factory, median("faiss-1proc"), peak_of("faiss-1proc"), res["tuned_nprobe"], recall, qps,
                 f"runs {times} s; last: " + ", ".join(f"{k} {v:.1f}" for k, v in res["timings"].items() if k != "tune")))
    print(rows[-1])
    # The same index searched at the same nprobe: the same recall and queries/s.
    times = "/".join(f"{r['seconds_tuned']:.1f}" for r, _ in runs["faiss-1proc"])
    rows.append(("faiss+tuning", factory, median("faiss-1proc", "seconds_tuned"), peak_of("faiss-1proc"),
                 res["tuned_nprobe"], recall, qps,
                 f"the same runs going on to tune as raysearch does: runs {times} s; last tune {res['timings']['tune']:.1f}"))
    print(rows[-1])
    del index
    os.unlink(out)

    if not args.no_autofaiss:
        if not os.path.exists(AUTOFAISS_PYTHON):
            print(f"autofaiss skipped: {AUTOFAISS_PYTHON} not found (see the setup in this script's docstring)")
        else:
            out, infos = os.path.join(work, "autofaiss.index"), os.path.join(work, "autofaiss.json")
            res, peak = run_measured([AUTOFAISS_PYTHON, "-c", _AUTOFAISS, os.path.join(data, "npy"), out, infos,
                                      args.max_index_memory, str(args.cpus)])
            index = faiss.read_index(out)
            info = res["infos"]
            key = info.get("index_key", "?")
            # Its own search parameters (string such as "nprobe=64,efSearch=128,ht=2048").
            params = info.get("index_param", "")
            if params:
                try:
                    faiss.ParameterSpace().set_index_parameters(index, params)
                except RuntimeError as e:  # a parameter this FAISS version names differently
                    print(f"could not apply autofaiss parameters {params!r}: {e}")
            recall, qps = evaluate(lambda q: index.search(q, K)[1], xq, truth)
            rows.append(("autofaiss", key, res["seconds"], peak, params, recall, qps, "its own search parameters"))
            print(rows[-1])
            from raysearch.index.tune import search_param, tune

            param, values = search_param(index)
            if param == "nprobe":
                def search_at(q, k, value):
                    faiss.ParameterSpace().set_index_parameter(index, "nprobe", int(value))
                    return index.search(q, k)[1]

                # The queries are not in the index: no id to leave out (-2 matches none).
                t = tune(search_at, xq, np.full(len(xq), -2), truth, param, values, args.target_recall, K)
                recall, qps = evaluate(faiss_search(index, t.value), xq, truth)
                rows.append(("autofaiss", key, res["seconds"], peak, t.value, recall, qps,
                             f"nprobe tuned to reach {args.target_recall}"))
                print(rows[-1])
            del index
            os.unlink(out)

    print()
    print(f"{args.n} x {args.d} float32, clustered synthetic ({args.clusters} clusters), --max-index-memory {args.max_index_memory}, "
          f"target recall@10 {args.target_recall}, {args.cpus} CPUs")
    print(f"{'build':24s} {'factory':32s} {'seconds':>8s} {'ratio':>6s} {'peak mem':>10s} {'nprobe':>24s} {'recall@10':>9s} {'queries/s':>10s}  notes")
    base = next(seconds for name, _, seconds, *_ in rows if name == "faiss-1proc")
    for name, key, seconds, peak, nprobe, recall, qps, notes in rows:
        print(f"{name:24s} {key:32s} {seconds:8.1f} {base / seconds:5.2f}x {gib(peak):>10s} {str(nprobe):>24s} "
              f"{recall:9.3f} {qps:10.0f}  {notes}")
    if not keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
