"""Synthetic embeddings for tests and benchmarks, and writing any vectors as an embeddings folder.

`ClusteredVectors` draws unit vectors from a mixture of Gaussian clusters whose variance decays over
the dimensions (like CNN descriptors, where a few hundred directions carry most of the energy) and is
then rotated at random, so no axis is special. Rows are generated in fixed chunks from per-chunk
seeds: any range of rows can be produced alone, and a million vectors never need to be in memory at
once to be written.

`write_embeddings` stores vectors in the layout `raysearch index` reads (see raysearch.embed), so
vectors computed elsewhere can be indexed too.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np

from raysearch import __version__, storage
from raysearch.embed import EMBEDDINGS_MANIFEST, write_parts
from raysearch.models.registry import IMAGENET_MEAN, IMAGENET_STD, ModelSpec

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


def vectors_model_spec(dim: int, name: str = "external-vectors") -> ModelSpec:
    """A ModelSpec for vectors that no registered model made (they can be searched by vector, not
    by image)."""
    return ModelSpec(
        name=name, dim=dim, input_size=224, resize="squash", mean=IMAGENET_MEAN, std=IMAGENET_STD,
        pooling=None, gem_p=3.0, weights=None, weights_sha256=None,
    )


def write_embeddings(
    embeddings_dir: str,
    batches: Iterator[np.ndarray] | list[np.ndarray] | np.ndarray,
    spec: ModelSpec | None = None,
    first_row: int = 0,
    part_rows: int = 4096,
    image_ids: list[str] | None = None,
) -> dict:
    """Write vectors as a complete embeddings folder (parts + embeddings.json); returns its manifest.

    batches: (n, dim) float32 arrays in row order. Rows are numbered from `first_row`; image_id
    defaults to "vec-ROW" and uri to "vector:ROW".
    """
    if isinstance(batches, np.ndarray):
        batches = [batches]
    start = time.perf_counter()
    row = first_row
    dim = None
    for x in batches:
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2:
            raise ValueError(f"vectors must be (n, dim), got shape {x.shape}")
        if dim is None:
            dim = x.shape[1]
        elif x.shape[1] != dim:
            raise ValueError(f"vectors change dimension from {dim} to {x.shape[1]}")
        for lo in range(0, x.shape[0], part_rows):
            chunk = x[lo:lo + part_rows]
            rows = np.arange(row, row + chunk.shape[0], dtype=np.int64)
            ids = image_ids[row - first_row: row - first_row + chunk.shape[0]] if image_ids else [f"vec-{r}" for r in rows]
            write_parts(
                {
                    "row": rows,
                    "image_id": np.asarray(ids, dtype=object),
                    "uri": np.asarray([f"vector:{r}" for r in rows], dtype=object),
                    "error": np.asarray([""] * chunk.shape[0], dtype=object),
                    "embedding": chunk,
                },
                embeddings_dir,
            )
            row += chunk.shape[0]
    if dim is None:
        raise ValueError("no vectors to write")
    spec = spec or vectors_model_spec(dim)
    if spec.dim != dim:
        raise ValueError(f"the model spec says {spec.dim}-d, the vectors are {dim}-d")
    n = row - first_row
    manifest = {
        "format": "raysearch-embeddings/1",
        "raysearch_version": __version__,
        "source": "vectors",
        "model": spec.to_dict(),
        "dim": dim,
        "n_images": n,
        "first_row": first_row,
        "end_row": row,
        "n_embedded": n,
        "n_errors": 0,
        "seconds": round(time.perf_counter() - start, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    storage.atomic_write_json(storage.join(embeddings_dir, EMBEDDINGS_MANIFEST), manifest)
    return manifest


__all__ = ["ClusteredVectors", "vectors_model_spec", "write_embeddings"]
