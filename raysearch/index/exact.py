"""Exact nearest neighbours over a database seen block by block: the one brute-force routine behind
tuning's ground truth, ANN recall, score normalisation and exact-search baselines.

It is `faiss.contrib.exhaustive_search.knn_ground_truth` (a flat scan per block, merged in a result
heap; on GPUs when FAISS sees them), with the blocks' own ids instead of positions.
"""

from __future__ import annotations

from collections.abc import Iterable

import faiss
import numpy as np
from faiss.contrib.exhaustive_search import knn_ground_truth

METRICS = {"l2": faiss.METRIC_L2, "ip": faiss.METRIC_INNER_PRODUCT}


def exact_knn(xq: np.ndarray, blocks: Iterable[tuple[np.ndarray, np.ndarray]], k: int,
              metric: str = "l2") -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of queries xq (nq, d) float32 over the database blocks (xb (n_i, d) float32,
    ids (n_i,) int64), streamed: one block in memory at a time (plus 8 bytes per database id).

    metric: "l2" (squared distances, smallest first) or "ip" (inner products, largest first).
    Returns D (nq, k) float32 and I (nq, k) int64 ids; I is -1 (and D +-FLT_MAX) where the
    database holds fewer than k vectors.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {sorted(METRICS)}, got {metric!r}")
    xq = np.ascontiguousarray(xq, dtype=np.float32)
    ids: list[np.ndarray] = []

    def vectors():
        for xb, block_ids in blocks:
            if len(xb):
                ids.append(np.asarray(block_ids, np.int64))
                yield np.ascontiguousarray(xb, dtype=np.float32)

    D, positions = knn_ground_truth(xq, vectors(), k, METRICS[metric])
    all_ids = np.concatenate(ids) if ids else np.empty(0, np.int64)
    found = positions >= 0
    I = np.full(positions.shape, -1, np.int64)
    I[found] = all_ids[positions[found]]
    return D.astype(np.float32), I
