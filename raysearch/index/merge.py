"""Merging shards into one index: inverted lists (or flat code arrays) are appended, not re-added,
so merging costs a copy of the codes, never another pass of quantisation."""

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
        dst_ivf.merge_from(src_ivf, 0)
        # Wrappers such as IndexPreTransform keep their own count.
        dst.ntotal = dst_ivf.ntotal
        return
    dst = faiss.downcast_index(dst)
    dst.merge_from(faiss.downcast_index(src), 0)
