"""Searching a shard read into memory vs memory-mapped (FAISS IO_FLAG_MMAP), and raysearch's Searcher.

Data: N x D float32 random unit vectors written as an embeddings folder; one shard built by
raysearch (`--index`, fixed nprobe); 1000 queries (perturbed indexed vectors), k = 10. In the same
process: FAISS on the shard file read into memory (the baseline), FAISS on the file memory-mapped,
and `raysearch.search.Searcher` as it opens the index by default (in memory unless the shards take
more than a quarter of the available memory). Reported: best and median of --repeats searches of
all queries in one call, milliseconds.

Usage: python benchmarks/search_mmap.py [--n 300000 --d 256 --index IVF1024,Flat --nprobe 8]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=300_000)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--index", default="IVF1024,Flat")
    ap.add_argument("--nprobe", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()

    import faiss

    from raysearch.index.build import IndexConfig, build_index
    from raysearch.index.store import read_index_file
    from raysearch.formats.embeddings import write_embeddings
    from raysearch.search import Searcher

    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.n, args.d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    xq = x[:1000] + 0.01 * rng.standard_normal((1000, args.d)).astype(np.float32)
    with tempfile.TemporaryDirectory(prefix="rs-bench-mmap-") as work:
        write_embeddings(os.path.join(work, "emb"), x, part_rows=4096)
        manifest = build_index(os.path.join(work, "emb"), os.path.join(work, "index"),
                               IndexConfig(factory=args.index, nprobe=args.nprobe))
        shard = os.path.join(work, "index", manifest["shards"][0]["name"])
        in_memory = read_index_file(shard, mmap=False)
        mapped = read_index_file(shard, mmap=True)
        for index in (in_memory, mapped):
            faiss.extract_index_ivf(index).nprobe = args.nprobe
        searcher = Searcher(os.path.join(work, "index"))

        def timed(search) -> tuple[float, float]:
            search()  # warm the pages
            ms = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                search()
                ms.append(1000 * (time.perf_counter() - t))
            return min(ms), float(np.median(ms))

        rows = [
            ("FAISS, read into memory (baseline)", timed(lambda: in_memory.search(xq, 10))),
            ("FAISS, memory-mapped", timed(lambda: mapped.search(xq, 10))),
            (f"raysearch Searcher (mmap: {searcher.store.prefers_mmap()})", timed(lambda: searcher.search(xq, 10))),
        ]
        searcher = mapped = None  # unmap before the folder goes
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; FAISS threads {faiss.omp_get_max_threads()}; "
          f"{args.n} x {args.d} {args.index}, nprobe {args.nprobe}, 1000 queries per call, {args.repeats} repeats")
    base = rows[0][1][1]
    for name, (best, median) in rows:
        print(f"{name:44s} best {best:8.1f} ms  median {median:8.1f} ms  ratio {base / median:5.2f}x")


if __name__ == "__main__":
    main()
