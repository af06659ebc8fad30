"""Filtered search (`where`) at 1%, 10% and 50% selectivity vs an exact search of the subset, with
the unfiltered search as the baseline in the same run.

Data: N x D seeded clustered unit vectors (raysearch.index.synthetic) written as an embeddings
folder, one IVF shard built by raysearch with a fixed nprobe, and a metadata column `bucket`
(uniform 0..99, attached from a Parquet list as `raysearch.build` does), so `bucket < 1`, `< 10`
and `< 50` select 1%, 10% and 50% of the images. Queries: indexed vectors moved to cosine ~0.85
(like edited copies). For each filter, `Searcher.search(xq, k, where=...)` (FAISS IDSelectorBitmap
in the IVF scan) is timed, all queries in one call (best of --repeats) and one query per call, and
its recall@k is measured against an exact (Flat) search of the filtered subset; the unfiltered
search is measured the same way against an exact search of everything.

Usage: nice -n 10 python benchmarks/filter_search.py [--n 100000 --d 128 --index IVF1024,Flat
    --nprobe 16 --queries 1000] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each row of `truth` (nq, k) found in the same row of `found` (nq, k)."""
    k = truth.shape[1]
    return float(np.mean([len(set(f.tolist()) & set(t.tolist())) / k for f, t in zip(found, truth)]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--index", default="IVF1024,Flat")
    ap.add_argument("--nprobe", type=int, default=16)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--single", type=int, default=200, help="queries timed one per call")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import faiss
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raysearch.formats.embeddings import write_embeddings
    from raysearch.index.build import IndexConfig, build_index
    from raysearch.index.fields import attach_fields
    from raysearch.index.synthetic import ClusteredVectors
    from raysearch.search import Searcher

    gen = ClusteredVectors(args.d, n_clusters=1000, seed=0)
    x = gen.rows(0, args.n)
    rng = np.random.default_rng(1)
    picked = rng.choice(args.n, args.queries, replace=False)
    noise = rng.standard_normal((args.queries, args.d)).astype(np.float32)
    noise -= (noise * x[picked]).sum(1, keepdims=True) * x[picked]        # orthogonal to the original
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    xq = (0.85 * x[picked] + np.sqrt(1 - 0.85 ** 2) * noise).astype(np.float32)
    bucket = rng.integers(0, 100, args.n)
    filters = {"none": None, "50%": "bucket < 50", "10%": "bucket < 10", "1%": "bucket < 1"}
    rows = []
    with tempfile.TemporaryDirectory(prefix="rs-bench-filter-") as work:
        emb, out = os.path.join(work, "emb"), os.path.join(work, "index")
        write_embeddings(emb, x, part_rows=8192)
        build_index(emb, out, IndexConfig(factory=args.index, nprobe=args.nprobe, train_on="cpu"))
        listing = os.path.join(work, "list.parquet")
        pq.write_table(pa.table({"path": [f"vector:{i}" for i in range(args.n)], "id": [f"vec-{i}" for i in range(args.n)],
                                 "bucket": bucket}), listing)
        attach_fields(out, listing)
        searcher = Searcher(out)
        for label, where in filters.items():
            subset = np.arange(args.n) if where is None else np.flatnonzero(eval_bucket(where, bucket))
            exact = faiss.IndexFlatL2(args.d)
            exact.add(x[subset])
            _, pos = exact.search(xq, args.k)
            truth = subset[pos]
            searcher.search(xq[:10], args.k, where=where)   # warm: the filter's ids are cached
            best = float("inf")
            for _ in range(args.repeats):
                start = time.perf_counter()
                res = searcher.search(xq, args.k, where=where)
                best = min(best, time.perf_counter() - start)
            start = time.perf_counter()
            for q in range(args.single):
                searcher.search(xq[q:q + 1], args.k, where=where)
            single = time.perf_counter() - start
            row = {
                "filter": label, "where": where, "selected": int(subset.size),
                "qps_batch": round(args.queries / best, 1), "qps_single": round(args.single / single, 1),
                "recall_at_k": round(recall_at_k(res.ids, truth), 4),
                "full_rows": float(np.mean(np.sum(res.ids >= 0, axis=1) == args.k)),
            }
            rows.append(row)
            print(f"{label:>5}  {where or '-':14s} {row['selected']:>7} selected  batch {row['qps_batch']:>9.1f} q/s  "
                  f"single {row['qps_single']:>8.1f} q/s  recall@{args.k} {row['recall_at_k']:.4f}  "
                  f"rows with k hits {row['full_rows']:.3f}", flush=True)
    doc = {"n": args.n, "d": args.d, "index": args.index, "nprobe": args.nprobe, "queries": args.queries,
           "k": args.k, "faiss": faiss.__version__, "threads": faiss.omp_get_max_threads(),
           "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "results": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)


def eval_bucket(where: str, bucket: np.ndarray) -> np.ndarray:
    """The subset a `bucket < N` filter selects, computed independently of raysearch's parser."""
    prefix = "bucket < "
    assert where.startswith(prefix), where
    return bucket < int(where[len(prefix):])


if __name__ == "__main__":
    main()
