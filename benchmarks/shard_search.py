"""Searching several shards in one process: one coarse quantisation per batch vs one per shard.

Shards built from one trained IVF index share its coarse quantiser. `raysearch.index.fanout.ShardGroup`
assigns a query batch to its lists once and lets each shard scan its own lists; the baseline, in the
same process on the same open shards, searches each shard on its own (`ShardGroup(share=False)`,
what raysearch did before). Both return the same ids and distances (checked here on every run).

Index: serve_load.py's synthetic index (seeded clustered unit vectors, 1280-d, the default model's
dimension), built on first use in --workdir. Reported per batch size and nprobe: microseconds per
query, median of --repeats passes over the queries, and the ratio.

Usage:
  python benchmarks/shard_search.py --workdir /tmp/raysearch-serve-load-ivf   # 100k vectors, 3 shards
  python benchmarks/shard_search.py --vectors 20000 --shards 4 --factory IVF256,Flat --workdir /tmp/x
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def per_query_us(search, xq: np.ndarray, batch: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(xq), batch):
        search(xq[i : i + batch])
    return (time.perf_counter() - start) * 1e6 / len(xq)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vectors", type=int, default=100_000)
    ap.add_argument("--shards", type=int, default=3)
    ap.add_argument("--factory", default="IVF1024,Flat")
    ap.add_argument("--workdir", required=True, help="Keep (and reuse) the synthetic index here.")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--batches", default="1,16,1000", help="Queries per search call.")
    ap.add_argument("--nprobes", default="1,8,32")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("-k", type=int, default=10)
    args = ap.parse_args()

    import faiss

    from raysearch.index.store import IndexStore
    from raysearch.index.fanout import ShardGroup
    from serve_load import ensure_index, query_vectors

    index_dir = ensure_index(args.workdir, args.vectors, args.shards, args.factory, 0)
    xq = query_vectors(index_dir, args.queries, 1)
    store = IndexStore(index_dir, verify=False)
    # Two copies of the shards, so that the baseline's indexes keep FAISS's default settings.
    shared = ShardGroup([store.load_shard(i) for i in range(len(store.shards))])
    alone = ShardGroup([store.load_shard(i) for i in range(len(store.shards))], share=False)
    indexes = alone.indexes
    if not shared.shared:
        sys.exit("these shards do not share a plain IVF quantiser: nothing to compare")
    print(f"index: {store.ntotal} vectors, dim {store.dim}, {store.manifest['factory']}, "
          f"{len(indexes)} shards; {len(xq)} queries, k={args.k}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
          f"FAISS threads {faiss.omp_get_max_threads()}")
    print()
    print(f"{'batch':>6s} {'nprobe':>7s} {'per shard us/q':>15s} {'shared us/q':>12s} {'ratio':>7s}")
    for nprobe in (int(v) for v in args.nprobes.split(",")):
        for a, b in zip(alone.search(xq[:64], args.k, nprobe), shared.search(xq[:64], args.k, nprobe)):
            assert np.array_equal(a[1], b[1]) and np.array_equal(a[0], b[0]), "results differ"
        for batch in (int(v) for v in args.batches.split(",")):
            times = {"alone": [], "shared": []}
            for _ in range(args.repeats):  # interleaved, so both see the same machine
                for name, group in (("alone", alone), ("shared", shared)):
                    times[name].append(per_query_us(lambda q: group.search(q, args.k, nprobe), xq, batch))
            t0, t1 = np.median(times["alone"]), np.median(times["shared"])
            print(f"{batch:6d} {nprobe:7d} {t0:15.1f} {t1:12.1f} {t0 / t1:6.2f}x", flush=True)


if __name__ == "__main__":
    main()
