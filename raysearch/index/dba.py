"""Database-side augmentation (DBA) of an embeddings folder, done once at build time.

Every database vector is replaced by the similarity-weighted mean of itself and its k nearest
neighbours in the collection (see `raysearch.index.expansion`); the index is then built over the augmented
vectors, and queries are searched unchanged. The original embeddings stay where they are; the
augmented ones go to a second folder with the same layout (parts, errors, embeddings.json), which
the index manifest names as its embeddings.

Cost: one k-NN search of every vector against the whole collection, plus one pass reading and
writing the parts. The neighbour search is exact (a flat scan) up to `EXACT_MAX_VECTORS` and an
IVF scan over 8-bit scalar-quantised codes above that; the vectors are gathered from a local
memory-mapped file (n * dim * 4 bytes of scratch disk, not RAM).
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from typing import Any

import numpy as np
import pyarrow as pa

from raysearch import storage
from raysearch.formats.embeddings import (
    EMBEDDINGS_MANIFEST,
    embedding_schema,
    embeddings_matrix,
    list_parts,
    load_embeddings_manifest,
    read_part,
)
from raysearch.index.expansion import DatabaseAugmentation, database_side_augmentation

log = logging.getLogger("raysearch")

EXACT_MAX_VECTORS = 100_000
DBA_EMBEDDINGS_SUBDIR = "embeddings-dba"


def _neighbour_index(xb: np.ndarray, seed: int):
    """An inner-product index over xb (n, d) for the k-NN graph: exact while that is cheap."""
    import faiss

    from raysearch.index.factory import nlist_for

    n, d = xb.shape
    if n <= EXACT_MAX_VECTORS:
        index = faiss.IndexFlatIP(d)
        index.add(xb)
        return index, "exact (flat inner product)"
    nlist = nlist_for(n)
    index = faiss.index_factory(d, f"IVF{nlist},SQ8", faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(seed)
    train = xb[np.sort(rng.choice(n, size=min(n, nlist * 64), replace=False))]
    faiss.extract_index_ivf(index).cp.seed = seed
    index.train(np.ascontiguousarray(train))
    for start in range(0, n, 65_536):
        index.add(np.ascontiguousarray(xb[start:start + 65_536]))
    nprobe = max(1, min(nlist, int(math.ceil(nlist / 16))))
    faiss.extract_index_ivf(index).nprobe = nprobe
    return index, f"IVF{nlist},SQ8 inner product, nprobe {nprobe}"


def augment_embeddings(
    embeddings_dir: str, out_dir: str, dba: DatabaseAugmentation, seed: int = 1234, batch_size: int = 4096
) -> dict[str, Any]:
    """Write the DBA-augmented copy of a complete embeddings folder to `out_dir`; returns the
    record stored in the index manifest. A complete earlier run with the same settings is reused."""
    emb = load_embeddings_manifest(embeddings_dir)
    record = {
        "method": "dba",
        **dba.to_dict(),
        "source_embeddings": os.path.basename(embeddings_dir.rstrip("/")),
    }
    done_uri = storage.join(out_dir, EMBEDDINGS_MANIFEST)
    if storage.exists(done_uri):
        previous = storage.read_json(done_uri)
        prev_record = previous.get("augmentation") or {}
        if {k: prev_record.get(k) for k in ("method", "k", "alpha")} == {k: record[k] for k in ("method", "k", "alpha")} \
                and previous.get("n_embedded") == emb["n_embedded"]:
            return prev_record
        storage.remove(out_dir, recursive=True)
    parts = list_parts(embeddings_dir, "parts")
    dim = int(emb["dim"])
    with tempfile.TemporaryDirectory(prefix="raysearch-dba-") as tmp:
        # Every vector in one local memory-mapped matrix: neighbours are gathered from it by position.
        sizes, rows = [], []
        total = int(emb["n_embedded"])
        xb = np.lib.format.open_memmap(os.path.join(tmp, "xb.npy"), mode="w+", dtype=np.float32, shape=(total, dim))
        pos = 0
        for uri in parts:
            tbl = read_part(uri, ["row", "embedding"])
            x = embeddings_matrix(tbl)
            xb[pos:pos + len(x)] = x
            rows.append(tbl.column("row").to_numpy())
            sizes.append(len(x))
            pos += len(x)
        if pos != total:
            raise ValueError(f"{embeddings_dir}: the parts hold {pos} vectors, embeddings.json says {total}")
        row_of = np.concatenate(rows) if rows else np.empty(0, np.int64)
        index, how = _neighbour_index(xb, seed)
        log.info("dba: k-NN graph over %d vectors with %s", total, how)
        record["neighbours"] = how

        starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        for p, uri in enumerate(parts):
            tbl = read_part(uri)
            lo, hi = int(starts[p]), int(starts[p + 1])
            out = np.empty((hi - lo, dim), np.float32)
            for b in range(lo, hi, batch_size):
                e = min(hi, b + batch_size)
                x = np.ascontiguousarray(xb[b:e])
                D, I = index.search(x, dba.k + 1)
                neighbours = xb[np.where(I >= 0, I, 0).ravel()].reshape(I.shape + (dim,))
                ids = np.where(I >= 0, row_of[np.where(I >= 0, I, 0)], -1)
                out[b - lo:e - lo] = database_side_augmentation(x, row_of[b:e], ids, neighbours, D, dba.k, dba.alpha)
            vectors = pa.FixedSizeListArray.from_arrays(pa.array(out.reshape(-1)), dim)
            new = pa.table(
                {"row": tbl.column("row"), "image_id": tbl.column("image_id"), "uri": tbl.column("uri"), "embedding": vectors},
                schema=embedding_schema(dim),
            )
            _write_part(storage.join(out_dir, "parts", os.path.basename(uri)), new)
    for uri in list_parts(embeddings_dir, "errors"):
        storage.atomic_write(storage.join(out_dir, "errors", os.path.basename(uri)), storage.read_bytes(uri))
    storage.atomic_write_json(done_uri, {**emb, "augmentation": record})
    return record


def _write_part(uri: str, tbl: pa.Table) -> None:
    import io

    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(tbl, buf, compression="zstd")
    storage.atomic_write(uri, buf.getvalue())
