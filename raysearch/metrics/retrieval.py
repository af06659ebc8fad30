"""Retrieval metrics, computed exactly as the field's reference evaluation code computes them.

Copy detection (ISC2021 / DISC21, facebookresearch/isc2021 `isc/metrics.py`):
    predictions are (query, reference, score) triples pooled over all queries and sorted by
    decreasing score; among equal scores the wrong predictions come first (ties are broken
    pessimistically, so giving every prediction the same score cannot help). With n_gt the number of
    ground-truth pairs (queries without a match do not count), precision_i = TP_i / i and
    recall_i = TP_i / n_gt after the i-th prediction, and
        micro-AP = sum_i (recall_i - recall_{i-1}) * precision_i.
    Recall at precision 0.9 is the highest recall_i with precision_i >= 0.9, and its threshold the
    score of that prediction. Recall@1 / @10: the share of ground-truth pairs whose reference is
    predicted for the query with fewer than 1 / 10 of that query's predictions scoring at least as
    high (ties again count against).

Landmark retrieval (Revisited Oxford / Paris, filipradenovic/revisitop `compute_map`):
    per query, junk images are removed from the ranking (positions of the positives move up by the
    number of junk images ranked before them); AP is the trapezoidal area under the
    precision-recall curve; mP@k uses k' = min(k, position of the last positive). Easy: positives
    = easy, junk = junk + hard; Medium: positives = easy + hard, junk = junk; Hard: positives =
    hard, junk = junk + easy. Queries without positives are left out of the means.

Labelled retrieval (e.g. FID-300 shoeprints): cumulative match characteristic, the share of
queries whose first correct reference ranks at or above r, with ties counted pessimistically.

ANN quality: k-recall@k, the share of the exact top-k ids that the index returns in its top-k.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

NOT_FOUND = np.iinfo(np.int64).max


# ---------------------------------------------------------------------------------------------
# Copy detection (ISC2021)
# ---------------------------------------------------------------------------------------------


@dataclass
class Predictions:
    """Pooled predictions: query_ids, reference_ids (object arrays of str), scores (float64), all (n,)."""

    query_ids: np.ndarray
    reference_ids: np.ndarray
    scores: np.ndarray

    def __post_init__(self) -> None:
        self.query_ids = np.asarray(self.query_ids, dtype=object)
        self.reference_ids = np.asarray(self.reference_ids, dtype=object)
        self.scores = np.asarray(self.scores, dtype=np.float64)
        n = len(self.query_ids)
        if len(self.reference_ids) != n or len(self.scores) != n:
            raise ValueError("query_ids, reference_ids and scores must have the same length")
        if n and not np.isfinite(self.scores).all():
            raise ValueError("prediction scores must be finite numbers")

    def __len__(self) -> int:
        return len(self.query_ids)


@dataclass
class CopyDetectionMetrics:
    """ISC2021 copy detection metrics (see the module docstring); precisions, recalls and
    thresholds are the (n_predictions,) curve they were read from, in order of increasing recall."""

    average_precision: float          # micro-AP
    recall_at_p90: float | None       # None when precision never reaches 0.9
    threshold_at_p90: float | None
    recall_at_rank1: float
    recall_at_rank10: float
    n_ground_truth: int               # ground-truth pairs (queries with a match)
    n_predictions: int
    precisions: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    recalls: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    thresholds: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))

    def summary(self) -> dict:
        """The metrics as a JSON-ready dict, without the precision-recall curve."""
        return {
            "micro_ap": self.average_precision,
            "recall_at_p90": self.recall_at_p90,
            "threshold_at_p90": self.threshold_at_p90,
            "recall_at_1": self.recall_at_rank1,
            "recall_at_10": self.recall_at_rank10,
            "n_ground_truth": self.n_ground_truth,
            "n_predictions": self.n_predictions,
        }


def check_unique_pairs(predictions: Predictions) -> None:
    """Raise ValueError if a (query, reference) pair is predicted twice (as ISC2021 does)."""
    pairs = set(zip(predictions.query_ids.tolist(), predictions.reference_ids.tolist()))
    if len(pairs) != len(predictions):
        raise ValueError(f"predictions hold {len(predictions) - len(pairs)} repeated (query, reference) pairs")


def precision_recall(is_match: np.ndarray, scores: np.ndarray, n_positives: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precisions, recalls and thresholds over predictions sorted by decreasing score, wrong
    predictions first among equal scores. Each output is (n,), ordered by increasing recall."""
    is_match = np.asarray(is_match, dtype=bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if n_positives < 1:
        raise ValueError("the ground truth holds no matching pair: precision and recall are undefined")
    # lexsort: the last key is the primary one (score descending), then matches after non-matches.
    order = np.lexsort((is_match, -scores))
    hits = is_match[order]
    true_positives = np.cumsum(hits)
    n_results = np.arange(1, len(hits) + 1)
    return true_positives / n_results, true_positives / n_positives, scores[order]


def micro_average_precision(precisions: np.ndarray, recalls: np.ndarray) -> float:
    """sum_i (recall_i - recall_{i-1}) * precision_i with recall_0 = 0 (recalls non-decreasing)."""
    if len(recalls) and np.any(np.diff(recalls) < 0):
        raise ValueError("recalls must be non-decreasing")
    steps = np.diff(np.concatenate([[0.0], recalls]))
    return float((steps * precisions).sum())


def operating_point(precisions: np.ndarray, recalls: np.ndarray, thresholds: np.ndarray,
                    min_precision: float = 0.9) -> tuple[float | None, float | None]:
    """(recall, threshold) of the highest recall reached with precision >= min_precision;
    (None, None) if precision never gets there."""
    ok = precisions >= min_precision
    if not ok.any():
        return None, None
    best = int(np.argmax(np.where(ok, recalls, -np.inf)))
    return float(recalls[best]), float(thresholds[best])


def match_ranks(ground_truth: Sequence[tuple[str, str]], predictions: Predictions) -> np.ndarray:
    """0-based rank of each ground-truth reference among its query's predictions: the number of
    that query's predictions scoring at least as high, minus one (ties count against).
    NOT_FOUND where the reference is not predicted. Returns (n_gt,) int64."""
    score_of: dict[tuple[str, str], float] = {}
    by_query: dict[str, list[float]] = {}
    for q, r, s in zip(predictions.query_ids.tolist(), predictions.reference_ids.tolist(), predictions.scores.tolist()):
        score_of[(q, r)] = s
        by_query.setdefault(q, []).append(s)
    sorted_scores = {q: np.sort(np.asarray(v)) for q, v in by_query.items()}
    ranks = np.full(len(ground_truth), NOT_FOUND, dtype=np.int64)
    for i, (q, r) in enumerate(ground_truth):
        s = score_of.get((q, r))
        if s is None:
            continue
        asc = sorted_scores[q]
        ranks[i] = len(asc) - int(np.searchsorted(asc, s, side="left")) - 1
    return ranks


def copy_detection_metrics(ground_truth: Sequence[tuple[str, str]], predictions: Predictions) -> CopyDetectionMetrics:
    """ISC2021 metrics for pooled predictions against (query_id, reference_id) ground-truth pairs
    (only the pairs: queries without a match contribute through their predictions, all wrong)."""
    check_unique_pairs(predictions)
    gt = [(str(q), str(r)) for q, r in ground_truth]
    gt_set = set(gt)
    is_match = np.fromiter(
        ((q, r) in gt_set for q, r in zip(predictions.query_ids.tolist(), predictions.reference_ids.tolist())),
        dtype=bool, count=len(predictions),
    )
    p, r, t = precision_recall(is_match, predictions.scores, len(gt))
    ap = micro_average_precision(p, r)
    recall_p90, threshold_p90 = operating_point(p, r, t, 0.9)
    ranks = match_ranks(gt, predictions)
    return CopyDetectionMetrics(
        average_precision=ap,
        recall_at_p90=recall_p90,
        threshold_at_p90=threshold_p90,
        recall_at_rank1=float((ranks == 0).mean()) if len(ranks) else 0.0,
        recall_at_rank10=float((ranks < 10).mean()) if len(ranks) else 0.0,
        n_ground_truth=len(gt),
        n_predictions=len(predictions),
        precisions=p,
        recalls=r,
        thresholds=t,
    )


def keep_best_predictions(predictions: Predictions, max_predictions: int) -> Predictions:
    """The `max_predictions` highest-scoring predictions (ISC2021 capped submissions at 10 per
    query on average); order within the kept ones is preserved."""
    if max_predictions < 1:
        raise ValueError(f"--max-predictions must be >= 1, got {max_predictions}")
    if len(predictions) <= max_predictions:
        return predictions
    keep = np.sort(np.argsort(-predictions.scores, kind="stable")[:max_predictions])
    return Predictions(predictions.query_ids[keep], predictions.reference_ids[keep], predictions.scores[keep])


# ---------------------------------------------------------------------------------------------
# Landmark retrieval (Revisited Oxford / Paris)
# ---------------------------------------------------------------------------------------------

PROTOCOLS = ("easy", "medium", "hard")


def average_precision_trapezoid(positions: np.ndarray, n_positives: int) -> float:
    """revisitop's compute_ap: `positions` are the 0-based ranks of the retrieved positives
    (junk already removed, increasing); the area under the precision-recall curve by trapezoids,
    recall step 1 / n_positives."""
    ap = 0.0
    step = 1.0 / n_positives
    for j, rank in enumerate(np.asarray(positions).tolist()):
        precision_before = 1.0 if rank == 0 else j / rank
        precision_after = (j + 1) / (rank + 1)
        ap += (precision_before + precision_after) * step / 2.0
    return ap


def positions_without_junk(ranking: np.ndarray, positives: np.ndarray, junk: np.ndarray) -> np.ndarray:
    """0-based positions of the positives in `ranking` once the junk images are taken out."""
    ranking = np.asarray(ranking)
    is_pos = np.isin(ranking, positives)
    is_junk = np.isin(ranking, junk)
    junk_before = np.cumsum(is_junk) - is_junk  # junk strictly before each position (as revisitop)
    where = np.flatnonzero(is_pos)
    return (where - junk_before[where]).astype(np.int64)


@dataclass
class LandmarkMetrics:
    """mAP and mP@k per protocol (easy / medium / hard), and per-query APs (NaN where excluded)."""

    map: dict[str, float]
    mean_precision_at: dict[str, dict[int, float]]
    aps: dict[str, np.ndarray] = field(repr=False)
    n_queries: dict[str, int]

    def summary(self) -> dict:
        """Protocol -> {"map", "mp_at" (k -> mP@k), "n_queries"}, JSON-ready; without the per-query APs."""
        return {
            p: {"map": self.map[p], "mp_at": {str(k): v for k, v in self.mean_precision_at[p].items()},
                "n_queries": self.n_queries[p]}
            for p in self.map
        }


def mean_average_precision(
    rankings: Sequence[np.ndarray], positives: Sequence[np.ndarray], junk: Sequence[np.ndarray],
    kappas: Sequence[int] = (1, 5, 10),
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """revisitop's compute_map over per-query rankings (database indices, best first).

    A ranking may be truncated (the index returned fewer than all images): positives missing from it
    add nothing to the AP, as if ranked last with no credit; a query with no positive in its
    ranking gets AP 0 and P@k 0 (the reference code, given whole rankings, never meets that case).

    Returns (mAP, APs (nq,), mP@kappas (len(kappas),), P@kappas (nq, len(kappas))); queries without
    positives get NaN and are left out of the means.
    """
    nq = len(rankings)
    aps = np.full(nq, np.nan)
    prs = np.full((nq, len(kappas)), np.nan)
    for i in range(nq):
        pos_ids = np.asarray(positives[i])
        if pos_ids.size == 0:
            continue
        pos = positions_without_junk(rankings[i], pos_ids, np.asarray(junk[i]))
        aps[i] = average_precision_trapezoid(pos, len(pos_ids))
        if pos.size == 0:
            prs[i] = 0.0
            continue
        one_based = pos + 1
        for j, kappa in enumerate(kappas):
            k_eff = min(int(one_based.max()), int(kappa))
            prs[i, j] = (one_based <= k_eff).sum() / k_eff
    counted = ~np.isnan(aps)
    if not counted.any():
        return float("nan"), aps, np.full(len(kappas), np.nan), prs
    return float(aps[counted].mean()), aps, prs[counted].mean(axis=0), prs


def protocol_sets(gnd: dict, protocol: str) -> tuple[np.ndarray, np.ndarray]:
    """(positives, junk) of one query's ground truth under the easy / medium / hard protocol."""
    easy = np.asarray(gnd.get("easy", []), dtype=np.int64)
    hard = np.asarray(gnd.get("hard", []), dtype=np.int64)
    junk = np.asarray(gnd.get("junk", []), dtype=np.int64)
    if protocol == "easy":
        return easy, np.concatenate([junk, hard])
    if protocol == "medium":
        return np.concatenate([easy, hard]), junk
    if protocol == "hard":
        return hard, np.concatenate([junk, easy])
    raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")


def revisited_metrics(rankings: Sequence[np.ndarray], gnd: Sequence[dict], kappas: Sequence[int] = (1, 5, 10)) -> LandmarkMetrics:
    """Easy / Medium / Hard mAP and mP@kappas for rankings of database indices (revisitop)."""
    if len(rankings) != len(gnd):
        raise ValueError(f"{len(rankings)} rankings for {len(gnd)} queries")
    maps, mps, aps, counts = {}, {}, {}, {}
    for protocol in PROTOCOLS:
        sets = [protocol_sets(g, protocol) for g in gnd]
        m, ap, mp, _ = mean_average_precision(rankings, [s[0] for s in sets], [s[1] for s in sets], kappas)
        maps[protocol] = m
        mps[protocol] = {int(k): float(v) for k, v in zip(kappas, mp)}
        aps[protocol] = ap
        counts[protocol] = int((~np.isnan(ap)).sum())
    return LandmarkMetrics(maps, mps, aps, counts)


# ---------------------------------------------------------------------------------------------
# CMC (labelled retrieval)
# ---------------------------------------------------------------------------------------------

CMC_RANKS = (1, 5, 10, 20)
CMC_FRACTIONS = (0.01, 0.05, 0.10)


def first_match_ranks(result_ids: np.ndarray, result_scores: np.ndarray, correct: Sequence[set]) -> np.ndarray:
    """1-based rank of the first correct result per query, ties counted against: 1 + the number
    of wrong results scoring at least as high as the best-scoring correct one (other correct
    results never push it down). NOT_FOUND where no correct result was returned.

    result_ids: (nq, k) object array (None = no result); result_scores: (nq, k); correct: per
    query, the set of correct reference ids.
    """
    nq = len(correct)
    ranks = np.full(nq, NOT_FOUND, dtype=np.int64)
    for i in range(nq):
        ids = result_ids[i]
        scores = np.asarray(result_scores[i], dtype=np.float64)
        present = np.array([x is not None for x in ids], dtype=bool)
        hit = present & np.array([x in correct[i] for x in ids], dtype=bool)
        if not hit.any():
            continue
        best = scores[hit].max()
        ranks[i] = 1 + int((present & ~hit & (scores >= best)).sum())
    return ranks


def collection_rank(fraction: float, n_collection: int) -> int:
    """The rank that `fraction` of the collection covers: ceil(fraction * N), at least 1."""
    return max(1, int(math.ceil(fraction * n_collection - 1e-9)))


@dataclass
class CmcMetrics:
    """CMC: the share of queries whose first correct result ranks at or above each rank
    (at_rank) and each fraction of the collection (at_fraction, reached at fraction_ranks)."""

    at_rank: dict[int, float | None]             # None where the evaluation did not rank that deep
    at_fraction: dict[float, float | None]
    fraction_ranks: dict[float, int]
    n_queries: int
    n_collection: int
    depth: int                                    # results per query that were ranked

    def summary(self) -> dict:
        """The metrics as a JSON-ready dict; fractions are written as percentages ("5%")."""
        return {
            "cmc_at_rank": {str(k): v for k, v in self.at_rank.items()},
            "cmc_at_fraction": {f"{100 * f:g}%": v for f, v in self.at_fraction.items()},
            "fraction_ranks": {f"{100 * f:g}%": r for f, r in self.fraction_ranks.items()},
            "n_queries": self.n_queries,
            "n_collection": self.n_collection,
            "depth": self.depth,
        }


def cmc(ranks: np.ndarray, n_collection: int, depth: int, at_ranks: Sequence[int] = CMC_RANKS,
        fractions: Sequence[float] = CMC_FRACTIONS) -> CmcMetrics:
    """CMC values from 1-based first-match ranks. `depth`: how many results per query were
    ranked; points deeper than that cannot be known and are None (unless depth covers the whole
    collection)."""
    ranks = np.asarray(ranks)
    if ranks.size == 0:
        raise ValueError("no query has a labelled reference: CMC is undefined")
    full = depth >= n_collection

    def value(r: int) -> float | None:
        if r > depth and not full:
            return None
        return float((ranks <= r).mean())

    frac_ranks = {float(f): collection_rank(f, n_collection) for f in fractions}
    return CmcMetrics(
        at_rank={int(r): value(int(r)) for r in at_ranks},
        at_fraction={f: value(r) for f, r in frac_ranks.items()},
        fraction_ranks=frac_ranks,
        n_queries=int(ranks.size),
        n_collection=int(n_collection),
        depth=int(depth),
    )


# ---------------------------------------------------------------------------------------------
# ANN quality
# ---------------------------------------------------------------------------------------------


def knn_recall(ann_ids: np.ndarray, exact_ids: np.ndarray, k: int) -> float:
    """k-recall@k: mean over queries of |ANN top-k & exact top-k| / |exact top-k| (ids -1 ignored)."""
    if ann_ids.shape[0] != exact_ids.shape[0]:
        raise ValueError("ann_ids and exact_ids must hold the same queries")
    total = 0.0
    n = 0
    for a, e in zip(ann_ids[:, :k], exact_ids[:, :k]):
        e = e[e >= 0]
        if e.size == 0:
            continue
        total += np.intersect1d(a[a >= 0], e).size / e.size
        n += 1
    return total / n if n else float("nan")
