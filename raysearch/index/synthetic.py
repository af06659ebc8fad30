"""Synthetic embeddings for tests and benchmarks.

`ClusteredVectors` draws unit vectors from a mixture of Gaussian clusters whose variance decays over
the dimensions (like CNN descriptors, where a few hundred directions carry most of the energy) and is
then rotated at random, so no axis is special. Rows are generated in fixed chunks from per-chunk
seeds: any range of rows can be produced alone, and a million vectors never need to be in memory at
once to be written.

`raysearch.formats.embeddings.write_embeddings` stores them (or vectors computed elsewhere) as an
embeddings folder that `raysearch index` reads.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

CHUNK_ROWS = 65_536


class ClusteredVectors:
    """Seeded unit vectors in `d` dimensions drawn around `n_clusters` centres.

    spread: the within-cluster standard deviation relative to the spread of the centres (1.0 makes
    neighbouring clusters overlap, which gives IVF indexes a realistic nprobe/recall trade-off).
    """

    def __init__(self, d: int, n_clusters: int = 1000, seed: int = 0, spread: float = 1.0):
        if d < 2:
            raise ValueError(f"d must be >= 2, got {d}")
        if n_clusters < 1:
            raise ValueError(f"n_clusters must be >= 1, got {n_clusters}")
        self.d, self.n_clusters, self.seed, self.spread = d, n_clusters, seed, spread
        rng = np.random.default_rng([seed, 0])
        self.scales = (1.0 / np.sqrt(np.arange(1, d + 1))).astype(np.float32)
        self.centres = rng.standard_normal((n_clusters, d)).astype(np.float32) * self.scales
        self.rotation = np.linalg.qr(rng.standard_normal((d, d)))[0].astype(np.float32)

    def _chunk(self, c: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, 1, c])
        labels = rng.integers(0, self.n_clusters, CHUNK_ROWS)
        noise = rng.standard_normal((CHUNK_ROWS, self.d), dtype=np.float32) * (self.spread * self.scales)
        x = (self.centres[labels] + noise) @ self.rotation
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x.astype(np.float32)

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Vectors of rows [start, stop): (stop - start, d) float32, L2-normalised."""
        out = []
        for c in range(start // CHUNK_ROWS, -(-stop // CHUNK_ROWS)):
            lo, hi = c * CHUNK_ROWS, (c + 1) * CHUNK_ROWS
            x = self._chunk(c)
            out.append(x[max(start, lo) - lo : min(stop, hi) - lo])
        return np.concatenate(out) if out else np.empty((0, self.d), np.float32)

    def batches(self, n: int, batch_rows: int = CHUNK_ROWS) -> Iterator[np.ndarray]:
        for lo in range(0, n, batch_rows):
            yield self.rows(lo, min(n, lo + batch_rows))


__all__ = ["ClusteredVectors"]
