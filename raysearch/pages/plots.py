"""The figures of the report pages, drawn with matplotlib's Agg canvas and returned as PNG data:
URIs (no pyplot: no global figure state, safe in threads and in Ray workers, no display needed).

Each function takes plain numbers (numpy arrays, dicts) and returns a `data:image/png` URI.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter, ScalarFormatter

from raysearch.metrics import retrieval as M
from raysearch.pages.render import data_uri

SIZE = (5.8, 3.7)        # inches; at DPI 100 a 580x370 PNG: two side by side on a laptop screen
DPI = 100
MAX_CURVE_POINTS = 4000  # a million-point curve draws the same line from a few thousand points
TRUE_COLOUR = "#2a9d55"
FALSE_COLOUR = "#d1495b"
MARK_COLOUR = "#1f4e9c"


def _figure() -> tuple[Figure, object]:
    fig = Figure(figsize=SIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def figure_uri(fig: Figure) -> str:
    """A matplotlib figure as a PNG data: URI."""
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=DPI)
    return data_uri(out.getvalue(), "image/png")


def _thin(n: int) -> np.ndarray:
    """At most MAX_CURVE_POINTS indices spread over range(n), first and last kept."""
    if n <= MAX_CURVE_POINTS:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, MAX_CURVE_POINTS).round().astype(np.int64))


def precision_recall_plot(precisions: np.ndarray, recalls: np.ndarray, recall_at_p90: float | None,
                          threshold_at_p90: float | None) -> str:
    """The precision-recall curve of pooled predictions (ordered by increasing recall), with the
    operating point at precision 0.9 marked when precision reaches it."""
    fig, ax = _figure()
    precisions, recalls = np.asarray(precisions), np.asarray(recalls)
    if precisions.size:
        keep = _thin(precisions.size)
        ax.plot(recalls[keep], precisions[keep], color=MARK_COLOUR, lw=1.6, label="precision-recall")
    if recall_at_p90 is not None and threshold_at_p90 is not None:
        ax.axhline(0.9, color="grey", lw=0.8, ls=":")
        ax.plot([recall_at_p90], [0.9], "o", color=FALSE_COLOUR,
                label=f"P90: recall {recall_at_p90:.3f} at score {threshold_at_p90:.3g}")
    ax.set(xlim=(0, 1.01), ylim=(0, 1.02), xlabel="recall", ylabel="precision",
           title="Precision-recall (pooled predictions)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    return figure_uri(fig)


def cmc_plot(first_ranks: np.ndarray, depth: int, n_collection: int,
             fraction_ranks: Mapping[float, int] | None = None) -> str:
    """CMC(r), the share of queries whose first correct result ranks r or better, for r = 1..depth
    (log scale); `first_ranks` are 1-based (metrics.retrieval.NOT_FOUND where never found), the
    collection fractions are marked at their ranks."""
    fig, ax = _figure()
    ranks = np.asarray(first_ranks)
    depth = max(1, min(int(depth), int(n_collection)))
    r = np.arange(1, depth + 1)
    found = np.sort(ranks[ranks <= depth])
    values = np.searchsorted(found, r, side="right") / max(1, ranks.size)
    keep = _thin(r.size)
    ax.step(r[keep], values[keep], where="post", color=MARK_COLOUR, lw=1.6)
    for f, rank in (fraction_ranks or {}).items():
        if rank <= depth:
            ax.axvline(rank, color="grey", lw=0.8, ls=":")
            ax.annotate(f"{100 * f:g}%", (rank, 0.02), fontsize=8, color="grey", ha="left")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ScalarFormatter())   # ranks as 1, 10, 100, not powers of ten
    ax.set(ylim=(0, 1.02), xlim=(1, max(2, depth)), xlabel="rank r", ylabel="CMC(r)",
           title=f"Cumulative match characteristic ({ranks.size} queries, {n_collection} references)")
    ax.grid(alpha=0.3, which="both")
    return figure_uri(fig)


def score_histogram_plot(true_scores: np.ndarray, false_scores: np.ndarray, threshold: float | None,
                         title: str = "Scores of true and false matches") -> str:
    """Histograms of the scores of true and of false matches on shared bins, with the P90
    threshold (the score above which 90% of results are true) drawn when there is one."""
    fig, ax = _figure()
    t = np.asarray(true_scores, dtype=np.float64)
    f = np.asarray(false_scores, dtype=np.float64)
    t, f = t[np.isfinite(t)], f[np.isfinite(f)]
    both = np.concatenate([t, f])
    if both.size:
        lo, hi = float(both.min()), float(both.max())
        bins = np.linspace(lo, hi if hi > lo else lo + 1e-3, 41)
        ax.hist(f, bins=bins, color=FALSE_COLOUR, alpha=0.6, label=f"false matches ({f.size})")
        ax.hist(t, bins=bins, color=TRUE_COLOUR, alpha=0.6, label=f"true matches ({t.size})")
    if threshold is not None:
        ax.axvline(threshold, color=MARK_COLOUR, lw=1.4, ls="--", label=f"P90 threshold {threshold:.3g}")
    ax.set(xlabel="score", ylabel="results", title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    return figure_uri(fig)


def p90_threshold(is_match: np.ndarray, scores: np.ndarray) -> float | None:
    """The lowest score at which the results scoring at least that are 90% true matches (as ISC2021
    reads its threshold off the pooled precision-recall curve); None when precision never gets
    there or nothing matches."""
    is_match = np.asarray(is_match, dtype=bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    finite = np.isfinite(scores)
    is_match, scores = is_match[finite], scores[finite]
    if not is_match.any():
        return None
    p, r, t = M.precision_recall(is_match, scores, int(is_match.sum()))
    return M.operating_point(p, r, t, 0.9)[1]


def _nprobe_axis(ax, nprobes: Sequence[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(nprobes), [str(p) for p in nprobes], fontsize=8)
    ax.minorticks_off()
    ax.set_xlabel("nprobe / efSearch")


def ann_recall_plot(rows: Sequence[Mapping], ks: Sequence[int], tuned: int | None = None) -> str:
    """recall@k against nprobe, one line per k (rows of `AnnEvalReport.rows`); the index's tuned
    value marked."""
    fig, ax = _figure()
    swept = [r for r in rows if r.get("nprobe") is not None]
    nprobes = [int(r["nprobe"]) for r in swept]
    for k in ks:
        values = [r.get(f"recall@{k}") for r in swept]
        if any(v is not None for v in values):
            ax.plot(nprobes, [np.nan if v is None else v for v in values], "o-", ms=4, label=f"recall@{k}")
    if tuned is not None and tuned in nprobes:
        ax.axvline(tuned, color="grey", lw=0.8, ls=":", label=f"tuned nprobe {tuned}")
    if nprobes:
        _nprobe_axis(ax, nprobes)
    ax.set(ylim=(0, 1.02), ylabel="recall against exact search", title="Recall vs nprobe")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    return figure_uri(fig)


def ann_latency_plot(rows: Sequence[Mapping], tuned: int | None = None) -> str:
    """Milliseconds per query against nprobe: batched and one query at a time (median)."""
    fig, ax = _figure()
    swept = [r for r in rows if r.get("nprobe") is not None]
    nprobes = [int(r["nprobe"]) for r in swept]
    ax.plot(nprobes, [r["ms_per_query_batch"] for r in swept], "o-", ms=4, label="batched, ms per query")
    single = [r.get("ms_per_query_single_median") for r in swept]
    if any(v is not None for v in single):
        ax.plot(nprobes, [np.nan if v is None else v for v in single], "s-", ms=4, label="one at a time, median ms")
    if tuned is not None and tuned in nprobes:
        ax.axvline(tuned, color="grey", lw=0.8, ls=":", label=f"tuned nprobe {tuned}")
    if nprobes:
        _nprobe_axis(ax, nprobes)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.margins(y=0.3)   # room for the legend above and below the lines
    ax.set(ylabel="milliseconds per query", title="Latency vs nprobe")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="best")
    return figure_uri(fig)


def activation_recall_plot(passive: Mapping[str, float], activated: Mapping[str, float]) -> str:
    """recall@1 of edited copies per edit: passive (original) and activated images side by side."""
    fig = Figure(figsize=(max(6.4, 0.45 * len(passive) + 2), 4.0), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    edits = list(passive)
    x = np.arange(len(edits))
    ax.bar(x - 0.2, [passive[e] for e in edits], 0.4, color="#8a8f98", label="passive (original)")
    ax.bar(x + 0.2, [activated.get(e, np.nan) for e in edits], 0.4, color=MARK_COLOUR, label="activated")
    ax.set_xticks(x, edits, rotation=45, ha="right", fontsize=8)
    ax.set(ylim=(0, 1.05), ylabel="recall@1", title="Edited copies found at rank 1")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(loc="upper right")
    return figure_uri(fig)
