"""Merging shards into one index: inverted lists (or flat code arrays) are appended, not re-added,
so merging costs a copy of the codes, never another pass of quantisation.

4-bit fast-scan indexes keep their codes interleaved in blocks of 32 vectors, which FAISS cannot
append to one another. Shards that are going to be merged are therefore built as plain IVF-PQ with
the same quantiser and 4-bit codebooks (`to_mergeable`), merged, and only then packed into the
fast-scan layout (`to_searchable`); the codes are the same, only their layout changes.
"""

from __future__ import annotations

import faiss


def merge_into(dst: faiss.Index, src: faiss.Index) -> None:
    """Move every vector of `src` into `dst` (both built from the same trained index)."""
    try:
        dst_ivf = faiss.extract_index_ivf(dst)
        src_ivf = faiss.extract_index_ivf(src)
    except RuntimeError:
        dst_ivf = src_ivf = None
    if dst_ivf is not None and src_ivf is not None:
        if isinstance(faiss.downcast_index(dst_ivf), faiss.IndexIVFFastScan):
            raise ValueError("fast-scan inverted lists cannot be merged; build the shards with to_mergeable()")
        dst_ivf.merge_from(src_ivf, 0)
        # Wrappers such as IndexPreTransform keep their own count.
        dst.ntotal = dst_ivf.ntotal
        return
    dst = faiss.downcast_index(dst)
    dst.merge_from(faiss.downcast_index(src), 0)


def _fastscan_ivf(index: faiss.Index) -> faiss.IndexIVFPQFastScan | None:
    try:
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    except RuntimeError:
        return None
    return ivf if isinstance(ivf, faiss.IndexIVFPQFastScan) else None


def _replace_inner(index: faiss.Index, inner: faiss.Index) -> faiss.Index:
    """Put `inner` in place of the IVF index inside `index`'s pre-transform (or return `inner`
    when there is none). The pre-transform takes ownership of `inner`; the old one is freed."""
    pre = faiss.downcast_index(index)
    if not isinstance(pre, faiss.IndexPreTransform):
        return inner
    old = pre.index
    pre.index = inner
    inner.this.disown()
    if pre.own_fields:
        old.thisown = True  # Python now owns the replaced index and frees it
    pre.own_fields = True
    pre.ntotal = inner.ntotal
    return index  # the caller's (owning) handle, not the downcast view


def to_mergeable(index: faiss.Index) -> faiss.Index:
    """A fast-scan IVF-PQ index (trained, empty) as a plain IVF-PQ with the same quantiser,
    codebooks and residual setting; any other index is returned as it is."""
    fs = _fastscan_ivf(index)
    if fs is None:
        return index
    if fs.ntotal:
        raise ValueError("only an empty fast-scan index can be turned into a mergeable one")
    quantizer = faiss.clone_index(fs.quantizer)
    plain = faiss.IndexIVFPQ(quantizer, fs.d, fs.nlist, fs.pq.M, fs.pq.nbits, fs.metric_type)
    quantizer.this.disown()
    plain.own_fields = True
    plain.pq = fs.pq
    plain.by_residual = fs.by_residual
    plain.is_trained = fs.is_trained
    if plain.by_residual and plain.is_trained:
        plain.precompute_table()
    return _replace_inner(index, plain)


def is_fastscan(index: faiss.Index) -> bool:
    return _fastscan_ivf(index) is not None


def to_searchable(index: faiss.Index) -> faiss.Index:
    """Pack a plain 4-bit IVF-PQ built by `to_mergeable` into the fast-scan layout (call it only
    for indexes whose trained form is fast-scan). Other indexes are returned as they are."""
    try:
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    except RuntimeError:
        return index
    if not isinstance(ivf, faiss.IndexIVFPQ) or ivf.pq.nbits != 4:
        return index
    fast = faiss.IndexIVFPQFastScan(ivf)
    # The packed index points at the plain index's quantiser: give it its own copy.
    quantizer = faiss.clone_index(ivf.quantizer)
    quantizer.this.disown()
    fast.quantizer = quantizer
    fast.own_fields = True
    return _replace_inner(index, fast)
