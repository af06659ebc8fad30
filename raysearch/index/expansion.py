"""Re-ranking by neighbourhood averaging: alpha query expansion (alpha-QE) and database-side
augmentation (DBA), as pure numpy functions.

Both replace a vector by a weighted mean of itself and its nearest neighbours in the index's own
space (after whitening, when the index whitens), weighting neighbour j by max(s_j, 0) ** alpha where
s_j is its similarity (Radenovic et al., "Fine-tuning CNN image retrieval with no human annotation",
TPAMI 2018):

    x' = normalise(x + sum_j max(s_j, 0) ** alpha * n_j)

alpha = 0 gives plain average expansion; large alpha keeps only near-duplicates. QE does this to the
query at search time (one extra search per query); DBA does it once to every database vector at build
time (one k-NN search over the whole collection), and then queries are left alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_NEIGHBOURS = 100


@dataclass(frozen=True)
class QueryExpansion:
    """alpha-QE settings: expand each query with its `k` best results weighted by similarity**alpha."""

    k: int
    alpha: float = 3.0

    def __post_init__(self) -> None:
        check_neighbourhood("--qe", self.k, self.alpha)

    def to_dict(self) -> dict:
        return {"k": int(self.k), "alpha": float(self.alpha)}

    @classmethod
    def from_dict(cls, d: dict | None) -> "QueryExpansion | None":
        return None if not d else cls(k=int(d["k"]), alpha=float(d.get("alpha", 3.0)))


@dataclass(frozen=True)
class DatabaseAugmentation:
    """DBA settings: replace each database vector by its weighted mean with its `k` nearest
    neighbours (itself excluded), weights similarity**alpha."""

    k: int
    alpha: float = 3.0

    def __post_init__(self) -> None:
        check_neighbourhood("--dba", self.k, self.alpha)

    def to_dict(self) -> dict:
        return {"k": int(self.k), "alpha": float(self.alpha)}


def check_neighbourhood(option: str, k: int, alpha: float) -> None:
    if not 1 <= int(k) <= MAX_NEIGHBOURS:
        raise ValueError(f"{option} must be between 1 and {MAX_NEIGHBOURS} neighbours, got {k}")
    if not np.isfinite(alpha) or alpha < 0:
        raise ValueError(f"{option}-alpha must be a finite number >= 0, got {alpha}")


def neighbour_weights(similarities: np.ndarray, alpha: float, valid: np.ndarray | None = None) -> np.ndarray:
    """Weights max(s, 0) ** alpha, (n, k) float32; zero where `valid` is False (missing results).

    Negative similarities are clipped first so that a fractional alpha stays defined and a dissimilar
    neighbour never pushes the vector away from its own content.
    """
    s = np.clip(np.nan_to_num(np.asarray(similarities, dtype=np.float64), nan=0.0), 0.0, None)
    w = np.power(s, alpha) if alpha != 0 else np.ones_like(s)
    if valid is not None:
        w = np.where(valid, w, 0.0)
    return w.astype(np.float32)


def expand_vectors(
    x: np.ndarray, neighbours: np.ndarray, similarities: np.ndarray, alpha: float,
    valid: np.ndarray | None = None,
) -> np.ndarray:
    """Weighted neighbourhood mean: normalise(x + sum_j w_j * neighbours_j).

    Parameters
    ----------
    x : (n, d) float32, the vectors to expand (queries or database vectors), L2-normalised.
    neighbours : (n, k, d) float32, each vector's neighbours in the same space.
    similarities : (n, k), their similarities to x (cosine / 1 - d^2/2 scores).
    alpha : weight exponent (0 = plain mean).
    valid : (n, k) bool, False for padding (fewer than k results); default all True.

    Returns
    -------
    (n, d) float32, L2-normalised.
    """
    x = np.asarray(x, dtype=np.float32)
    neighbours = np.asarray(neighbours, dtype=np.float32)
    if x.ndim != 2 or neighbours.ndim != 3 or neighbours.shape[0] != x.shape[0] or neighbours.shape[2] != x.shape[1]:
        raise ValueError(f"expected x (n, d) and neighbours (n, k, d), got {x.shape} and {neighbours.shape}")
    if similarities.shape != neighbours.shape[:2]:
        raise ValueError(f"similarities must have shape {neighbours.shape[:2]}, got {similarities.shape}")
    w = neighbour_weights(similarities, alpha, valid)
    out = x + np.einsum("nk,nkd->nd", w, neighbours)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    # A zero sum can only come from a zero input with no usable neighbour: keep it as it was.
    return np.where(norms > 0, out / np.maximum(norms, 1e-12), x).astype(np.float32)


def alpha_query_expansion(
    xq: np.ndarray, top_vectors: np.ndarray, top_scores: np.ndarray, alpha: float,
    valid: np.ndarray | None = None,
) -> np.ndarray:
    """alpha-QE: queries (n, d) and the vectors (n, k, d) / scores (n, k) of their k best results
    -> expanded queries (n, d), to be searched again. All in the index's space."""
    return expand_vectors(xq, top_vectors, top_scores, alpha, valid)


def database_side_augmentation(
    xb: np.ndarray, ids: np.ndarray, neighbour_ids: np.ndarray, neighbour_vectors: np.ndarray,
    neighbour_scores: np.ndarray, k: int, alpha: float,
) -> np.ndarray:
    """DBA for a block of database vectors.

    Parameters
    ----------
    xb : (n, d) float32, the database vectors of this block.
    ids : (n,) int64, their vector ids.
    neighbour_ids : (n, k+1) int64, ids of their nearest neighbours in the database (-1 = none),
        best first, normally starting with the vector itself.
    neighbour_vectors : (n, k+1, d) float32, the neighbours' vectors.
    neighbour_scores : (n, k+1), the neighbours' similarities.
    k : neighbours to use, the vector itself excluded (it is always counted once, weight 1).

    Returns
    -------
    (n, d) float32 augmented, L2-normalised vectors.
    """
    neighbour_ids = np.asarray(neighbour_ids)
    not_self = neighbour_ids != np.asarray(ids)[:, None]
    valid = (neighbour_ids >= 0) & not_self
    # Keep the first k valid neighbours per row (the self match may sit anywhere among exact ties).
    keep = valid & (np.cumsum(valid, axis=1) <= k)
    return expand_vectors(xb, neighbour_vectors, neighbour_scores, alpha, keep)
