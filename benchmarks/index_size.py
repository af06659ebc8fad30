"""Index size per FAISS factory string: bytes per vector measured on FAISS's own serialised
indexes, fixed costs (coarse centroids, codebooks, rotations) from their shapes, totals for the
collections of the scale plan (docs/scale.md), and the shards each needs under a memory budget.

Per-vector bytes are measured, not assumed: for each factory string an index is trained on
synthetic unit vectors and serialised twice, holding --n1 and --n2 vectors; the difference over
(n2 - n1) is what one more vector costs on disk (codes, the 8-byte id an inverted list keeps,
HNSW's links). A loaded index (`faiss.read_index`, or memory-mapped as raysearch's searchers
map shards) takes the same bytes in memory, plus, for 8-bit IVF-PQ, FAISS's precomputed
distance tables when it uses them (nlist x M x 256 x 4 bytes, counted separately below).

The baseline in the same run is the raw float32 matrix (4 * d bytes per vector): every row says
how many times smaller than it the index is.

Usage:
  python benchmarks/index_size.py [--dims 1280,512,2048] [--n1 2000 --n2 6000] [--budget 32G] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numpy as np

COLLECTIONS = {            # name -> number of vectors
    "DISC21 references": 1_000_000,
    "GLDv2 index": 761_757,
    "GLDv2 train": 4_132_914,
    "100M images": 100_000_000,
}


def nlist_for(n: int) -> int:
    """raysearch's rule: a power of two near 4 * sqrt(n)."""
    from raysearch.index.factory import nlist_for as rule

    return rule(n)


def factory_templates(d: int) -> list[tuple[str, str]]:
    """(label, factory template with {nlist}) for the strings raysearch's --index auto moves through
    as collections grow, plus the active-indexing protocol's and a graph index for comparison."""
    out = [("exact", "Flat"), ("IVF-Flat", "IVF{nlist},Flat"), ("IVF-SQ8", "IVF{nlist},SQ8")]
    for code_bytes in (64, 32, 16):
        if code_bytes <= d:
            d_out = min(4 * code_bytes, d - d % code_bytes)
            out.append((f"OPQ-IVF-PQ {code_bytes} B", f"OPQ{code_bytes}_{d_out},IVF{{nlist}},PQ{code_bytes}"))
    if 64 <= d:
        out.append(("OPQ-IVF-PQ 32 B fast-scan", f"OPQ64_{min(128, d)},IVF{{nlist}},PQ64x4fsr"))
    out.append(("active indexing (8 B)", "IVF{nlist},PQ8x8"))
    out.append(("HNSW32 graph", "HNSW32,Flat"))
    return out


def unit_vectors(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def serialized_bytes(index) -> int:
    import faiss

    return int(faiss.serialize_index(index).nbytes)


def measure_per_vector(template: str, d: int, n1: int, n2: int, seed: int = 0) -> float:
    """Bytes one more vector adds to the serialised index (measured).

    An OPQ prefix only rotates (and reduces) vectors before they are coded: it adds fixed bytes
    (its matrix), never per-vector ones, so the codes are measured on the rest of the string at
    the OPQ output dimension (training OPQ would take minutes and change nothing measured here).
    """
    import re

    import faiss

    opq = re.match(r"OPQ\d+_(\d+),", template)
    if opq:
        d, template = int(opq.group(1)), template[opq.end():]
    factory = template.format(nlist=16)
    index = faiss.index_factory(d, factory, faiss.METRIC_L2)
    xt = unit_vectors(max(n2, 4096), d, seed)
    if not index.is_trained:
        index.train(xt[:4096])
    index.add(unit_vectors(n1, d, seed + 1))
    a = serialized_bytes(index)
    index.add(unit_vectors(n2 - n1, d, seed + 2))
    b = serialized_bytes(index)
    return (b - a) / (n2 - n1)


def fixed_bytes(template: str, d: int, nlist: int) -> dict[str, int]:
    """Bytes that do not grow with the collection, from the shapes FAISS stores."""
    import re

    out: dict[str, int] = {}
    opq = re.match(r"OPQ(\d+)_(\d+)", template)
    d_ivf = d
    if opq:
        d_ivf = int(opq.group(2))
        out["opq_rotation"] = d * d_ivf * 4
    if "IVF" in template:
        out["coarse_centroids"] = nlist * d_ivf * 4
    pq = re.search(r",PQ(\d+)(x(\d+))?", template)
    if pq:
        m = int(pq.group(1))
        nbits = int(pq.group(3)) if pq.group(3) else 8
        out["pq_codebooks"] = (1 << nbits) * d_ivf * 4   # m sub-quantisers x 2^nbits x (d/m) floats
        if nbits == 8 and "IVF" in template:
            # FAISS's IVF-PQ precomputed tables (used when they fit its limit, 2 GiB by default).
            out["precomputed_tables (memory only)"] = nlist * m * 256 * 4
    return out


def fmt(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def parse_bytes(text: str) -> int:
    from raysearch.index.factory import parse_memory

    return parse_memory(text)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", default="1280,512,2048", help="Vector dimensions (default model 1280, SSCD 512, ResNet GeM 2048).")
    ap.add_argument("--n1", type=int, default=2000)
    ap.add_argument("--n2", type=int, default=6000)
    ap.add_argument("--budget", default="32G", help="Memory per shard replica, for the shard counts.")
    ap.add_argument("--json", default=None, help="Also write the figures as JSON here.")
    args = ap.parse_args(argv)
    import faiss

    budget = parse_bytes(args.budget)
    print(f"faiss {faiss.__version__}; per-vector bytes measured between {args.n1} and {args.n2} vectors; "
          f"shards for {fmt(budget)} per shard")
    doc: dict = {"faiss": faiss.__version__, "budget_bytes": budget, "dims": {}}
    for d in (int(x) for x in args.dims.split(",")):
        print(f"\n## d = {d}   (raw float32: {4 * d} B per vector)")
        header = f"{'index':28s} {'factory (nlist for 1M)':38s} {'B/vector':>9s} {'x smaller':>9s}"
        header += "".join(f" {name:>20s}" for name in COLLECTIONS)
        print(header)
        rows = []
        for label, template in factory_templates(d):
            start = time.perf_counter()
            per_vector = measure_per_vector(template, d, args.n1, args.n2)
            cells = {}
            for name, n in COLLECTIONS.items():
                nlist = nlist_for(n)
                fixed = fixed_bytes(template, d, nlist)
                disk = n * per_vector + sum(v for k, v in fixed.items() if "memory only" not in k)
                memory = disk + sum(v for k, v in fixed.items() if "memory only" in k)
                shards = max(1, math.ceil(memory / budget))
                cells[name] = {"n": n, "nlist": nlist, "factory": template.format(nlist=nlist),
                               "disk_bytes": int(disk), "memory_bytes": int(memory), "shards": shards, "fixed": fixed}
            row = {"label": label, "template": template, "bytes_per_vector": per_vector,
                   "times_smaller_than_float32": 4 * d / per_vector, "collections": cells,
                   "seconds": round(time.perf_counter() - start, 2)}
            rows.append(row)
            line = f"{label:28s} {template.format(nlist=nlist_for(1_000_000)):38s} {per_vector:9.1f} {4 * d / per_vector:9.1f}"
            line += "".join(" " + (fmt(c["memory_bytes"]) + " /" + str(c["shards"]) + "sh").rjust(20) for c in cells.values())
            print(line)
        doc["dims"][d] = rows
    print("\nCells: memory of the loaded index (disk + in-memory tables) / shards needed at the budget.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    return doc


if __name__ == "__main__":
    main(sys.argv[1:])
