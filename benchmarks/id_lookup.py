"""Mapping a query's hits to image ids and URIs: one shard's id map, as searchers hold it.

An id map of --rows rows (the columns raysearch writes: id, image_id, uri) is written as Parquet
and read back as a shard's map is (`pyarrow.parquet.read_table`, which returns it in several
chunks). Timed: `raysearch.index.store.IdMap.lookup` for --k random ids (one query's hits), with
  baseline   the map's string columns kept as the chunked arrays Parquet returned (the first IdMap)
  arrow      the columns combined into one Arrow array at load, looked up with `take`
  raysearch  IdMap as it is now (maps up to store.OBJECT_MAP_MAX_ROWS rows also hold their
             strings as numpy object arrays; bigger ones are the "arrow" row)
Median of --repeats timings of --n lookups each, all in this process; also the load time.

Usage: python benchmarks/id_lookup.py [--rows 1000000 --k 10]
"""

import argparse
import os
import platform
import sys
import tempfile
import time
import timeit

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def per_call_us(fn, n: int, repeats: int) -> float:
    """Median over `repeats` runs of the time of one call, from `n` calls per run (us)."""
    fn()
    return float(np.median(timeit.repeat(fn, number=n, repeat=repeats))) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    import pyarrow as pa
    import pyarrow.parquet as pq

    from raysearch.index import store

    ids = np.arange(args.rows, dtype=np.int64)
    path = os.path.join(tempfile.mkdtemp(prefix="rs-idmap-"), "shard-00000.ids.parquet")
    pq.write_table(pa.table({"id": ids, "image_id": [f"photos/{i:08d}" for i in ids],
                             "uri": [f"s3://bucket/photos/{i:08d}.jpg" for i in ids]}), path, compression="zstd")
    tbl = pq.read_table(path)
    start = time.perf_counter()
    now = store.IdMap(tbl)
    load_s = time.perf_counter() - start
    arrow = store.IdMap(tbl)
    arrow._objects = None
    before = store.IdMap(tbl)
    before._objects = None
    before.image_ids, before.uris = tbl.column("image_id"), tbl.column("uri")
    query = np.random.default_rng(0).integers(0, args.rows, (1, args.k))
    base = per_call_us(lambda: before.lookup(query), args.n, args.repeats)
    one = per_call_us(lambda: arrow.lookup(query), args.n, args.repeats)
    ours = per_call_us(lambda: now.lookup(query), args.n, args.repeats)
    assert before.lookup(query)[1].tolist() == now.lookup(query)[1].tolist() == arrow.lookup(query)[1].tolist()
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; pyarrow {pa.__version__}; {args.rows} rows "
          f"read back in {tbl.column('uri').num_chunks} chunks; {args.k} ids per lookup; "
          f"object arrays: {'yes' if now._objects is not None else 'no'} (up to {store.OBJECT_MAP_MAX_ROWS} rows)")
    print(f"chunked columns (first)    {base:9.1f} us per lookup")
    print(f"one Arrow array            {one:9.1f} us per lookup   ({base / one:.1f}x faster)")
    print(f"IdMap now                  {ours:9.1f} us per lookup   ({base / ours:.1f}x faster than chunked, "
          f"{one / ours:.1f}x than one Arrow array); load took {load_s:.2f} s")


if __name__ == "__main__":
    main()
